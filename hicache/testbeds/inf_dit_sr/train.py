"""The Inf-DiT SR testbed: the same architecture at a CPU-sized config, trained on x4 pairs made on the machine
(nothing is downloaded), so the SR experiments run end to end on CPU.

Data (`sr_data`, `DataConfig.source`): the FLUX testbed's procedural shape scenes, crops of the scikit-image
photos, or both; the held-out pairs are images never trained on, of the same source. Training is EDM's
(Karras et al. 2022) with the official Inf-DiT settings by default: log-normal sigma (P_mean -1.0, P_std 1.4),
EDM loss weighting, sigma_data 0.5 (the Hydra config moves the sigma range, weights each image by its bicubic
error, exports EMA weights and starts from `blend_init_`; see TrainConfig). The CLIP tower is replaced by a
frozen, randomly initialised one-layer OpenCLIP ViT (pretrained CLIP weights cannot be fetched here); the
pipeline path is unchanged.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hicache.models.inf_dit.image_encoder import encode_lr_image
from hicache.models.inf_dit.pipeline import InfDiTPipeline, bicubic_resize, edm_preconditioning, rho_spaced
from .data import TRAIN_PHOTOS, check_source, downscale, heldout_description, heldout_pairs, training_images
from hicache.models.inf_dit.transformer import InfDiTTransformer2DModel

logger = logging.getLogger(__name__)


@dataclass
class SRTestbedConfig:
    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    patch_size: int = 4
    image_block_size: int = 32
    image_size: int = 64
    vector_dim: int = 16
    encoder_width: int = 32
    hr_size: int = 64

    def transformer_kwargs(self) -> dict:
        return dict(num_layers=self.num_layers, hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
                    patch_size=self.patch_size, image_block_size=self.image_block_size, image_size=self.image_size,
                    vector_dim=self.vector_dim, sr_scale=4)


def build_testbed(cfg: SRTestbedConfig, seed: int = 0) -> InfDiTPipeline:
    """A freshly initialised testbed pipeline (DiT-style init: zero adaLN and vector MLP output)."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(seed)
    transformer = InfDiTTransformer2DModel(**cfg.transformer_kwargs())
    with torch.no_grad():
        for module in [*(b.adaln_modulation for b in transformer.transformer_blocks), transformer.adaln_out,
                       transformer.vector_embedding.linear_2]:
            module.weight.zero_()
            module.bias.zero_()
        cross = transformer.transformer_blocks[0].cross_attn
        torch.nn.init.normal_(cross.query_pos, std=0.02)
        torch.nn.init.normal_(cross.key_pos, std=0.02)
    encoder = VisionTransformer(image_size=224, patch_size=32, width=cfg.encoder_width, layers=1, heads=2,
                                mlp_ratio=2.0, output_dim=cfg.vector_dim).eval()
    encoder.requires_grad_(False)
    pipe = InfDiTPipeline(transformer=transformer, image_encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def blend_targets(sigma: torch.Tensor, bicubic_mse: float, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (on c_in x, on c_in up) of the network output F for which EDM's denoiser D = c_skip x + c_out F
    is the per-sigma Wiener blend w x + (1 - w) up, w = e^2 / (e^2 + sigma^2), of the noisy image x and the
    bicubic upsample up (e^2 its mean squared error): the best denoiser that only mixes its two inputs."""
    c_skip, c_out, c_in, _ = edm_preconditioning(sigma, sigma_data)
    w = bicubic_mse / (bicubic_mse + sigma**2)
    return (w - c_skip) / (c_in * c_out), (1 - w) / (c_in * c_out)


@torch.no_grad()
def blend_init_(transformer: InfDiTTransformer2DModel, bicubic_mse: float, anchor: float = 8.0, seed: int = 0,
                sigma_range: tuple[float, float] = (0.002, 80.0), ridge: float = 1e-5) -> dict:
    """Initialise the testbed so that its denoiser starts as the Wiener blend of `blend_targets` (a training-recipe
    choice; the architecture and its call are unchanged). From a random start the tiny model took thousands of
    steps to learn to carry the LR channel through its affine-free LayerNorms with the sigma-dependent gain EDM's
    preconditioning asks for; this start carries it from step 0, and training only has to improve on the blend.

    - the patch embedding writes the noisy and the LR pixels of a token into two disjoint channel groups, through
      orthonormal maps orthogonal to the all-ones vector (so the LayerNorms subtract nothing), plus a constant
      +-``anchor`` pattern in the remaining channels (so the LayerNorms divide by an almost constant norm and are
      nearly linear in the pixels);
    - every residual branch (self-attention, LR cross-attention, MLP) starts at zero output, like DiT's zero gates;
    - the output projection reads the two groups back, and the final adaLN scale of each group is a ridge fit, over
      log-spaced sigma, of the blend coefficient from the noise-level embedding (whose MLP starts as hinges).
    Returns the fit's worst relative error of the two coefficients over ``sigma_range``.
    """
    cfg = transformer.config
    p, hidden = cfg.patch_size, cfg.hidden_size
    pixels = p * p * cfg.out_channels
    group = pixels + 2
    n_anchor = hidden - 2 * group
    if n_anchor < 2 or n_anchor % 2:
        raise ValueError(f"blend init needs hidden_size >= 2 * ({pixels} + 2) + 2 with an even remainder, got {hidden}")
    generator = torch.Generator().manual_seed(seed)

    def basis() -> torch.Tensor:  # (group, pixels): orthonormal columns orthogonal to ones(group)
        q, _ = torch.linalg.qr(torch.cat([torch.ones(group, 1), torch.randn(group, pixels, generator=generator)], 1))
        return q[:, 1 : pixels + 1]

    q_noisy, q_lr = basis(), basis()
    noisy_ch, lr_ch = torch.arange(group), torch.arange(group, 2 * group)
    # Output pixel o = (row * p + col) * C + c (the unpatchify order); the conv input is (channel, row, col).
    o = torch.arange(pixels)
    c, row, col = o % cfg.out_channels, (o // cfg.out_channels) // p, (o // cfg.out_channels) % p
    noisy_in, lr_in = (c * p + row) * p + col, ((c + cfg.out_channels) * p + row) * p + col
    weight = torch.zeros(hidden, cfg.in_channels * p * p)
    weight[noisy_ch[:, None], noisy_in[None]] = q_noisy
    weight[lr_ch[:, None], lr_in[None]] = q_lr
    transformer.patch_embed.weight.copy_(weight.view_as(transformer.patch_embed.weight))
    bias = torch.zeros(hidden)
    bias[2 * group :] = anchor * torch.tensor([1.0, -1.0]).repeat(n_anchor // 2)
    transformer.patch_embed.bias.copy_(bias)

    for block in transformer.transformer_blocks:
        for branch in (block.attn.to_out, block.ff.proj_out, *([block.cross_attn.to_out] if block.cross_attn else [])):
            branch.weight.zero_()
            branch.bias.zero_()

    norm = anchor * (n_anchor / hidden) ** 0.5  # the token's standard deviation, pixels neglected
    proj = torch.zeros(pixels, hidden)
    proj[:, noisy_ch] = norm * q_noisy.T
    proj[:, lr_ch] = norm * q_lr.T
    transformer.proj_out.weight.copy_(proj)
    transformer.proj_out.bias.zero_()

    # The official time embedding's Fourier features are all smooth in c_noise (its fastest is sin(c_noise)), too
    # smooth for a ridge fit of coefficients spanning 0.3..80; start its MLP as hinges of sin(c_noise) at knots
    # spread over the sigma range instead, so the embedding is a piecewise-linear basis of the noise level.
    knots = torch.linspace(0.25 * math.log(sigma_range[0]), 0.25 * math.log(sigma_range[1]), hidden)
    slope = 8.0 / knots.cos().clamp_min(0.05) / (knots[1] - knots[0]) / hidden
    first = torch.zeros(hidden, cfg.time_embed_channels)
    first[:, cfg.time_embed_channels // 2] = slope  # the sin(c_noise) channel (frequency 1)
    transformer.time_embedding.linear_1.weight.copy_(first)
    transformer.time_embedding.linear_1.bias.copy_(-slope * knots.sin())
    transformer.time_embedding.linear_2.weight.copy_(torch.eye(hidden))
    transformer.time_embedding.linear_2.bias.zero_()

    sigma = torch.logspace(math.log10(sigma_range[0]), math.log10(sigma_range[1]), 512)
    vector = transformer.vector_embedding(torch.zeros(1, cfg.vector_dim)).expand(len(sigma), -1)
    features = F.silu(F.silu(transformer.time_embedding(0.25 * sigma.log()) + vector))
    design = torch.cat([features, torch.ones(len(sigma), 1)], 1).double()
    coef_noisy, coef_lr = blend_targets(sigma.double(), bicubic_mse)
    targets = torch.stack([coef_noisy - 1, coef_lr - 1], 1)
    scale = (targets + 1).abs().clamp_min(1e-2)  # fit each coefficient to a relative precision
    solution = torch.empty(design.shape[1], 2, dtype=torch.float64)
    for k in range(2):
        rows = design / scale[:, k : k + 1]
        gram = rows.T @ rows + ridge * len(sigma) * torch.eye(design.shape[1], dtype=torch.float64)
        solution[:, k] = torch.linalg.solve(gram, rows.T @ (targets[:, k] / scale[:, k]))
    fit = design @ solution
    error = ((fit - targets).abs() / scale).max(0).values
    ada_weight, ada_bias = torch.zeros(2 * hidden, hidden), torch.zeros(2 * hidden)
    for ch, k in ((noisy_ch, 0), (lr_ch, 1)):
        ada_weight[hidden + ch] = solution[:-1, k].float()
        ada_bias[hidden + ch] = solution[-1, k].float()
    transformer.adaln_out.weight.copy_(ada_weight)
    transformer.adaln_out.bias.copy_(ada_bias)
    return {"fit_rel_error_noisy": float(error[0]), "fit_rel_error_lr": float(error[1]),
            "adaln_out_weight_max": float(solution[:-1].abs().max())}


def training_sigmas(batch: int, generator: torch.Generator, p_mean: float = -1.0, p_std: float = 1.4,
                    p_schedule: float = 0.0) -> torch.Tensor:
    """EDM's log-normal training noise levels; a fraction ``p_schedule`` of them is drawn instead from the density
    of the sampler's own rho-spaced schedule (sigma_max 40 down to sigma_min 0.002, continuous in the ramp).

    A log-normal centred on the mid levels almost never draws the top ones (sigma > 8 is 2 % of draws at
    P_mean 0, P_std 1), yet 6 of the 20 Heun steps start there; left untrained, the shipped testbed's denoiser at
    sigma 40 drifted from its blend start (28.8 dB, the bicubic upsample) to 22.4 dB on the held-out scenes,
    and the sampler started from that."""
    sigma = (torch.randn(batch, generator=generator) * p_std + p_mean).exp()
    if p_schedule > 0:  # (no extra draws otherwise: the log-normal-only stream stays as it was)
        schedule = rho_spaced(torch.rand(batch, generator=generator))
        sigma = torch.where(torch.rand(batch, generator=generator) < p_schedule, schedule, sigma)
    return sigma


def edm_loss(transformer, hr: torch.Tensor, lr: torch.Tensor, embeds: torch.Tensor, generator: torch.Generator,
             p_mean: float = -1.0, p_std: float = 1.4, sigma_data: float = 0.5,
             image_weight: torch.Tensor | None = None, p_schedule: float = 0.0) -> torch.Tensor:
    """EDM's weighted denoising loss on [-1, 1] images, conditioned as the pipeline conditions; ``image_weight``
    (B,) scales each image's term (see `relative_image_weights`); noise levels from `training_sigmas`."""
    batch = hr.shape[0]
    up = bicubic_resize(lr, tuple(hr.shape[-2:])).clamp(-1, 1)
    sigma = training_sigmas(batch, generator, p_mean, p_std, p_schedule)
    noisy = hr + torch.randn(hr.shape, generator=generator) * sigma[:, None, None, None]
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, sigma_data)
    b = lambda t: t[:, None, None, None]  # noqa: E731
    out = transformer(torch.cat([noisy, up], dim=1) * b(c_in), c_noise, lr, embeds).sample
    denoised = b(c_skip) * noisy + b(c_out) * out
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    if image_weight is not None:
        weight = weight * image_weight
    return (weight * ((denoised - hr) ** 2).mean(dim=(1, 2, 3))).mean()


def relative_image_weights(hr: torch.Tensor, lr: torch.Tensor, floor: float = 1e-4) -> torch.Tensor:
    """Per-image loss weights 1 / (the image's bicubic MSE), scaled to geometric mean 1.

    The gate averages PSNR over images, i.e. it scores each image's log error; EDM's loss sums squared error over
    pixels, so a few images with many edges (large bicubic error) dominate it. On the procedural scenes that
    pushed the denoiser to keep the noisy sample everywhere (good for edge-rich images, noise left on the flat
    ones). Dividing by the bicubic MSE makes the loss a first-order stand-in for the mean log error."""
    up = bicubic_resize(lr, tuple(hr.shape[-2:])).clamp(0, 1)
    mse = ((up - hr) * 2).pow(2).flatten(1).mean(1).clamp_min(floor)  # in the model's [-1, 1] units
    return mse.log().mean().exp() / mse


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of [0, 1] images."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1 / mse)


@torch.no_grad()
def evaluate_gate(pipe: InfDiTPipeline, hr: torch.Tensor, lr: torch.Tensor, steps: int = 20, seed: int = 0) -> dict:
    """Mean PSNR against HR of the testbed's SR output and of bicubic upsampling, on the same pairs."""
    sr = torch.cat([pipe(lr[i : i + 1], num_inference_steps=steps, generator=torch.Generator().manual_seed(seed + i),
                         output_type="pt").images for i in range(len(lr))])
    bicubic = ((bicubic_resize(lr * 2 - 1, tuple(hr.shape[-2:])).clamp(-1, 1) + 1) / 2)
    return {"psnr_sr": float(psnr(sr, hr).mean()), "psnr_bicubic": float(psnr(bicubic, hr).mean()),
            "n": len(hr), "steps": steps}


@dataclass
class DataConfig:
    """Where the training and held-out pairs come from (see `sr_data`): procedural | photos | mixed."""
    source: str = "procedural"


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 3000
    time_limit_minutes: float = 25.0
    batch_size: int = 12
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    pool_size: int = 4096
    log_every: int = 50
    save_every: int = 250
    eval_pairs: int = 16
    eval_steps: int = 20
    eval_every: int = 0           # > 0: also log the sampler's held-out PSNR every this many steps (progress check)
    p_mean: float = -1.0
    p_std: float = 1.4
    p_schedule: float = 0.0       # fraction of training sigmas drawn from the sampler's schedule (`training_sigmas`)
    ema_decay: float = 0.0
    min_lr_ratio: float = 0.0
    init: str = "random"          # "random" (DiT-style) or "blend" (see `blend_init_`)
    init_anchor: float = 8.0
    loss_weighting: str = "edm"   # "edm" (per pixel) or "relative" (each image / its bicubic MSE)
    # The blend's e: below this sigma the start trusts the noisy sample, above it the bicubic upsample. Small on
    # purpose: Heun sampling from the blend ends with residual noise of about e (untrained, on 8 held-out crops:
    # the pool's bicubic RMSE 0.11 gave 23.5 dB, 0.01 gives 33.9 dB; bicubic 35.6 dB).
    init_blend_sigma: float = 0.01
    model: SRTestbedConfig = field(default_factory=SRTestbedConfig)
    data: DataConfig = field(default_factory=DataConfig)


def save_testbed(pipe: InfDiTPipeline, out: Path, meta: dict) -> None:
    from hicache.models.inf_dit.convert import save_image_encoder

    out.mkdir(parents=True, exist_ok=True)
    pipe.transformer.save_pretrained(out / "transformer", safe_serialization=True)
    save_image_encoder(pipe.image_encoder, out / "image_encoder", arch="testbed")
    (out / "image_encoder" / "config.json").write_text(json.dumps(
        {"library": "open_clip", "arch": "testbed", "part": "visual", "class": "open_clip.transformer.VisionTransformer",
         "kwargs": dict(image_size=224, patch_size=32, width=meta["model"]["encoder_width"], layers=1, heads=2,
                        mlp_ratio=2.0, output_dim=meta["model"]["vector_dim"])}, indent=2))
    (out / "testbed.json").write_text(json.dumps(meta, indent=2))


def load_testbed(path: str | Path) -> InfDiTPipeline:
    """The shipped (or a freshly trained) SR testbed folder -> pipeline on CPU."""
    from open_clip.transformer import VisionTransformer
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "transformer" / "config.json").is_file():
        raise FileNotFoundError(f"no Inf-DiT SR testbed at {path}: train one with "
                                f"python run.py experiment=inf_dit_sr_testbed_train train.export_dir={path}")
    transformer = InfDiTTransformer2DModel.from_pretrained(path / "transformer").eval()
    spec = json.loads((path / "image_encoder" / "config.json").read_text())
    encoder = VisionTransformer(**spec["kwargs"]).eval()
    encoder.load_state_dict(load_file(str(path / "image_encoder" / "model.safetensors")), strict=True)
    pipe = InfDiTPipeline(transformer=transformer, image_encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lr_factor(step: int, elapsed: float, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay over training progress, where progress is the larger of the step
    fraction and the wall-clock fraction: a time-limited run still ends at the low learning rate."""
    progress = min(1.0, max(step / cfg.steps, elapsed / (cfg.time_limit_minutes * 60)))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return min(1.0, (step + 1) / cfg.warmup_steps) * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """EMA of the weights with the usual short-run warm-up of the decay (min(decay, (1 + t) / (10 + t)))."""
    d = min(decay, (1 + step) / (10 + step))
    ema_params, params = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_params, params, 1 - d)


def train(cfg: TrainConfig, out_dir: Path, log=None) -> dict:
    """Train the testbed; checkpoints to ``out_dir`` every ``save_every`` steps and at the end; returns the gate.

    With ``ema_decay`` > 0 the exported (and evaluated) weights are the EMA of the trained ones."""
    if cfg.init not in ("random", "blend"):  # before minutes of data preparation
        raise ValueError(f"train.init must be 'random' or 'blend', got {cfg.init!r}")
    check_source(cfg.data.source)
    if cfg.loss_weighting not in ("edm", "relative"):
        raise ValueError(f"train.loss_weighting must be 'edm' or 'relative', got {cfg.loss_weighting!r}")
    if not 0 <= cfg.p_schedule <= 1:
        raise ValueError(f"train.p_schedule is a fraction of the batch, in [0, 1]; got {cfg.p_schedule}")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    pipe = build_testbed(cfg.model, cfg.seed)
    transformer, encoder = pipe.transformer, pipe.image_encoder
    pool = training_images(cfg.data.source, cfg.pool_size, cfg.model.hr_size, generator)
    pool_lr = downscale(pool)
    pool_weights = relative_image_weights(pool, pool_lr) if cfg.loss_weighting == "relative" else None
    with torch.no_grad():
        pool_embeds = torch.cat([encode_lr_image(encoder, pool_lr[i : i + 256] * 2 - 1)
                                 for i in range(0, len(pool_lr), 256)])
    eval_hr, eval_lr = heldout_pairs(cfg.eval_pairs, cfg.model.hr_size, cfg.data.source)
    init_info = {}
    if cfg.init == "blend":
        init_info = blend_init_(transformer, cfg.init_blend_sigma**2, cfg.init_anchor, cfg.seed)
        logger.info("blend init: %s", init_info)
    export = pipe
    if cfg.ema_decay > 0:
        ema_transformer = copy.deepcopy(transformer).eval().requires_grad_(False)
        export = InfDiTPipeline(transformer=ema_transformer, image_encoder=encoder)
        export.set_progress_bar_config(disable=True)

    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    meta = {"model": vars(cfg.model), "train": {k: v for k, v in vars(cfg).items() if k not in ("model", "data")},
            "data": {"source": cfg.data.source, "heldout": heldout_description(cfg.data.source)}, "init": init_info}
    if cfg.data.source != "procedural":
        meta["data"]["train_photos"] = TRAIN_PHOTOS
    start, step, ema = time.time(), 0, None
    transformer.train()
    with tqdm(total=cfg.steps, desc="train SR testbed") as bar:
        while step < cfg.steps and (time.time() - start) < cfg.time_limit_minutes * 60:
            lr_now = cfg.lr * lr_factor(step, time.time() - start, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            idx = torch.randint(len(pool), (cfg.batch_size,), generator=generator)
            loss = edm_loss(transformer, pool[idx] * 2 - 1, pool_lr[idx] * 2 - 1, pool_embeds[idx], generator,
                            p_mean=cfg.p_mean, p_std=cfg.p_std, p_schedule=cfg.p_schedule,
                            image_weight=None if pool_weights is None else pool_weights[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            if export is not pipe:
                update_ema(export.transformer, transformer, cfg.ema_decay, step)
            step += 1
            ema = float(loss.detach()) if ema is None else 0.98 * ema + 0.02 * float(loss.detach())
            bar.update()
            bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr_now:.2e}")
            if log is not None and step % cfg.log_every == 0:
                log({"loss": ema, "lr": lr_now, "minutes": (time.time() - start) / 60}, step)
            if cfg.eval_every and step % cfg.eval_every == 0:
                gate_now = evaluate_gate(export, eval_hr[:8], eval_lr[:8], steps=cfg.eval_steps, seed=cfg.seed)
                logger.info("step %d: held-out PSNR SR %.2f dB vs bicubic %.2f dB (%d images)", step,
                            gate_now["psnr_sr"], gate_now["psnr_bicubic"], gate_now["n"])
            if step % cfg.save_every == 0:
                transformer.eval()
                save_testbed(export, out_dir, {**meta, "steps_done": step, "loss_ema": ema})
                transformer.train()
    transformer.eval()
    minutes = (time.time() - start) / 60
    gate = evaluate_gate(export, eval_hr, eval_lr, steps=cfg.eval_steps, seed=cfg.seed)
    gate["passes"] = gate["psnr_sr"] > gate["psnr_bicubic"]
    meta.update(steps_done=step, loss_ema=ema, train_minutes=minutes, gate=gate)
    if cfg.data.source == "procedural":  # the earlier testbeds' held-out photo crops, a cross-domain figure
        meta["cross_domain_photos"] = evaluate_gate(export, *heldout_pairs(cfg.eval_pairs, cfg.model.hr_size, "photos"),
                                                    steps=cfg.eval_steps, seed=cfg.seed)
    save_testbed(export, out_dir, meta)
    logger.info("SR testbed: %d steps in %.1f min, loss %.4f; held-out PSNR SR %.2f dB vs bicubic %.2f dB",
                step, minutes, ema, gate["psnr_sr"], gate["psnr_bicubic"])
    if "cross_domain_photos" in meta:
        logger.info("cross-domain (held-out photo crops): SR %.2f dB vs bicubic %.2f dB",
                    meta["cross_domain_photos"]["psnr_sr"], meta["cross_domain_photos"]["psnr_bicubic"])
    return meta

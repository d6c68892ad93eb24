"""Train the testbed pipeline: the VAE first, then the FLUX transformer (with the text encoders).

Stage 1 fits the `AutoencoderKL` to the shape images (L1 + MSE reconstruction, up-weighted on
shape pixels so the few shape pixels are not drowned by the background, plus a small KL term) and
sets its `shift_factor`/`scaling_factor` from the latent statistics, as FLUX's VAE does.
Stage 2 encodes a fixed pool of training images once (the VAE is frozen from then on) and trains
the transformer with FLUX's rectified-flow objective: x_t = (1 - t) x0 + t noise, the model predicts
noise - x0, t from a logit-normal distribution; the CLIP and T5 encoders are trained jointly.

Everything is seeded (model init, data stream, noise), so a run is reproducible given the config
and thread count. The entry point is `python run.py experiment=testbed_train`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import maximum_filter
from tqdm.auto import tqdm

from .build import TestbedSizes, build_pipeline, with_shift
from .distill import GuidanceStageConfig, distill_guidance
from .dataset import DEFAULT_VARIATION, ShapesDataset, Variation, heldout_captions, render, shape_mask

logger = logging.getLogger(__name__)

Logger = Callable[[dict[str, float], int], None]


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> float tensor in [-1, 1], (B, 3, H, W), the VAE's input convention."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching time shift FLUX samples with (noise level t = 1 at pure noise): more time at high
    noise for shift > 1, the same map FlowMatchEulerDiscreteScheduler applies to its sigmas."""
    return shift * t / (1 + (shift - 1) * t)


def _cosine_lr(step: int, total: int, warmup: int, time_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine decay over the larger of step and wall-clock progress, so a run
    stopped by its time limit still ends at a low learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = max((step - warmup) / max(1, total - warmup), time_progress)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class WallClockSchedule:
    """`_cosine_lr` on an optimiser, with the stage's wall-clock limit: `expired()` says when to stop."""

    def __init__(self, opt, steps: int, warmup: int, time_limit_minutes: float | None):
        self.start, self.limit_s = time.perf_counter(), None if time_limit_minutes is None else 60 * time_limit_minutes
        self.lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps, warmup, self.time_progress()))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def time_progress(self) -> float:
        return 0.0 if self.limit_s is None else self.elapsed() / self.limit_s

    def expired(self) -> bool:
        return self.limit_s is not None and self.elapsed() > self.limit_s


@dataclass
class VAEStageConfig:
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    kl_weight: float = 1e-3
    sample_posterior: bool = False  # decode posterior samples (True) or means (False: converged faster here)
    shape_weight: float = 10.0  # extra loss weight on (dilated) shape pixels: shapes are ~5 % of the pixels
    stats_images: int = 512
    log_every: int = 20


@dataclass
class TransformerStageConfig:
    steps: int = 1600
    batch_size: int = 64
    lr: float = 7e-4
    text_lr: float = 7e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    pool_size: int = 16384
    train_text_encoders: bool = True
    grad_clip: float = 1.0
    caption_dropout: float = 0.0  # fraction of captions replaced by the empty prompt (for true CFG at inference)
    log_every: int = 20
    time_limit_minutes: float | None = None  # safety stop on a shared machine; the LR decays by time too (not step-exact then)
    timestep_shift: float = 1.0  # s: t -> s t / (1 + (s - 1) t) after the logit-normal draw, FLUX's shift (3.16 at 1024 px)

    def __post_init__(self):
        if not self.timestep_shift > 0:
            raise ValueError(f"timestep_shift must be > 0 (1 is no shift, FLUX at 1024 px 3.16); got {self.timestep_shift}")


def train_vae(vae, data: ShapesDataset, cfg: VAEStageConfig, log: Logger, start_index: int = 0) -> dict[str, float]:
    """Fit the VAE, then set its latent shift/scale; returns the final losses and PSNR."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, cfg.steps, min(50, cfg.steps // 10 + 1)))
    index = start_index
    stats: dict[str, float] = {}
    bar = tqdm(range(cfg.steps), desc="vae", mininterval=5)
    for step in bar:
        scenes = [data.scene(index + i) for i in range(cfg.batch_size)]
        index += cfg.batch_size
        x = images_to_tensor([render(sc, data.resolution) for sc in scenes])
        masks = np.stack([maximum_filter(shape_mask(sc, data.resolution), size=3) for sc in scenes])
        weight = 1.0 + cfg.shape_weight * torch.from_numpy(masks)[:, None]
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample() if cfg.sample_posterior else posterior.mode()).sample
        mse, l1 = F.mse_loss(rec, x), F.l1_loss(rec, x)
        weighted = ((rec - x).pow(2) + (rec - x).abs()) * weight
        kl = posterior.kl().mean() / x[0].numel()
        loss = weighted.sum() / weight.expand_as(x).sum() + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-12))  # range [-1, 1] has peak-to-peak 2
        stats = {"vae/loss": loss.item(), "vae/mse": mse.item(), "vae/l1": l1.item(), "vae/kl": kl.item(), "vae/psnr": psnr}
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.1f}")
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log(stats, step)
    vae.eval()
    set_latent_normalisation(vae, data, cfg.stats_images, start_index=index)
    return stats


@torch.no_grad()
def set_latent_normalisation(vae, data: ShapesDataset, num_images: int, start_index: int) -> None:
    """Store shift/scale so that normalised latents have zero mean and unit variance (as FLUX's VAE)."""
    latents = []
    for lo in range(0, num_images, 64):
        batch = [data[start_index + i][0] for i in range(lo, min(num_images, lo + 64))]
        latents.append(vae.encode(images_to_tensor(batch)).latent_dist.mean)
    z = torch.cat(latents)
    shift, scale = z.mean().item(), 1.0 / max(z.std().item(), 1e-6)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    logger.info("VAE latent normalisation: shift_factor=%.4f scaling_factor=%.4f", shift, scale)


@torch.no_grad()
def reconstruction_psnr(vae, images) -> tuple[float, torch.Tensor]:
    """Mean PSNR (dB, on [0, 1] images) of encode->decode with the posterior mean, and the reconstructions."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    x = images_to_tensor(images)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    x01, rec01 = (x + 1) / 2, (rec + 1) / 2
    psnr = peak_signal_noise_ratio(rec01, x01, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean().item()
    return psnr, rec01


@torch.no_grad()
def encode_pool(pipe, data: ShapesDataset, size: int, start_index: int, batch: int = 64):
    """Normalised, packed latents and token ids of `size` training items (encoded once; VAE frozen)."""
    from diffusers import FluxPipeline

    vae = pipe.vae
    latents, ids = [], []
    for lo in tqdm(range(0, size, batch), desc="encode pool", mininterval=5):
        items = [data[start_index + i] for i in range(lo, min(size, lo + batch))]
        z = vae.encode(images_to_tensor([im for im, _ in items])).latent_dist.mean
        z = (z - vae.config.shift_factor) * vae.config.scaling_factor
        b, c, h, w = z.shape
        latents.append(FluxPipeline._pack_latents(z, b, c, h, w))
        ids.append(tokenize(pipe.tokenizer, [cap for _, cap in items]))
    return torch.cat(latents), torch.cat(ids), (h, w)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids exactly as `FluxPipeline` makes them (max-length padding, truncation)."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_text(pipe, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 sequence, CLIP pooled) as `FluxPipeline.encode_prompt` computes them."""
    pooled = pipe.text_encoder(ids, output_hidden_states=False).pooler_output
    sequence = pipe.text_encoder_2(ids, output_hidden_states=False)[0]
    return sequence, pooled


def train_transformer(pipe, data: ShapesDataset, cfg: TransformerStageConfig, log: Logger, start_index: int,
                      on_step: Callable[[int], None] | None = None) -> dict[str, float]:
    from diffusers import FluxPipeline

    if cfg.steps == 0:  # e.g. only a guidance distillation of an init_from folder
        return {"transformer/steps_done": 0}
    latents, token_ids, (h, w) = encode_pool(pipe, data, cfg.pool_size, start_index)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, latents.device, latents.dtype)
    txt_ids = torch.zeros(token_ids.shape[1], 3)

    transformer = pipe.transformer.train()
    groups = [{"params": list(transformer.parameters()), "lr": cfg.lr}]
    text_encoders = [pipe.text_encoder, pipe.text_encoder_2]
    for enc in text_encoders:
        enc.train(cfg.train_text_encoders)
        enc.requires_grad_(cfg.train_text_encoders)
        if cfg.train_text_encoders:
            groups.append({"params": list(enc.parameters()), "lr": cfg.text_lr})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    clock = WallClockSchedule(opt, cfg.steps, cfg.warmup_steps, cfg.time_limit_minutes)
    sched = clock.lr
    generator = torch.Generator().manual_seed(int(data.seed) * 7919 + 17)
    empty_ids = tokenize(pipe.tokenizer, [""])  # the unconditional prompt of classifier-free guidance
    stats: dict[str, float] = {}
    bar = tqdm(range(cfg.steps), desc="transformer", mininterval=5)
    for step in bar:
        batch = torch.randint(0, latents.shape[0], (cfg.batch_size,), generator=generator)
        x0, ids = latents[batch], token_ids[batch]
        if cfg.caption_dropout > 0:
            dropped = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
            ids = torch.where(dropped[:, None], empty_ids, ids)
        noise = torch.randn(x0.shape, generator=generator)
        t = shift_timesteps(torch.sigmoid(torch.randn(cfg.batch_size, generator=generator)), cfg.timestep_shift)  # logit-normal, as SD3/FLUX
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        with torch.set_grad_enabled(cfg.train_text_encoders):
            sequence, pooled = encode_text(pipe, ids)
        pred = transformer(
            hidden_states=xt, encoder_hidden_states=sequence, pooled_projections=pooled, timestep=t,
            img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
        )[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
        opt.step()
        sched.step()
        stats = {"transformer/loss": loss.item(), "transformer/grad_norm": grad_norm,
                 "transformer/lr": sched.get_last_lr()[0], "transformer/elapsed_s": clock.elapsed()}
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log(stats, step)
        if on_step is not None:
            on_step(step)
        if clock.expired():
            logger.warning("transformer stage stopped by time_limit_minutes after %d of %d steps", step + 1, cfg.steps)
            break
    stats["transformer/steps_done"] = step + 1
    for module in (transformer, *text_encoders):
        module.eval().requires_grad_(False)
    return stats


def generate(pipe, captions: list[str], num_inference_steps: int = 50, seed: int = 0, batch: int = 16, **call_kwargs):
    """Images for `captions` with the testbed's call settings, seeded per batch."""
    from . import PIPELINE_CALL_KWARGS

    kwargs = {**PIPELINE_CALL_KWARGS, **call_kwargs}
    images = []
    for lo in range(0, len(captions), batch):
        gen = torch.Generator().manual_seed(seed + lo)
        prompts = captions[lo : lo + batch]
        if kwargs.get("true_cfg_scale", 1.0) > 1:  # FluxPipeline's true CFG needs one negative prompt per prompt
            kwargs["negative_prompt"] = [""] * len(prompts)
        out = pipe(prompts, num_inference_steps=num_inference_steps, generator=gen, **kwargs)
        images.extend(out.images)
    return images


def save_grid(images, path: Path, nrow: int = 8) -> Path:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in images])
    save_image(x, path, nrow=nrow, padding=2, pad_value=1.0)
    return path


def checker_accuracy(images, captions) -> float:
    from .checker import accuracy, check

    return accuracy([check(im, cap) for im, cap in zip(images, captions)])


def stage_configs(cfg: Any) -> tuple[Variation, VAEStageConfig, TransformerStageConfig, GuidanceStageConfig]:
    """The data variation and the stages' settings of a composed `train` config; ValueError names a bad knob."""
    from omegaconf import OmegaConf

    variation = Variation(**OmegaConf.to_container(cfg.data, resolve=True)) if cfg.get("data") else Variation()
    vae_cfg = VAEStageConfig(**OmegaConf.to_container(cfg.vae, resolve=True))
    tr_cfg = TransformerStageConfig(**OmegaConf.to_container(cfg.transformer, resolve=True))
    mu = cfg.get("schedule_mu")
    if mu is not None and not (isinstance(mu, (int, float)) and not isinstance(mu, bool) and math.isfinite(mu)):
        raise ValueError(f"schedule_mu must be a number (FLUX.1-dev at 1024 px: 1.15) or null; got {mu!r}")
    guidance = GuidanceStageConfig(**(OmegaConf.to_container(cfg.guidance, resolve=True) if cfg.get("guidance") else {}))
    config = Path(cfg.init_from) / "transformer" / "config.json" if cfg.get("init_from") else None
    init_distilled = config is not None and config.is_file() and json.loads(config.read_text()).get("guidance_embeds", False)
    # all three would otherwise surface only after the earlier stages have run, two of them as a library traceback
    if init_distilled and tr_cfg.steps > 0:
        raise ValueError(f"transformer: init_from {cfg.init_from} is guidance-distilled and the transformer stage trains "
                         "two-branch models; set transformer.steps=0 (and guidance.steps, guidance.teacher to distil further)")
    if init_distilled and guidance.steps > 0 and guidance.teacher is None:
        raise ValueError(f"guidance: init_from {cfg.init_from} is already guidance-distilled; "
                         "set guidance.teacher to its two-branch teacher's folder")
    if cfg.get("samples") and cfg.samples.get("guidance_scales") and guidance.steps == 0 and not init_distilled:
        raise ValueError("samples.guidance_scales needs a guidance-distilled transformer: set guidance.steps > 0 "
                         "or init_from a distilled folder (true CFG: samples.cfg_scales)")
    return variation, vae_cfg, tr_cfg, guidance


def run(cfg: Any, out_dir: Path, log: Logger) -> dict[str, float]:
    """The whole training run, from the composed config; writes `out_dir/pipeline` and sample grids."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    variation, vae_cfg, tr_cfg, guidance_cfg = stage_configs(cfg)
    torch.manual_seed(cfg.seed)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    sizes = TestbedSizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in model.items()})
    if cfg.get("init_from"):
        # continue from a trained folder (e.g. a longer transformer stage with vae.steps=0)
        from . import load_pipeline

        pipe = load_pipeline(Path(cfg.init_from))
    else:
        pipe = build_pipeline(sizes, seed=cfg.seed)
    if cfg.get("schedule_mu") is not None:  # sample (and so evaluate and ship) at one shift exponent for every size
        pipe.scheduler = with_shift(pipe.scheduler, float(cfg.schedule_mu))
    pipe.set_progress_bar_config(disable=True)
    data = ShapesDataset(seed=cfg.seed, variation=variation)
    cap = cfg.max_steps
    if cap is not None:
        vae_cfg.steps, tr_cfg.steps = min(vae_cfg.steps, cap), min(tr_cfg.steps, cap)
        vae_cfg.stats_images = min(vae_cfg.stats_images, cap * vae_cfg.batch_size)
        tr_cfg.pool_size = min(tr_cfg.pool_size, cap * tr_cfg.batch_size)
        tr_cfg.warmup_steps = min(tr_cfg.warmup_steps, cap)
    samples = out_dir / "samples"
    results: dict[str, float] = {}

    t0 = time.perf_counter()
    if vae_cfg.steps > 0:
        train_vae(pipe.vae, data, vae_cfg, log)
    held = ShapesDataset(seed=cfg.seed + 10_000, variation=variation)
    originals = [held[i][0] for i in range(cfg.samples.psnr_images)]
    psnr, rec = reconstruction_psnr(pipe.vae, originals)
    save_grid(originals[:16] + [_to_pil(r) for r in rec[:16]], samples / "vae_reconstructions.png")
    results.update({"vae/heldout_psnr": psnr, "vae/minutes": (time.perf_counter() - t0) / 60})
    log({"vae/heldout_psnr": psnr}, vae_cfg.steps)
    logger.info("VAE done in %.1f min, held-out reconstruction PSNR %.2f dB", results["vae/minutes"], psnr)

    captions = heldout_captions(cfg.samples.num_captions, seed=cfg.seed, variation=variation)

    def sample_grid(step: int) -> None:
        if cfg.samples.every and step > 0 and step % cfg.samples.every == 0:
            modules = (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2)
            modes = [m.training for m in modules]
            for m in modules:
                m.eval()  # T5's dropout off while sampling
            images = generate(pipe, captions, cfg.samples.num_inference_steps, seed=cfg.seed)
            for m, mode in zip(modules, modes):
                m.train(mode)
            save_grid(images, samples / f"transformer_step{step:05d}.png")
            log({"samples/checker_accuracy": checker_accuracy(images, captions)}, step)  # a learning curve

    t1 = time.perf_counter()
    pool_start = 10 * vae_cfg.steps * vae_cfg.batch_size + 1_000_000  # disjoint from the VAE's stream
    tr_stats = train_transformer(pipe, data, tr_cfg, log, start_index=pool_start, on_step=sample_grid)
    results["transformer/steps_done"] = tr_stats["transformer/steps_done"]
    results["transformer/minutes"] = (time.perf_counter() - t1) / 60
    if guidance_cfg.steps > 0:  # fold classifier-free guidance into a guidance embedding (the teacher needs caption dropout)
        t2 = time.perf_counter()
        if cap is not None:
            guidance_cfg.steps = min(guidance_cfg.steps, cap)
            guidance_cfg.pool_size = min(guidance_cfg.pool_size, cap * guidance_cfg.batch_size)
        pipe.transformer, g_stats = distill_guidance(pipe, data, guidance_cfg, log, start_index=pool_start + 2_000_000,
                                                     seed=int(cfg.seed))
        results["guidance/steps_done"] = g_stats["guidance/steps_done"]
        results["guidance/minutes"] = (time.perf_counter() - t2) / 60

    eval_caps = heldout_captions(cfg.samples.eval_captions, seed=cfg.seed, variation=variation)
    images = generate(pipe, eval_caps, cfg.samples.num_inference_steps, seed=cfg.seed)
    save_grid(images[: cfg.samples.num_captions], samples / "final.png")
    (samples / "final_captions.txt").write_text("\n".join(eval_caps[: cfg.samples.num_captions]) + "\n")
    results["eval/checker_accuracy"] = checker_accuracy(images, eval_caps)
    if variation.leaves_unsaid:  # also on fully stated captions: comparable with a testbed that never left anything unsaid
        stated = heldout_captions(cfg.samples.eval_captions, seed=cfg.seed, variation=DEFAULT_VARIATION)
        results["eval/checker_accuracy_stated"] = checker_accuracy(
            generate(pipe, stated, cfg.samples.num_inference_steps, seed=cfg.seed), stated)
    for scale in cfg.samples.get("guidance_scales") or []:  # stage_configs made sure the transformer is distilled
        distilled = generate(pipe, eval_caps, cfg.samples.num_inference_steps, seed=cfg.seed, guidance_scale=float(scale))
        results[f"eval/checker_accuracy_guidance{scale:g}"] = checker_accuracy(distilled, eval_caps)
        save_grid(distilled[: cfg.samples.num_captions], samples / f"final_guidance{scale:g}.png")
    for scale in cfg.samples.get("cfg_scales") or []:  # true classifier-free guidance (caption dropout)
        guided = generate(pipe, eval_caps, cfg.samples.num_inference_steps, seed=cfg.seed, true_cfg_scale=float(scale))
        results[f"eval/checker_accuracy_cfg{scale:g}"] = checker_accuracy(guided, eval_caps)
        save_grid(guided[: cfg.samples.num_captions], samples / f"final_cfg{scale:g}.png")
    log({k: v for k, v in results.items() if k.startswith("eval/")}, tr_cfg.steps)
    pipe.save_pretrained(out_dir / "pipeline")
    # the caption distribution travels with the weights: heldout_captions() reads it (dataset.variation_of)
    (out_dir / "pipeline" / "testbed.json").write_text(json.dumps({"data": asdict(variation)}, indent=1) + "\n")
    results["total/minutes"] = (time.perf_counter() - t0) / 60
    logger.info("results: %s", {k: round(v, 4) for k, v in results.items()})
    return results


def _to_pil(x: torch.Tensor):
    from PIL import Image

    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))

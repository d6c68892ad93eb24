"""Guidance distillation: fold classifier-free guidance into a guidance embedding, as FLUX.1-dev is sampled.

True CFG bends a testbed's sampling paths, but a cache then forecasts two branches whose difference is multiplied
by the guidance scale, which no real FLUX.1-dev run does: FLUX.1-dev is one guidance-distilled branch that reads the
scale as an input. This stage gives a testbed the same: a student with FLUX's guidance embedder learns, for a scale
g drawn per sample, the teacher's guided velocity v_u + g (v_c - v_u) on noised training latents. The student starts
as the teacher's conditional branch (the new embedder's last layer is zero), so g = 1 is where it begins.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

Logger = Callable[[dict, int], None]
logger = logging.getLogger(__name__)


@dataclass
class GuidanceStageConfig:
    steps: int = 0                       # 0: no distillation (the testbed keeps guidance_embeds=False)
    batch_size: int = 64
    lr: float = 3.0e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    pool_size: int = 8192
    scale_min: float = 1.0               # guidance scales drawn uniformly per sample
    scale_max: float = 5.0
    timestep_shift: float = 1.0          # as TransformerStageConfig.timestep_shift
    time_limit_minutes: float | None = None
    log_every: int = 20
    teacher: str | None = None           # FluxPipeline folder of the teacher; needed to continue an already distilled student

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"guidance.steps must be >= 0; got {self.steps}")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"guidance scales need 0 < scale_min <= scale_max; got {self.scale_min}, {self.scale_max}")


def with_guidance_embedding(transformer):
    """A copy of a FLUX transformer with FLUX.1-dev's guidance embedder, computing exactly what `transformer` computes
    at any guidance (the embedder's output layer starts at zero)."""
    from diffusers import FluxTransformer2DModel

    if transformer.config.guidance_embeds:
        raise ValueError("the transformer already has a guidance embedding")
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    student = FluxTransformer2DModel.from_config({**config, "guidance_embeds": True})
    missing, unexpected = student.load_state_dict(transformer.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_text_embed.guidance_embedder.") for k in missing):
        raise RuntimeError(f"guidance student does not match its teacher: missing {missing}, unexpected {unexpected}")
    last = student.time_text_embed.guidance_embedder.linear_2
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return student.to(dtype=next(transformer.parameters()).dtype)


def distill_guidance(pipe, data, cfg: GuidanceStageConfig, log: Logger, start_index: int, seed: int = 0):
    """Train a guidance-embedded student of `pipe.transformer` (the teacher, frozen, trained with caption dropout),
    or continue `pipe.transformer` if it is already a student (then `cfg.teacher` names the teacher's folder);
    returns (student, stats). Text encoders and VAE stay frozen."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from .train import WallClockSchedule, encode_pool, encode_text, shift_timesteps, tokenize

    if pipe.transformer.config.guidance_embeds:
        if cfg.teacher is None:
            raise ValueError("the transformer is already guidance-distilled: set guidance.teacher to the teacher's folder")
        teacher = FluxTransformer2DModel.from_pretrained(cfg.teacher, subfolder="transformer")
        if teacher.config.guidance_embeds:
            raise ValueError(f"guidance.teacher {cfg.teacher} is itself guidance-distilled; it must have two branches")
        student = pipe.transformer.train().requires_grad_(True)
    else:
        teacher = pipe.transformer
        student = with_guidance_embedding(teacher).train()
    teacher = teacher.eval().requires_grad_(False)
    latents, token_ids, (h, w) = encode_pool(pipe, data, cfg.pool_size, start_index)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, latents.device, latents.dtype)
    txt_ids = torch.zeros(token_ids.shape[1], 3)
    with torch.no_grad():
        empty_sequence, empty_pooled = encode_text(pipe, tokenize(pipe.tokenizer, [""]))
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    clock = WallClockSchedule(opt, cfg.steps, cfg.warmup_steps, cfg.time_limit_minutes)
    sched = clock.lr
    generator = torch.Generator().manual_seed(seed * 7919 + 29)
    stats: dict[str, float] = {}
    step = -1
    bar = tqdm(range(cfg.steps), desc="guidance", mininterval=5)
    for step in bar:
        batch = torch.randint(0, latents.shape[0], (cfg.batch_size,), generator=generator)
        x0, ids = latents[batch], token_ids[batch]
        noise = torch.randn(x0.shape, generator=generator)
        t = shift_timesteps(torch.sigmoid(torch.randn(cfg.batch_size, generator=generator)), cfg.timestep_shift)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        g = cfg.scale_min + (cfg.scale_max - cfg.scale_min) * torch.rand(cfg.batch_size, generator=generator)
        common = dict(hidden_states=xt, timestep=t, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)
        with torch.no_grad():
            sequence, pooled = encode_text(pipe, ids)
            v_c = teacher(encoder_hidden_states=sequence, pooled_projections=pooled, **common)[0]
            v_u = teacher(encoder_hidden_states=empty_sequence.expand_as(sequence),
                          pooled_projections=empty_pooled.expand_as(pooled), **common)[0]
            target = v_u + g[:, None, None] * (v_c - v_u)
        pred = student(encoder_hidden_states=sequence, pooled_projections=pooled, guidance=g, **common)[0]
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip).item()
        opt.step()
        sched.step()
        stats = {"guidance/loss": loss.item(), "guidance/grad_norm": grad_norm, "guidance/lr": sched.get_last_lr()[0],
                 "guidance/elapsed_s": clock.elapsed()}
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log(stats, step)
        if clock.expired():
            logger.warning("guidance stage stopped by time_limit_minutes after %d of %d steps", step + 1, cfg.steps)
            break
    stats["guidance/steps_done"] = step + 1
    return student.eval().requires_grad_(False), stats

"""Train a LESA predictor through `run.py` (`experiment=testbed_lesa_train`, `experiment=flux_lesa_train`).

The official protocol (`caipeiliang2004/LESA`, `src/train.py`), on any pipeline with a LESA recipe:

0. **Ground truth.** Full-compute runs on the training prompts (``data``, never the evaluation prompts), each from
   the seed the later phases use; the LESA hooks run at interval 1 (every step full, the predictor never called)
   and keep the forecast tensor of every step, saved as ``<out_dir>/gt/<index>.safetensors``.
1. **Teacher-forced** (``phase1.passes`` passes over the prompts): at every step the cache schedule leaves to the
   predictor, it forecasts from the saved ground truth of the previous steps; no model runs.
2. **Closed loop** (``phase2.passes``): the pipeline runs with the LESA cache attached, so full steps are real
   model calls on the accelerated trajectory and the history holds the predictor's own forecasts.

Both phases make one L1 update per cached step against the uncached run's tensor at that step (AdamW, gradient
clipping, the learning rate halved every ``lr_step`` updates, phase 2 continuing phase 1's optimiser and
schedule). ``train.dtype=float32`` (default) keeps float32 parameters; ``bfloat16`` is the official recipe,
bfloat16 parameters with no float32 master copy, which freezes many weights as the learning rate decays.

Everything is resumable: the ground truth is kept per prompt, and ``<out_dir>/checkpoint.pt`` (predictor,
optimiser, LR schedule, position) is rewritten after every prompt; the same command continues where it stopped.
The trained predictor is ``<out_dir>/predictor/`` (`hicache.lesa.save_predictor`), copied to
``train.export_dir`` if set.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import hicache
from hicache.lesa import LesaPredictor, LesaPredictorConfig, save_predictor
from hicache.lesa_hooks import lesa_hook
from hicache.recipes.lesa import get_lesa_recipe

from .errors import SetupError
from .pipelines import load_pipeline, resolve_device, resolve_dtype
from .prompts import Prompt, load_prompts
from . import video  # noqa: E402,F401  (registers the video pipelines' loaders)

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


class PredictorOptimizer:
    """One L1 update per forecast: AdamW, gradient clipping, StepLR stepped at every update."""

    def __init__(self, predictor: LesaPredictor, lr: float, weight_decay: float, grad_clip: float,
                 lr_step: int, lr_gamma: float):
        self.predictor = predictor
        self.grad_clip = grad_clip
        self.optimizer = torch.optim.AdamW(predictor.parameters(), lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=lr_step, gamma=lr_gamma)
        self.updates = 0

    def update(self, forecast: torch.Tensor, target: torch.Tensor) -> float:
        loss = F.l1_loss(forecast, target.to(device=forecast.device, dtype=forecast.dtype))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.predictor.parameters(), max_norm=self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.updates += 1
        return float(loss.detach())

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {"predictor": self.predictor.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.predictor.load_state_dict(state["predictor"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.updates = int(state["updates"])


def teacher_forced_forecasts(predictor: LesaPredictor, truth: dict[str, torch.Tensor], cached_steps: list[int]):
    """Phase 1 of one prompt: ``(step, branch, forecast)`` at every cached step, each from the ground truth of the
    ``history_depth`` steps before it (what the official GT-guided run's history holds)."""
    depth = predictor.config.history_depth
    for step in cached_steps:
        for branch, series in truth.items():
            history = [series[s] for s in range(max(0, step - depth), step)]
            yield step, branch, predictor(history, predictor.config.timesteps[step], branch)


def _call(pipe, cfg: DictConfig, prompt: Prompt, **extra) -> Any:
    s = cfg.sampling
    kwargs = OmegaConf.to_container(cfg.model.get("call_kwargs") or {}, resolve=True)
    generator = torch.Generator("cpu").manual_seed(prompt.seed)
    return pipe(prompt=prompt.text, num_inference_steps=int(s.steps), height=int(s.height), width=int(s.width),
                guidance_scale=float(s.guidance_scale), generator=generator, output_type="latent", **kwargs, **extra)


def schedule_points(pipe, cfg: DictConfig, prompt: Prompt) -> list[float]:
    """The sampler's ``steps + 1`` schedule points in [0, 1] (final 0 included), read from the scheduler after a
    call interrupted after its first step."""
    def stop(pipeline, step, timestep, callback_kwargs):
        pipeline._interrupt = True
        return {}

    with torch.no_grad():
        _call(pipe, cfg, prompt, callback_on_step_end=stop)
    sigmas = getattr(pipe.scheduler, "sigmas", None)
    steps = int(cfg.sampling.steps)
    if not isinstance(sigmas, torch.Tensor) or sigmas.numel() != steps + 1 or not (0 <= float(sigmas.min()) <= float(sigmas.max()) <= 1):
        raise SetupError(f"LESA training needs a flow-matching scheduler with {steps} + 1 sigmas in [0, 1]; "
                         f"{type(pipe.scheduler).__name__} has {None if sigmas is None else list(sigmas.shape)}")
    return [float(v) for v in sigmas.double()]


def _cache_config(cfg: DictConfig, predictor: LesaPredictor, interval: int | None = None) -> hicache.CacheConfig:
    c = cfg.cache
    return hicache.CacheConfig("lesa", interval=interval or int(c.interval), warmup=int(c.warmup),
                               extra_full_steps=list(c.extra_full_steps), predictor=predictor,
                               num_inference_steps=int(cfg.sampling.steps))


def collect_ground_truth(pipe, cfg: DictConfig, predictor: LesaPredictor, prompt: Prompt, path: Path,
                         dtype: torch.dtype) -> None:
    """One full-compute run; the forecast tensor of every step of every branch, saved as (steps, *shape)."""
    steps: dict[str, list[torch.Tensor]] = {}
    probe = LesaPredictor(LesaPredictorConfig(**{**asdict(predictor.config), "interval": 1, "hidden_dim": 1}))
    transformer = pipe.transformer
    hicache.apply_cache(transformer, _cache_config(cfg, probe, interval=1), cfg.model.recipe)
    lesa_hook(transformer).observer = lambda step, branch, value, full: steps.setdefault(branch, []).append(
        value.to("cpu", dtype))
    try:
        with torch.no_grad():
            _call(pipe, cfg, prompt)
    finally:
        hicache.remove_cache(transformer)
    tensors = {branch: torch.stack(values).contiguous() for branch, values in steps.items()}
    if any(len(v) != int(cfg.sampling.steps) for v in tensors.values()):
        raise RuntimeError(f"ground truth of {prompt.text!r}: expected {cfg.sampling.steps} steps per branch, "
                           f"got { {b: len(v) for b, v in tensors.items()} }")
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"prompt": prompt.text, "seed": str(prompt.seed)})
    os.replace(tmp, path)


def run_lesa_train(cfg: DictConfig) -> dict:
    t = cfg.train
    torch.manual_seed(int(t.seed))
    device = resolve_device(cfg.model.get("device"))
    out_dir = Path(t.out_dir)
    recipe = get_lesa_recipe(cfg.model.recipe) if cfg.model.get("recipe") else None
    if recipe is None:
        raise SetupError(f"model {cfg.model.name} has no recipe; LESA needs one with a LESA forecast tensor")
    if cfg.cache.method != "lesa":
        raise SetupError(f"LESA training needs cache=lesa (the cache schedule the predictor learns), got cache={cfg.cache.method}")
    pipe = load_pipeline(cfg.model, device)
    prompts = load_prompts(cfg.data, int(cfg.sampling.seed_offset))
    dtype = resolve_dtype(t.dtype)
    data_dtype = resolve_dtype(t.data_dtype or cfg.model.dtype)
    (out_dir / "gt").mkdir(parents=True, exist_ok=True)

    checkpoint_path = out_dir / CHECKPOINT
    saved = torch.load(checkpoint_path, map_location="cpu", weights_only=False) if checkpoint_path.is_file() else None
    p = t.predictor
    thresholds = list(p.stage_thresholds) if p.get("stage_thresholds") else list(recipe.stage_thresholds)
    timesteps = saved["config"]["timesteps"] if saved else schedule_points(pipe, cfg, prompts[0])
    config = LesaPredictorConfig(timesteps=timesteps, interval=int(cfg.cache.interval), warmup=int(cfg.cache.warmup),
                                 extra_full_steps=list(cfg.cache.extra_full_steps), history_depth=int(p.history_depth),
                                 hidden_dim=int(p.hidden_dim), stage_thresholds=thresholds, branches=list(p.branches),
                                 model=f"{cfg.model.name} ({recipe.name} recipe)")
    if saved and saved["config"] != asdict(config):
        raise SetupError(f"{checkpoint_path} belongs to a run with another predictor or schedule; "
                         "set train.out_dir=<new folder> or delete it")
    predictor = LesaPredictor(config).to(device=device, dtype=dtype).train()
    opt = PredictorOptimizer(predictor, float(t.lr), float(t.weight_decay), float(t.grad_clip), int(t.lr_step),
                             float(t.lr_gamma))
    position = {"phase": 1, "pass": 0, "prompt": 0}
    if saved:
        opt.load_state_dict(saved["state"])
        position = saved["position"]
        logger.info("resuming %s at %s after %d updates", out_dir, position, opt.updates)

    import wandb

    wb = wandb.init(project=t.wandb.project, mode=t.wandb.mode, dir=str(out_dir), name=f"{cfg.name}/{out_dir.name}",
                    config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")

    def save_checkpoint() -> None:
        tmp = checkpoint_path.with_suffix(".tmp")
        torch.save({"config": asdict(config), "state": opt.state_dict(), "position": position}, tmp)
        os.replace(tmp, checkpoint_path)

    # 0. ground truth
    truth_files = [out_dir / "gt" / f"{prompt.index:05d}.safetensors" for prompt in prompts]
    todo = [(p_, f) for p_, f in zip(prompts, truth_files) if not f.is_file()]
    for prompt, path in tqdm(todo, desc="LESA ground truth", disable=not todo, dynamic_ncols=True):
        collect_ground_truth(pipe, cfg, predictor, prompt, path, data_dtype)
    steps = int(cfg.sampling.steps)
    schedule = _cache_config(cfg, predictor).schedule
    cached_steps = [s for s in range(steps) if not schedule.is_full(s, steps)]

    results: dict[str, Any] = {}
    phases: list[tuple[int, int, Callable]] = [(1, int(t.phase1.passes), _teacher_forced_prompt),
                                               (2, int(t.phase2.passes), _closed_loop_prompt)]
    for phase, passes, run_prompt in phases:
        cap = t[f"phase{phase}"].get("max_updates")
        start = opt.updates
        for pass_ in range(passes):
            if (phase, pass_) < (position["phase"], position["pass"]):
                continue
            losses: list[float] = []
            first = position["prompt"] if (phase, pass_) == (position["phase"], position["pass"]) else 0
            bar = tqdm(range(first, len(prompts)), desc=f"LESA phase {phase} pass {pass_ + 1}/{passes}", dynamic_ncols=True)
            for i in bar:
                budget = None if cap is None else int(cap) - (opt.updates - start)
                if budget is not None and budget <= 0:
                    break
                truth = load_file(str(truth_files[i]))
                prompt_losses = run_prompt(pipe, cfg, predictor, opt, truth, cached_steps, prompts[i], budget)
                losses += prompt_losses
                position = {"phase": phase, "pass": pass_, "prompt": i + 1}
                save_checkpoint()
                if prompt_losses:
                    mean = sum(prompt_losses) / len(prompt_losses)
                    bar.set_postfix(l1=f"{mean:.4g}", lr=f"{opt.lr:.3g}")
                    wb.log({f"phase{phase}/l1": mean, "lr": opt.lr, "updates": opt.updates})
            if losses:
                results[f"phase{phase}_l1_last_pass"] = sum(losses) / len(losses)
            position = {"phase": phase, "pass": pass_ + 1, "prompt": 0}
            save_checkpoint()
        if position["phase"] <= phase:  # not when resuming into a later phase
            position = {"phase": phase + 1, "pass": 0, "prompt": 0}
            save_checkpoint()
        results[f"phase{phase}_updates"] = opt.updates - start

    folder = save_predictor(predictor.eval(), out_dir / "predictor")
    if t.get("export_dir"):
        export = Path(t.export_dir)
        if export.exists():
            shutil.rmtree(export)
        export_dtype = t.get("export_dtype")
        save_predictor(predictor, export, dtype=getattr(torch, export_dtype) if export_dtype else None)
        logger.info("exported the predictor to %s (%s)", export, export_dtype or "as trained")
    results.update(updates=opt.updates, predictor=str(folder), cached_steps_per_prompt=len(cached_steps))
    wb.summary.update({k: v for k, v in results.items() if isinstance(v, (int, float))})
    wb.finish()
    logger.info("LESA training done: %s", results)
    return results


def _teacher_forced_prompt(pipe, cfg, predictor, opt: PredictorOptimizer, truth, cached_steps, prompt, budget) -> list[float]:
    losses = []
    for step, branch, forecast in teacher_forced_forecasts(predictor, truth, cached_steps):
        if budget is not None and len(losses) >= budget:
            break
        losses.append(opt.update(forecast, truth[branch][step]))
    return losses


def _closed_loop_prompt(pipe, cfg, predictor, opt: PredictorOptimizer, truth, cached_steps, prompt, budget) -> list[float]:
    losses: list[float] = []

    def learn(forecast: torch.Tensor, step: int, branch: str) -> None:
        if budget is None or len(losses) < budget:
            losses.append(opt.update(forecast, truth[branch][step]))

    transformer = pipe.transformer
    hicache.apply_cache(transformer, _cache_config(cfg, predictor), cfg.model.recipe)
    lesa_hook(transformer).on_prediction = learn
    try:
        _call(pipe, cfg, prompt)
    finally:
        hicache.remove_cache(transformer)
    return losses

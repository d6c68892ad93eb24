"""`python run.py experiment=collect_features`: record full-compute feature trajectories.

The same model, data and sampling groups as every other experiment, so trajectories come from
exactly the calls the caching runs make (same prompts, seeds, resolution and call kwargs); the
``collect`` group says which blocks, how many tokens and where. One safetensors file per prompt is
written by `hicache.trajectories`; the analysis scripts read that folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..trajectories import collect_runs
from .errors import SetupError
from .pipelines import load_pipeline, model_cpu_threads, resolve_device, resolve_dtype
from .prompts import load_prompts

logger = logging.getLogger(__name__)


def run_collect(cfg: DictConfig) -> dict:
    """One collection job, under ``model.cpu_threads`` as the caching runs."""
    with model_cpu_threads(cfg.model):
        return _collect(cfg)


def _collect(cfg: DictConfig) -> dict:
    c = cfg.collect
    if cfg.cache.method != "none":
        raise SetupError(f"experiment=collect_features records full compute; got cache={cfg.cache.name}, use cache=none")
    device = resolve_device(cfg.model.get("device"))
    pipe = load_pipeline(cfg.model, device)
    prompts = load_prompts(cfg.data, int(cfg.sampling.seed_offset))
    s = cfg.sampling
    call = dict(num_inference_steps=int(s.steps), height=int(s.height), width=int(s.width),
                **({} if s.guidance_scale is None else {"guidance_scale": float(s.guidance_scale)}),
                **OmegaConf.to_container(cfg.model.get("call_kwargs") or {}, resolve=True))
    out_dir = Path(c.out_dir)
    runs = [(f"p{p.index:05d}_s{p.seed}", p.text, p.seed) for p in prompts]
    try:
        paths = collect_runs(
            pipe, runs, out_dir, recipe=c.get("recipe") or cfg.model.recipe, blocks=c.get("blocks"),
            num_tokens=c.get("num_tokens"), token_seed=int(c.get("token_seed", 0)), dtype=resolve_dtype(c.dtype),
            max_bytes=int(float(c.max_gib) * 2**30), extra_metadata={"model": cfg.model.name, "data": cfg.data.name},
            **call,
        )
    except (ValueError, MemoryError) as err:
        raise SetupError(str(err)) from None
    total = sum(p.stat().st_size for p in paths)
    logger.info("collect_features: %d runs, %.1f MiB in %s", len(paths), total / 2**20, out_dir)
    print(f"wrote {len(paths)} trajectory files ({total / 2**20:.1f} MiB) to {out_dir}")
    return {"experiment": cfg.name, "out_dir": str(out_dir), "files": [str(p) for p in paths], "bytes": total,
            "device": str(device), "torch": torch.__version__}

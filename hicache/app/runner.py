"""One run of the app: references, the cached outputs, their metrics and cost, the summary.

Order of work: load the pipeline (so missing weights fail first, in one line), the prompts and the
metrics, and check the size the pipeline can render; claim the run folder; render the missing
uncached references (cache off; reused from disk for quality only); time the uncached and the
cached pipeline on ``speed.latency_pairs`` of this run's prompts, in turn, after a warm-up (the
latency speedup never divides by a time measured in another process or on another machine); attach
the cache and render this process's shard of the prompts, measuring each output; then rank 0 merges
all shards, writes ``summary.json`` and logs the run. A run that stops before its first output
releases its claim, so the corrected command is not refused.
"""

from __future__ import annotations

import logging
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from . import distributed
from .caching import attach, is_uncached
from .checks import check_output_size, check_size
from .loggers import NullLogger, build_logger
from .memory_check import check_fits
from .metrics import Metric, build_metrics
from .outputs import OutputKind, output_kind
from .pipelines import load_pipeline, model_cpu_threads, resolve_device
from .prompts import Prompt, load_input_image, load_prompts, reference_text
from .references import ReferenceStore, digest, read_json, write_json_atomic
from .results import RunDir
from .speed import count_transformer_flops, stopwatch
from . import video  # noqa: E402,F401  (registers the video loaders, output kind, metrics and prompt source)
from . import qwen_image  # noqa: E402,F401  (registers the Qwen-Image loaders, the edit sets and their metric)

logger = logging.getLogger(__name__)

FINGERPRINT_KEYS = ("model", "cache", "data", "sampling")


def run_name(cfg: DictConfig) -> str:
    """The run's folder name: the run name, the variant or the cache's name, and ``_limit<n>`` when
    ``data.limit`` is set, so a short smoke sweep never lands in (or is refused by) the full run's folder."""
    name = str(cfg.get("run_name") or cfg.get("variant") or cfg.cache.name)
    limit = cfg.data.get("limit")
    return name if limit is None else f"{name}_limit{int(limit)}"


def fingerprint(cfg: DictConfig) -> str:
    return digest({k: OmegaConf.to_container(cfg[k], resolve=True) for k in FINGERPRINT_KEYS})


def reference_key(cfg: DictConfig) -> dict[str, Any]:
    """What makes two uncached outputs of the same prompt and seed equal."""
    m, s = cfg.model, cfg.sampling
    return {"model": m.name, "path": str(m.get("path")), "dtype": str(m.dtype), "seed_model": m.get("seed"),
            "steps": int(s.steps), "height": int(s.height), "width": int(s.width),
            "guidance_scale": None if s.guidance_scale is None else float(s.guidance_scale),
            "call_kwargs": OmegaConf.to_container(m.get("call_kwargs") or {}, resolve=True)}


class Renderer:
    """Calls the pipeline the same way for references and cached outputs; only the steps differ."""

    def __init__(self, pipe, cfg: DictConfig, output: OutputKind, device: torch.device):
        self.pipe, self.cfg, self.output, self.device = pipe, cfg, output, device

    def __call__(self, prompt: Prompt, steps: int):
        s = self.cfg.sampling
        kwargs = OmegaConf.to_container(self.cfg.model.get("call_kwargs") or {}, resolve=True)
        if s.guidance_scale is not None:  # null for pipelines without embedded guidance (Qwen-Image warns on any value)
            kwargs["guidance_scale"] = float(s.guidance_scale)
        if prompt.image is not None:  # an editing prompt: its input image
            kwargs["image"] = load_input_image(prompt.image)
        generator = torch.Generator("cpu").manual_seed(prompt.seed)
        with torch.inference_mode():
            result = self.pipe(prompt=prompt.text, num_inference_steps=steps, height=int(s.height), width=int(s.width),
                               generator=generator, **kwargs)
        return self.output.extract(result)

    def timed(self, prompt: Prompt, steps: int):
        with stopwatch(self.device) as clock:
            out = self(prompt, steps)
        return out, clock["seconds"]

    def cached(self, prompt: Prompt, timed: bool = True):
        """Render ``prompt`` with the run's cache attached for this one call (and its time)."""
        attached = attach(self.pipe, self.cfg.cache, self.cfg.model, int(self.cfg.sampling.steps))
        try:
            return self.timed(prompt, attached.steps) if timed else (self(prompt, attached.steps), None)
        finally:
            attached.detach()

    def flops(self, prompt: Prompt, steps: int) -> int:
        with count_transformer_flops(self.pipe.transformer) as count:
            self(prompt, steps)
        return count["flops"]


def _quality(metrics: list[Metric], output, prompt: str) -> dict[str, float]:
    return {m.name: m.fn(output, prompt) for m in metrics if m.kind == "quality"}


def ensure_references(render: Renderer, store: ReferenceStore, prompts: list[Prompt], metrics: list[Metric],
                      cfg: DictConfig, world: distributed.World) -> dict[int, tuple[Any, dict]]:
    """Every prompt's uncached output and its meta (latency, quality metrics), rendering what is missing."""
    steps = int(cfg.sampling.steps)
    found = {p.index: store.get(p.key, p.seed) for p in prompts}
    missing = [p for p in prompts if found[p.index] is None]
    for p in tqdm(missing, desc="references", disable=not missing, dynamic_ncols=True):
        output = render(p, steps)
        check_output_size(output, cfg)
        store.put(p.key, p.seed, output, {"device": str(render.device), "metrics": {}})
        found[p.index] = store.get(p.key, p.seed)
    for p in prompts:  # quality metrics of the references, measured once and kept with them
        output, meta = found[p.index]
        todo = [m for m in metrics if m.kind == "quality" and m.name not in meta.get("metrics", {})]
        if todo:
            meta.setdefault("metrics", {}).update(_quality(todo, output, p.text))
            store.update_meta(p.key, p.seed, meta)
    return found


def measure_latency(render: Renderer, prompts: list[Prompt], uncached: bool, warmup: bool) -> dict[str, Any]:
    """Wall-clock seconds of the uncached and the cached pipeline on the same prompts, in turn, in this process.

    One untimed render of each comes first (``warmup``), then each prompt is rendered uncached and
    cached back to back, so both see the same load, clocks and thread count. For an uncached run
    the cached pipeline *is* the uncached one: each prompt is timed once and counts for both (1.00x).
    """
    steps = int(render.cfg.sampling.steps)
    if warmup and prompts:
        render(prompts[0], steps)
        if not uncached:
            render.cached(prompts[0], timed=False)
    pairs = []
    for p in tqdm(prompts, desc="latency pairs", dynamic_ncols=True):
        _, reference = render.timed(p, steps)
        cached = reference if uncached else render.cached(p)[1]
        pairs.append({"index": p.index, "uncached_s": reference, "cached_s": cached})
    return {"pairs": pairs, "device": str(render.device), "threads": torch.get_num_threads(), "warmup": bool(warmup),
            "host": platform.node()}


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else None


def summarize(cfg: DictConfig, records: list[dict], metric_names: list[str], unavailable: list[str],
              extra: dict[str, Any]) -> dict[str, Any]:
    c = cfg.cache
    summary: dict[str, Any] = {
        "experiment": cfg.name, "run": run_name(cfg), "variant": cfg.get("variant"), "model": cfg.model.name,
        "family": c.get("family", "hicache"), "method": c.method, "label": c.get("label") or c.method,
        "interval": c.get("interval"), "order": c.get("order"), "sigma": c.get("sigma"), "warmup": c.get("warmup"),
        "clusters": c.get("clusters"), "propagation": c.get("propagation"),
        "reference_steps": int(cfg.sampling.steps), "num_outputs": len(records),
        "height": int(cfg.sampling.height), "width": int(cfg.sampling.width),
        "data_limit": cfg.data.get("limit"), "output_latency_s": _mean([r.get("latency_s") for r in records]),
        "torch": torch.__version__, "host": platform.node(),
    }
    summary.update(extra)
    pairs = (summary.pop("latency", None) or {}).get("pairs") or []
    if pairs:  # see measure_latency: both pipelines timed in this run, on the same prompts
        summary["latency_s"] = _mean([p["cached_s"] for p in pairs])
        summary["reference_latency_s"] = _mean([p["uncached_s"] for p in pairs])
        summary["latency_pairs"] = len(pairs)
        summary["latency_speedup"] = summary["reference_latency_s"] / summary["latency_s"]
    if summary.get("flops") and summary.get("reference_flops"):
        summary["flops_speedup"] = summary["reference_flops"] / summary["flops"]
    for name in metric_names:
        summary[name] = _mean([r.get(name) for r in records])
        if any(f"reference_{name}" in r for r in records):
            summary[f"reference_{name}"] = _mean([r.get(f"reference_{name}") for r in records])
    for name in unavailable:
        summary[name] = "n/a"
    summary["unavailable_metrics"] = list(unavailable)
    return summary


def run(cfg: DictConfig) -> dict[str, Any]:
    """One job, under ``model.cpu_threads`` (see `model_cpu_threads`)."""
    with model_cpu_threads(cfg.model):
        return _run(cfg)


def _run(cfg: DictConfig) -> dict[str, Any]:
    device = resolve_device(cfg.model.get("device"))
    world = distributed.join(device)
    device = world.device(device)
    run_dir = RunDir(Path(cfg.paths.outputs) / cfg.name / run_name(cfg), fingerprint(cfg))
    if cfg.run.skip_finished and run_dir.finished():
        logger.info("skipping %s: finished (summary.json present)", run_dir.path)
        distributed.leave(world)
        return run_dir.summary()

    video.check_metrics(cfg.model, cfg.metrics)
    output = output_kind(cfg.model.get("output", "image"))
    pipe = load_pipeline(cfg.model, device, before_move=lambda pipe: check_fits(pipe, cfg, device))
    check_size(pipe, cfg)
    prompts = load_prompts(cfg.data, int(cfg.sampling.seed_offset))
    metrics, unavailable = build_metrics(cfg.metrics, device)
    step_logger = build_logger(cfg.logger) if world.is_main else NullLogger()
    # Claim the folder only once setup succeeded: a run that stopped at a setup error (missing
    # weights, say) must not block the corrected command the error told the user to type.
    if world.is_main:
        run_dir.claim()
    world.barrier()
    try:
        return _render_claimed(cfg, world, device, run_dir, output, pipe, prompts, metrics, unavailable, step_logger)
    except BaseException:
        if world.is_main:
            run_dir.release()  # only if it holds no output yet: nothing is lost, nothing is left half claimed
        raise


def _render_claimed(cfg: DictConfig, world: distributed.World, device: torch.device, run_dir: RunDir,
                    output: OutputKind, pipe, prompts: list[Prompt], metrics: list[Metric],
                    unavailable: list[str], step_logger) -> dict[str, Any]:
    done = run_dir.records()
    shard = world.shard(prompts)
    todo = [p for p in shard if p.index not in done or not run_dir.output_path(p.index, output.suffix).is_file()]
    logger.info("%s: %d prompts, %d in this shard, %d to render", run_dir.path, len(prompts), len(shard), len(todo))

    render = Renderer(pipe, cfg, output, device)
    store = ReferenceStore(cfg.paths.references, output, reference_key(cfg))
    references = ensure_references(render, store, todo, metrics, cfg, world) if todo else {}
    if world.is_main and cfg.speed.flops and store.flops() is None:
        store.put_flops(render.flops(prompts[0], int(cfg.sampling.steps)))

    latency_file = run_dir.path / "latency.json"
    uncached = is_uncached(cfg.cache)
    latency_pairs = int(cfg.speed.get("latency_pairs") or 0)
    if world.is_main and latency_pairs > 0 and not latency_file.is_file():
        write_json_atomic(latency_file, measure_latency(render, prompts[:latency_pairs], uncached,
                                                        bool(cfg.speed.warmup)))

    if todo:
        step_logger.start(config=cfg, run_dir=run_dir.path, name=f"{cfg.name}/{run_name(cfg)}", group=cfg.name)
    attached = attach(pipe, cfg.cache, cfg.model, int(cfg.sampling.steps))
    flops_file = run_dir.path / "flops.json"
    try:
        if world.is_main and cfg.speed.flops and not flops_file.is_file():
            flops = store.flops() if uncached and store.flops() else render.flops(prompts[0], attached.steps)
            write_json_atomic(flops_file, {"flops": flops})
        for i, p in enumerate(tqdm(todo, desc=run_name(cfg), dynamic_ncols=True)):
            out, seconds = render.timed(p, attached.steps)
            if i == 0:
                check_output_size(out, cfg)
            reference, meta = references[p.index]
            record = {"index": p.index, "prompt": p.text, "seed": p.seed, "rank": world.rank, "latency_s": seconds}
            if p.image is not None:
                record["image"] = p.image
            for m in metrics:
                record[m.name] = m.fn(out, reference) if m.kind == "fidelity" else m.fn(out, p.text)
                if m.kind == "quality":
                    record[f"reference_{m.name}"] = meta["metrics"][m.name]
            output.save(out, run_dir.output_path(p.index, output.suffix))
            run_dir.append(world.rank, record)
            step_logger.log_output(record)
        described = attached.describe()
    except BaseException:
        step_logger.close(failed=True)
        raise
    finally:
        attached.detach()

    world.barrier()
    summary = None
    if world.is_main:
        records = sorted(run_dir.records().values(), key=lambda r: r["index"])
        missing = sorted({p.index for p in prompts} - {r["index"] for r in records})
        if missing:
            raise RuntimeError(f"{run_dir.path}: outputs {missing[:10]} missing after every shard finished")
        extra = {"steps": attached.steps, "device": str(device), "world_size": world.size,
                 "flops": read_json(flops_file)["flops"] if flops_file.is_file() else None,
                 "reference_flops": store.flops(), "uncached": uncached,
                 "latency": read_json(latency_file) if latency_file.is_file() else None, **described}
        summary = summarize(cfg, records, [m.name for m in metrics], unavailable, extra)
        OmegaConf.save(cfg, run_dir.path / "config.yaml", resolve=True)
        run_dir.write_final(records, summary)  # summary.json last: it marks the run finished
        summary = run_dir.summary()
        pairs = []
        for r in records[: int(cfg.logger.get("grid_size", 8))] if cfg.logger.get("kind", "none") != "none" else []:
            ref = store.get(reference_text(r["prompt"], r.get("image")), r["seed"])
            pairs.append((output.load(run_dir.output_path(r["index"], output.suffix)), ref[0]))
        step_logger.log_run(config=cfg, run_dir=run_dir.path, name=f"{cfg.name}/{run_name(cfg)}",
                                         group=cfg.name, records=records, summary=summary, pairs=pairs)
        logger.info("%s: %s", run_dir.path, {k: summary.get(k) for k in ("latency_speedup", "flops_speedup", "psnr", "ssim")})
    world.barrier()
    distributed.leave(world)
    return summary if summary is not None else {}

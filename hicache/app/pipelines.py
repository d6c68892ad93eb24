"""Build a diffusers pipeline from a `model` config, and say in one line what is missing if it cannot.

A model config names its loader with ``kind``; `LOADERS` maps kinds to functions, so a new model
family (a video pipeline, a super-resolution port) registers one function with `register_loader`
and needs no change to the runner.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from .errors import SetupError

logger = logging.getLogger(__name__)

LOADERS: dict[str, Callable[[DictConfig], object]] = {}


def register_loader(kind: str):
    def add(fn):
        LOADERS[kind] = fn
        return fn

    return add


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextmanager
def model_cpu_threads(model_cfg):
    """Cap torch's CPU threads at ``model.cpu_threads`` for one job: for small models a second
    thread's synchronisation costs more than it saves, badly so on a busy machine."""
    threads = torch.get_num_threads()
    if model_cfg.get("cpu_threads") and resolve_device(model_cfg.get("device")).type == "cpu":
        torch.set_num_threads(int(model_cfg.cpu_threads))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise SetupError(f"model.dtype={name!r} is not a torch dtype (try float32, bfloat16 or float16)")
    return dtype


_LOADED: dict[str, object] = {}  # the last pipeline, so the jobs of a multirun load the weights once


def load_pipeline(model: DictConfig, device: torch.device, before_move: Callable[[object], None] | None = None):
    """The pipeline of ``model`` on ``device``, with its own progress bar off (the app shows one per run).

    The jobs of a Hydra multirun share one process: the last pipeline is kept and handed to the next
    job with the same model config (every run detaches its cache, so it is the uncached model again).
    ``model.reuse=false`` loads afresh every time. ``before_move(pipe)`` runs once the weights are read, before
    they move to ``device`` (the memory check: it raises to stop there), and on a kept pipeline too.
    """
    key = f"{device}|{OmegaConf.to_yaml(model, resolve=True)}"
    if model.get("reuse", True) and key in _LOADED:
        if before_move is not None:
            before_move(_LOADED[key])
        return _LOADED[key]
    _LOADED.clear()
    pipe = _load(model, device, before_move)
    if model.get("reuse", True):
        _LOADED[key] = pipe
    return pipe


def forget_pipelines() -> None:
    """Drop the kept pipeline (after a failed job, whose hooks may not have been removed)."""
    _LOADED.clear()


CPU_OFFLOAD = {True: "enable_model_cpu_offload", "model": "enable_model_cpu_offload",
               "sequential": "enable_sequential_cpu_offload"}


def _load(model: DictConfig, device: torch.device, before_move: Callable[[object], None] | None = None):
    if model.kind not in LOADERS:
        raise SetupError(f"model.kind={model.kind!r} has no loader; known kinds: {', '.join(sorted(LOADERS))}")
    offload = model.get("cpu_offload", False)
    if offload and offload not in CPU_OFFLOAD:
        raise SetupError(f"model.cpu_offload={offload!r}: use false, true (= model) or sequential")
    pipe = LOADERS[model.kind](model)
    if before_move is not None:
        before_move(pipe)
    if offload:
        getattr(pipe, CPU_OFFLOAD[offload])(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def from_pretrained(pipeline_class, model: DictConfig):
    """``pipeline_class.from_pretrained(model.path)``; missing weights become a one-line `SetupError`."""
    hint = model.get("download_hint") or "download the pipeline folder and set model.path=<folder>"
    if not model.get("path"):
        raise SetupError(f"model {model.name}: model.path is not set; {hint}")
    path = str(model.path)
    local = Path(path).expanduser()
    looks_local = local.exists() or path.startswith(("/", ".", "~")) or path.count("/") != 1
    if looks_local and not (local / "model_index.json").is_file():
        raise SetupError(f"model {model.name}: no diffusers pipeline at {local} (model_index.json missing); {hint}")
    import diffusers
    from diffusers.utils import logging as diffusers_logging
    from packaging.version import Version

    dtype_arg = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its "couldn't connect, trying the cache" lines are not the error
    try:
        return pipeline_class.from_pretrained(str(local) if looks_local else path,
                                              **{dtype_arg: resolve_dtype(model.dtype)})
    except OSError as err:
        reason = str(err).splitlines()[0]
        reason = reason if len(reason) <= 100 else reason[:100] + "..."
        raise SetupError(f"model {model.name}: cannot load {path!r} ({reason}); {hint}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)


@register_loader("flux")
def _flux(model: DictConfig):
    from diffusers import FluxPipeline

    return from_pretrained(FluxPipeline, model)


@register_loader("diffusers")
def _any_diffusers(model: DictConfig):
    """Any pipeline class, picked by diffusers from the folder's model_index.json."""
    from diffusers import DiffusionPipeline

    return from_pretrained(DiffusionPipeline, model)


@register_loader("tiny_flux")
def _tiny_flux(model: DictConfig):
    """A random tiny FluxPipeline built in memory (tests and smoke runs; no files needed)."""
    from hicache.testbeds.tiny.flux import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed=int(model.get("seed", 0)), num_layers=int(model.get("num_layers", 1)),
                              num_single_layers=int(model.get("num_single_layers", 1)))
    dtype = resolve_dtype(model.dtype)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)

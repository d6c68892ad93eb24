"""Record the exact features a cache would forecast, at every step of full-compute sampling.

The analysis of issue 5 (how Gaussian are feature differences, how well does each basis forecast
them) needs the reference trajectories of the very modules a recipe forecasts. This module attaches
plain recorder hooks (diffusers `HookRegistry`, so nothing in the model changes) to those modules and
writes one safetensors file per sampling run.

Memory stays bounded by design: only the blocks matching a regex are recorded, and tokens are
subsampled with one fixed seeded index per token count (all channels are kept, so per-token norms,
which the analytic sigma uses, stay exact). A budget in bytes stops a run that would not fit with a
one-line error instead of an out-of-memory crash hours later.

File layout: one tensor per (branch, module, output index), named ``"{branch}/{module}/{output}"``,
of shape ``(steps, batch, tokens, channels)`` (or ``(steps, *shape)`` for outputs without a token
axis); all metadata (prompt, seed, timesteps, sigmas, token indices, ...) is one JSON string under
the ``"hicache_trajectories"`` key of the safetensors header, mirrored in a ``.json`` sidecar.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .recipes import Recipe, get_recipe

METADATA_KEY = "hicache_trajectories"
FORMAT_VERSION = 1
ROOT_HOOK = "hicache_trajectory_step"
MODULE_HOOK = "hicache_trajectory_record"
DEFAULT_BRANCH = "default"

_BLOCK_RE = re.compile(r"^(.*\.\d+)\.([^.].*)$")


def split_block(module_name: str) -> tuple[str, str]:
    """``"transformer_blocks.3.attn"`` -> ``("transformer_blocks.3", "attn")``: the block is the
    longest prefix ending in a numeric index, so any ModuleList-of-blocks model splits the same way."""
    match = _BLOCK_RE.match(module_name)
    return (match.group(1), match.group(2)) if match else ("", module_name)


def token_index(num_tokens: int, keep: int | None, seed: int) -> torch.Tensor:
    """The sorted token positions kept out of ``num_tokens``; the same for every module of that length."""
    if keep is None or keep >= num_tokens:
        return torch.arange(num_tokens)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + num_tokens)
    return torch.randperm(num_tokens, generator=generator)[:keep].sort().values


def recorded_modules(model: torch.nn.Module, recipe: str | Recipe, blocks: str | None = None) -> list[str]:
    """Names of the modules ``recipe`` forecasts, restricted to blocks fully matching ``blocks``."""
    recipe = get_recipe(recipe)
    names = [n for n, _ in model.named_modules() if n and recipe.role(n) == "forecast"]
    if blocks is not None:
        pattern = re.compile(blocks)
        names = [n for n in names if pattern.fullmatch(split_block(n)[0])]
    if not names:
        raise ValueError(
            f"nothing to record: recipe {recipe.name!r} with blocks={blocks!r} matches no module of "
            f"{type(model).__name__}"
        )
    return names


class _BranchState(BaseState):
    def reset(self) -> None:
        pass


class _StepHook(ModelHook):
    """On the root module: one forward is one denoising step of the current cache-context branch."""

    # Stateful only so that diffusers' `cache_context` hands us the branch name ("cond", "uncond").
    _is_stateful = True

    def __init__(self, recorder: "TrajectoryRecorder"):
        super().__init__()
        self.recorder = recorder
        self.state_manager = StateManager(_BranchState)

    def pre_forward(self, module, *args, **kwargs):
        try:
            branch = self.state_manager.context.name
        except ValueError:
            branch = DEFAULT_BRANCH
        self.recorder._begin_step(branch, kwargs.get("timestep"))
        return args, kwargs

    def reset_state(self, module):
        self.state_manager.reset()
        return module


class _RecordHook(ModelHook):
    def __init__(self, recorder: "TrajectoryRecorder", name: str):
        super().__init__()
        self.recorder = recorder
        self.name = name

    def post_forward(self, module, output):
        self.recorder._record(self.name, output)
        return output


@dataclass
class TrajectoryRecorder:
    """Recorder hooks on ``model``: attach, run sampling, `save`, `clear`, and finally `remove`.

    Args:
        model: the denoiser (e.g. ``pipe.transformer``); it must run in full (no cache attached).
        recipe: registered recipe name or `Recipe`; its ``forecast`` modules are recorded.
        blocks: regex fully matching the block names to keep (e.g. ``r"transformer_blocks\\.(0|9)"``).
        num_tokens: tokens kept per output (a fixed seeded subsample); None keeps all.
        token_seed: seed of the token subsample.
        dtype: storage dtype on CPU.
        max_bytes: stop with a clear error once the recorded features exceed this.
    """

    model: torch.nn.Module
    recipe: str | Recipe = "flux"
    blocks: str | None = None
    num_tokens: int | None = 256
    token_seed: int = 0
    dtype: torch.dtype = torch.float32
    max_bytes: int = 8 * 2**30
    modules: list[str] = field(init=False)

    def __post_init__(self):
        handle = getattr(self.model, "_hicache_handle", None)
        if handle is not None and handle.config.method != "none":
            raise ValueError("trajectories must come from full compute: call hicache.remove_cache(model) first")
        self.recipe = get_recipe(self.recipe)
        self.modules = recorded_modules(self.model, self.recipe, self.blocks)
        self._steps: dict[str, int] = {}
        self._branch = DEFAULT_BRANCH
        self._timesteps: dict[str, list[float | None]] = {}
        self._features: dict[tuple[str, str, int], list[tuple[int, torch.Tensor]]] = {}
        self._shapes: dict[tuple[str, str, int], list[int]] = {}
        self._bytes = 0
        self._attached = False
        self.attach()

    # -- hooks -----------------------------------------------------------------------------------
    def attach(self) -> None:
        if self._attached:
            return
        modules = dict(self.model.named_modules())
        HookRegistry.check_if_exists_or_initialize(self.model).register_hook(_StepHook(self), ROOT_HOOK)
        for name in self.modules:
            HookRegistry.check_if_exists_or_initialize(modules[name]).register_hook(_RecordHook(self, name), MODULE_HOOK)
        HookRegistry.check_if_exists_or_initialize(self.model).invalidate_child_registries_cache()
        self._attached = True

    def remove(self) -> None:
        """Detach every recorder hook; the model is as before."""
        if not self._attached:
            return
        registry = HookRegistry.check_if_exists_or_initialize(self.model)
        registry.remove_hook(ROOT_HOOK, recurse=False)
        registry.remove_hook(MODULE_HOOK, recurse=True)
        registry.invalidate_child_registries_cache()
        self._attached = False

    def _begin_step(self, branch: str, timestep: Any) -> None:
        self._branch = branch
        self._steps[branch] = self._steps.get(branch, -1) + 1
        value = None
        if isinstance(timestep, torch.Tensor) and timestep.numel() > 0:
            value = float(timestep.detach().flatten()[0].float())
        elif isinstance(timestep, (int, float)):
            value = float(timestep)
        self._timesteps.setdefault(branch, []).append(value)

    def _record(self, name: str, output: Any) -> None:
        if self._branch not in self._steps:
            raise RuntimeError(f"recorder: {name!r} ran before the root module's step hook")
        step = self._steps[self._branch]
        outputs = (output,) if isinstance(output, torch.Tensor) else output
        if not isinstance(outputs, tuple):
            raise TypeError(f"recorder: {name!r} returned {type(output).__name__}, not a tensor or tuple of tensors")
        for i, value in enumerate(outputs):
            if not isinstance(value, torch.Tensor):
                continue
            key = (self._branch, name, i)
            value = value.detach()
            if value.dim() >= 3:  # (batch, tokens, channels, ...): keep a fixed subsample of tokens
                index = token_index(value.shape[1], self.num_tokens, self.token_seed).to(value.device)
                value = value.index_select(1, index)
            value = value.to("cpu", self.dtype).contiguous()
            previous = self._shapes.setdefault(key, list(value.shape))
            if previous != list(value.shape):
                raise ValueError(f"recorder: {name!r} output {i} changed shape from {previous} to {list(value.shape)}")
            self._bytes += value.numel() * value.element_size()
            if self._bytes > self.max_bytes:
                raise MemoryError(
                    f"recorded features exceed max_bytes={self.max_bytes / 2**30:.2f} GiB: record fewer blocks "
                    f"(blocks=...), fewer tokens (num_tokens=...) or fewer steps"
                )
            self._features.setdefault(key, []).append((step, value))

    # -- runs ------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        """Forget the recorded run (the hooks stay attached)."""
        self._steps.clear()
        self._timesteps.clear()
        self._features.clear()
        self._shapes.clear()
        self._bytes = 0
        self._branch = DEFAULT_BRANCH

    def save(self, path: str | Path, **metadata: Any) -> Path:
        """Write the recorded run to ``path`` (safetensors) plus a ``.json`` sidecar of the metadata."""
        if not self._features:
            raise RuntimeError("nothing recorded: run the model between attaching the recorder and save()")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        series = {}
        for (branch, name, i), items in self._features.items():
            key = f"{branch}/{name}/{i}"
            steps = [s for s, _ in items]
            if len(set(steps)) != len(steps):
                raise RuntimeError(f"recorder: {name!r} ran more than once in one step; record a single denoiser call per step")
            tensors[key] = torch.stack([v for _, v in items])
            block, module = split_block(name)
            series[key] = dict(branch=branch, name=name, block=block, module=module, output=i, steps=steps)
        meta = dict(
            format_version=FORMAT_VERSION,
            recipe=self.recipe.name,
            recipe_forecast=list(self.recipe.forecast),
            blocks=self.blocks,
            model_class=type(self.model).__name__,
            num_tokens=self.num_tokens,
            token_seed=self.token_seed,
            dtype=str(self.dtype).removeprefix("torch."),
            timesteps=self._timesteps,
            series=series,
            **metadata,
        )
        text = json.dumps(meta, default=_jsonable)
        save_file(tensors, str(path), metadata={METADATA_KEY: text})
        path.with_suffix(".json").write_text(json.dumps(json.loads(text), indent=1))
        return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (torch.dtype, Path)):
        return str(value)
    raise TypeError(f"metadata value {value!r} is not JSON-serialisable")


# -- reading ---------------------------------------------------------------------------------------
@dataclass
class Series:
    """One recorded output of one module: ``values[j]`` is the feature at denoising step ``steps[j]``."""

    key: str
    branch: str
    name: str
    block: str
    module: str
    output: int
    steps: list[int]
    values: torch.Tensor

    @property
    def label(self) -> str:
        out = f"[{self.output}]" if self.output else ""
        branch = "" if self.branch in ("cond", DEFAULT_BRANCH) else f"{self.branch}:"
        return f"{branch}{self.name}{out}"


@dataclass
class Trajectories:
    path: Path
    meta: dict
    series: list[Series]

    def __iter__(self):
        return iter(self.series)

    def __len__(self) -> int:
        return len(self.series)


def load_trajectories(path: str | Path, keys: Iterable[str] | None = None) -> Trajectories:
    """Read a file written by `TrajectoryRecorder.save`; only the series named in ``keys``, if given
    (tensors are read lazily, so one series of many large runs fits in memory)."""
    path = Path(path)
    wanted = None if keys is None else set(keys)
    if not path.is_file():
        raise FileNotFoundError(f"no trajectory file at {path}: collect one with `python run.py experiment=collect_features`")
    with safe_open(str(path), framework="pt") as f:
        header = (f.metadata() or {}).get(METADATA_KEY)
        if header is None:
            raise ValueError(f"{path} is not a hicache trajectory file (no {METADATA_KEY!r} metadata)")
        meta = json.loads(header)
        series = [
            Series(key=key, branch=info["branch"], name=info["name"], block=info["block"], module=info["module"],
                   output=info["output"], steps=info["steps"], values=f.get_tensor(key))
            for key, info in meta["series"].items()
            if wanted is None or key in wanted
        ]
    return Trajectories(path, meta, series)


def trajectory_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (all ``*.safetensors`` inside) into a sorted list of trajectory files."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    paths = [Path(p) for p in paths]
    for p in paths:
        files.extend(sorted(p.glob("*.safetensors")) if p.is_dir() else [p] if p.exists() else [])
    if not files:
        raise FileNotFoundError(
            f"no trajectory files in {', '.join(map(str, paths))}: collect them with "
            f"`python run.py experiment=collect_features` (or hicache.trajectories.collect_pipeline_runs)"
        )
    return files


# -- collecting through a pipeline ------------------------------------------------------------------
def collect_runs(
    pipe,
    runs: Iterable[tuple[str, str, int]],
    out_dir: str | Path,
    recipe: str | Recipe = "flux",
    blocks: str | None = None,
    num_tokens: int | None = 256,
    token_seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_bytes: int = 8 * 2**30,
    progress: bool = True,
    extra_metadata: dict | None = None,
    **call_kwargs: Any,
) -> list[Path]:
    """Run ``pipe`` in full once per ``(name, prompt, seed)`` and save ``out_dir/{name}.safetensors``.

    ``call_kwargs`` go to the pipeline call (num_inference_steps, guidance_scale, height, width...).
    The latents are not decoded: only the denoiser's features matter here.
    """
    model = getattr(pipe, "transformer", None)
    if model is None:
        raise ValueError(f"{type(pipe).__name__} has no .transformer to record")
    recorder = TrajectoryRecorder(model, recipe, blocks, num_tokens, token_seed, dtype, max_bytes)
    out_dir = Path(out_dir)
    runs = list(runs)
    paths = []
    try:
        for name, prompt, seed in tqdm(runs, desc="collect trajectories", disable=not progress):
            recorder.clear()
            # A CPU generator, like the experiment app's renders: the same noise on any device.
            generator = torch.Generator("cpu").manual_seed(int(seed))
            with torch.inference_mode():
                pipe(prompt, generator=generator, output_type="latent", **call_kwargs)
            sigmas = getattr(getattr(pipe, "scheduler", None), "sigmas", None)
            paths.append(recorder.save(
                out_dir / f"{name}.safetensors", prompt=prompt, seed=int(seed), pipeline_class=type(pipe).__name__,
                call_kwargs={k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str, bool, type(None)))},
                sigmas=sigmas.tolist() if isinstance(sigmas, torch.Tensor) else None,
                **(extra_metadata or {}),
            ))
    finally:
        recorder.remove()
    return paths


def collect_pipeline_runs(pipe, prompts: Sequence[str], seeds: Sequence[int], out_dir: str | Path,
                          **kwargs: Any) -> list[Path]:
    """`collect_runs` over every (prompt, seed) pair, saved as ``p{prompt index:03d}_s{seed}``."""
    runs = [(f"p{i:03d}_s{int(seed)}", prompt, seed) for i, prompt in enumerate(prompts) for seed in seeds]
    return collect_runs(pipe, runs, out_dir, **kwargs)

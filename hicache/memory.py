"""How much memory a cached run needs, known before the weights reach the accelerator.

The cache holds, for every forecast output, ``order + 1`` factors (FORA: the output itself), per cache
context, plus the shared zeros that stand in for skipped modules. Their sizes depend only on the
model's configuration and the sampling shape, so they are read off one forward of a *meta* twin of
the model (same class, same config, no storage, no weights needed): forward hooks record the shape and
dtype of every module the recipe forecasts, skips or computes partly. The same forward, under a
dispatch mode that follows every tensor's storage, gives the peak of a full step's live activations;
attention is counted as a fused kernel would run it (its output only, as flash/memory-efficient SDPA
on a GPU), not as the quadratic score matrix the meta device's reference kernel would make.

The inputs of that forward are model knowledge: each recipe module registers an input builder
(`register_input_builder`) that turns a sampling shape (height, width, frames, text tokens) into the
transformer's keyword arguments.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .config import CacheConfig
from .hooks import STAND_IN_SHAPE_OF_ROLE, chunk_runs, stand_in_shape

InputBuilder = Callable[..., dict[str, Any]]
INPUT_BUILDERS: dict[str, InputBuilder] = {}

GiB = 2**30


def format_bytes(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def register_input_builder(recipe_name: str):
    """``fn(config, *, height, width, frames, batch, text_tokens, dtype, device, **kw) -> forward kwargs``
    of the transformer a recipe is written for (``config``: the model's diffusers config)."""
    def add(fn: InputBuilder) -> InputBuilder:
        INPUT_BUILDERS[recipe_name] = fn
        return fn

    return add


@dataclass
class MemoryEstimate:
    """Bytes of a cached run's transformer, per part; `total_bytes` is what the accelerator must hold."""

    cache_bytes: int        # the factors of every forecast output, all contexts, at the peak order
    stand_in_bytes: int     # the shared zeros of skipped modules and left-out chunks
    update_bytes: int       # the one extra output a full step's update holds while it replaces the oldest
    activation_bytes: int   # peak live tensors of one full forward (inputs included)
    weight_bytes: int       # the transformer's parameters and buffers
    forecast_outputs: int
    factor_dtype: str

    @property
    def cache_total_bytes(self) -> int:
        return self.cache_bytes + self.stand_in_bytes + self.update_bytes

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.cache_total_bytes + self.activation_bytes

    def __str__(self) -> str:
        return (f"transformer weights {format_bytes(self.weight_bytes)} + cache {format_bytes(self.cache_total_bytes)} "
                f"({self.forecast_outputs} forecast outputs, {self.factor_dtype} factors) + activations "
                f"{format_bytes(self.activation_bytes)} = {format_bytes(self.total_bytes)}")


def num_factors(config: CacheConfig) -> int:
    """Factors kept per forecast output at the peak: FORA keeps D0 only, the others D0..D_order."""
    if config.method == "none":
        return 0
    return 1 if config.method == "fora" else config.order + 1


def meta_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The same class built from ``model``'s config on the meta device, without hooks or weights (``model`` itself
    if it has no diffusers config but is already on meta)."""
    if not hasattr(type(model), "from_config") or not hasattr(model, "config"):
        if all(p.device.type == "meta" for p in model.parameters()):
            return model
        raise ValueError(f"{type(model).__name__} has no diffusers config to build a meta twin from; "
                         "pass a model built on the meta device")
    with torch.device("meta"):
        twin = type(model).from_config(model.config)
    return torch.nn.Module.to(twin, _dtype_of(model)).eval()  # not ModelMixin.to, which warns about fp32 modules


def estimate_memory(model: torch.nn.Module, config: CacheConfig, recipe, *, height: int, width: int,
                    frames: int | None = None, batch: int = 1, contexts: int = 1, text_tokens: int | None = None,
                    **builder_kwargs) -> MemoryEstimate:
    """The memory of sampling ``model`` at ``height`` x ``width`` (x ``frames``) with the cache of ``config``,
    without running the model (one forward of its meta twin).

    ``contexts``: cache contexts kept at once (2 with true classifier-free guidance, else 1).
    ``builder_kwargs`` go to the recipe's input builder (e.g. ``vae_scale_factor``).
    """
    from .recipes import get_recipe  # the recipes register their input builders here: imported late

    recipe = get_recipe(recipe)
    if recipe.name not in INPUT_BUILDERS:
        raise ValueError(f"recipe {recipe.name!r} has no input builder for memory estimates; "
                         f"known: {', '.join(sorted(INPUT_BUILDERS))} (see hicache.memory.register_input_builder)")
    twin = meta_twin(model)
    dtype = _dtype_of(twin)
    kwargs = {k: v for k, v in dict(frames=frames, text_tokens=text_tokens).items() if v is not None}
    inputs = INPUT_BUILDERS[recipe.name](twin.config, height=height, width=width, batch=batch, dtype=dtype,
                                         device=torch.device("meta"), **kwargs, **builder_kwargs)
    outputs: dict[str, list[tuple[torch.Size, torch.dtype]]] = {}
    roles = {name: recipe.role(name) for name, _ in twin.named_modules() if name}
    modules = dict(twin.named_modules())
    handles = [modules[name].register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, _specs(out)))
               for name, role in roles.items() if role is not None]
    tracker = _LiveBytes(exclude=[*twin.parameters(), *twin.buffers()])
    try:
        with torch.no_grad(), _FusedAttention(), tracker:
            for value in inputs.values():
                tracker.track(value)
            twin(**inputs)
    finally:
        for handle in handles:
            handle.remove()

    cache = largest = count = 0
    zeros: set[tuple] = set()
    factor_dtypes: set[str] = set()
    factors = num_factors(config)
    for name, specs in outputs.items():
        role = roles[name]
        for slot, (shape, out_dtype) in enumerate(specs):
            if role == "forecast" and factors:
                factor_dtype = out_dtype if config.method == "fora" or config.factor_dtype is None else config.factor_dtype
                nbytes = math.prod(shape) * _itemsize(factor_dtype)
                cache += nbytes * factors * contexts
                factor_dtypes.add(str(factor_dtype).removeprefix("torch."))
                largest = max(largest, nbytes)
                count += 1
            elif role in STAND_IN_SHAPE_OF_ROLE and factors:
                # one tensor per (shape, dtype, tuple slot): `hooks.ZeroPool`
                zeros.add((tuple(stand_in_shape(shape, STAND_IN_SHAPE_OF_ROLE[role])), out_dtype, slot))
            elif role == "live_chunks" and factors:
                for start, stop, live in chunk_runs(shape[-1], *recipe.chunks(name)):
                    if not live:
                        zeros.add((tuple(shape[:-1]) + (stop - start,), out_dtype, 0))
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return MemoryEstimate(
        cache_bytes=cache,
        stand_in_bytes=sum(math.prod(s) * _itemsize(d) for s, d, _ in zeros),
        update_bytes=largest if factors > 1 else 0,
        activation_bytes=tracker.peak,
        weight_bytes=weights,
        forecast_outputs=count,
        factor_dtype="/".join(sorted(factor_dtypes)) or "no",
    )


def _dtype_of(model: torch.nn.Module) -> torch.dtype:
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return max(set(dtypes), key=dtypes.count) if dtypes else torch.float32


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _specs(output: Any) -> list[tuple[torch.Size, torch.dtype]]:
    outputs = output if isinstance(output, tuple) else (output,)
    return [(o.shape, o.dtype) for o in outputs if isinstance(o, torch.Tensor)]


class _FusedAttention(TorchFunctionMode):
    """SDPA as a fused GPU kernel allocates it: the output (and no score matrix)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query = args[0] if args else kwargs["query"]
            value = args[2] if len(args) > 2 else kwargs["value"]
            return query.new_empty(query.shape[:-1] + value.shape[-1:])
        return func(*args, **kwargs)


class _LiveBytes(TorchDispatchMode):
    """The peak bytes of storages alive at once among the tensors ops create (and those given to `track`)."""

    def __init__(self, exclude=()):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage id -> [tensors alive, bytes]
        self._excluded = {t.untyped_storage()._cdata for t in exclude}  # the weights (and views of them)

    def track(self, tensor: Any) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._excluded:
            return
        entry = self._refs.get(key)
        if entry is None:
            entry = self._refs[key] = [0, storage.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            self.track(t)
        return out

"""diffusers hooks that carry the caching core into an unmodified model.

Four hooks, one concern each, all on diffusers' own `HookRegistry`:

- `StepHook` on the root module counts steps (one root forward = one step) and asks the schedule
  whether the step is full. Its `StateManager` is shared with every other hook, so they all see
  the same step in the same cache context (and the pipelines' `cache_context` and reset reach it
  through them). It is a torch forward pre-hook, not a wrapper of ``forward``: accelerate's CPU
  offload re-wraps the root's ``forward`` at the end of every pipeline call
  (`maybe_free_model_hooks`), which would drop a wrapper, while ``_forward_pre_hooks`` survive it.
- `ForecastHook` on a forecast module records its output at full steps and returns the forecast
  at cached steps without calling the module.
- `SkipHook` on a skipped module runs it at full steps and returns zeros of the recorded shape at
  cached steps (from a `ZeroPool` shared by all skipped modules, so standing in costs nothing), or
  smaller zeros where the recipe says the consumers allow it: empty along the last dimension
  (``skip_empty``) or a single element in every other dimension (``skip_broadcast``).
- `LiveChunksHook` on a linear layer of which cached steps read only some output chunks (adaLN
  modulation: the gates) multiplies only those rows of its weight at cached steps.

State is per cache context ("cond", "uncond", ...) through `StateManager`, so classifier-free
guidance branches never mix. diffusers pipelines reset it at the end of every call
(`maybe_free_model_hooks`), but only for `CacheMixin` models and only if the call finishes; so the step
hook also starts a fresh sampling loop by itself when a new one begins (`StepHook.starts_new_loop`): a
call interrupted mid-loop, a model outside `CacheMixin` or a custom loop never carries a stale step
counter or history into the next call.
"""

from __future__ import annotations

import inspect
import itertools
import numbers
import warnings
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .config import CacheConfig
from .forecast import DifferenceHistory
from .schedule import Schedule

STEP_HOOK = "hicache_step"
FORECAST_HOOK = "hicache_forecast"
SKIP_HOOK = "hicache_skip"
LIVE_CHUNKS_HOOK = "hicache_live_chunks"
HOOK_NAMES = (STEP_HOOK, FORECAST_HOOK, SKIP_HOOK, LIVE_CHUNKS_HOOK)
# Stand-in shapes of skipped modules: the recorded shape; empty along the last dimension; one
# element in every dimension but the last (see `hicache.recipes`).
STAND_IN_SHAPES = ("full", "empty", "broadcast")
# recipe role of a skipped module -> the shape of its stand-in
STAND_IN_SHAPE_OF_ROLE = {"skip": "full", "skip_empty": "empty", "skip_broadcast": "broadcast"}


def stand_in_shape(shape: torch.Size, kind: str) -> torch.Size:
    """The shape a skipped module's zeros take in place of an output of ``shape`` (kind: `STAND_IN_SHAPES`)."""
    if kind == "full" or len(shape) == 0:
        return shape
    if kind == "empty":
        return shape[:-1] + (0,)
    return torch.Size((1,) * (len(shape) - 1) + shape[-1:])


# Each sampling loop of each context gets a fresh id; a submodule's state from another loop is reset on first use.
# Ids and step positions reach compiled code as floats: dynamo makes a changing float a graph input after one
# recompile (unspecialised floats), while it guards on every int's value (a recompile for each new step or loop).
_LOOP_IDS = itertools.count()
# Names under which diffusers transformers (and most custom denoisers) take the diffusion timestep.
TIMESTEP_ARGS = ("timestep", "timesteps")


class StepState(BaseState):
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.step = -1
        self.position = -1.0  # `step` as a float, what the hooks inside the (possibly compiled) blocks read
        self.started = False
        self.is_full = True
        self.num_steps: int | None = None  # the step count of this loop, if known
        self.timestep: float | None = None  # the last step's timestep, if the model takes one
        self.direction = 0  # +1 or -1 once the timestep has moved within this loop
        self.loop = float(next(_LOOP_IDS))


class StepHook(ModelHook):
    """Counts the root module's forwards as steps and decides which are full.

    A new sampling loop starts fresh (step 0, empty histories) when the cache context says it is step 0
    (``step_index=0``), else when the pipeline the cache was applied to says so (``loop_starts``: its
    scheduler has not stepped yet in this call), else when the timestep moves against the way it moved so far
    in this loop (down in every diffusers pipeline: a new call starts at the highest noise again). Only that
    last signal reads a number from the model's ``timestep`` argument, one host sync per step on a GPU: apply
    the cache to the pipeline (``apply_cache(pipe, ...)``) to avoid it. A model without a timestep, driven by a
    loop that gives neither signal, is reset only by pipelines at the end of a call or by `hicache.reset_cache`.

    The step count, which ``final_full_steps`` needs, comes from the cache context (``num_inference_steps``),
    else from the pipeline the cache was applied to (``num_steps_of_call``), else from the config.
    """

    _is_stateful = True

    def __init__(self, schedule: Schedule, num_steps_of_call: Callable[[], int | None] | None = None,
                 loop_starts: Callable[[], bool | None] | None = None):
        super().__init__()
        self.schedule = schedule
        self.num_steps_of_call = num_steps_of_call
        self.loop_starts = loop_starts
        self.state_manager = StateManager(StepState)
        self.full_forwards = 0
        self.cached_forwards = 0
        self.last_num_steps: int | None = None
        self._timestep_at: tuple[int, str] | None = None
        self._warned: set[int] = set()
        self.on_new_loop = lambda context_name: None  # set by `apply_cache`: forgets the context's histories
        self.on_step_end = lambda context_name: None  # set by `apply_cache`: notes the cache's memory
        self.on_last_step = lambda context_name: None  # set by `apply_cache`: frees the context's history

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._timestep_at = _timestep_parameter(module)
        return module

    @torch.compiler.disable
    def after_forward(self, module: torch.nn.Module, args, kwargs, output) -> None:
        """The root's forward hook: notes the cache's memory after every full step (here, outside any compiled block:
        a byte count read inside one would be a guarded constant), and after the last step of a known step count
        releases the context's history, so the memory of the factors is free again before the VAE decode."""
        state: StepState = self.state_manager.get_state()
        if state.is_full:  # only a full step changes what the histories hold
            self.on_step_end(self.state_manager.context.name)
        if state.num_steps is not None and state.step == state.num_steps - 1:
            self.on_last_step(self.state_manager.context.name)

    @torch.compiler.disable
    def __call__(self, module: torch.nn.Module, args, kwargs) -> None:
        """The root's forward pre-hook (``register_forward_pre_hook(hook, with_kwargs=True)``). Never compiled: under
        ``torch.compile(model)`` the step count would be a guarded constant, one graph per step."""
        self.pre_forward(module, *args, **kwargs)

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        try:
            context = self.state_manager.context
        except ValueError:
            raise ValueError(
                f"hicache: {type(module).__name__} was called outside a cache context; wrap the call (or the whole "
                "pipeline call) in `with hicache.cache_context(model, 'cond'):`") from None
        state: StepState = self.state_manager.get_state()
        step_index = context.step_index
        if step_index is None and self.loop_starts is not None:
            starts = self.loop_starts()
            if starts is not None:
                step_index = 0 if starts else -1  # -1: some later step (its number is the step counter's)
        timestep = self._timestep(args, kwargs) if step_index is None else None
        if state.step >= 0 and self.starts_new_loop(state, step_index, timestep):
            state.reset()
            self.on_new_loop(context.name)
        if state.step < 0:
            state.num_steps = self._num_steps(context)
        if timestep is not None:
            if state.timestep is not None and state.direction == 0 and timestep != state.timestep:
                state.direction = 1 if timestep > state.timestep else -1
            state.timestep = timestep
        state.step += 1
        state.position = float(state.step)
        state.started = True
        state.is_full = self.schedule.is_full(state.step, state.num_steps)
        if state.is_full:
            self.full_forwards += 1
        else:
            self.cached_forwards += 1
        return args, kwargs  # as a diffusers hook (LESA registers it so)

    @staticmethod
    def starts_new_loop(state: StepState, step_index: int | None, timestep: float | None) -> bool:
        if step_index is not None:
            return step_index == 0
        return timestep is not None and state.timestep is not None and (timestep - state.timestep) * state.direction < 0

    def _timestep(self, args: tuple, kwargs: dict) -> float | None:
        if self._timestep_at is None:
            return None
        index, name = self._timestep_at
        value = kwargs.get(name, args[index] if index < len(args) else None)
        if isinstance(value, torch.Tensor):  # a meta tensor (FLOP counting) has no value to compare
            return float(value.detach().max()) if value.numel() > 0 and not value.is_meta else None
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        return None

    def _num_steps(self, context) -> int | None:
        """The step count of the loop that starts now (see the class docstring), checked against the config's."""
        actual = context.num_inference_steps
        if actual is None and self.num_steps_of_call is not None:
            actual = self.num_steps_of_call()
        configured = self.schedule.num_steps
        if actual is not None and configured is not None and actual != configured:
            raise ValueError(f"hicache: CacheConfig(num_inference_steps={configured}) but this call runs {actual} steps; "
                             "leave num_inference_steps out of the config (the call's count is used) or make them match")
        num_steps = actual if actual is not None else configured
        if num_steps is None and self.schedule.final_full_steps:
            raise ValueError(
                f"hicache: final_full_steps={self.schedule.final_full_steps} needs the number of steps, which this call "
                "does not give: apply the cache to the pipeline (hicache.apply_cache(pipe, ...)), or pass "
                "num_inference_steps to CacheConfig or to the cache context")
        if num_steps is not None:
            self.last_num_steps = num_steps
            if num_steps not in self._warned:
                self._warned.add(num_steps)
                message = self.schedule.sparse_warning(num_steps)
                if message:
                    warnings.warn(message, UserWarning, stacklevel=2)
        return num_steps

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module


def _timestep_parameter(module: torch.nn.Module) -> tuple[int, str] | None:
    """(position among the call's positional arguments, name) of the root module's timestep argument, if any."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for index, parameter in enumerate(parameters):
        if parameter.name in TIMESTEP_ARGS:
            return index, parameter.name
    return None


def _reference(obj) -> Callable[[], Any]:
    """A weak reference where the object allows one (a pipeline holds its transformer, which holds these hooks),
    else a plain one (e.g. a `types.SimpleNamespace` standing in for a pipeline)."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def pipeline_step_count(pipe) -> Callable[[], int | None]:
    """The step count of a diffusers pipeline's current call: ``num_timesteps``, which every pipeline sets to
    the length of its loop before entering it (an img2img call counts only the steps it runs)."""
    ref = _reference(pipe)

    def count() -> int | None:
        p = ref()
        return None if p is None else getattr(p, "_num_timesteps", None)

    return count


def pipeline_loop_starts(pipe) -> Callable[[], bool | None]:
    """Whether a diffusers pipeline's current call is at its first step: its scheduler's ``step_index`` is None
    until the first ``scheduler.step`` of a call (``set_timesteps`` clears it). None when the pipeline has no such
    scheduler. Read on the host, so the step hook need not read the timestep back from the device."""
    ref = _reference(pipe)

    def starts() -> bool | None:
        p = ref()
        scheduler = getattr(p, "scheduler", None)
        if scheduler is None or not hasattr(type(scheduler), "step_index"):
            return None
        return scheduler.step_index is None

    return starts


def attach_step_hook(model: torch.nn.Module, step_hook: StepHook):
    """Put the root's step counter on ``model`` as torch forward (pre-)hooks; their two removable handles.

    Torch hooks rather than a `HookRegistry` entry: accelerate's offload re-wraps ``forward`` at the end of every
    call, which drops a registry hook on the root but keeps these. Every method (LESA too) attaches it this way."""
    step_hook.initialize_hook(model)
    return (model.register_forward_pre_hook(step_hook, with_kwargs=True, prepend=True),
            model.register_forward_hook(step_hook.after_forward, with_kwargs=True))


def current_step(steps: StateManager, module_name: str) -> StepState:
    """The step the root module's `StepHook` is in, for a hook on one of its submodules."""
    step: StepState = steps.get_state()
    if not step.started:  # a bool, not the step number: compiled code would guard on (recompile for) the number
        raise RuntimeError(f"hicache: {module_name!r} ran before its root module's step hook")
    return step


def _as_tuple(output: Any, module_name: str) -> tuple[torch.Tensor | None, ...]:
    if isinstance(output, torch.Tensor):
        return (output,)
    if isinstance(output, tuple) and all(o is None or isinstance(o, torch.Tensor) for o in output):
        return output
    raise TypeError(
        f"hicache can only cache modules returning a tensor or a tuple of tensors; "
        f"{module_name!r} returned {type(output).__name__}"
    )


class ForecastState(BaseState):
    def __init__(self, config: CacheConfig):
        self.config = config
        self.reset()

    def reset(self) -> None:
        self.histories: list[DifferenceHistory | None] | None = None
        self.is_tensor = True

    def update(self, output: Any, step: int, module_name: str) -> None:
        outputs = _as_tuple(output, module_name)
        if self.histories is None or len(self.histories) != len(outputs):
            cfg = self.config
            self.histories = [
                None
                if o is None
                else DifferenceHistory(cfg.basis, cfg.order, cfg.sigma, cfg.warmup, cfg.factor_dtype, cfg.analytic)
                for o in outputs
            ]
        self.is_tensor = isinstance(output, torch.Tensor)
        for history, o in zip(self.histories, outputs):
            if history is not None:
                history.update(o, step)

    def forecast(self, step: int, module_name: str) -> Any:
        if self.histories is None:
            raise RuntimeError(f"hicache: {module_name!r} has no recorded full step to forecast from")
        outputs = tuple(None if h is None else h.forecast(step) for h in self.histories)
        return outputs[0] if self.is_tensor else outputs

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.histories or () if h is not None)


class ZeroPool:
    """One dense zero tensor per (shape, dtype, device, inference mode), shared by every skipped module of a model.

    Skipped modules stand in with zeros at every cached step. Allocating and filling them each time
    costs a tenth of a cached step on small models, and a broadcast view of one zero is no better:
    `torch.cat`, their usual consumer, runs at half speed on it. So the zeros are made once and reused.
    Outside inference mode their version counter catches a consumer that wrote into them in place,
    which would corrupt every later stand-in. Under `torch.inference_mode()` they are inference tensors
    like every other activation there, which have no version counter: a compiled block then sees the
    same kind of tensor at cached steps as at full steps (a normal tensor among inference tensors is a
    different dispatch key, hence one more graph per block); `hicache.check_recipe` runs outside
    inference mode, so the check still runs there.
    """

    def __init__(self):
        self._tensors: dict[tuple, tuple[torch.Tensor, int | None, set[str]]] = {}

    def zeros(self, shape: torch.Size, dtype: torch.dtype, device: torch.device, module_name: str,
              slot: int = 0) -> torch.Tensor:
        """``slot``: the output's index in its module's tuple. The elements of one tuple get distinct tensors, so
        a compiled consumer never sees two of its inputs alias at cached steps and not at full steps (one more
        graph, e.g. FLUX's rotary cos and sin)."""
        if torch.compiler.is_compiling():
            # inside a compiled graph the zeros are the graph's own: no version bookkeeping (the check would be a
            # guard, recompiled at every new user)
            return torch.zeros(shape, dtype=dtype, device=device)
        inference = torch.is_inference_mode_enabled()
        key = (tuple(shape), dtype, device, inference, slot)
        entry = self._tensors.get(key)
        if entry is None:
            tensor = torch.zeros(shape, dtype=dtype, device=device)
            entry = self._tensors[key] = (tensor, None if inference else tensor._version, set())
        tensor, version, users = entry
        users.add(module_name)
        if version is not None and tensor._version != version:
            raise RuntimeError(
                f"hicache: the zeros standing in for skipped modules ({', '.join(map(repr, sorted(users)))}) were modified in "
                "place by a consumer; a module whose output is written into cannot be skipped (forecast it instead)"
            )
        return tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t, _, _ in self._tensors.values())

    def clear(self) -> None:
        self._tensors.clear()


class SkipState(BaseState):
    def __init__(self, pool: ZeroPool, shape: str = "full"):
        if shape not in STAND_IN_SHAPES:
            raise ValueError(f"stand-in shape must be one of {', '.join(STAND_IN_SHAPES)}, got {shape!r}")
        self.pool = pool
        self.shape = shape
        self.reset()

    def reset(self) -> None:
        self.specs: list[tuple[torch.Size, torch.dtype, torch.device] | None] | None = None
        self.is_tensor = True

    def update(self, output: Any, module_name: str) -> None:
        outputs = _as_tuple(output, module_name)
        self.specs = [None if o is None else (stand_in_shape(o.shape, self.shape), o.dtype, o.device) for o in outputs]
        self.is_tensor = isinstance(output, torch.Tensor)

    def zeros(self, module_name: str) -> Any:
        if self.specs is None:
            raise RuntimeError(f"hicache: skipped module {module_name!r} never ran at a full step")
        outputs = tuple(None if s is None else self.pool.zeros(*s, module_name, slot) for slot, s in enumerate(self.specs))
        return outputs[0] if self.is_tensor else outputs


class _CachedModuleHook(ModelHook):
    """Shared plumbing: find the current step, run the module at full steps, stand in otherwise."""

    _is_stateful = True

    def __init__(self, module_name: str, steps: StateManager, state_manager: StateManager):
        super().__init__()
        self.module_name = module_name
        self.steps = steps
        self.state_manager = state_manager

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        # a new sampling loop finds no state here: the step hook dropped it (`StepHook.on_new_loop`), outside any
        # compiled block (a loop id read here would be one more graph per loop)
        step = current_step(self.steps, self.module_name)
        state = self.state_manager.get_state()
        if step.is_full:
            output = self.fn_ref.original_forward(*args, **kwargs)
            self.record(state, output, step.position)
            return output
        return self.stand_in(state, step.position)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        self.steps.reset()  # the root's step hook is no registry's: its state is reset with its users'
        return module


class ForecastHook(_CachedModuleHook):
    def __init__(self, module_name: str, steps: StateManager, config: CacheConfig):
        super().__init__(module_name, steps, StateManager(ForecastState, init_args=(config,)))
        self.peak_bytes = 0
        self._bytes: dict[str, int] = {}

    def record(self, state: ForecastState, output: Any, step: float) -> None:
        state.update(output, step, self.module_name)

    def note_bytes(self, context_name: str) -> None:
        """Account the memory of one context's history (called by the root's step hook after each step)."""
        state = self.state_manager._state_cache.get(context_name)
        if state is not None:
            self._bytes[context_name] = state.nbytes
            self.peak_bytes = max(self.peak_bytes, sum(self._bytes.values()))

    def stand_in(self, state: ForecastState, step: float) -> Any:
        return state.forecast(step, self.module_name)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self._bytes.clear()
        return super().reset_state(module)


class SkipHook(_CachedModuleHook):
    def __init__(self, module_name: str, steps: StateManager, pool: ZeroPool, shape: str = "full"):
        super().__init__(module_name, steps, StateManager(SkipState, init_args=(pool, shape)))

    def record(self, state: SkipState, output: Any, step: float) -> None:
        state.update(output, self.module_name)

    def stand_in(self, state: SkipState, step: float) -> Any:
        return state.zeros(self.module_name)


def chunk_runs(out_features: int, num_chunks: int, live: tuple[int, ...]) -> list[tuple[int, int, bool]]:
    """Row ranges ``(start, stop, is_live)`` of a linear layer's output split into ``num_chunks`` equal
    chunks, with neighbouring chunks of the same kind merged (one matmul per run of live chunks)."""
    size = out_features // num_chunks
    runs: list[tuple[int, int, bool]] = []
    for chunk in range(num_chunks):
        is_live = chunk in live
        if runs and runs[-1][2] == is_live:
            runs[-1] = (runs[-1][0], (chunk + 1) * size, is_live)
        else:
            runs.append((chunk * size, (chunk + 1) * size, is_live))
    return runs


class LiveChunksHook(ModelHook):
    """At cached steps, a `torch.nn.Linear` computes only the output chunks the cached step reads.

    adaLN modulation linears output shift, scale and gate for each branch of a block; at a cached step
    the branches are forecast, so their shifts and scales modulate only inputs that nothing reads, and
    the gates are all that is needed. The rows of the other chunks are not multiplied (the weight is
    row-major, so each run of live rows is a contiguous slice) and stand in as zeros from the shared
    pool. Stateless: it only reads the current step from the step hook."""

    def __init__(self, module_name: str, steps: StateManager, pool: ZeroPool, num_chunks: int, live: tuple[int, ...]):
        super().__init__()
        self.module_name = module_name
        self.steps = steps
        self.pool = pool
        self.num_chunks = num_chunks
        self.live = live
        self.runs: list[tuple[int, int, bool]] = []

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.runs = chunk_runs(module.out_features, self.num_chunks, self.live)
        return module

    def new_forward(self, module: torch.nn.Linear, *args, **kwargs):
        if current_step(self.steps, self.module_name).is_full:
            return self.fn_ref.original_forward(*args, **kwargs)
        x = args[0] if args else kwargs["input"]
        weight, bias = module.weight, module.bias
        if not (_sliceable(weight, x) and (bias is None or _sliceable(bias, x))):
            return self.fn_ref.original_forward(*args, **kwargs)
        return live_rows_linear(x, weight, bias, self.runs, self.dead_chunks)

    def dead_chunks(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.pool.zeros(shape, dtype, device, self.module_name)


def live_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     runs: list[tuple[int, int, bool]], dead_chunks) -> torch.Tensor:
    """A linear layer's output with only the live row runs (`chunk_runs`) multiplied, and the others taken from
    ``dead_chunks(shape, dtype, device)``."""
    pieces = [
        F.linear(x, weight[start:stop], None if bias is None else bias[start:stop]) if is_live else None
        for start, stop, is_live in runs
    ]
    like = next(p for p in pieces if p is not None)
    for i, (start, stop, is_live) in enumerate(runs):
        if not is_live:
            pieces[i] = dead_chunks(like.shape[:-1] + (stop - start,), like.dtype, like.device)
    return torch.cat(pieces, dim=-1)


def _sliceable(tensor: torch.Tensor, x: torch.Tensor) -> bool:
    """A dense tensor whose rows can be sliced, where the input is: not a quantised or packed parameter subclass
    (bitsandbytes, torchao, ...), nor a placeholder (meta, or offloaded elsewhere) that an offloading hook fills in
    inside the module's own forward. For any other weight the whole linear runs, as at a full step: exact, only not
    cheaper. (An all-meta run, e.g. counting FLOPs on the meta device, slices like a real one.)"""
    return type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.device == x.device


def register(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    hook.wrapper = module.forward  # to recognise it under a wrapper added later (accelerate's offload)


def unregister(module: torch.nn.Module, name: str) -> None:
    """Remove the hook ``name`` from ``module`` and leave any wrapper added on top of it working.

    diffusers' `HookRegistry.remove_hook` sets ``module.forward`` back to what the hook wrapped, which would
    also drop a wrapper added after it: accelerate's offload (``enable_sequential_cpu_offload`` wraps every
    module with weights; model offload wraps the root) keeps what it wraps in ``module._old_forward`` and
    calls that, so there the hook is taken out from under accelerate's wrapper instead."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or name not in registry.hooks:
        return
    hook = registry.hooks[name]
    outer = module.forward
    wrapped = outer is not getattr(hook, "wrapper", outer) and getattr(module, "_old_forward", None) is hook.wrapper
    registry.remove_hook(name, recurse=False)
    if wrapped:
        module._old_forward, module.forward = module.forward, outer

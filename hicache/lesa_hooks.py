"""The LESA cache on diffusers' hooks: one forecast tensor, the whole stack before it skipped.

`attach_lesa` (called by `hicache.apply_cache` for ``method="lesa"``) registers, through the core's own
step hook and skip hooks:

- the core's `StepHook` on the root, whose state also holds the root's ``timestep`` argument, so the run is
  checked against the schedule the predictor was trained on;
- `LesaHook` on the recipe's target module: at every step it appends the forecast tensor to a history of the
  last ``history_depth`` values (per cache context, so CFG branches never mix): the computed tensor at full
  steps, the predictor's forecast at cached steps, where the target then runs on the forecast (``input``) or
  returns it (``output``);
- `hicache.hooks.SkipHook` on every module of the recipe's ``skip`` list (zeros at cached steps).

Training reuses the same hooks (`hicache.app.lesa_train`): ``observer`` sees the forecast tensor of every
step, ``on_prediction`` receives each forecast with its autograd graph before it is detached.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .hooks import FORECAST_HOOK, SKIP_HOOK, SkipHook, StepHook, StepState, attach_step_hook, current_step, register
from .lesa import LesaPredictor
from .recipes.lesa import LesaRecipe, get_lesa_recipe

# the tolerance of the schedule check: a bfloat16 timestep near 1 is off by up to 2^-8
TIMESTEP_TOLERANCE = 1e-2


class LesaState(BaseState):
    def __init__(self, depth: int):
        self.depth = depth
        self.reset()

    def reset(self) -> None:
        self.history: deque[torch.Tensor] = deque(maxlen=self.depth)
        self.loop: int | None = None  # the sampling loop (`StepState.loop`) this history belongs to


class LesaHook(ModelHook):
    _is_stateful = True

    def __init__(self, module_name: str, steps: StateManager, predictor: LesaPredictor, recipe: LesaRecipe):
        super().__init__()
        self.module_name = module_name
        self.steps = steps
        self.predictor = predictor
        self.recipe = recipe
        self.state_manager = StateManager(LesaState, init_args=(predictor.config.history_depth,))
        self.observer: Callable[[int, str, torch.Tensor, bool], None] | None = None
        self.on_prediction: Callable[[torch.Tensor, int, str], None] | None = None
        self.peak_bytes = 0
        self._bytes: dict[str, int] = {}

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        step = current_step(self.steps, self.module_name)
        state: LesaState = self.state_manager.get_state()
        if state.loop != step.loop:  # a new sampling loop: nothing recorded in another one applies
            state.reset()
            state.loop = step.loop
        branch = self.state_manager.context.name
        if self.recipe.io == "input":
            if step.is_full:
                value = _first_argument(args, kwargs, self.module_name)
            else:
                value = self._forecast(state, step, branch, like=_first_argument(args, kwargs, self.module_name))
                args, kwargs = _replace_first_argument(args, kwargs, value)
            self._remember(state, value, step, branch)
            return self.fn_ref.original_forward(*args, **kwargs)
        if step.is_full:
            output = self.fn_ref.original_forward(*args, **kwargs)
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"LESA target {self.module_name!r} must return one tensor, got {type(output).__name__}")
            self._remember(state, output, step, branch)
            return output
        value = self._forecast(state, step, branch, like=state.history[-1] if state.history else None)
        self._remember(state, value, step, branch)
        return value

    def _forecast(self, state: LesaState, step: StepState, branch: str, like: torch.Tensor | None) -> torch.Tensor:
        config = self.predictor.config
        if step.step >= config.num_steps:
            raise ValueError(f"LESA predictor trained on {config.num_steps} steps was asked for step {step.step}")
        t = config.timesteps[step.step]
        if step.timestep is not None and abs(step.timestep * self.recipe.timestep_scale - t) > TIMESTEP_TOLERANCE:
            raise ValueError(
                f"this run's step {step.step} is at t={step.timestep * self.recipe.timestep_scale:.4f}, but the LESA "
                f"predictor was trained on a schedule with t={t:.4f} there: use a predictor trained at this step count "
                "and resolution")
        if like is None:
            raise RuntimeError(f"hicache: LESA target {self.module_name!r} has no recorded full step to forecast from")
        history = list(state.history)
        if self.on_prediction is None:
            with torch.no_grad():
                forecast = self.predictor(history, t, branch)
        else:
            with torch.enable_grad():  # the pipeline runs under no_grad; the update needs the graph
                forecast = self.predictor(history, t, branch)
                self.on_prediction(forecast, step.step, branch)
        return forecast.detach().to(like.dtype)

    def _remember(self, state: LesaState, value: torch.Tensor, step: StepState, branch: str) -> None:
        value = value.detach()
        state.history.append(value)
        if self.observer is not None:
            self.observer(step.step, branch, value, step.is_full)
        self._bytes[branch] = sum(h.numel() * h.element_size() for h in state.history)
        self.peak_bytes = max(self.peak_bytes, sum(self._bytes.values()))

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        self._bytes.clear()
        return module


def _first_argument(args: tuple, kwargs: dict, module_name: str) -> torch.Tensor:
    value = args[0] if args else next(iter(kwargs.values()), None)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"LESA target {module_name!r}: its first argument is {type(value).__name__}, not a tensor")
    return value


def _replace_first_argument(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    first = next(iter(kwargs))
    return args, {**kwargs, first: value}


def attach_lesa(model: torch.nn.Module, config, recipe, handle, num_steps_of_call=None, loop_starts=None) -> None:
    """Register the LESA hooks of ``config`` on ``model`` and record them in ``handle`` (a `CacheHandle`)."""
    lesa = get_lesa_recipe(recipe)
    predictor: LesaPredictor = config.predictor
    if tuple(predictor.config.stage_thresholds) != tuple(lesa.stage_thresholds):
        raise ValueError(f"this LESA predictor uses stage thresholds {predictor.config.stage_thresholds}, "
                         f"recipe {lesa.name!r} {list(lesa.stage_thresholds)}: it was trained for another model")
    modules = dict(model.named_modules())
    if lesa.target not in modules:
        raise ValueError(f"LESA recipe {lesa.name!r}: {type(model).__name__} has no module {lesa.target!r}")
    skip = [name for name in modules if name and lesa.is_skipped(name)]
    if not skip:
        raise ValueError(f"LESA recipe {lesa.name!r} skips no module of {type(model).__name__}")
    parameter = next(model.parameters(), None)
    if parameter is not None:
        predictor.to(parameter.device)
    handle.step_hook = StepHook(config.schedule, num_steps_of_call, loop_starts)
    handle.step_handle, handle.release_handle = attach_step_hook(model, handle.step_hook)
    steps = handle.step_hook.state_manager
    hook = LesaHook(lesa.target, steps, predictor, lesa)
    handle.forecast_hooks[lesa.target] = hook
    register(modules[lesa.target], hook, FORECAST_HOOK)
    for name in skip:
        handle.skip_hooks[name] = SkipHook(name, steps, handle.zero_pool)
        register(modules[name], handle.skip_hooks[name], SKIP_HOOK)
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()


def lesa_hook(model: torch.nn.Module) -> LesaHook:
    """The `LesaHook` of a model cached with ``method="lesa"`` (to set its ``observer`` / ``on_prediction``)."""
    handle = getattr(model, "_hicache_handle", None)
    hooks = [h for h in (handle.forecast_hooks.values() if handle else ()) if isinstance(h, LesaHook)]
    if not hooks:
        raise ValueError("this model has no LESA cache: apply hicache.CacheConfig(method='lesa', ...) first")
    return hooks[0]


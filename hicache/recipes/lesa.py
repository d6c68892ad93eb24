"""LESA recipes: the one tensor a model's LESA predictor forecasts, and the stack skipped at cached steps.

LESA forecasts a single tensor per model call and skips the whole transformer stack before it, so its
recipe differs from the per-block HiCache recipe of the same model. A `LesaRecipe` names:

- ``target``, the module at whose ``input`` (its first argument) or ``output`` the forecast tensor sits;
  at cached steps an ``input`` target still runs on the forecast, an ``output`` target does not run;
- ``skip``, regexes (full matches) of every module whose output then feeds nothing but skipped modules
  or the target's forecast input (``tests/test_recipe_skips.py`` checks this with random stand-ins);
- ``timestep_scale``: the root module's ``timestep`` argument times this is the schedule time t in [0, 1]
  (FLUX receives the sigma itself, HunyuanVideo 1000 sigma);
- ``stage_thresholds``: LESA's stage boundaries for a new predictor of this model.

They are registered under the name of the model's ordinary recipe ("flux", "hunyuan_video").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["LesaRecipe", "register_lesa_recipe", "get_lesa_recipe", "available_lesa_recipes"]


@dataclass(frozen=True)
class LesaRecipe:
    name: str
    target: str
    io: str = "input"
    skip: tuple[str, ...] = ()
    timestep_scale: float = 1.0
    stage_thresholds: tuple[float, float] = (0.9, 0.5)

    def __post_init__(self):
        if self.io not in ("input", "output"):
            raise ValueError(f"LESA recipe {self.name!r}: io must be 'input' or 'output', got {self.io!r}")
        object.__setattr__(self, "skip", tuple(self.skip))
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"LESA recipe {self.name!r}: bad regex {pattern!r}: {err}") from None

    def is_skipped(self, module_name: str) -> bool:
        return any(re.fullmatch(p, module_name) for p in self.skip)


_REGISTRY: dict[str, LesaRecipe] = {}


def register_lesa_recipe(recipe: LesaRecipe) -> LesaRecipe:
    _REGISTRY[recipe.name] = recipe
    return recipe


def get_lesa_recipe(recipe) -> LesaRecipe:
    if isinstance(recipe, LesaRecipe):
        return recipe
    name = getattr(recipe, "name", recipe)
    if name not in _REGISTRY:
        raise ValueError(f"no LESA recipe for {name!r}; LESA recipes: {', '.join(sorted(_REGISTRY))} "
                         "(or pass a hicache.recipes.lesa.LesaRecipe)")
    return _REGISTRY[name]


def available_lesa_recipes() -> list[str]:
    return sorted(_REGISTRY)

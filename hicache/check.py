"""Check a recipe against a model before trusting its numbers, and list what a recipe could name.

A skipped module stands in with zeros at cached steps, and a ``live_chunks`` linear leaves its other output
chunks as zeros; both are exact only if nothing but forecast or other skipped modules reads those values. A
recipe that skips a module whose output is needed runs without any error and gives a far worse image.
`check_recipe` finds that out: it runs the cached
model twice on the same inputs, once with the zeros and once with random values in place of every stand-in;
dead stand-ins leave every output bit-identical, a live one changes it, and the report names it.

    print(hicache.candidate_modules(model))          # what a recipe could forecast or skip
    report = hicache.check_recipe(model, recipe, example_inputs)
    print(report)                                     # OK, or which module is read at cached steps
    report.raise_if_wrong()
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from .api import apply_cache, cache_context, remove_cache
from .config import CacheConfig
from .recipes import Recipe, get_recipe

__all__ = ["Candidate", "RecipeReport", "candidate_modules", "check_recipe"]

# Full, cached, full, cached: every stand-in is recorded at a full step and used at the cached step after it.
_CHECK_CONFIG = dict(method="fora", interval=2, warmup=1)


@dataclass
class RecipeReport:
    """What `check_recipe` found. ``live``: stand-in module -> the largest change its random values made."""

    recipe: str
    model: str
    forecast: list[str]
    stand_ins: dict[str, str]  # module -> its role ("skip", "skip_empty", "skip_broadcast", "live_chunks")
    cached_steps: int
    live: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.live

    def __str__(self) -> str:
        head = f"recipe {self.recipe!r} on {self.model}"
        if self.ok:
            return (f"{head}: OK. {len(self.forecast)} forecast modules; random values in place of all "
                    f"{len(self.stand_ins)} stand-ins ({_role_counts(self.stand_ins.values())}) leave the output of "
                    f"{self.cached_steps} cached steps bit-identical, so what they skip is never read.")
        lines = [f"{head}: WRONG. {len(self.live)} of {len(self.stand_ins)} stand-ins are read at cached steps; "
                 "random values in their place change the model's output:"]
        for name, change in self.live.items():
            what = ("its left-out output chunks are read: add them to its live chunks"
                    if self.stand_ins[name] == "live_chunks" else
                    "its output is needed: forecast it, or leave it out of the recipe")
            lines.append(f"  {name!r} ({self.stand_ins[name]}): output changes by up to {change:.3g}; {what}")
        return "\n".join(lines)

    def raise_if_wrong(self) -> None:
        """A one-line `ValueError` naming the live stand-ins, if there are any."""
        if not self.ok:
            names = ", ".join(f"{n!r} ({self.stand_ins[n]})" for n in self.live)
            raise ValueError(f"recipe {self.recipe!r} on {self.model} stands in for outputs read at cached steps: "
                             f"{names}; skip only modules read by nothing but forecast or skipped modules, and give "
                             "live_chunks every chunk a cached step reads")


@torch.no_grad()
def check_recipe(model: torch.nn.Module, recipe: str | Recipe, example_inputs: Mapping[str, Any] | tuple,
                 seed: int = 0) -> RecipeReport:
    """Whether every stand-in of ``recipe`` on ``model`` is dead at cached steps (see the module docstring).

    ``example_inputs``: the keyword arguments of one call of ``model`` (or a tuple of positional ones), e.g. a
    latent, a timestep and the text embeddings at the model's real shapes (small sizes are enough). The model is
    called 4 times (full, cached, full, cached) per pass, in its own cache context, and left as it was. When a
    pass with every stand-in random changes the output, each recipe pattern and then each module of a pattern
    that changed it is tried alone, to name the culprits.
    """
    recipe = get_recipe(recipe)
    args, kwargs = (tuple(example_inputs), {}) if isinstance(example_inputs, (tuple, list)) else ((), dict(example_inputs))
    roles = {name: recipe.role(name) for name, _ in model.named_modules() if name}
    forecast = [n for n, r in roles.items() if r == "forecast"]
    stand_ins = {n: r for n, r in roles.items() if r is not None and r != "forecast"}

    def run(random: Iterable[str] = ()) -> list[torch.Tensor]:
        return _cached_outputs(model, recipe, args, kwargs, set(random), seed)

    training = model.training
    model.eval()  # dropout would change the output between runs as a live stand-in does
    try:
        return _check(recipe, model, forecast, stand_ins, run)
    finally:
        model.train(training)


def _check(recipe: Recipe, model, forecast: list[str], stand_ins: dict[str, str], run) -> RecipeReport:
    zeros = run()
    report = RecipeReport(recipe.name, type(model).__name__, forecast, stand_ins, cached_steps=2)
    if not stand_ins or _change(zeros, run(stand_ins)) == 0:
        return report
    for pattern in recipe.patterns:
        members = [n for n in stand_ins if re.fullmatch(pattern, n)]
        if members and _change(zeros, run(members)) > 0:
            for name in members:
                change = _change(zeros, run([name]))
                if change > 0:
                    report.live[name] = change
    if not report.live:  # only a combination changes it (never seen): report them all together
        report.live = {name: _change(zeros, run(stand_ins)) for name in stand_ins}
    return report


def _cached_outputs(model, recipe: Recipe, args: tuple, kwargs: dict, random: set[str], seed: int) -> list[torch.Tensor]:
    """Every output tensor of the cached steps of a full, cached, full, cached run, with random stand-ins for the
    modules in ``random``."""
    handle = apply_cache(model, CacheConfig(**_CHECK_CONFIG), recipe)
    generator = torch.Generator().manual_seed(seed)

    def noise(shape, dtype, device) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(dtype=dtype, device=device)

    for name, hook in handle.skip_hooks.items():
        if name in random:
            hook.stand_in = lambda state, step: _like(state, noise)
    for name, hook in handle.live_chunks_hooks.items():
        if name in random:
            hook.dead_chunks = noise
    outputs = []
    try:
        with cache_context(model, "hicache_check"):
            for step in range(4):
                out = model(*args, **kwargs)
                if step % 2:
                    outputs.extend(_tensors(out))
    finally:
        remove_cache(model)
    return outputs


def _like(state, noise) -> Any:
    """Random values of the shapes a `SkipState` would return as zeros."""
    outputs = tuple(None if spec is None else noise(*spec) for spec in state.specs)
    return outputs[0] if state.is_tensor else outputs


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output.detach().clone()]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _tensors(o)]
    return []


def _change(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest absolute difference between two runs' outputs (inf where shapes or NaNs differ)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            return float("inf")
        if torch.equal(x, y) or bool(((x == y) | (x.isnan() & y.isnan())).all()):
            continue
        diff = (x.float() - y.float()).abs().nan_to_num(nan=float("inf"))
        worst = max(worst, float(diff.max()))
    return worst


def _role_counts(roles: Iterable[str]) -> str:
    counts: dict[str, int] = {}
    for role in roles:
        counts[role] = counts.get(role, 0) + 1
    return ", ".join(f"{n} {role}" for role, n in counts.items()) or "none"


@dataclass(frozen=True)
class Candidate:
    """A module a recipe could name: ``pattern`` is the regex a recipe would use (one per name inside the
    model's repeated blocks, ``\\d+`` for the block index), ``count`` how many modules it matches."""

    pattern: str
    kind: str
    count: int

    def __str__(self) -> str:
        return f"{self.pattern:<60} {self.kind} x{self.count}"


class Candidates(list):
    def __str__(self) -> str:
        return "\n".join(map(str, self))


def candidate_modules(model: torch.nn.Module, depth: int = 2) -> Candidates:
    """The modules a recipe for ``model`` could forecast or skip, as recipe patterns, in model order.

    Inside repeated blocks (the items of a `torch.nn.ModuleList`) every submodule down to ``depth`` levels below
    the block becomes one pattern for all blocks, e.g. ``transformer_blocks\\.\\d+\\.attn``; outside them, the
    model's modules down to ``depth`` levels (embeddings, output norm). Lists and `torch.nn.Identity` are left out. Forecast candidates are usually a block's attention and MLP (their output before the gate and
    residual); skip candidates are what only feeds them (norms in front of them, rotary embeddings). Check any
    recipe made from them with `check_recipe`.
    """
    found: dict[str, list] = {}
    block_lists = {name for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0}
    for name, module in model.named_modules():
        if not name or isinstance(module, (torch.nn.ModuleList, torch.nn.Identity)):
            continue
        pattern = _block_pattern(name, block_lists, depth)
        if pattern is None:  # too deep inside a block
            continue
        kind = type(module).__name__
        entry = found.setdefault(pattern, [kind, 0])
        entry[1] += 1
        if entry[0] != kind and kind not in entry[0].split("/"):
            entry[0] += f"/{kind}"
    return Candidates(Candidate(p, kind, count) for p, (kind, count) in found.items())


def _block_pattern(name: str, block_lists: set[str], depth: int) -> str | None:
    """The pattern of a module: ``blocks\\.\\d+\\.<rest>`` inside an item of the outermost block list, its escaped
    name outside any; None if it is more than ``depth`` levels below its block (or below the model)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if prefix in block_lists and parts[i].isdigit():
            rest = parts[i + 1:]
            if 1 <= len(rest) <= depth:
                return re.escape(prefix) + r"\.\d+\." + re.escape(".".join(rest))
            return None
    return re.escape(name) if len(parts) <= depth else None

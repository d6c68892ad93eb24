"""Recipes: which submodules of a model are forecast and which are skipped at cached steps.

All model knowledge of the caching core lives here, one module per model family. A recipe is two
lists of regular expressions matched in full against `named_modules()` names:

- ``forecast``: the module's output is recorded at full steps and forecast at cached steps
  (tensor or tuple-of-tensor outputs);
- ``skip``: the module runs at full steps and returns zeros of the recorded shape at cached steps,
  for modules whose result only feeds a forecast module (so their compute is simply avoided);
- ``skip_empty``: skipped likewise, but the stand-in is empty along the last dimension. For modules
  whose outputs reach forecast modules only through a concatenation along the last dimension (or
  feed nothing but other skipped modules): concatenating full-size zeros there is itself a large
  part of a cached step. A consumer that does arithmetic with the stand-in fails on its shape
  instead of computing something wrong;
- ``skip_broadcast``: skipped likewise, but the stand-in is zeros of shape ``(1, ..., 1, C)``. For
  LayerNorms whose outputs are only scaled and shifted per channel (adaLN modulation) before
  reaching forecast or skipped modules: modulating a full-size tensor of zeros costs as much as
  the residual stream's own arithmetic;
- ``live_chunks``: ``{pattern: (num_chunks, live)}`` for `torch.nn.Linear` modules whose output is
  split into ``num_chunks`` equal chunks along the last dimension, of which only the chunks in
  ``live`` are read at cached steps. At cached steps only those rows of the weight are multiplied;
  the other chunks stand in as zeros. For adaLN modulation linears: a cached step needs their gates,
  while their shifts and scales only modulate the inputs of forecast or skipped modules. Reading the
  whole weight matrix for a third of its output was a fifth of a cached step.

A module may have only one role. ``tests/test_recipe_skips.py`` checks every built-in recipe's
skipped outputs are dead at cached steps, whatever stands in for them.

Token-wise methods (ClusCa, Hi-ClusCa) also need to know which forecast modules are recomputed for a
few tokens at cached steps, where their tokens come from and where the clusters are taken:
``fresh_tokens`` (`FreshTokens`), ``cluster_sources`` (`ClusterSource`), ``fresh_run`` (skipped modules
they need run), ``fresh_live_chunks`` (the modulation chunks those recomputations read) and
``fresh_refused`` (``{model config flag: why}``: models on which token selection cannot work, refused
in one line). `Recipe.for_fresh_tokens` turns a recipe into the one these methods run with
(`hicache.fresh_tokens` attaches the hooks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

__all__ = ["Recipe", "FreshTokens", "ClusterSource", "register_recipe", "get_recipe", "available_recipes",
           "double_single_stream"]


@dataclass(frozen=True)
class FreshTokens:
    """A forecast module that token-wise methods recompute for K tokens at cached steps (ClusCa).

    Args:
        module: regex of the forecast modules (e.g. each double-stream block's image MLP).
        select: regex of the module, one per block, that feeds ``module`` and works token by token (a
            LayerNorm followed only by arithmetic that broadcasts over the tokens, such as adaLN's per-sample
            scale and shift; not a per-token modulation index like Qwen-Image-Edit's ``zero_cond_t``). Its input
            holds the stream's tokens (the residual stream); at cached steps it runs on the K selected
            rows only, so ``module`` receives and computes K tokens. Hi-ClusCa clusters this input, in the
            first block, at the first cached step.
        stream: the token stream ("image", "text"); one cluster assignment per stream serves every block.
        propagate: the fresh rows also pull every token of their cluster towards them (gamma); otherwise
            they are only written into D0.
    """

    module: str
    select: str
    stream: str
    propagate: bool = False


@dataclass(frozen=True)
class ClusterSource:
    """Where ClusCa clusters a stream at every full step: element ``output`` of the output of the *last*
    module matching ``module`` (e.g. the last double-stream block, whose output is (text, image))."""

    stream: str
    module: str
    output: int


@dataclass(frozen=True)
class Recipe:
    forecast: tuple[str, ...]
    skip: tuple[str, ...] = ()
    name: str = "custom"
    skip_empty: tuple[str, ...] = ()
    skip_broadcast: tuple[str, ...] = ()
    live_chunks: tuple[tuple[str, int, tuple[int, ...]], ...] = ()
    fresh_tokens: tuple[FreshTokens, ...] = ()
    cluster_sources: tuple[ClusterSource, ...] = ()
    fresh_live_chunks: tuple[tuple[str, int, tuple[int, ...]], ...] = ()
    fresh_run: tuple[str, ...] = ()
    fresh_refused: tuple[tuple[str, str], ...] = ()

    def __init__(self, forecast: Iterable[str], skip: Iterable[str] = (), name: str = "custom",
                 skip_empty: Iterable[str] = (), skip_broadcast: Iterable[str] = (),
                 live_chunks: Mapping[str, tuple[int, Iterable[int]]] | None = None,
                 fresh_tokens: Iterable[FreshTokens] = (), cluster_sources: Iterable[ClusterSource] = (),
                 fresh_live_chunks: Mapping[str, tuple[int, Iterable[int]]] | None = None,
                 fresh_run: Iterable[str] = (), fresh_refused: Mapping[str, str] | None = None):
        object.__setattr__(self, "forecast", tuple(forecast))
        object.__setattr__(self, "skip", tuple(skip))
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "skip_empty", tuple(skip_empty))
        object.__setattr__(self, "skip_broadcast", tuple(skip_broadcast))
        object.__setattr__(self, "live_chunks", tuple(
            (pattern, *_chunk_spec(name, pattern, spec)) for pattern, spec in (live_chunks or {}).items()))
        object.__setattr__(self, "fresh_tokens", tuple(fresh_tokens))
        object.__setattr__(self, "cluster_sources", tuple(cluster_sources))
        object.__setattr__(self, "fresh_live_chunks", tuple(
            (pattern, *_chunk_spec(name, pattern, spec)) for pattern, spec in (fresh_live_chunks or {}).items()))
        object.__setattr__(self, "fresh_run", tuple(fresh_run))
        object.__setattr__(self, "fresh_refused", tuple((fresh_refused or {}).items()))
        token_patterns = [p for f in self.fresh_tokens for p in (f.module, f.select)] + list(self.fresh_run)
        for pattern in (*self.patterns, *token_patterns, *(c.module for c in self.cluster_sources)):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"recipe {name!r}: bad regex {pattern!r}: {err}") from None

    @property
    def patterns(self) -> tuple[str, ...]:
        return tuple(p for patterns in self.roles.values() for p in patterns)

    @property
    def roles(self) -> dict[str, tuple[str, ...]]:
        return {"forecast": self.forecast, "skip": self.skip, "skip_empty": self.skip_empty,
                "skip_broadcast": self.skip_broadcast, "live_chunks": tuple(p for p, _, _ in self.live_chunks)}

    def role(self, module_name: str) -> str | None:
        """The role (a key of `roles`) of a module name, or None; matching two roles is an error."""
        roles = [role for role, patterns in self.roles.items() if any(re.fullmatch(p, module_name) for p in patterns)]
        if len(roles) > 1:
            raise ValueError(f"recipe {self.name!r}: module {module_name!r} matches both {roles[0]} and {roles[1]}")
        return roles[0] if roles else None

    def for_fresh_tokens(self) -> "Recipe":
        """The recipe token-wise methods run with: the ``select`` modules (on K tokens) and the ``fresh_run``
        modules (whatever else the fresh tokens' inputs need, e.g. a text stream the recipe otherwise skips) run
        instead of being skipped, whichever skip pattern matched them, and ``fresh_live_chunks`` replace
        ``live_chunks`` (the fresh tokens' MLPs read the modulation's MLP shift and scale, not only the gates)."""
        if not self.fresh_tokens:
            raise ValueError(f"recipe {self.name!r} declares no fresh tokens, so it cannot run clusca or hi_clusca")
        keep = "|".join(f"(?:{p})" for p in (*(f.select for f in self.fresh_tokens), *self.fresh_run))

        kept = {f.select for f in self.fresh_tokens} | set(self.fresh_run)

        def running(patterns):  # each skip pattern, minus the names that must run (a full-match lookahead)
            return tuple(f"(?!(?:{keep})$)(?:{p})" for p in patterns if p not in kept)

        live = self.fresh_live_chunks or self.live_chunks
        return Recipe(forecast=self.forecast, skip=running(self.skip), name=self.name,
                      skip_empty=running(self.skip_empty), skip_broadcast=running(self.skip_broadcast),
                      live_chunks={pattern: (n, chunks) for pattern, n, chunks in live},
                      fresh_tokens=self.fresh_tokens, cluster_sources=self.cluster_sources, fresh_run=self.fresh_run,
                      fresh_refused=dict(self.fresh_refused))

    def refuse_fresh_tokens(self, model) -> None:
        """One-line error when the model's config has a flag (``fresh_refused``) that token selection breaks."""
        config = getattr(model, "config", None)
        for flag, reason in self.fresh_refused:
            if getattr(config, flag, False):
                raise ValueError(f"recipe {self.name!r}: clusca/hi_clusca cannot run on a model with {flag}=True "
                                 f"({reason}); use taylorseer or hicache")

    def chunks(self, module_name: str) -> tuple[int, tuple[int, ...]]:
        """(num_chunks, live chunk indices) of a ``live_chunks`` module."""
        for pattern, num_chunks, live in self.live_chunks:
            if re.fullmatch(pattern, module_name):
                return num_chunks, live
        raise KeyError(f"recipe {self.name!r}: {module_name!r} is not a live_chunks module")


def _chunk_spec(recipe: str, pattern: str, spec) -> tuple[int, tuple[int, ...]]:
    try:
        num_chunks, live = spec
        num_chunks, live = int(num_chunks), tuple(sorted({int(i) for i in live}))
    except (TypeError, ValueError):
        raise ValueError(f"recipe {recipe!r}: live_chunks[{pattern!r}] must be (num_chunks, live chunk indices), "
                         f"got {spec!r}") from None
    if num_chunks < 1 or not live or live[0] < 0 or live[-1] >= num_chunks:
        raise ValueError(f"recipe {recipe!r}: live_chunks[{pattern!r}] = {spec!r}: need num_chunks >= 1 and "
                         f"live indices in 0..{num_chunks - 1}")
    return num_chunks, live


_REGISTRY: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    _REGISTRY[recipe.name] = recipe
    return recipe


def get_recipe(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in _REGISTRY:
        raise ValueError(f"unknown recipe {recipe!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[recipe]


def available_recipes() -> list[str]:
    return sorted(_REGISTRY)


def double_single_stream(name: str, **token_wise) -> Recipe:
    """The MMDiT layout of FLUX and HunyuanVideo: ``transformer_blocks`` (double-stream) then
    ``single_transformer_blocks``, with the same submodule names in both families.

    Double-stream: the pre-gate attention outputs (``attn`` returns the image/video and text
    outputs as a tuple) and the pre-gate ``ff``/``ff_context`` outputs are forecast. Single-stream:
    the pre-gate ``proj_out`` output is forecast, and ``attn``, ``proj_mlp`` and ``act_mlp``, which
    only feed it, are skipped (skipping the activation too saves a GELU over the widest tensor of
    the block, which on small models is a third of a cached step).

    The LayerNorms in front of the forecast and skipped modules are skipped too (``norm1.norm``,
    ``norm1_context.norm``, ``norm2``, ``norm2_context``, single ``norm.norm``): their outputs only
    feed those modules, after the adaLN scale and shift, while the modulation linears beside them,
    whose shifts, scales and gates the cached step needs, still run. They stand in with one token
    of zeros (``skip_broadcast``), so that modulation costs nothing either; HunyuanVideo's
    token-replace norms slice the tokens into first-frame and rest, which a single token survives.
    So are the rotary position embeddings (FLUX ``pos_embed``, HunyuanVideo ``rope``), which only
    the attention reads. That is the paper's cached step (the official code computes only the
    modulation, gates and residual adds).

    Of the modulation itself a cached step reads only the gates: the double-stream linears
    (``norm1.linear``, ``norm1_context.linear``) output shift, scale and gate of the attention, then
    of the MLP (chunks 2 and 5 of 6 are the gates), the single-stream ``norm.linear`` shift, scale
    and gate (chunk 2 of 3); HunyuanVideo's token-replace norms call the same linear twice, with the
    same chunk order. So only the gate rows are multiplied (``live_chunks``).

    In single-stream blocks ``attn``, ``proj_mlp`` and ``act_mlp`` stand in with *empty* tensors
    (``skip_empty``): ``attn`` and ``act_mlp`` only reach ``proj_out`` through a concatenation along
    the feature dimension (HunyuanVideo first concatenates the attention's video and text parts
    along the tokens, which empty widths survive), and ``proj_mlp`` only feeds ``act_mlp``.
    Concatenating full-size zeros there was half of a cached step.

    Patterns are full matches from the top-level block lists, so nested blocks with the same leaf
    names (HunyuanVideo's token refiner) never match. ``token_wise`` (``fresh_tokens``,
    ``cluster_sources``, ``fresh_live_chunks``) is passed on to `Recipe` for ClusCa.
    """
    return Recipe(
        name=name,
        forecast=(
            r"transformer_blocks\.\d+\.attn",
            r"transformer_blocks\.\d+\.ff",
            r"transformer_blocks\.\d+\.ff_context",
            r"single_transformer_blocks\.\d+\.proj_out",
        ),
        skip=(r"pos_embed|rope",),
        skip_broadcast=(
            r"transformer_blocks\.\d+\.norm1\.norm",
            r"transformer_blocks\.\d+\.norm1_context\.norm",
            r"transformer_blocks\.\d+\.norm2",
            r"transformer_blocks\.\d+\.norm2_context",
            r"single_transformer_blocks\.\d+\.norm\.norm",
        ),
        skip_empty=(
            r"single_transformer_blocks\.\d+\.attn",
            r"single_transformer_blocks\.\d+\.proj_mlp",
            r"single_transformer_blocks\.\d+\.act_mlp",
        ),
        live_chunks={
            r"transformer_blocks\.\d+\.norm1(_context)?\.linear": (6, (2, 5)),
            r"single_transformer_blocks\.\d+\.norm\.linear": (3, (2,)),
        },
        **token_wise,
    )


from . import flux  # noqa: E402,F401  (registers the built-in recipes)
from . import hunyuan_video  # noqa: E402,F401
from . import inf_dit  # noqa: E402,F401
from . import qwen_image  # noqa: E402,F401

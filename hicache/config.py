"""`CacheConfig`: every knob of a caching run, checked once, on construction.

Experiments are composed by Hydra from plain values, so the dtype may be given as a string
("float32", "bfloat16") and sequences as lists; a bad value fails here with a one-line
`ValueError` rather than deep inside a denoising loop.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .forecast import METHODS, AnalyticSigma
from .schedule import Schedule

LEARNED_METHODS = ("lesa",)  # forecast by a trained module (`hicache.lesa`), not a basis of `hicache.forecast`
# Token-wise methods (ClusCa): the forecast basis each one uses (see `hicache.fresh_tokens`).
TOKEN_METHODS = {"clusca": "taylorseer", "hi_clusca": "hicache"}
ALL_METHODS = ("none",) + METHODS + LEARNED_METHODS + tuple(TOKEN_METHODS)
# The forced full steps of each method's official schedule when `extra_full_steps` is not given.
DEFAULT_EXTRA_FULL_STEPS = {"lesa": (3,)}
# HiCache's order-i weight sigma^i H_i(sigma k) / i! grows like (2 sigma^2 k)^i / i!: Taylor's with the step k
# stretched 2 sigma^2 times. The paper's contraction range is (0, 1] (sigma = 1/sqrt(2) is Taylor's own step,
# sigma = 1 "no contraction" doubles it); sigma = 2 stretches it 8-fold, past any useful forecast, and much
# larger values overflow the forecast to inf/NaN. So sigma (and the analytic mode's sigma_max) must be in (0, 2].
SIGMA_MAX = 2.0


def _check_int(name: str, value, minimum: int) -> None:
    """Counts must be ints: a float would be truncated silently (2.7 -> 2), a bool is a mistake."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_sigma(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= SIGMA_MAX:
        raise ValueError(f"{name} must be a number in (0, {SIGMA_MAX:g}] (the paper uses 0.3-1.0), got {value!r}")


def _as_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None:
        return value
    dtype = value if isinstance(value, torch.dtype) else getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"factor_dtype {value!r} is not a torch dtype (try 'float32' or 'bfloat16')")
    if not dtype.is_floating_point:
        raise ValueError(f"factor_dtype {value!r} is not a floating dtype (try 'float32' or 'bfloat16')")
    return dtype


@dataclass
class CacheConfig:
    """How to cache: the forecasting method, its schedule and its numerics.

    Args:
        method: "none", "fora", "taylorseer", "hicache", "hi_taylor", "hicache_analytic", "lesa", or the
            token-wise "clusca" (TaylorSeer's forecast plus one fresh token per cluster) and "hi_clusca" (the same
            with HiCache's forecast and clusters built once per image), which need a recipe with fresh tokens.
        interval: N, the distance between full steps after warm-up.
        warmup: W, the first W steps are full; differences are formed from step W-1 on.
        order: O, the highest divided difference kept (ignored by "fora").
        sigma: the dual-scaling factor of "hicache" and "hi_taylor", in (0, 2] (see `SIGMA_MAX`).
        full_steps: an explicit list of full steps (ints), replacing the interval rule (must hold 0).
        final_full_steps: force the last K steps full (needs the step count: `num_inference_steps`,
            the cache context's, or the pipeline's when the cache is applied to the pipeline).
        extra_full_steps: steps forced full on top of the rule (None: the method's official ones, step 3
            for "lesa", none otherwise).
        predictor: "lesa" only: a `hicache.lesa.LesaPredictor` or the folder it was saved to; it must have
            been trained for this interval (LESA trains one predictor per N).
        num_inference_steps: the number of denoising steps, if known in advance.
        factor_dtype: floating dtype of the stored differences. None (the default) keeps each module's output
            dtype, as the official code stores its history: a bf16 model's cache is half what float32
            factors take (on the SR testbed bf16 factors cost no accuracy). "float32" keeps float32
            factors whatever the model's dtype. FORA stores the output itself and never converts.
        analytic_alpha, analytic_sigma_max, analytic_beta, analytic_eps: "hicache_analytic" knobs.
        clusters: K, the token clusters (and fresh tokens per module) of "clusca"/"hi_clusca".
        propagation: gamma in [0, 1], how far each token moves towards its cluster's fresh row.
        seed: seeds the generator of every ClusCa draw, afresh in each cache context at each pipeline call.
    """

    method: str = "hicache"
    interval: int = 7
    warmup: int = 3
    order: int = 2
    sigma: float = 0.5
    full_steps: Sequence[int] | None = None
    final_full_steps: int = 0
    num_inference_steps: int | None = None
    factor_dtype: torch.dtype | str | None = None
    analytic_alpha: float = 1.28
    analytic_sigma_max: float = 1.0
    analytic_beta: float = 0.01
    analytic_eps: float = 1e-6
    extra_full_steps: Sequence[int] | None = None
    predictor: Any = field(default=None, repr=False)
    clusters: int = 16
    propagation: float = 0.005
    seed: int = 0
    schedule: Schedule = field(init=False, repr=False)

    def __post_init__(self):
        if self.method not in ALL_METHODS:
            raise ValueError(f"unknown cache method {self.method!r}; expected one of {', '.join(ALL_METHODS)}")
        _check_sigma("sigma", self.sigma)
        _check_int("order", self.order, 0)
        _check_int("interval", self.interval, 1)
        _check_int("warmup", self.warmup, 1)
        _check_int("final_full_steps", self.final_full_steps, 0)
        if self.num_inference_steps is not None:
            _check_int("num_inference_steps", self.num_inference_steps, 1)
        if self.full_steps is not None:
            for step in self.full_steps:
                _check_int("every entry of full_steps", step, 0)
        _check_sigma("analytic_sigma_max", self.analytic_sigma_max)
        if not (math.isfinite(self.analytic_alpha) and self.analytic_alpha > 0 and 0 < self.analytic_beta <= 1):
            raise ValueError("hicache_analytic needs a finite alpha > 0 and 0 < beta <= 1")
        _check_int("clusters", self.clusters, 1)
        if isinstance(self.propagation, bool) or not isinstance(self.propagation, numbers.Real) \
                or not 0 <= self.propagation <= 1:
            raise ValueError(f"propagation must be a number in [0, 1], got {self.propagation!r}")
        _check_int("seed", self.seed, 0)
        self.factor_dtype = _as_dtype(self.factor_dtype)
        if self.extra_full_steps is None:
            self.extra_full_steps = DEFAULT_EXTRA_FULL_STEPS.get(self.method, ())
        for step in self.extra_full_steps:
            _check_int("every entry of extra_full_steps", step, 0)
        self.extra_full_steps = tuple(self.extra_full_steps)
        if self.method == "lesa":
            self.predictor = _lesa_predictor(self.predictor, int(self.interval), self.num_inference_steps)
        elif self.predictor is not None:
            raise ValueError(f"predictor= is for method='lesa', not {self.method!r}")
        self.schedule = Schedule(
            interval=int(self.interval),
            warmup=int(self.warmup),
            full_steps=tuple(self.full_steps) if self.full_steps is not None else None,
            final_full_steps=int(self.final_full_steps),
            num_steps=self.num_inference_steps,
            extra_full_steps=self.extra_full_steps,
        )

    @property
    def basis(self) -> str:
        """The forecasting basis of `forecast.DifferenceHistory` behind the method."""
        return TOKEN_METHODS.get(self.method, self.method)

    @property
    def analytic(self) -> AnalyticSigma:
        return AnalyticSigma(self.analytic_alpha, self.analytic_sigma_max, self.analytic_beta, self.analytic_eps)


def _lesa_predictor(predictor: Any, interval: int, num_steps: int | None):
    """The loaded predictor of a "lesa" config, checked against the interval and step count it runs at."""
    from .lesa import LesaPredictor, load_predictor

    if predictor is None:
        raise ValueError("method='lesa' needs predictor=<folder with predictor.json and predictor.safetensors> "
                         "or a hicache.lesa.LesaPredictor")
    if isinstance(predictor, (str, Path)):
        predictor = load_predictor(predictor)
    if not isinstance(predictor, LesaPredictor):
        raise ValueError(f"predictor must be a hicache.lesa.LesaPredictor or its folder, got {type(predictor).__name__}")
    trained = predictor.config
    if trained.interval != interval:
        raise ValueError(f"this LESA predictor was trained for interval {trained.interval}, not {interval}: "
                         f"use a predictor trained at N={interval} (LESA trains one per N)")
    if num_steps is not None and trained.num_steps != num_steps:
        raise ValueError(f"this LESA predictor was trained on a {trained.num_steps}-step schedule, "
                         f"not {num_steps} steps")
    return predictor

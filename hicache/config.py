"""`CacheConfig`: every knob of a caching run, checked once, on construction.

Experiments are composed by Hydra from plain values, so the dtype may be given as a string
("float32", "bfloat16") and sequences as lists; a bad value fails here with a one-line
`ValueError` rather than deep inside a denoising loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .forecast import METHODS, AnalyticSigma
from .schedule import Schedule

ALL_METHODS = ("none",) + METHODS


def _as_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"factor_dtype {value!r} is not a torch dtype (try 'float32' or 'bfloat16')")
    return dtype


@dataclass
class CacheConfig:
    """How to cache: the forecasting method, its schedule and its numerics.

    Args:
        method: "none", "fora", "taylorseer", "hicache", "hi_taylor" or "hicache_analytic".
        interval: N, the distance between full steps after warm-up.
        warmup: W, the first W steps are full; differences are formed from step W-1 on.
        order: O, the highest divided difference kept (ignored by "fora").
        sigma: the dual-scaling factor of "hicache" and "hi_taylor" (> 0).
        full_steps: an explicit list of full steps, replacing the interval rule (must hold 0).
        final_full_steps: force the last K steps full (needs the step count, from
            `num_inference_steps` or from the pipeline's cache context).
        num_inference_steps: the number of denoising steps, if known in advance.
        factor_dtype: dtype of the stored differences (float32 by default, whatever the model's).
        analytic_alpha, analytic_sigma_max, analytic_beta, analytic_eps: "hicache_analytic" knobs.
    """

    method: str = "hicache"
    interval: int = 7
    warmup: int = 3
    order: int = 2
    sigma: float = 0.5
    full_steps: Sequence[int] | None = None
    final_full_steps: int = 0
    num_inference_steps: int | None = None
    factor_dtype: torch.dtype | str | None = torch.float32
    analytic_alpha: float = 1.28
    analytic_sigma_max: float = 1.0
    analytic_beta: float = 0.01
    analytic_eps: float = 1e-6
    schedule: Schedule = field(init=False, repr=False)

    def __post_init__(self):
        if self.method not in ALL_METHODS:
            raise ValueError(f"unknown cache method {self.method!r}; expected one of {', '.join(ALL_METHODS)}")
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.order < 0:
            raise ValueError(f"order must be >= 0, got {self.order}")
        if not (self.analytic_alpha > 0 and self.analytic_sigma_max > 0 and 0 < self.analytic_beta <= 1):
            raise ValueError("hicache_analytic needs alpha > 0, sigma_max > 0 and 0 < beta <= 1")
        self.factor_dtype = _as_dtype(self.factor_dtype)
        self.schedule = Schedule(
            interval=int(self.interval),
            warmup=int(self.warmup),
            full_steps=tuple(self.full_steps) if self.full_steps is not None else None,
            final_full_steps=int(self.final_full_steps),
            num_steps=self.num_inference_steps,
        )

    @property
    def analytic(self) -> AnalyticSigma:
        return AnalyticSigma(self.analytic_alpha, self.analytic_sigma_max, self.analytic_beta, self.analytic_eps)

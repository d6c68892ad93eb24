"""Forecasting one module output at cached steps from its divided-difference history.

Every method in the project shares one history and differs only in the basis that turns the
history into a forecast, so a new basis is one entry in `_COEFFICIENTS`.

The history follows the official HiCache/TaylorSeer code (``derivative_approximation``): at each
full step ``s_j`` it keeps ``D0 = F(s_j)`` and the divided differences
``D_{i+1} = (D_i - D_i_prev) / (s_j - s_{j-1})`` for ``i < order`` while the previous order-``i``
term exists. Differences are formed only at full steps ``s >= warmup - 1``; earlier warm-up steps
keep ``D0`` alone, so the first difference is taken across the last warm-up step.

At a cached step ``s`` with ``k = s - s_last`` and ``m = min(order, available)`` orders:

- ``fora``:             D0
- ``taylorseer``:       sum_i D_i k^i / i!
- ``hicache``:          D0 + sum_{i>=1} D_i sigma^i H_i(sigma k) / i!   (physicists' Hermite)
- ``hi_taylor``:        D0 + sum_{i>=1} D_i sigma^(2i) k^i / i!          (dual scaling, monomials)
- ``hicache_analytic``: ``hicache`` with a per-output sigma from the running size of D1.

Storage: each D_i is kept as ``c_i * U_i``, a tensor ``U_i`` and a float ``c_i`` (``c_0 = 1``,
``c_{i+1} = c_i / dt``), and the scales go into the forecast's weights. A new difference is then one
pass, ``U_{i+1} = U_i - (c_i_prev / c_i) U_i_prev``, written into a buffer of the history that is no
longer needed (the old top order, or the old ``U_i`` it replaces), so a full step of a steady history
makes no new tensor and touches each stored element once: at full steps this halves the memory traffic
of the update and keeps the allocator from having to find (and, on CPU, page in) fresh memory.

A property worth knowing: on full steps h apart the history holds the backward differences
nabla^i F / h^i, which equal the derivatives F^(i) only to first order. So the Taylor forecast is
exact on trajectories of degree <= 1 for any order; on a degree-O polynomial the top difference
D_O = O! a_O is exact, but e.g. order 2 on F = a s^2 misses F(s + k) by a h k. That is the official
algorithm, reproduced as is (tests/test_forecast.py pins both facts).

This module holds tensors but knows nothing of models, hooks or diffusers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METHODS = ("fora", "taylorseer", "hicache", "hi_taylor", "hicache_analytic")


def hermite(n: int, x: float) -> float:
    """Physicists' Hermite polynomial H_n(x): H0 = 1, H1 = 2x, H_{n+1} = 2x H_n - 2n H_{n-1}."""
    if n < 0:
        raise ValueError(f"Hermite order must be >= 0, got {n}")
    prev, cur = 1.0, 2.0 * x
    if n == 0:
        return prev
    for i in range(1, n):
        prev, cur = cur, 2.0 * x * cur - 2.0 * i * prev
    return cur


def _fora(k: float, num_orders: int, sigma: float) -> list[float]:
    return [1.0] + [0.0] * (num_orders - 1)


def _taylorseer(k: float, num_orders: int, sigma: float) -> list[float]:
    return [k**i / math.factorial(i) for i in range(num_orders)]


def _hicache(k: float, num_orders: int, sigma: float) -> list[float]:
    return [1.0] + [sigma**i * hermite(i, sigma * k) / math.factorial(i) for i in range(1, num_orders)]


def _hi_taylor(k: float, num_orders: int, sigma: float) -> list[float]:
    return [1.0] + [sigma ** (2 * i) * k**i / math.factorial(i) for i in range(1, num_orders)]


_COEFFICIENTS = {
    "fora": _fora,
    "taylorseer": _taylorseer,
    "hicache": _hicache,
    "hi_taylor": _hi_taylor,
    "hicache_analytic": _hicache,
}


def coefficients(method: str, k: float, num_orders: int, sigma: float = 0.5) -> list[float]:
    """Weights of D_0 .. D_{num_orders-1} in the forecast ``k`` steps after the last full step."""
    if method not in _COEFFICIENTS:
        raise ValueError(f"unknown forecasting method {method!r}; expected one of {', '.join(METHODS)}")
    if num_orders < 1:
        raise ValueError(f"a forecast needs at least D0, got num_orders={num_orders}")
    return _COEFFICIENTS[method](float(k), num_orders, float(sigma))


@dataclass(frozen=True)
class AnalyticSigma:
    """Per-output adaptive sigma of the official ``hicache_analytic`` mode.

    sigma = min(sigma_max, alpha / (sqrt(2) q + eps)), where q is the square root of an EMA (weight
    beta, started at the first observation) of the squared mean-over-tokens L2 norm of D1. Large,
    fast-moving features get a small sigma, which damps the higher-order Hermite terms.
    """

    alpha: float = 1.28
    sigma_max: float = 1.0
    beta: float = 0.01
    eps: float = 1e-6

    def observe(self, ema: torch.Tensor | None, first_difference: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """The EMA after seeing D1 = ``scale * first_difference``: a 0-d float32 tensor on D1's device, so that no
        step waits for the device to report a number (the official code's ``.item()`` is a host sync per output)."""
        d1 = first_difference.float()
        token_norms = d1.norm(dim=-1) if d1.dim() > 0 else d1.abs()
        x = (abs(scale) * token_norms.mean()) ** 2
        return x if ema is None else (1.0 - self.beta) * ema + self.beta * x

    def sigma(self, ema: torch.Tensor | float) -> torch.Tensor | float:
        if isinstance(ema, torch.Tensor):
            return torch.clamp(self.alpha / (math.sqrt(2.0) * ema.sqrt() + self.eps), max=self.sigma_max)
        return min(self.sigma_max, self.alpha / (math.sqrt(2.0) * math.sqrt(ema) + self.eps))


class DifferenceHistory:
    """Divided-difference history of one tensor-valued trajectory, and its forecasts."""

    def __init__(
        self,
        method: str,
        order: int,
        sigma: float = 0.5,
        warmup: int = 1,
        factor_dtype: torch.dtype | None = None,
        analytic: AnalyticSigma | None = None,
    ):
        if method not in _COEFFICIENTS:
            raise ValueError(f"unknown forecasting method {method!r}; expected one of {', '.join(METHODS)}")
        self.method = method
        # FORA only ever needs D0: storing higher orders would cost memory for nothing.
        self.order = 0 if method == "fora" else order
        self.sigma = sigma
        self.warmup = warmup
        # None: the output's own dtype (the official code's). FORA's forecast is D0 itself, so converting it would
        # only cost memory and two conversions per step.
        self.factor_dtype = None if method == "fora" else factor_dtype
        self.analytic = analytic or AnalyticSigma()
        self.reset()

    def reset(self) -> None:
        self._terms: list[torch.Tensor] = []  # U_i; D_i = scale_i * U_i
        self._scales: list[float] = []
        self.last_step: int | None = None
        self.output_dtype: torch.dtype | None = None
        self._ema: torch.Tensor | None = None

    @property
    def factors(self) -> list[torch.Tensor]:
        """D_0 .. D_m, the divided differences themselves: new tensors for i >= 1 (the stored ones are
        overwritten by later updates), made on demand for inspection and analysis."""
        return [u if i == 0 else u * c for i, (u, c) in enumerate(zip(self._terms, self._scales))]

    @property
    def current_sigma(self) -> float:
        """The sigma of the next forecast, as a number (for inspection: the forecast itself keeps it on the device)."""
        sigma = self._sigma()
        return float(sigma) if isinstance(sigma, torch.Tensor) else sigma

    def _sigma(self) -> torch.Tensor | float:
        if self.method == "hicache_analytic" and self._ema is not None:
            return self.analytic.sigma(self._ema)
        return self.sigma

    @property
    def nbytes(self) -> int:
        return sum(u.numel() * u.element_size() for u in self._terms)

    @property
    def d0(self) -> torch.Tensor:
        """The stored order-0 term (the last full step's output, or what `replace_d0` put there)."""
        if not self._terms:
            raise RuntimeError("no full step was recorded yet")
        return self._terms[0]

    def replace_d0(self, value: torch.Tensor) -> None:
        """Replace D0 between full steps (ClusCa writes its fresh token rows there). Later forecasts use it, and
        the next full step's first difference is taken against it, as in the official ClusCa code."""
        if value.shape != self.d0.shape:
            raise ValueError(f"new D0 has shape {tuple(value.shape)}, the stored one {tuple(self.d0.shape)}")
        self._terms[0] = value.to(self.d0.dtype)

    def update(self, value: torch.Tensor, step: int) -> None:
        """Record the exact output of a full step."""
        value = value.detach()
        self.output_dtype = value.dtype
        v = value.to(self.factor_dtype or value.dtype)  # may be the module's output itself: never written into
        old_terms, old_scales = self._terms, self._scales
        num_new = 0
        if self.last_step is not None and step >= self.warmup - 1:
            dt = step - self.last_step
            if dt <= 0:
                raise ValueError(f"full steps must increase: got step {step} after {self.last_step}")
            prev = old_terms[0]
            same = prev.shape == v.shape and prev.dtype == v.dtype and prev.device == v.device
            num_new = min(self.order, len(old_terms)) if same else 0  # shape changed: start again from D0
        terms, scales = [v], [1.0]
        # the old top order is dropped, so its buffer can take the first new difference; old U_0 cannot
        # (it is a module output the model may still hold)
        spare = old_terms[num_new] if 0 < num_new < len(old_terms) else None
        for i in range(num_new):
            ratio = old_scales[i] / scales[i]
            out = spare if i == 0 else old_terms[i]  # old U_i (i >= 1) is ours and dead after this line
            terms.append(torch.sub(terms[i], old_terms[i], alpha=ratio, out=out))  # out=None: a new tensor
            scales.append(scales[i] / dt)
        if self.method == "hicache_analytic" and num_new > 0:
            self._ema = self.analytic.observe(self._ema, terms[1], scale=scales[1])
        self._terms, self._scales = terms, scales
        self.last_step = step

    def forecast(self, step: int) -> torch.Tensor:
        """The forecast at a cached step, in the dtype of the recorded output."""
        if self.last_step is None:
            raise RuntimeError("cannot forecast before any full step was recorded")
        k = step - self.last_step
        sigma = self._sigma()
        if isinstance(sigma, torch.Tensor):  # the adaptive sigma stays on the device: tensor weights, no sync
            weights = [1.0] + [sigma**i * hermite(i, sigma * k) / math.factorial(i) for i in range(1, len(self._terms))]
            out = self._terms[0].clone()
            for w, c, u in zip(weights[1:], self._scales[1:], self._terms[1:]):
                out.addcmul_(u, (w * c).to(u.dtype))
            return out.to(self.output_dtype)
        weights = coefficients(self.method, k, len(self._terms), sigma)
        terms = [(w * c, u) for w, c, u in zip(weights[1:], self._scales[1:], self._terms[1:]) if w != 0.0]
        if not terms:  # a fresh tensor, never the stored D0 itself: callers may write into it
            return self._terms[0].to(self.output_dtype, copy=True)
        (w, term), rest = terms[0], terms[1:]
        out = torch.add(self._terms[0], term, alpha=w)  # the first term allocates: no separate copy of D0
        for w, term in rest:
            out.add_(term, alpha=w)
        return out.to(self.output_dtype)

"""The forecasting math, checked exactly on polynomial trajectories and against direct formulas."""

import math

import numpy as np
import pytest
import torch

from hicache.forecast import AnalyticSigma, DifferenceHistory, coefficients, hermite


def poly(coeffs, s, shape=(3, 5)):
    """A tensor trajectory whose every entry is sum_j c_j s^j, in float64 so the checks are exact."""
    base = torch.linspace(0.5, 2.0, math.prod(shape), dtype=torch.float64).reshape(shape)
    return base * sum(c * s**j for j, c in enumerate(coeffs))


def run_history(method, order, full_steps, coeffs, sigma=0.5, warmup=1):
    h = DifferenceHistory(method, order, sigma=sigma, warmup=warmup, factor_dtype=torch.float64)
    for s in full_steps:
        h.update(poly(coeffs, s), s)
    return h


@pytest.mark.parametrize("n", range(7))
def test_hermite_matches_numpy_physicists_polynomials(n):
    for x in (-1.3, 0.0, 0.25, 2.0):
        expected = np.polynomial.hermite.hermval(x, [0] * n + [1])
        assert hermite(n, x) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("coeffs", [(2.0,), (1.0, -0.5)])
def test_taylor_is_exact_on_polynomials_of_degree_at_most_one(order, coeffs):
    h = run_history("taylorseer", order, [0, 1, 2, 5, 9], coeffs)
    for s in range(10, 16):
        torch.testing.assert_close(h.forecast(s), poly(coeffs, s), rtol=0, atol=1e-12)


@pytest.mark.parametrize("order", [2, 3])
def test_differences_are_exact_backward_differences_on_polynomials(order):
    """The history holds nabla^i F / h^i exactly; on a degree-O polynomial D_O = O! a_O."""
    coeffs = (0.3, -1.0, 0.7, 0.2)[: order + 1]
    h_step = 4
    steps = [0, 4, 8, 12, 16]
    h = run_history("taylorseer", order, steps, coeffs)
    values = [poly(coeffs, s) for s in steps]
    for i in range(order + 1):
        diffs = values
        for _ in range(i):
            diffs = [(b - a) / h_step for a, b in zip(diffs, diffs[1:])]
        torch.testing.assert_close(h.factors[i], diffs[-1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.factors[order], poly((math.factorial(order) * coeffs[order],), 0), rtol=1e-12, atol=0)


def test_taylor_order_two_on_a_quadratic_has_the_backward_difference_gap():
    """Backward differences equal derivatives only to first order: for F = a s^2 sampled every h steps,
    TaylorSeer's order-2 forecast k steps ahead is F(s + k) - a h k, exactly (the official scheme)."""
    a, h_step = 0.7, 3
    h = run_history("taylorseer", 2, [0, 3, 6, 9], (0.0, 0.0, a))
    for k in range(1, 5):
        expected = poly((0.0, 0.0, a), 9 + k) - poly((a * h_step * k,), 0)
        torch.testing.assert_close(h.forecast(9 + k), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("sigma", [0.3, 0.5, 1.0])
def test_hicache_equals_direct_evaluation_of_the_formula(order, sigma):
    coeffs = (0.2, 1.0, -0.4, 0.05)
    h = run_history("hicache", order, [0, 1, 2, 9, 16], coeffs, sigma=sigma)
    for s in range(17, 23):
        k = s - 16
        expected = h.factors[0].clone()
        for i in range(1, len(h.factors)):
            herm = np.polynomial.hermite.hermval(sigma * k, [0] * i + [1])
            expected = expected + h.factors[i] * sigma**i * herm / math.factorial(i)
        torch.testing.assert_close(h.forecast(s), expected, rtol=1e-12, atol=1e-12)


def test_hi_taylor_equals_direct_evaluation_of_the_formula():
    sigma = 0.6
    h = run_history("hi_taylor", 2, [0, 1, 2, 9], (0.2, 1.0, -0.4), sigma=sigma)
    k = 3
    expected = h.factors[0] + h.factors[1] * sigma**2 * k + h.factors[2] * sigma**4 * k**2 / 2
    torch.testing.assert_close(h.forecast(12), expected, rtol=1e-12, atol=1e-12)


def test_hermite_with_sigma_one_over_root_two_and_order_one_equals_taylor():
    sigma = 1 / math.sqrt(2)
    coeffs = (0.2, 1.0, -0.4)
    herm = run_history("hicache", 1, [0, 1, 2, 9], coeffs, sigma=sigma)
    taylor = run_history("taylorseer", 1, [0, 1, 2, 9], coeffs)
    for s in range(10, 16):
        torch.testing.assert_close(herm.forecast(s), taylor.forecast(s), rtol=1e-12, atol=1e-12)


def test_fora_reuses_the_last_full_output_and_stores_only_it():
    h = run_history("fora", 3, [0, 1, 2, 9], (0.2, 1.0, -0.4))
    assert len(h.factors) == 1
    torch.testing.assert_close(h.forecast(13), poly((0.2, 1.0, -0.4), 9))


def test_differences_start_only_from_the_last_warmup_step():
    h = DifferenceHistory("taylorseer", 2, warmup=3, factor_dtype=torch.float64)
    h.update(poly((1.0, 1.0), 0), 0)
    h.update(poly((1.0, 1.0), 1), 1)
    assert len(h.factors) == 1  # step 1 < warmup - 1: D0 only
    h.update(poly((1.0, 1.0), 2), 2)
    assert len(h.factors) == 2  # step 2 = warmup - 1: first difference, no second (no previous D1)
    h.update(poly((1.0, 1.0), 9), 9)
    assert len(h.factors) == 3


def test_analytic_sigma_follows_the_ema_of_the_first_difference_norm():
    knobs = AnalyticSigma(alpha=1.28, sigma_max=1.0, beta=0.5, eps=1e-6)
    h = DifferenceHistory("hicache_analytic", 1, warmup=1, factor_dtype=torch.float64, analytic=knobs)
    x0 = torch.zeros(2, 4, 8, dtype=torch.float64)
    h.update(x0, 0)
    assert h.current_sigma == 0.5  # no D1 yet: the configured sigma
    d1 = torch.full((2, 4, 8), 3.0, dtype=torch.float64)  # every token norm = 3 * sqrt(8)
    h.update(x0 + d1, 1)
    ema = (3.0 * math.sqrt(8)) ** 2
    assert h.current_sigma == pytest.approx(min(1.0, 1.28 / (math.sqrt(2) * math.sqrt(ema) + 1e-6)))
    h.update(x0 + d1, 2)  # D1 = 0 now: ema halves
    assert h.current_sigma == pytest.approx(min(1.0, 1.28 / (math.sqrt(2) * math.sqrt(ema / 2) + 1e-6)))
    small = DifferenceHistory("hicache_analytic", 1, warmup=1, factor_dtype=torch.float64, analytic=knobs)
    small.update(x0, 0)
    small.update(x0 + 1e-3, 1)
    assert small.current_sigma == 1.0  # capped at sigma_max


def test_float32_factors_and_forecasts_return_in_the_model_dtype():
    h = DifferenceHistory("hicache", 2, warmup=1, factor_dtype=torch.float32)
    for s in (0, 1, 2):
        h.update(torch.full((4,), float(s), dtype=torch.bfloat16), s)
    assert all(f.dtype == torch.float32 for f in h.factors)
    out = h.forecast(3)
    assert out.dtype == torch.bfloat16
    low = DifferenceHistory("hicache", 2, warmup=1, factor_dtype=torch.bfloat16)
    low.update(torch.ones(4), 0)
    assert low.factors[0].dtype == torch.bfloat16 and low.forecast(1).dtype == torch.float32


def test_coefficients_reject_unknown_methods():
    with pytest.raises(ValueError, match="unknown forecasting method"):
        coefficients("magic", 1, 2)


def _reference_differences(values, steps, order, warmup=1):
    """The documented recursion, written out directly: D_{i+1} = (D_i - D_i_prev) / (s_j - s_{j-1})."""
    factors, last = [], None
    for v, s in zip(values, steps):
        new = [v]
        if last is not None and s >= warmup - 1:
            for i in range(min(order, len(factors))):
                new.append((new[i] - factors[i]) / (s - last))
        factors, last = new, s
    return factors


@pytest.mark.parametrize("order", [1, 2, 3])
def test_history_equals_the_recursion_on_uneven_full_steps(order):
    """Scales folded into the forecast weights change nothing: the warm-up boundary (steps 1 apart, then 7)
    and an uneven tail give the recursion's differences."""
    steps = [0, 1, 2, 9, 16, 20, 27]
    values = [torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in steps]
    h = DifferenceHistory("taylorseer", order, warmup=3, factor_dtype=torch.float64)
    for s, v in zip(steps, values):
        h.update(v, s)
        expected = _reference_differences(values[: steps.index(s) + 1], steps[: steps.index(s) + 1], order, warmup=3)
        assert len(h.factors) == len(expected)
        for got, want in zip(h.factors, expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_a_steady_history_reuses_its_buffers_and_never_writes_into_recorded_outputs(order):
    h = DifferenceHistory("hicache", order, warmup=1, factor_dtype=torch.float32)
    outputs = [torch.randn(8, 16, generator=torch.Generator().manual_seed(s)) for s in range(order + 4)]
    kept = [o.clone() for o in outputs]
    for s, o in enumerate(outputs[: order + 1]):
        h.update(o, s)  # the history grows to order + 1 terms
    for s in range(order + 1, len(outputs)):
        before = {t.data_ptr() for t in h._terms[1:]}
        factors_before = [f.clone() for f in h.factors]
        handed_out = h.factors
        h.update(outputs[s], s)
        assert {t.data_ptr() for t in h._terms[1:]} == before  # no new tensor: the old buffers took the new differences
        assert h._terms[0].data_ptr() == outputs[s].data_ptr()  # D0 is the output itself, not a copy
        for f, f0 in zip(handed_out, factors_before):
            torch.testing.assert_close(f, f0, rtol=0, atol=0)  # factors handed out earlier were copies
    for o, k in zip(outputs, kept):
        torch.testing.assert_close(o, k, rtol=0, atol=0)  # module outputs are read, never written

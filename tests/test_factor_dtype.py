"""Factors are kept in each module's output dtype by default (the official code's memory), float32 on request;
FORA never converts."""

import pytest
import torch

import hicache
from hicache.forecast import DifferenceHistory
from hicache.testbeds.tiny.flux import tiny_flux_transformer


def _fill(history: DifferenceHistory, dtype: torch.dtype, steps=(0, 1, 2)) -> None:
    for s in steps:
        history.update(torch.full((4, 8), float(s * s), dtype=dtype), s)


def test_default_factor_dtype_is_the_output_dtype():
    assert hicache.CacheConfig().factor_dtype is None
    h = DifferenceHistory("hicache", 2, warmup=1)
    _fill(h, torch.bfloat16)
    assert [f.dtype for f in h.factors] == [torch.bfloat16] * 3
    assert h.nbytes == 3 * 4 * 8 * 2
    assert h.forecast(3).dtype is torch.bfloat16


def test_float32_factors_stay_an_option():
    h = DifferenceHistory("taylorseer", 2, warmup=1, factor_dtype=torch.float32)
    _fill(h, torch.bfloat16)
    assert [f.dtype for f in h.factors] == [torch.float32] * 3
    assert h.nbytes == 3 * 4 * 8 * 4
    assert h.forecast(3).dtype is torch.bfloat16  # forecasts come back in the output's dtype


def test_fora_never_converts():
    h = DifferenceHistory("fora", 2, warmup=1, factor_dtype=torch.float32)
    out = torch.randn(4, 8).to(torch.bfloat16)
    h.update(out, 0)
    assert h.factors[0].dtype is torch.bfloat16 and h.nbytes == 4 * 8 * 2
    assert torch.equal(h.forecast(1), out)


def _run_bf16(config: hicache.CacheConfig):
    model = tiny_flux_transformer(num_layers=1, num_single_layers=1).to(torch.bfloat16)
    hicache.apply_cache(model, config, "flux")
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=g).bfloat16(),
                  encoder_hidden_states=torch.randn(1, 4, 32, generator=g).bfloat16(),
                  pooled_projections=torch.randn(1, 32, generator=g).bfloat16(),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3))
    with torch.no_grad():
        for step in range(4):
            with model.cache_context("cond"):
                model(**inputs, timestep=torch.tensor([1.0 - step / 4]))
    summary = hicache.cache_summary(model, 4)
    forecast_bytes = sum(hook.peak_bytes for hook in model._hicache_handle.forecast_hooks.values())
    hicache.remove_cache(model)
    return summary, forecast_bytes


@pytest.mark.parametrize("dtype,factor", [(None, 2), ("float32", 4)])
def test_a_bf16_models_cache_takes_the_factor_dtypes_bytes(dtype, factor):
    summary, forecast_bytes = _run_bf16(hicache.CacheConfig("hicache", interval=2, warmup=1, order=1, factor_dtype=dtype))
    # forecast outputs of one double block (attn: 16 + 4 tokens, ff: 16, ff_context: 4) and one single block
    # (proj_out: 20 tokens), width 32, D0 and D1
    elements = (16 + 4 + 16 + 4 + 20) * 32 * 2
    assert forecast_bytes == elements * factor
    assert summary.factor_dtypes == ["bfloat16" if dtype is None else "float32"]
    assert f"factors in {summary.factor_dtypes[0]}" in str(summary)

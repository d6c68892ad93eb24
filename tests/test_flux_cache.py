"""The FLUX recipe on a tiny `FluxTransformer2DModel`/`FluxPipeline`, against diffusers' own cache."""

import re

import pytest
import torch
from diffusers import TaylorSeerCacheConfig
from diffusers.hooks.taylorseer_cache import _TRANSFORMER_BLOCK_IDENTIFIERS

import hicache
from hicache.testbeds.tiny.flux import tiny_flux_pipeline

STEPS = 8
GEN = dict(height=32, width=32, num_inference_steps=STEPS, output_type="pt", max_sequence_length=16)


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline(seed=0, num_layers=2, num_single_layers=2)


def generate(pipe, prompt="a red circle", seed=0, **kwargs):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **{**GEN, **kwargs}).images


@pytest.fixture(scope="module")
def reference(pipe):
    return generate(pipe)


def with_cache(pipe, config, recipe="flux"):
    hicache.apply_cache(pipe.transformer, config, recipe)
    try:
        return generate(pipe)
    finally:
        hicache.remove_cache(pipe.transformer)


@pytest.mark.parametrize("method", ["none", "fora", "taylorseer", "hicache", "hi_taylor", "hicache_analytic"])
def test_interval_one_or_no_method_is_bit_identical(pipe, reference, method):
    config = hicache.CacheConfig("none" if method == "none" else method, interval=1, warmup=1, order=2)
    assert torch.equal(with_cache(pipe, config), reference)


@pytest.mark.parametrize("method", ["fora", "taylorseer", "hicache", "hi_taylor", "hicache_analytic"])
def test_cached_output_differs_only_by_forecast_error(pipe, reference, method):
    out = with_cache(pipe, hicache.CacheConfig(method, interval=3, warmup=2, order=2))
    err = (out - reference).abs().max().item()
    assert 0 < err < 0.5


def test_taylorseer_matches_diffusers_own_taylorseer_hook(pipe):
    interval, before = 3, 2
    ours = hicache.CacheConfig(
        "taylorseer", order=1, warmup=1, factor_dtype=torch.float32,
        # diffusers' rule: full while s < before, then whenever (s - before - 1) % interval == 0
        full_steps=[s for s in range(STEPS) if s < before or (s - before - 1) % interval == 0],
    )
    recipe = hicache.Recipe(forecast=_TRANSFORMER_BLOCK_IDENTIFIERS, name="diffusers_default")
    mine = with_cache(pipe, ours, recipe)
    pipe.transformer.enable_cache(
        TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=before, max_order=1,
                              taylor_factors_dtype=torch.float32)
    )
    try:
        theirs = generate(pipe)
    finally:
        pipe.transformer.disable_cache()
    assert not torch.equal(mine, generate(pipe))  # caching really happened
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


def count_heavy_calls(transformer):
    """Count real computations of every Linear inside attention and MLP modules (the compute the
    recipe avoids). The count wraps each Linear's own forward, below any hook, because torch's
    forward hooks fire on ``__call__`` even when a cache hook answers without computing."""
    counts = {"n": 0}
    patched = []
    for name, module in transformer.named_modules():
        heavy = re.search(r"\.(attn|ff|ff_context)\.", name) or re.search(
            r"single_transformer_blocks\.\d+\.(proj_mlp|proj_out)$", name
        )
        if heavy and isinstance(module, torch.nn.Linear):

            def counting(x, _forward=module.forward):
                counts["n"] += 1
                return _forward(x)

            module.forward = counting
            patched.append(module)
    return counts, patched


def test_cached_steps_call_no_attention_or_mlp(pipe):
    transformer = pipe.transformer
    counts, patched = count_heavy_calls(transformer)
    callback_counts = []

    def on_step(p, i, t, kw):
        callback_counts.append(counts["n"])
        return kw

    hicache.apply_cache(transformer, hicache.CacheConfig("hicache", interval=3, warmup=2, order=2), "flux")
    try:
        generate(pipe, callback_on_step_end=on_step)
    finally:
        hicache.remove_cache(transformer)
        for module in patched:
            del module.forward
    per_step = [b - a for a, b in zip([0] + callback_counts, callback_counts)]
    full = hicache.CacheConfig("hicache", interval=3, warmup=2).schedule.full_steps_for(STEPS)
    assert full == [0, 1, 4, 7]
    assert all(per_step[s] > 0 for s in full)
    assert all(per_step[s] == 0 for s in range(STEPS) if s not in full)


def test_two_calls_in_a_row_are_identical(pipe):
    hicache.apply_cache(pipe.transformer, hicache.CacheConfig("hicache", interval=3, warmup=2, order=2), "flux")
    try:
        first, second = generate(pipe), generate(pipe)
    finally:
        hicache.remove_cache(pipe.transformer)
    assert torch.equal(first, second)


def test_cond_and_uncond_contexts_are_independent(pipe):
    """With true CFG the pipeline alternates cond/uncond calls; each context must see only its own
    history, which we check by driving the transformer directly, interleaved and alone."""
    t = pipe.transformer
    g = torch.Generator().manual_seed(1)
    x = {n: torch.randn(1, 16, 16, generator=g) for n in ("cond", "uncond")}
    txt = {n: torch.randn(1, 4, 32, generator=g) for n in ("cond", "uncond")}
    pooled = torch.randn(1, 32, generator=g)
    ids_img, ids_txt = torch.zeros(16, 3), torch.zeros(4, 3)

    def step(name, s):
        with t.cache_context(name):
            return t(hidden_states=x[name] * (1 + 0.1 * s), encoder_hidden_states=txt[name], pooled_projections=pooled,
                     timestep=torch.tensor([1.0 - s / 10]), img_ids=ids_img, txt_ids=ids_txt).sample

    cfg = hicache.CacheConfig("hicache", interval=3, warmup=2, order=2)
    hicache.apply_cache(t, cfg, "flux")
    try:
        both = [(step("cond", s), step("uncond", s)) for s in range(7)]
        t._reset_stateful_cache()
        alone = [step("uncond", s) for s in range(7)]
    finally:
        hicache.remove_cache(t)
    for (c, u), a in zip(both, alone):
        assert torch.equal(u, a)
    assert not torch.equal(both[5][0], both[5][1])


def test_hooks_live_in_diffusers_registry_and_removal_restores_the_model(pipe, reference):
    t = pipe.transformer
    hicache.apply_cache(t, hicache.CacheConfig("hicache"), "flux")
    # the step counter is a torch forward pre-hook (accelerate's offload re-wraps the root's forward), the rest
    # live in diffusers' registries
    assert t._hicache_handle.step_hook in t._forward_pre_hooks.values()
    assert "hicache_forecast" in t.transformer_blocks[0].attn._diffusers_hook.hooks
    assert "hicache_skip" in t.single_transformer_blocks[0].proj_mlp._diffusers_hook.hooks
    summary = hicache.cache_summary(t, 50)
    assert summary.full_steps == [0, 1, 2, 9, 16, 23, 30, 37, 44]
    assert len(summary.forecast_modules) == 2 * 3 + 2 and len(summary.skip_modules) == 1 + 2 * 4 + 2 * 4
    hicache.remove_cache(t)
    assert not t._forward_pre_hooks
    assert torch.equal(generate(pipe), reference)


def _steps_that_ran_attention(pipe, cache_target, config, **call):
    """Apply ``config`` to ``cache_target`` (the pipeline or its transformer), generate, and return the steps at
    which attention and MLPs really ran, and the cache summary."""
    counts, patched = count_heavy_calls(pipe.transformer)
    seen = []
    hicache.apply_cache(cache_target, config, "flux")
    try:
        generate(pipe, callback_on_step_end=lambda p, i, t, kw: seen.append(counts["n"]) or kw, **call)
        summary = hicache.cache_summary(cache_target)
    finally:
        hicache.remove_cache(cache_target)
        for module in patched:
            del module.forward
    per_step = [b - a for a, b in zip([0] + seen, seen)]
    return [s for s, n in enumerate(per_step) if n > 0], summary


@pytest.mark.parametrize("steps", [STEPS, 10])
def test_final_full_steps_follow_the_pipelines_own_step_count(pipe, steps):
    """Applied to the pipeline, the cache takes each call's step count from it: the last K steps run in full and
    the summary reports the steps that ran (through the transformer alone they were ignored, while the summary
    claimed them)."""
    config = hicache.CacheConfig("hicache", interval=3, warmup=2, order=2, final_full_steps=2)
    ran, summary = _steps_that_ran_attention(pipe, pipe, config, num_inference_steps=steps)
    expected = config.schedule.full_steps_for(steps)
    assert expected[-2:] == [steps - 2, steps - 1]
    assert ran == expected and summary.full_steps == expected and summary.num_steps == steps
    assert summary.full_forwards == len(expected) and summary.cached_forwards == steps - len(expected)


def test_final_full_steps_without_a_step_count_is_a_one_line_error(pipe):
    config = hicache.CacheConfig("hicache", interval=3, warmup=2, final_full_steps=2)
    with pytest.raises(ValueError, match=r"final_full_steps=2 needs the number of steps.*apply_cache\(pipe") as err:
        _steps_that_ran_attention(pipe, pipe.transformer, config)
    assert "\n" not in str(err.value)


def test_a_config_step_count_other_than_the_calls_is_a_one_line_error(pipe):
    config = hicache.CacheConfig("hicache", interval=3, warmup=2, num_inference_steps=50)
    with pytest.raises(ValueError, match=rf"num_inference_steps=50\) but this call runs {STEPS} steps") as err:
        _steps_that_ran_attention(pipe, pipe, config)
    assert "\n" not in str(err.value)


def test_a_call_interrupted_mid_loop_leaves_nothing_behind(pipe):
    """An exception mid-loop skips the pipeline's end-of-call reset; the next call must still start at step 0."""

    def stop_at_step_5(p, i, t, kw):
        if i == 5:
            raise KeyboardInterrupt
        return kw

    hicache.apply_cache(pipe.transformer, hicache.CacheConfig("hicache", interval=3, warmup=2, order=2), "flux")
    try:
        fresh = generate(pipe)
        with pytest.raises(KeyboardInterrupt):
            generate(pipe, callback_on_step_end=stop_at_step_5)
        after = generate(pipe)
    finally:
        hicache.remove_cache(pipe.transformer)
    assert torch.equal(after, fresh)

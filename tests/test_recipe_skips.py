"""A recipe may only skip modules whose outputs are dead at cached steps.

A skipped module stands in with zeros at cached steps; that is only exact if nothing but forecast
or other skipped modules reads its output. So: run the cached model twice, once with the zeros and
once with random stand-ins for every skipped module and every chunk a ``live_chunks`` linear does
not compute. Dead outputs leave the result bit-identical; a live one (the negative case) changes it.
"""

import re

import pytest
import torch

import hicache
from hicache import hooks
from hicache.testbeds.tiny.flux import tiny_flux_transformer
from hicache.testbeds.tiny.hunyuan_video import tiny_hunyuan_video_transformer
from hicache.testbeds.tiny.qwen_image import tiny_qwen_image_transformer

STEPS = 6
CONFIG = hicache.CacheConfig("hicache", interval=3, warmup=2, order=2)


def _flux():
    model = tiny_flux_transformer(num_layers=2, num_single_layers=2)
    g = torch.Generator().manual_seed(0)
    ids = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(-1, 2)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        img_ids=torch.cat([torch.zeros(16, 1), ids.float()], 1),
        txt_ids=torch.zeros(5, 3),
    )
    return model, inputs, "flux"


def _hunyuan(**overrides):
    model = tiny_hunyuan_video_transformer(num_layers=2, num_single_layers=2, **overrides)
    g = torch.Generator().manual_seed(0)
    frames = 3 if overrides else 2
    inputs = dict(
        hidden_states=torch.randn(1, 4, frames, 4, 4, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
        encoder_attention_mask=torch.ones(1, 5),
        pooled_projections=torch.randn(1, 8, generator=g),
        guidance=torch.tensor([6000.0]),
    )
    return model, inputs, "hunyuan_video"


def _qwen(reference: bool = False, **overrides):
    """Qwen-Image; with ``reference``, the edit pipelines' layout: a reference image's tokens after the noisy
    ones, and padded text (Edit-Plus-2511 also modulates the reference tokens apart: ``zero_cond_t``)."""
    model = tiny_qwen_image_transformer(num_layers=2, **overrides)
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 4, 4)] + ([(1, 2, 2)] if reference else [])
    mask = torch.ones(1, 5, dtype=torch.long)
    if reference:
        mask[:, -2:] = 0
    inputs = dict(
        hidden_states=torch.randn(1, sum(f * h * w for f, h, w in shapes), 16, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        encoder_hidden_states_mask=mask if reference else None,
        img_shapes=[shapes],
    )
    return model, inputs, "qwen_image"


MODELS = {
    "flux": _flux,
    "hunyuan_video": _hunyuan,
    "hunyuan_video_i2v": lambda: _hunyuan(image_condition_type="token_replace"),
    "qwen_image": _qwen,
    "qwen_image_edit": lambda: _qwen(reference=True),
    "qwen_image_edit_zero_cond_t": lambda: _qwen(reference=True, zero_cond_t=True),
}


@torch.no_grad()
def _sample(model, inputs, recipe, config=CONFIG) -> torch.Tensor:
    """A short Euler loop with the cache applied; returns the final sample."""
    hicache.apply_cache(model, config, recipe)
    try:
        x = inputs["hidden_states"].clone()
        for i in range(STEPS):
            t = torch.tensor([1.0 - i / STEPS])
            with hicache.cache_context(model, "cond"):
                v = model(**{**inputs, "hidden_states": x}, timestep=t * 1000 if "guidance" in inputs else t,
                          return_dict=False)[0]
            x = x - v / STEPS
        return x
    finally:
        hicache.remove_cache(model)


def _example(inputs: dict) -> dict:
    """One call's inputs, with the timestep of a step in the middle of the loop."""
    t = torch.tensor([0.5])
    return {**inputs, "timestep": t * 1000 if "guidance" in inputs else t, "return_dict": False}


@pytest.mark.parametrize("name", list(MODELS))
def test_skipped_outputs_are_dead_at_cached_steps(name):
    model, inputs, recipe = MODELS[name]()
    report = hicache.check_recipe(model, recipe, _example(inputs))
    assert report.ok, str(report)
    declared = {role for role, patterns in hicache.get_recipe(recipe).roles.items() if patterns and role != "forecast"}
    assert set(report.stand_ins.values()) == declared  # every kind of stand-in the recipe declares was exercised
    assert str(report).startswith(f"recipe {recipe!r} on {type(model).__name__}: OK.")


def _lesa_config(recipe: str = "flux") -> hicache.CacheConfig:
    """LESA on the toy loop's schedule (t = 1 - i/6): full at 0, 1, 3, 4; steps 2 and 5 forecast."""
    from hicache.lesa import LesaPredictor, LesaPredictorConfig
    from hicache.recipes.lesa import get_lesa_recipe

    torch.manual_seed(0)
    predictor = LesaPredictor(LesaPredictorConfig(timesteps=[1 - i / STEPS for i in range(STEPS + 1)], interval=3,
                                                  warmup=2, history_depth=2, hidden_dim=4,
                                                  stage_thresholds=list(get_lesa_recipe(recipe).stage_thresholds)))
    return hicache.CacheConfig("lesa", interval=3, warmup=2, predictor=predictor)


def _lesa_models() -> list[str]:
    """The models whose recipe has a LESA recipe (Qwen-Image has none yet)."""
    from hicache.recipes.lesa import available_lesa_recipes

    recipe_of = {name: next(r for r in ("qwen_image", "hunyuan_video", "flux") if name.startswith(r)) for name in MODELS}
    models = [name for name in MODELS if recipe_of[name] in available_lesa_recipes()]
    assert {"flux", "hunyuan_video"} <= set(models)
    return models


@pytest.mark.parametrize("name", _lesa_models())
def test_lesa_skipped_outputs_are_dead_at_cached_steps(name, random_stand_ins):
    """LESA skips the whole stack before its forecast tensor: every skipped output must be dead."""
    model, inputs, recipe = MODELS[name]()
    with_zeros = _sample(model, inputs, recipe, _lesa_config(recipe))
    random_stand_ins(chunks=False)  # LESA has no live chunks
    with_noise = _sample(model, inputs, recipe, _lesa_config(recipe))
    torch.testing.assert_close(with_noise, with_zeros, rtol=0, atol=0)


def test_a_live_lesa_skip_changes_the_result(random_stand_ins):
    """Skipping FLUX's time embedding, which norm_out reads after the forecast, is caught."""
    from dataclasses import replace

    from hicache.recipes.lesa import get_lesa_recipe

    model, inputs, recipe = _flux()
    live = replace(get_lesa_recipe(recipe), name="live", skip=(*get_lesa_recipe(recipe).skip, r"time_text_embed"))
    with_zeros = _sample(model, inputs, live, _lesa_config())
    random_stand_ins(chunks=False)
    assert not torch.equal(_sample(model, inputs, live, _lesa_config()), with_zeros)


def test_a_live_skipped_output_is_caught_and_named():
    """The check can fail: skipping the final norm, whose output is the model's, is caught and named."""
    model, inputs, recipe = _flux()
    live = hicache.Recipe(
        forecast=hicache.get_recipe(recipe).forecast,
        skip=(*hicache.get_recipe(recipe).skip, r"norm_out\.norm"),
        name="live",
    )
    report = hicache.check_recipe(model, live, _example(inputs))
    assert not report.ok and list(report.live) == ["norm_out.norm"] and report.live["norm_out.norm"] > 0
    assert "'norm_out.norm' (skip): output changes by up to" in str(report)
    with pytest.raises(ValueError, match=r"recipe 'live' on FluxTransformer2DModel stands in for outputs read at "
                                         r"cached steps: 'norm_out.norm' \(skip\)") as err:
        report.raise_if_wrong()
    assert "\n" not in str(err.value)
    assert not hasattr(model, "_hicache_handle")  # the check leaves the model as it was


def test_a_live_chunk_left_out_is_caught_and_named():
    """Declaring FLUX's MLP gate (chunk 5 of the double-stream modulation) dead is caught, for each block."""
    model, inputs, recipe = _flux()
    registered = hicache.get_recipe(recipe)
    wrong = hicache.Recipe(forecast=registered.forecast, skip=registered.skip, name="gate_left_out",
                           live_chunks={r"transformer_blocks\.\d+\.norm1\.linear": (6, (2,))})
    report = hicache.check_recipe(model, wrong, _example(inputs))
    assert list(report.live) == ["transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1.linear"]
    assert "(live_chunks): output changes by up to" in str(report)


def test_a_wrong_custom_recipe_on_a_toy_is_caught_and_the_right_one_passes():
    """``out(inner(x) + x)``: ``inner`` feeds the output through an addition, so it may not be skipped."""
    model, x = _Block(lambda x, h: x + h), torch.randn(2, 3)
    assert hicache.check_recipe(model, hicache.Recipe(forecast=["out"], skip=["inner"], name="toy"), (x,)).ok
    report = hicache.check_recipe(model, hicache.Recipe(forecast=["inner"], skip=["out"], name="bad"), (x,))
    assert list(report.live) == ["out"]


def test_candidate_modules_are_recipe_patterns():
    model, _, _ = _flux()
    candidates = {c.pattern: c for c in hicache.candidate_modules(model)}
    attn = candidates[r"transformer_blocks\.\d+\.attn"]
    assert attn.kind == "FluxAttention" and attn.count == 2
    assert candidates[r"single_transformer_blocks\.\d+\.proj_out"].count == 2
    assert candidates[r"norm_out\.norm"].count == 1 and r"transformer_blocks" not in candidates
    # every pattern of the built-in recipe is among them, and each matches exactly its modules
    names = [n for n, _ in model.named_modules()]
    for pattern in hicache.get_recipe("flux").patterns:
        for part in pattern.split("|"):
            if part.endswith("(_context)?\\.linear") or not any(re.fullmatch(part, n) for n in names):
                continue  # two candidates in one pattern; HunyuanVideo's rope
            assert part in candidates, part
            assert candidates[part].count == sum(bool(re.fullmatch(part, n)) for n in names)
    assert r"transformer_blocks\.\d+\.attn\.to_out\.0" not in candidates  # deeper than 2 levels in a block
    assert "transformer_blocks" in str(hicache.candidate_modules(model))


@pytest.mark.parametrize("name", list(MODELS))
def test_live_chunks_compute_what_the_whole_linear_computes(name):
    """Multiplying only the gate rows of the modulation linears is only a saving."""
    model, inputs, recipe = MODELS[name]()
    registered = hicache.get_recipe(recipe)
    assert registered.live_chunks
    whole = hicache.Recipe(forecast=registered.forecast, skip=registered.skip, skip_empty=registered.skip_empty,
                           skip_broadcast=registered.skip_broadcast, name="whole_linears")
    torch.testing.assert_close(_sample(model, inputs, recipe), _sample(model, inputs, whole), rtol=0, atol=0)


def _out_inputs_at_a_full_then_a_cached_step(model: "_Block", x: torch.Tensor, live_chunks: dict) -> list:
    """Cache ``model`` (FORA, interval 2, ``out`` forecast) with ``live_chunks``, run a full then a cached step,
    and return the input ``out`` received at each (a forecast module's input is still computed)."""
    hicache.apply_cache(model, hicache.CacheConfig("fora", interval=2, warmup=1),
                        hicache.Recipe(forecast=["out"], live_chunks=live_chunks))
    seen = []
    model.out.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with hicache.cache_context(model, "cond"), torch.no_grad():
            model(x)
            model(x)
    finally:
        hicache.remove_cache(model)
    return seen


def test_live_chunks_multiply_only_their_rows():
    """At a full step the whole linear runs; at a cached step only the live rows, the rest are zeros."""
    model, x = _Block(lambda x, h: h), torch.randn(2, 3)
    full, cached = _out_inputs_at_a_full_then_a_cached_step(model, x, {"inner": (3, (1,))})
    with torch.no_grad():
        whole = model.inner(x)
    torch.testing.assert_close(full, whole)
    torch.testing.assert_close(cached, torch.stack([torch.zeros(2), whole[:, 1], torch.zeros(2)], 1))


class _PackedParameter(torch.nn.Parameter):
    """Stands for a quantised weight class (bitsandbytes' Params4bit, ...), whose rows cannot be sliced."""


def test_live_chunks_run_the_whole_linear_when_its_weight_is_not_a_plain_tensor():
    model = _Block(lambda x, h: h)
    model.inner.weight = _PackedParameter(model.inner.weight.detach().clone())
    full, cached = _out_inputs_at_a_full_then_a_cached_step(model, torch.randn(2, 3), {"inner": (3, (1,))})
    torch.testing.assert_close(cached, full)  # not sliced: the whole linear ran


def test_live_chunks_run_the_whole_linear_when_its_weight_waits_elsewhere_for_an_offloading_hook():
    """Offloading (accelerate's sequential offload) wraps the module's forward and brings the weight in there; a
    weight on another device than the input is left to that forward instead of being sliced."""
    model = _Block(lambda x, h: h)
    onloaded = model.inner.weight.detach().clone()
    inner_forward = model.inner.forward

    def offloaded_forward(*args, **kwargs):  # installed before hicache's hooks, as accelerate's would be
        model.inner.weight = torch.nn.Parameter(onloaded.clone())
        out = inner_forward(*args, **kwargs)
        model.inner.weight = torch.nn.Parameter(torch.empty(3, 3, device="meta"))
        return out

    model.inner.forward = offloaded_forward
    model.inner.weight = torch.nn.Parameter(torch.empty(3, 3, device="meta"))
    x = torch.randn(2, 3)
    full, cached = _out_inputs_at_a_full_then_a_cached_step(model, x, {"inner": (3, (1,))})
    assert cached.device == x.device
    torch.testing.assert_close(cached, full)


def test_chunk_runs_merge_neighbours():
    assert hooks.chunk_runs(12, 6, (2, 5)) == [(0, 4, False), (4, 6, True), (6, 10, False), (10, 12, True)]
    assert hooks.chunk_runs(6, 3, (0, 1)) == [(0, 4, True), (4, 6, False)]


def test_bad_live_chunks_are_one_line_errors():
    with pytest.raises(ValueError, match=r"live_chunks\['a'\] = \(3, \(3,\)\).*0\.\.2"):
        hicache.Recipe(forecast=["x"], live_chunks={"a": (3, (3,))})
    with pytest.raises(ValueError, match=r"must be \(num_chunks, live chunk indices\)"):
        hicache.Recipe(forecast=["x"], live_chunks={"a": 3})
    model = _Block(lambda x, h: h)
    for chunks, match in (({"out": (2, (0,))}, "has 3 outputs, not divisible into 2"),
                          ({"combine": (1, (0,))}, "not a torch.nn.Linear")):
        model.combine = torch.nn.Identity() if "combine" in chunks else model.combine
        with pytest.raises(ValueError, match=match):
            hicache.apply_cache(model, hicache.CacheConfig("fora"), hicache.Recipe(forecast=["inner"], live_chunks=chunks))
        assert not hasattr(model, "_hicache_handle") and not hasattr(model, "_diffusers_hook")


def test_skipped_modules_share_one_dense_zero_tensor_per_shape():
    """No allocation or fill per cached step: every stand-in of a shape is the same dense zeros."""
    pool = hooks.ZeroPool()
    a, b = hooks.SkipState(pool), hooks.SkipState(pool)
    a.update(torch.ones(2, 3), "a")
    b.update((torch.ones(2, 3), torch.ones(4)), "b")
    za, (zb, zc) = a.zeros("a"), b.zeros("b")
    assert za is zb and za.is_contiguous() and not za.any() and zc.shape == (4,)
    assert pool.nbytes == (6 + 4) * 4


class _Block(torch.nn.Module):
    """``out(combine(x, inner(x)))``: whether ``inner`` may be skipped depends on ``combine``."""

    def __init__(self, combine):
        super().__init__()
        self.inner = torch.nn.Linear(3, 3)
        self.out = torch.nn.Linear(3, 3)
        self.combine = combine

    def forward(self, x):
        return self.out(self.combine(x, self.inner(x)))


def _run_toy(combine, recipe: hicache.Recipe, calls: int, error: type, match: str) -> None:
    """Alternate full and cached steps (interval 2); the last call must raise."""
    model = _Block(combine)
    hicache.apply_cache(model, hicache.CacheConfig("fora", interval=2, warmup=1), recipe)
    try:
        with hicache.cache_context(model, "cond"), torch.no_grad():
            for _ in range(calls - 1):
                model(torch.ones(1, 3))
            with pytest.raises(error, match=match):
                model(torch.ones(1, 3))
    finally:
        hicache.remove_cache(model)


def test_a_consumer_writing_into_the_zeros_fails_loudly():
    # full, cached (the pool's zeros are written into: `inner` must not be skipped), full, cached: caught
    _run_toy(lambda x, h: h.mul_(2), hicache.Recipe(forecast=["out"], skip=["inner"]), 4, RuntimeError,
             "'inner'.*modified in place")


def _dense(recipe: hicache.Recipe) -> hicache.Recipe:
    """The same recipe with every skipped module standing in with zeros of its recorded shape."""
    return hicache.Recipe(forecast=recipe.forecast, skip=recipe.skip + recipe.skip_empty + recipe.skip_broadcast,
                          name=recipe.name, live_chunks={p: (n, live) for p, n, live in recipe.live_chunks})


@pytest.mark.parametrize("name", list(MODELS))
def test_smaller_stand_ins_compute_what_full_size_zeros_compute(name):
    """Empty (``skip_empty``) and one-token (``skip_broadcast``) stand-ins are only a saving."""
    model, inputs, recipe = MODELS[name]()
    registered = hicache.get_recipe(recipe)
    assert registered.skip_empty or registered.skip_broadcast
    small = _sample(model, inputs, recipe)
    dense = _sample(model, inputs, _dense(registered))
    torch.testing.assert_close(small, dense, rtol=0, atol=0)


def test_stand_in_shapes():
    pool = hooks.ZeroPool()
    full, empty, broadcast = (hooks.SkipState(pool, shape) for shape in ("full", "empty", "broadcast"))
    for state in (full, empty, broadcast):
        state.update((torch.ones(2, 5, 3), torch.ones(4)), "m")
    assert [z.shape for z in full.zeros("m")] == [(2, 5, 3), (4,)]
    assert [z.shape for z in empty.zeros("m")] == [(2, 5, 0), (0,)]
    assert [z.shape for z in broadcast.zeros("m")] == [(1, 1, 3), (4,)]
    with pytest.raises(ValueError, match="stand-in shape"):
        hooks.SkipState(pool, "tiny")


def test_an_empty_stand_in_used_in_arithmetic_fails_instead_of_computing_wrong():
    # full, then cached: (1, 3) + (1, 0) cannot broadcast, since `inner` is live, not concatenated
    _run_toy(lambda x, h: x + h, hicache.Recipe(forecast=["out"], skip_empty=["inner"], name="wrong"), 2,
             RuntimeError, "size of tensor")


def test_a_module_may_have_only_one_role():
    recipe = hicache.Recipe(forecast=[r"a"], skip_empty=[r"a|b"], name="clash")
    assert recipe.role("b") == "skip_empty" and recipe.role("c") is None
    with pytest.raises(ValueError, match="'a' matches both forecast and skip_empty"):
        recipe.role("a")


def test_a_hooked_submodule_called_before_its_root_is_a_one_line_error():
    model = _Block(lambda x, h: h)
    hicache.apply_cache(model, hicache.CacheConfig("fora", interval=2, warmup=1),
                        hicache.Recipe(forecast=["out"], live_chunks={"inner": (3, (1,))}))
    try:
        with hicache.cache_context(model, "cond"), torch.no_grad():
            for name in ("out", "inner"):  # a forecast module and a live-chunks linear, no root step yet
                with pytest.raises(RuntimeError, match=f"'{name}' ran before its root module's step hook") as err:
                    getattr(model, name)(torch.ones(1, 3))
                assert "\n" not in str(err.value)
    finally:
        hicache.remove_cache(model)


def test_check_recipe_runs_in_eval_mode_and_restores_the_mode():
    """Dropout would change the output between the two passes just as a live stand-in does."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5), torch.nn.Linear(3, 3)).train()
    assert hicache.check_recipe(model, hicache.Recipe(forecast=["2"], skip=["0"], name="dropout"), (torch.randn(4, 3),)).ok
    assert model.training

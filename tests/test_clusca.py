"""ClusCa and Hi-ClusCa through `apply_cache` on a tiny `FluxTransformer2DModel` / `FluxPipeline`."""

import math

import pytest
import torch

import hicache
from hicache import clusters as C
from hicache import fresh_tokens
from hicache.app.speed import count_transformer_flops
from hicache.testbeds.tiny.flux import tiny_flux_pipeline, tiny_flux_transformer

STEPS = 8
GEN = dict(height=32, width=32, num_inference_steps=STEPS, output_type="pt", max_sequence_length=16)
DIM = 32  # 2 heads x 16
IMAGE_TOKENS, TEXT_TOKENS = 16, 5


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline(seed=0, num_layers=2, num_single_layers=2)


def generate(pipe, seed=0):
    return pipe("a red circle", generator=torch.Generator().manual_seed(seed), **GEN).images


def with_cache(pipe, config):
    hicache.apply_cache(pipe.transformer, config, "flux")
    try:
        return generate(pipe)
    finally:
        hicache.remove_cache(pipe.transformer)


def clusca(method="clusca", **kwargs):
    return hicache.CacheConfig(method, **{**dict(interval=3, warmup=2, order=1, sigma=0.5, clusters=4), **kwargs})


# --- configuration ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("clusters", 0, "clusters must be >= 1"),
    ("clusters", 2.5, "clusters must be an integer"),
    ("propagation", -0.1, r"propagation must be a number in \[0, 1\]"),
    ("propagation", "0.1", r"propagation must be a number in \[0, 1\]"),
    ("seed", "zero", "seed must be an integer"),
])
def test_bad_values_fail_in_one_line(field, value, message):
    with pytest.raises(ValueError, match=message):
        hicache.CacheConfig("clusca", **{field: value})


def test_token_wise_methods_need_a_recipe_with_fresh_tokens():
    model = tiny_flux_transformer()
    with pytest.raises(ValueError, match="declares no fresh tokens"):
        hicache.apply_cache(model, clusca(), hicache.Recipe(forecast=[r"transformer_blocks\.\d+\.ff"]))
    assert not hasattr(model, "_diffusers_hook")  # nothing attached


def test_summary_reports_the_fresh_tokens():
    model = tiny_flux_transformer(num_layers=2, num_single_layers=1)
    hicache.apply_cache(model, clusca("clusca", clusters=16, propagation=0.005, seed=3), "flux")
    summary = hicache.cache_summary(model, 50)
    assert summary.method == "clusca" and summary.fresh_tokens["clusters"] == 16
    assert summary.fresh_tokens["propagation"] == 0.005 and summary.fresh_tokens["seed"] == 3
    assert summary.fresh_tokens["fresh_modules"] == [f"transformer_blocks.{i}.{m}" for i in range(2)
                                                     for m in ("ff", "ff_context")]
    assert summary.fresh_tokens["propagating_modules"] == ["transformer_blocks.0.ff", "transformer_blocks.1.ff"]
    assert summary.fresh_tokens["cluster_sources"] == ["transformer_blocks.1"]
    assert "recomputed for K=16 fresh tokens" in str(summary)
    # the select norms run instead of being skipped, the MLP shift and scale rows of the modulation too
    assert "transformer_blocks.0.norm2" not in summary.skip_modules
    assert hicache.get_recipe("flux").role("transformer_blocks.0.norm2") == "skip_broadcast"
    hicache.remove_cache(model)
    hicache.apply_cache(model, clusca("hi_clusca"), "flux")
    assert "first cached step" in str(hicache.cache_summary(model, 50))
    hicache.remove_cache(model)


# --- end to end on the tiny pipeline ---------------------------------------------------------------

@pytest.mark.parametrize("method", ["clusca", "hi_clusca"])
def test_interval_one_is_the_uncached_model(pipe, method):
    reference = generate(pipe)
    assert torch.equal(with_cache(pipe, clusca(method, interval=1, warmup=1)), reference)


@pytest.mark.parametrize("method", ["clusca", "hi_clusca"])
def test_seed_makes_runs_reproducible(pipe, method):
    first, second = with_cache(pipe, clusca(method)), with_cache(pipe, clusca(method))
    assert torch.equal(first, second)
    assert not torch.equal(first, with_cache(pipe, clusca(method, seed=1)))
    reference = generate(pipe)
    assert 0 < (first - reference).abs().max() < 0.5


def test_fresh_tokens_change_the_forecast(pipe):
    taylor = with_cache(pipe, hicache.CacheConfig("taylorseer", interval=3, warmup=2, order=1))
    assert not torch.equal(with_cache(pipe, clusca("clusca")), taylor)


# --- driving the transformer directly --------------------------------------------------------------

def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(-1, 2)
    return dict(hidden_states=torch.randn(1, IMAGE_TOKENS, 16, generator=g),
                encoder_hidden_states=torch.randn(1, TEXT_TOKENS, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g),
                img_ids=torch.cat([torch.zeros(IMAGE_TOKENS, 1), ids.float()], 1), txt_ids=torch.zeros(TEXT_TOKENS, 3))


@torch.no_grad()
def sample(model, x, steps=STEPS, context="cond", callback=None):
    """A short Euler loop in one cache context; the final sample."""
    x = {**x}
    for i in range(steps):
        with hicache.cache_context(model, context):
            v = model(**x, timestep=torch.tensor([1.0 - i / steps]), return_dict=False)[0]
        x["hidden_states"] = x["hidden_states"] - v / steps
        if callback:
            callback(i)
    return x["hidden_states"]


def cluster_state(model, context="cond") -> fresh_tokens.ClusterState:
    return model._hicache_handle.fresh_tokens.clusters._state_cache[context]


def test_clusca_clusters_at_every_full_step_and_hi_clusca_once():
    model = tiny_flux_transformer(num_layers=2, num_single_layers=1)
    hicache.apply_cache(model, clusca("clusca", interval=3, warmup=2), "flux")
    sample(model, inputs(), steps=10)
    full = [0, 1, 4, 7]
    assert cluster_state(model).clusterings == [(s, stream, "transformer_blocks.1") for s in full
                                                for stream in ("image", "text")]
    hicache.remove_cache(model)
    hicache.apply_cache(model, clusca("hi_clusca", interval=3, warmup=2), "flux")
    sample(model, inputs(), steps=10)
    assert cluster_state(model).clusterings == [(2, "image", "transformer_blocks.0.norm2"),
                                                (2, "text", "transformer_blocks.0.norm2_context")]
    hicache.remove_cache(model)


def test_draws_follow_the_official_order_and_shapes(monkeypatch):
    """K-means starts (image before text) and one rand(B, N) per selection, ff before ff_context, block by block,
    all from one generator seeded with the config's seed."""
    calls = []
    randint, rand = torch.randint, torch.rand

    def logged_randint(*args, generator=None, **kwargs):
        calls.append(("randint", tuple(args[2]), generator.initial_seed()))
        return randint(*args, generator=generator, **kwargs)

    def logged_rand(*args, generator=None, **kwargs):
        calls.append(("rand", tuple(args[0]), generator.initial_seed()))
        return rand(*args, generator=generator, **kwargs)

    monkeypatch.setattr(C.torch, "randint", logged_randint)
    monkeypatch.setattr(C.torch, "rand", logged_rand)
    model = tiny_flux_transformer(num_layers=2, num_single_layers=1)
    hicache.apply_cache(model, clusca("hi_clusca", interval=3, warmup=2, seed=5), "flux")
    sample(model, inputs(), steps=4)  # full 0, 1; cached 2, 3
    img, txt = ("rand", (1, IMAGE_TOKENS), 5), ("rand", (1, TEXT_TOKENS), 5)
    assert calls == [("randint", (1, 4), 5), img, ("randint", (1, 4), 5), txt, img, txt,  # step 2, blocks 0 and 1
                     img, txt, img, txt]  # step 3
    hicache.remove_cache(model)
    calls.clear()
    hicache.apply_cache(model, clusca("clusca", interval=3, warmup=2, seed=5), "flux")
    sample(model, inputs(), steps=4)  # K-means starts at step 0 only, then warm starts
    assert calls == [("randint", (1, 4), 5), ("randint", (1, 4), 5)] + [img, txt] * 4
    hicache.remove_cache(model)


def test_clusca_and_hi_clusca_agree_at_sigma_one_over_root_two_with_the_same_clusters(monkeypatch):
    """At O = 1 the Hermite weight sigma * H1(sigma k) = 2 sigma^2 k is Taylor's k at sigma = 1/sqrt(2); with the
    same (injected) clusters the two methods then compute the same thing. With their own clusters they differ."""
    model = tiny_flux_transformer(num_layers=2, num_single_layers=1)
    sigma = 1 / math.sqrt(2)
    native = {}
    for method in ("clusca", "hi_clusca"):
        hicache.apply_cache(model, clusca(method, sigma=sigma), "flux")
        native[method] = sample(model, inputs())
        hicache.remove_cache(model)
    assert not torch.allclose(native["clusca"], native["hi_clusca"], rtol=0, atol=1e-6)

    def injected(self, x, stream, num_clusters, step, where):  # the same fixed assignment for both methods
        self.labels[stream] = (torch.arange(x.shape[1]) % num_clusters).expand(x.shape[0], -1)
        self.clusterings.append((step, stream, where))

    monkeypatch.setattr(fresh_tokens.ClusterState, "cluster", injected)
    same = {}
    for method in ("clusca", "hi_clusca"):
        hicache.apply_cache(model, clusca(method, sigma=sigma), "flux")
        same[method] = sample(model, inputs())
        hicache.remove_cache(model)
    torch.testing.assert_close(same["clusca"], same["hi_clusca"], rtol=0, atol=1e-6)
    assert not torch.allclose(same["clusca"], native["clusca"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["clusca", "hi_clusca"])
def test_cfg_contexts_keep_separate_generators_and_clusters(method):
    model = tiny_flux_transformer(num_layers=2, num_single_layers=1)
    hicache.apply_cache(model, clusca(method), "flux")
    cond, uncond = inputs(0), inputs(1)
    together = {"cond": [], "uncond": []}
    xs = {"cond": {**cond}, "uncond": {**uncond}}
    with torch.no_grad():
        for i in range(STEPS):
            for name in ("cond", "uncond"):
                with hicache.cache_context(model, name):
                    v = model(**xs[name], timestep=torch.tensor([1.0 - i / STEPS]), return_dict=False)[0]
                xs[name]["hidden_states"] = xs[name]["hidden_states"] - v / STEPS
    labels = {n: cluster_state(model, n).labels["image"] for n in ("cond", "uncond")}
    model._reset_stateful_cache()
    alone = sample(model, uncond, context="uncond")
    hicache.remove_cache(model)
    assert torch.equal(xs["uncond"]["hidden_states"], alone)
    assert not torch.equal(labels["cond"], labels["uncond"])


def test_a_cached_step_computes_k_tokens_updates_d0_and_forecasts_from_it(monkeypatch):
    """Against the rules written out: the MLP sees the modulated LayerNorm of the K drawn rows of its block's
    residual stream, D0 becomes the propagation of those outputs, the output is D0 + k D1 (TaylorSeer, O = 1),
    and the next full step's first difference is taken against the updated D0."""
    model = tiny_flux_transformer(num_layers=2, num_single_layers=1)
    block = model.transformer_blocks[1]
    gamma = 0.3
    hicache.apply_cache(model, clusca("clusca", interval=3, warmup=2, propagation=gamma), "flux")
    hook = model._hicache_handle.forecast_hooks["transformer_blocks.1.ff"]
    seen, steps = {}, {}
    block.register_forward_pre_hook(lambda m, a, kw: seen.update(temb=kw["temb"]), with_kwargs=True)
    block.norm2.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    block.ff.register_forward_pre_hook(lambda m, a: seen.update(ff_in=a[0]))
    block.ff.register_forward_hook(lambda m, a, out: seen.update(ff_out=out))
    draws, draw = [], C.draw_fresh
    monkeypatch.setattr(C, "draw_fresh", lambda *a: draws.append(draw(*a)) or draws[-1])

    def after_step(i):
        history = hook.state_manager._state_cache["cond"].histories[0]
        steps[i] = {**seen, "d0": history.d0.clone(), "factors": history.factors}

    sample(model, inputs(), steps=5, callback=after_step)  # full 0, 1, cached 2, 3, full 4
    labels = cluster_state(model).labels["image"]
    hicache.remove_cache(model)
    assert len(draws) == 8  # steps 2 and 3: block 0 image, text, block 1 image, text
    idx, s3 = draws[6], steps[3]
    emb = block.norm1.linear(torch.nn.functional.silu(s3["temb"])).chunk(6, dim=1)
    shift, scale = emb[3], emb[4]
    rows = C.gather_tokens(s3["x"], idx)
    want_in = torch.nn.functional.layer_norm(rows, (DIM,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(s3["ff_in"], want_in)
    assert s3["ff_in"].shape == (1, 4, DIM)
    d0_before, d1 = steps[2]["d0"], steps[2]["factors"][1]
    want_d0 = C.propagate_fresh(d0_before, idx, block.ff(want_in), labels, 4, gamma)
    torch.testing.assert_close(s3["d0"], want_d0)
    assert torch.equal(steps[3]["factors"][1], d1)  # higher orders untouched
    torch.testing.assert_close(s3["ff_out"], want_d0 + 2 * d1)  # k = 3 - 1
    torch.testing.assert_close(steps[4]["factors"][1], (steps[4]["ff_out"] - s3["d0"]) / 3)


def test_cached_step_flops_are_the_forecast_plus_k_token_mlps():
    """The FLOP counter sees the K-token MLPs: a ClusCa cached step costs a TaylorSeer cached step plus, per
    double-stream block, two MLPs on K tokens and the modulation's MLP shift and scale rows."""
    model = tiny_flux_transformer(num_layers=2, num_single_layers=1)
    k, x = 3, inputs()

    def cached_step_flops(config):
        hicache.apply_cache(model, config, "flux")
        flops = []
        with count_transformer_flops(model) as counted:
            sample(model, x, steps=3, callback=lambda i: flops.append(counted["flops"]))
        hicache.remove_cache(model)
        return flops[2] - flops[1]  # step 2 is cached

    taylor = cached_step_flops(hicache.CacheConfig("taylorseer", interval=3, warmup=2, order=1))
    ours = cached_step_flops(clusca("clusca", clusters=k))
    mlp = 2 * (2 * k * DIM * 4 * DIM)  # two linears, D -> 4D -> D, on K tokens
    modulation = 2 * DIM * (2 * DIM)  # shift and scale rows of one adaLN linear
    assert taylor > 0 and ours - taylor == 2 * (2 * mlp + 2 * modulation)


@pytest.mark.parametrize("method", ["clusca", "hi_clusca"])
def test_skipped_outputs_stay_dead(method, random_stand_ins):
    """The recipe that token-wise methods run with skips only dead outputs (as tests/test_recipe_skips.py checks
    for the others): random stand-ins for every skipped output and left-out chunk change nothing."""
    model = tiny_flux_transformer(num_layers=2, num_single_layers=1)

    def run():
        hicache.apply_cache(model, clusca(method), "flux")
        try:
            return sample(model, inputs())
        finally:
            hicache.remove_cache(model)

    with_zeros = run()
    random_stand_ins()
    assert torch.equal(run(), with_zeros)


@pytest.mark.parametrize("method", ["clusca", "hi_clusca"])
def test_a_new_sampling_loop_reseeds_and_reclusters(method):
    """Without any reset between them, a second loop (the timestep moves back up) starts with the seeded generator
    and no clusters again, so it repeats the first exactly."""
    model = tiny_flux_transformer(num_layers=2, num_single_layers=1)
    hicache.apply_cache(model, clusca(method), "flux")
    first, second = sample(model, inputs()), sample(model, inputs())
    hicache.remove_cache(model)
    assert torch.equal(first, second)


def test_select_and_fresh_run_modules_run_whichever_skip_pattern_matched_them():
    """A recipe may skip the select LayerNorms with a pattern that also covers other modules (as qwen_image's
    ``(img|txt)_norm[12]`` does): token-wise methods run just the select and ``fresh_run`` modules, and the result
    is the flux recipe's."""
    flux = hicache.get_recipe("flux")
    combined = hicache.Recipe(
        forecast=flux.forecast, skip=flux.skip, name="combined", skip_empty=flux.skip_empty,
        skip_broadcast=(r"transformer_blocks\.\d+\.norm(1\.norm|1_context\.norm|2|2_context)",
                        r"single_transformer_blocks\.\d+\.norm\.norm"),
        live_chunks={p: (n, c) for p, n, c in flux.live_chunks},
        fresh_tokens=flux.fresh_tokens, cluster_sources=flux.cluster_sources, fresh_run=[r"pos_embed"],
        fresh_live_chunks={p: (n, c) for p, n, c in flux.fresh_live_chunks})
    model = tiny_flux_transformer(num_layers=2, num_single_layers=1)
    out = {}
    for recipe in (flux, combined):
        hicache.apply_cache(model, clusca("clusca"), recipe)
        skipped = hicache.cache_summary(model).skip_modules
        out[recipe.name] = sample(model, inputs())
        hicache.remove_cache(model)
    assert "transformer_blocks.0.norm1.norm" in skipped and "transformer_blocks.0.norm2" not in skipped
    assert "pos_embed" not in skipped
    assert combined.role("transformer_blocks.0.norm2") == "skip_broadcast"  # the recipe itself still skips it
    assert torch.equal(out["combined"], out["flux"])

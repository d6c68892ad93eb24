"""The `qwen_image` recipe on an unmodified tiny `QwenImageTransformer2DModel`, against the official semantics.

The official HiCache Qwen-Image backend (``models/qwen_image/transformer_qwenimage.py`` in
yiming-l21/CFGCache@96eec87, see ``shared/research/qwen_image.md``) patches the block forward: at a full
step it stores the pre-gate ``img_attn``/``txt_attn``/``img_mlp``/``txt_mlp`` of every block per CFG
branch, at a forecast step it adds ``gate * forecast`` instead, and ``cal_type`` decides once per step
for both branches. `_official_loop` re-writes that forward and sampler (true CFG with the per-token norm
rescale) from the spec, with its own forecast formulas for TaylorSeer, HiCache and FORA (order 0);
the hooks on the unmodified model must give the same samples, for every method, with and without CFG.
"""

import math

import pytest
import torch

import hicache
from hicache.forecast import DifferenceHistory
from hicache.testbeds.tiny.qwen_image import tiny_qwen_image_transformer

STEPS = 8
INTERVAL, WARMUP, ORDER, SIGMA = 3, 2, 2, 0.5
CFG_SCALE = 4.0
METHODS = ("fora", "taylorseer", "hicache", "hi_taylor", "hicache_analytic")
MODULES = ("img_attn", "txt_attn", "img_mlp", "txt_mlp")


@pytest.fixture(scope="module")
def model():
    return tiny_qwen_image_transformer(num_layers=2)


def _inputs(seed=0, text=(5, 3), size=4, ref_size=None):
    """Packed latents of a ``size`` x ``size`` token image (plus a reference image's, as the edit pipeline
    concatenates them), and cond / uncond text of different lengths, the uncond one padded."""
    g = torch.Generator().manual_seed(seed)
    n = size * size + (ref_size * ref_size if ref_size else 0)
    shapes = [(1, size, size)] + ([(1, ref_size, ref_size)] if ref_size else [])
    cond, uncond = (torch.randn(1, t, 32, generator=g) for t in text)
    uncond_mask = torch.ones(1, text[1], dtype=torch.long)
    uncond_mask[:, -1] = 0
    return dict(latents=torch.randn(1, size * size, 16, generator=g), reference=torch.randn(1, n - size * size, 16, generator=g),
                img_shapes=[shapes], cond=(cond, None), uncond=(uncond, uncond_mask))


def _call(model, x, inputs, branch, t):
    text, mask = inputs[branch]
    hidden = torch.cat([x, inputs["reference"]], dim=1)
    out = model(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                timestep=t, img_shapes=inputs["img_shapes"], return_dict=False)[0]
    return out[:, : x.shape[1]]  # the edit pipeline's slice: the reference tokens' prediction is dropped


def _combine(cond, uncond):
    """QwenImagePipeline's true CFG: scale, then renormalise each token to the conditional prediction's norm."""
    comb = uncond + CFG_SCALE * (cond - uncond)
    return comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


@torch.no_grad()
def _hooked_loop(model, inputs, config, cfg: bool):
    """The pipeline's loop on the unmodified model: cond and uncond in their own cache contexts."""
    if config is not None:
        hicache.apply_cache(model, config, "qwen_image")
    try:
        x = inputs["latents"].clone()
        for i in range(STEPS):
            t = torch.tensor([1.0 - i / STEPS])
            with model.cache_context("cond"):
                v = _call(model, x, inputs, "cond", t)
            if cfg:
                with model.cache_context("uncond"):
                    v = _combine(v, _call(model, x, inputs, "uncond", t))
            x = x - v / STEPS
        if config is not None:
            model._reset_stateful_cache()  # what the pipeline's maybe_free_model_hooks does
        return x
    finally:
        if config is not None:
            hicache.remove_cache(model)


# ----------------------------------------------------------------------------- the official code, from the spec

def _hermite(n, x):
    h0, h1 = 1.0, 2.0 * x
    if n == 0:
        return h0
    for _ in range(n - 1):
        h0, h1 = h1, 2.0 * x * h1 - 2.0 * (_ + 1) * h0
    return h1


class _OfficialFeature:
    """``derivative_approximation`` / ``taylor_formula`` (TaylorSeer) and the Hermite formula (HiCache)."""

    def __init__(self, method):
        self.method, self.factors, self.max_order = method, None, 0 if method == "fora" else ORDER

    def update(self, feature, step, activated):
        new = {0: feature}
        if self.factors is not None and step > WARMUP - 2:
            distance = activated[-1] - activated[-2]
            for i in range(self.max_order):
                if i not in self.factors:
                    break
                new[i + 1] = (new[i] - self.factors[i]) / distance
        self.factors = new

    def predict(self, step, activated):
        x = step - activated[-1]
        if self.method == "hicache":
            return self.factors[0] + sum(self.factors[k] * SIGMA ** k * _hermite(k, SIGMA * x) / math.factorial(k)
                                         for k in range(1, len(self.factors)))
        return sum(f * x ** i / math.factorial(i) for i, f in self.factors.items())


class _CoreFeature:
    """hi_taylor and hicache_analytic have no official Qwen mode: the core's history stands in."""

    def __init__(self, method):
        self.history = DifferenceHistory(method, ORDER, SIGMA, WARMUP)

    def update(self, feature, step, activated):
        self.history.update(feature, step)

    def predict(self, step, activated):
        return self.history.forecast(step)


def _official_block(block, cache, full, step, activated, h, e, mask, temb, rope):
    """``QwenImageTransformerBlock.forward`` as the official tree patches it (every module always computed
    that the official forecast step computes: both streams' modulation and residuals)."""
    img_mod1, img_mod2 = block.img_mod(temb).chunk(2, dim=-1)
    txt_mod1, txt_mod2 = block.txt_mod(temb).chunk(2, dim=-1)
    img_modulated, img_gate1 = block._modulate(block.img_norm1(h), img_mod1)
    txt_modulated, txt_gate1 = block._modulate(block.txt_norm1(e), txt_mod1)
    if full:
        img_attn, txt_attn = block.attn(hidden_states=img_modulated, encoder_hidden_states=txt_modulated,
                                        encoder_hidden_states_mask=mask, image_rotary_emb=rope)
        cache["img_attn"].update(img_attn, step, activated)
        cache["txt_attn"].update(txt_attn, step, activated)
    else:
        img_attn, txt_attn = (cache[k].predict(step, activated) for k in ("img_attn", "txt_attn"))
    h = h + img_gate1 * img_attn
    e = e + txt_gate1 * txt_attn
    img_modulated2, img_gate2 = block._modulate(block.img_norm2(h), img_mod2)
    txt_modulated2, txt_gate2 = block._modulate(block.txt_norm2(e), txt_mod2)
    if full:
        img_mlp, txt_mlp = block.img_mlp(img_modulated2), block.txt_mlp(txt_modulated2)
        cache["img_mlp"].update(img_mlp, step, activated)
        cache["txt_mlp"].update(txt_mlp, step, activated)
    else:
        img_mlp, txt_mlp = (cache[k].predict(step, activated) for k in ("img_mlp", "txt_mlp"))
    return e + txt_gate2 * txt_mlp, h + img_gate2 * img_mlp


def _official_forward(model, cache, full, step, activated, hidden, text, mask, t, img_shapes):
    h = model.img_in(hidden)
    e = model.txt_in(model.txt_norm(text))
    temb = model.time_text_embed(t, h)
    rope = model.pos_embed(img_shapes, max_txt_seq_len=e.shape[1], device=h.device)
    mask = None if mask is None else mask.bool()
    for layer, block in enumerate(model.transformer_blocks):
        e, h = _official_block(block, cache[layer], full, step, activated, h, e, mask, temb, rope)
    return model.proj_out(model.norm_out(h, temb))


@torch.no_grad()
def _official_loop(model, inputs, method, cfg: bool):
    feature = _CoreFeature if method in ("hi_taylor", "hicache_analytic") else _OfficialFeature
    caches = {branch: [{m: feature(method) for m in MODULES} for _ in model.transformer_blocks]
              for branch in ("cond", "uncond")}
    activated, counter = [], 0
    x = inputs["latents"].clone()
    for step in range(STEPS):
        # cal_type: once per step, for both branches
        full = step < WARMUP or counter == INTERVAL - 1
        if full:
            counter = 0
            activated.append(step)
        else:
            counter += 1
        t = torch.tensor([1.0 - step / STEPS])

        def branch(name):
            text, mask = inputs[name]
            hidden = torch.cat([x, inputs["reference"]], dim=1)
            out = _official_forward(model, caches[name], full, step, activated, hidden, text, mask, t,
                                    inputs["img_shapes"])
            return out[:, : x.shape[1]]

        v = branch("cond")
        if cfg:
            v = _combine(v, branch("uncond"))
        x = x - v / STEPS
    return x


# ----------------------------------------------------------------------------- tests

def _config(method):
    return hicache.CacheConfig(method, interval=INTERVAL, warmup=WARMUP, order=ORDER, sigma=SIGMA)


@pytest.mark.parametrize("cfg", [False, True], ids=["no_cfg", "true_cfg"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_matches_the_official_forward(model, method, cfg):
    inputs = _inputs()
    uncached = _hooked_loop(model, inputs, None, cfg)
    ours = _hooked_loop(model, inputs, _config(method), cfg)
    official = _official_loop(model, inputs, method, cfg)
    assert not torch.allclose(ours, uncached, rtol=0, atol=1e-6)  # caching really happened
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["taylorseer", "hicache"])
def test_edit_reference_tokens_are_forecast_with_the_noisy_ones(model, method):
    """Qwen-Image-Edit: the reference image's latents ride in the image stream, so they are forecast too."""
    inputs = _inputs(seed=1, ref_size=2)
    ours = _hooked_loop(model, inputs, _config(method), cfg=True)
    torch.testing.assert_close(ours, _official_loop(model, inputs, method, cfg=True), rtol=1e-5, atol=1e-6)
    hicache.apply_cache(model, _config(method), "qwen_image")
    try:
        with torch.no_grad(), model.cache_context("cond"):
            for i in range(WARMUP):
                _call(model, inputs["latents"], inputs, "cond", torch.tensor([1.0 - i / STEPS]))
        hook = hicache.api._handle(model).forecast_hooks["transformer_blocks.0.img_mlp"]
        with model.cache_context("cond"):
            history = hook.state_manager.get_state().histories[0]
        assert history.factors[0].shape[1] == 16 + 4 and len(history.factors) == 2  # D0 and D1 over 20 tokens
    finally:
        hicache.remove_cache(model)


def test_interval_one_is_bit_identical(model):
    inputs = _inputs(seed=2)
    for method in METHODS:
        config = hicache.CacheConfig(method, interval=1, warmup=1, order=ORDER)
        assert torch.equal(_hooked_loop(model, inputs, config, cfg=True), _hooked_loop(model, inputs, None, cfg=True))


def test_cond_and_uncond_keep_separate_caches_and_share_the_decision(model):
    """The cond branch's samples do not depend on whether an uncond branch runs between its calls, and
    both branches are full at the same steps."""
    inputs = _inputs(seed=3)
    config = _config("hicache")
    handle = hicache.apply_cache(model, config, "qwen_image")
    seen = {"cond": [], "uncond": []}
    step_manager = handle.step_hook.state_manager
    try:
        with torch.no_grad():
            outs = {}
            for interleave in (False, True):
                x, cond_outs = inputs["latents"].clone(), []
                for i in range(STEPS):
                    t = torch.tensor([1.0 - i / STEPS])
                    with model.cache_context("cond"):
                        v = _call(model, x, inputs, "cond", t)
                        if interleave:
                            seen["cond"].append(step_manager.get_state().is_full)
                    if interleave:
                        with model.cache_context("uncond"):
                            _call(model, x * 0.5, inputs, "uncond", t)
                            seen["uncond"].append(step_manager.get_state().is_full)
                    cond_outs.append(v)
                    x = x - v / STEPS
                outs[interleave] = torch.stack(cond_outs)
                model._reset_stateful_cache()
    finally:
        hicache.remove_cache(model)
    assert torch.equal(outs[True], outs[False])
    full = [s in config.schedule.full_steps_for(STEPS) for s in range(STEPS)]
    assert seen["cond"] == seen["uncond"] == full


def test_recipe_hooks(model):
    handle = hicache.apply_cache(model, _config("hicache"), "qwen_image")
    try:
        blocks = [f"transformer_blocks.{i}." for i in range(2)]
        assert sorted(handle.forecast_hooks) == sorted(b + m for b in blocks for m in ("attn", "img_mlp", "txt_mlp"))
        assert sorted(handle.skip_hooks) == sorted(
            ["pos_embed", "txt_in", "txt_norm"]
            + [b + m for b in blocks for m in ("txt_mod", "img_norm1", "txt_norm1", "img_norm2", "txt_norm2")])
        assert sorted(handle.live_chunks_hooks) == sorted(b + "img_mod.1" for b in blocks)
    finally:
        hicache.remove_cache(model)


def _captured_block_args(model, inputs):
    captured = {}
    h = model.transformer_blocks[0].register_forward_pre_hook(
        lambda _m, args, kwargs: captured.setdefault("kwargs", dict(kwargs)) and None, with_kwargs=True)
    with torch.no_grad():
        _call(model, inputs["latents"], inputs, "cond", torch.tensor([0.7]))
    h.remove()
    return captured["kwargs"]


def test_forecast_outputs_are_pre_gate_and_pre_residual(model):
    """Zero attention and MLP outputs leave a block's streams unchanged; a perturbation moves them by gate * delta."""
    block = model.transformer_blocks[0]
    kwargs = _captured_block_args(model, _inputs(seed=4))

    def run(transforms):
        handles = [m.register_forward_hook(lambda _m, _i, o, f=f: f(o)) for m, f in transforms.items()]
        try:
            with torch.no_grad():
                return block(**kwargs)
        finally:
            for h in handles:
                h.remove()

    zeros = {m: (lambda o: tuple(torch.zeros_like(x) for x in o) if isinstance(o, tuple) else torch.zeros_like(o))
             for m in (block.attn, block.img_mlp, block.txt_mlp)}
    e, h = run(zeros)
    torch.testing.assert_close(h, kwargs["hidden_states"], rtol=0, atol=0)
    torch.testing.assert_close(e, kwargs["encoder_hidden_states"], rtol=0, atol=0)

    img_gate2 = block.img_mod(kwargs["temb"]).chunk(6, dim=-1)[5].unsqueeze(1)
    txt_gate2 = block.txt_mod(kwargs["temb"]).chunk(6, dim=-1)[5].unsqueeze(1)
    base_e, base_h = run({})
    d_img, d_txt = torch.randn_like(base_h), torch.randn_like(base_e)
    _, moved_h = run({block.img_mlp: lambda o: o + d_img})
    moved_e, _ = run({block.txt_mlp: lambda o: o + d_txt})
    torch.testing.assert_close(moved_h - base_h, img_gate2 * d_img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(moved_e - base_e, txt_gate2 * d_txt, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- ClusCa / Hi-ClusCa (issue 18)

TOKEN_METHODS = ("clusca", "hi_clusca")


def _token_config(method, **kwargs):
    return hicache.CacheConfig(method, **{**dict(interval=INTERVAL, warmup=WARMUP, order=1, sigma=SIGMA, clusters=3), **kwargs})


@pytest.mark.parametrize("method", TOKEN_METHODS)
def test_token_wise_interval_one_is_bit_identical_and_caching_happens(model, method):
    inputs = _inputs(seed=5)
    uncached = _hooked_loop(model, inputs, None, cfg=True)
    assert torch.equal(_hooked_loop(model, inputs, _token_config(method, interval=1, warmup=1), cfg=True), uncached)
    cached = _hooked_loop(model, inputs, _token_config(method), cfg=True)
    taylor = _hooked_loop(model, inputs, hicache.CacheConfig("taylorseer", interval=INTERVAL, warmup=WARMUP, order=1), cfg=True)
    assert not torch.allclose(cached, uncached, rtol=0, atol=1e-6) and not torch.equal(cached, taylor)


def test_token_wise_recipe_runs_the_text_stream_and_the_mlp_modulation(model):
    handle = hicache.apply_cache(model, _token_config("clusca"), "qwen_image")
    try:
        blocks = [f"transformer_blocks.{i}." for i in range(2)]
        assert sorted(handle.skip_hooks) == sorted(["pos_embed"] + [b + m for b in blocks for m in ("img_norm1", "txt_norm1")])
        assert sorted(handle.live_chunks_hooks) == sorted(b + m for b in blocks for m in ("img_mod.1", "txt_mod.1"))
        assert all(handle.recipe.chunks(b + m) == (6, (2, 3, 4, 5)) for b in blocks for m in ("img_mod.1", "txt_mod.1"))
    finally:
        hicache.remove_cache(model)


@pytest.mark.parametrize("method", TOKEN_METHODS)
def test_token_wise_skipped_outputs_stay_dead(model, method, random_stand_ins):
    """Random stand-ins for every skipped output and left-out modulation chunk change nothing, with true CFG and
    edit reference tokens."""
    inputs = _inputs(seed=6, ref_size=2)
    with_zeros = _hooked_loop(model, inputs, _token_config(method), cfg=True)
    random_stand_ins()
    assert torch.equal(_hooked_loop(model, inputs, _token_config(method), cfg=True), with_zeros)


def test_fresh_text_tokens_see_the_true_text_stream(model, monkeypatch):
    """At a cached step the text stream enters the blocks as txt_in(txt_norm(text)), and a block's txt_mlp receives
    the modulated LayerNorm (MLP shift and scale of txt_mod) of the K drawn rows of its text residual stream."""
    from hicache import clusters as C

    block = model.transformer_blocks[1]
    seen = {}
    handles = [model.transformer_blocks[0].register_forward_pre_hook(
                   lambda m, a, kw: seen.update(text_in=kw["encoder_hidden_states"]), with_kwargs=True),
               block.register_forward_pre_hook(lambda m, a, kw: seen.update(temb=kw["temb"]), with_kwargs=True),
               block.txt_norm2.register_forward_pre_hook(lambda m, a: seen.update(x=a[0])),
               block.txt_mlp.register_forward_pre_hook(lambda m, a: seen.update(mlp_in=a[0]))]
    draws, draw = [], C.draw_fresh
    monkeypatch.setattr(C, "draw_fresh", lambda *a: draws.append(draw(*a)) or draws[-1])
    inputs = _inputs(seed=7)
    hicache.apply_cache(model, _token_config("clusca"), "qwen_image")
    try:
        with torch.no_grad():
            x = inputs["latents"].clone()
            for i in range(WARMUP + 1):  # full, full, cached
                with model.cache_context("cond"):
                    v = _call(model, x, inputs, "cond", torch.tensor([1.0 - i / STEPS]))
                x = x - v / STEPS
    finally:
        for h in handles:
            h.remove()
        hicache.remove_cache(model)
    assert len(draws) == 4  # the cached step: block 0 image, text, block 1 image, text
    with torch.no_grad():
        torch.testing.assert_close(seen["text_in"], model.txt_in(model.txt_norm(inputs["cond"][0])))
        emb = block.txt_mod(seen["temb"]).chunk(6, dim=-1)
    rows = C.gather_tokens(seen["x"], draws[3])
    want = torch.nn.functional.layer_norm(rows, rows.shape[-1:], eps=1e-6) * (1 + emb[4][:, None]) + emb[3][:, None]
    torch.testing.assert_close(seen["mlp_in"], want)
    assert seen["mlp_in"].shape[1] == 3  # one token per cluster


def test_token_wise_methods_refuse_zero_cond_t_in_one_line():
    model = tiny_qwen_image_transformer(num_layers=1, zero_cond_t=True)
    with pytest.raises(ValueError, match=r"^recipe 'qwen_image': clusca/hi_clusca cannot run on a model with zero_cond_t=True") as err:
        hicache.apply_cache(model, _token_config("clusca"), "qwen_image")
    assert "\n" not in str(err.value) and not hasattr(model, "_hicache_handle")

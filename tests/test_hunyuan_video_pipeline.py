"""HiCache/TaylorSeer/FORA on a tiny `HunyuanVideoPipeline` loaded with `from_pretrained`, end to end."""

import pytest
import torch
from diffusers import HunyuanVideoPipeline

import hicache
from hicache.testbeds.tiny.hunyuan_video import save_tiny_hunyuan_video_pipeline, tiny_call_kwargs, tiny_prompt_template




STEPS = 12
PROMPT = "a red cat on a green background"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = save_tiny_hunyuan_video_pipeline(tmp_path_factory.mktemp("tiny_hunyuan_video"))
    pipe = HunyuanVideoPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _video(pipe, seed=42, **kwargs):
    out = pipe(
        PROMPT, height=32, width=48, num_frames=9, num_inference_steps=STEPS, guidance_scale=6.0,
        generator=torch.Generator().manual_seed(seed), output_type="np", **tiny_call_kwargs(pipe), **kwargs,
    )
    return torch.from_numpy(out.frames[0])


@pytest.fixture(scope="module")
def reference(pipe):
    return _video(pipe)


@pytest.fixture(scope="module")
def seed_distance(pipe, reference):
    """How far another seed's video is: the scale a forecast error must stay well below."""
    return (_video(pipe, seed=43) - reference).abs().mean().item()


def _cached_video(pipe, config, **kwargs):
    hicache.apply_cache(pipe.transformer, config, "hunyuan_video")
    try:
        video = _video(pipe, **kwargs)
        summary = hicache.cache_summary(pipe.transformer, STEPS)
    finally:
        hicache.remove_cache(pipe.transformer)
    return video, summary


def test_tiny_prompt_template_keeps_the_prompt_words(pipe):
    template = tiny_prompt_template(pipe.tokenizer)
    ids = pipe.tokenizer(template["template"].format(PROMPT))["input_ids"]
    kept = pipe.tokenizer.convert_ids_to_tokens(ids[template["crop_start"]:])
    assert kept == PROMPT.split() + ["<|eot_id|>"]


def test_video_shape_and_determinism(pipe, reference):
    assert reference.shape == (9, 32, 48, 3)
    assert torch.equal(_video(pipe), reference)


def test_interval_one_is_bit_identical(pipe, reference):
    video, summary = _cached_video(pipe, hicache.CacheConfig("hicache", interval=1, warmup=1, order=2))
    assert summary.cached_forwards == 0 and summary.full_forwards == STEPS
    assert torch.equal(video, reference)


@pytest.mark.parametrize(
    "config",
    [
        hicache.CacheConfig("hicache", interval=3, warmup=2, order=2, sigma=0.5),
        hicache.CacheConfig("taylorseer", interval=3, warmup=2, order=1),
        hicache.CacheConfig("fora", interval=3, warmup=2),
    ],
    ids=lambda c: c.method,
)
def test_cached_video_differs_only_by_forecast_error(pipe, reference, seed_distance, config):
    video, summary = _cached_video(pipe, config)
    assert summary.cached_forwards > 0
    error = (video - reference).abs().mean().item()
    assert error > 0  # cached steps really were forecast
    assert error < 0.25 * seed_distance, (error, seed_distance)


def test_remove_cache_restores_the_exact_model(pipe, reference):
    _cached_video(pipe, hicache.CacheConfig("hicache", interval=3, warmup=2))
    assert torch.equal(_video(pipe), reference)


def test_true_cfg_branches_are_cached_separately(pipe):
    kwargs = dict(negative_prompt="blue square", true_cfg_scale=3.0)
    plain = _video(pipe, **kwargs)
    same, summary = _cached_video(pipe, hicache.CacheConfig("hicache", interval=1, warmup=1), **kwargs)
    assert torch.equal(same, plain)
    assert summary.full_forwards == 2 * STEPS  # "cond" and "uncond" each step
    cached, _ = _cached_video(pipe, hicache.CacheConfig("hicache", interval=3, warmup=2), **kwargs)
    assert 0 < (cached - plain).abs().mean() < 0.25 * (_video(pipe, seed=43, **kwargs) - plain).abs().mean()


def _heavy_linears(transformer):
    """Attention and MLP leaf Linear layers of the double- and single-stream blocks."""
    heavy = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        parts = name.split(".")
        if parts[0] == "transformer_blocks" and parts[2] in ("attn", "ff", "ff_context"):
            heavy[name] = module
        if parts[0] == "single_transformer_blocks" and parts[2] in ("attn", "proj_mlp", "proj_out"):
            heavy[name] = module
    return heavy


def test_cached_steps_skip_the_heavy_modules(pipe, monkeypatch):
    """Count the matmuls that really run: hooked Linears still get called, but must not compute."""
    transformer = pipe.transformer
    heavy = {id(m.weight) for m in _heavy_linears(transformer).values()}
    refiner = {id(m.weight) for n, m in transformer.named_modules()
               if n.startswith("context_embedder.token_refiner") and isinstance(m, torch.nn.Linear)}
    assert len(heavy) == 2 * (8 + 4) + 2 * (3 + 2)  # double: q,k,v,out x2 streams + 2 Linears per FF x2; single: q,k,v, mlp, out
    counts = {"heavy": 0, "refiner": 0}
    per_step: list[dict[str, int]] = []
    linear = torch.nn.functional.linear

    def counting_linear(input, weight, bias=None):
        if id(weight) in heavy:
            counts["heavy"] += 1
        elif id(weight) in refiner:
            counts["refiner"] += 1
        return linear(input, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    config = hicache.CacheConfig("hicache", interval=4, warmup=2, order=2)
    hicache.apply_cache(transformer, config, "hunyuan_video")
    step_hook = transformer.register_forward_pre_hook(lambda *_: per_step.append(dict(counts)))
    try:
        _video(pipe)
    finally:
        step_hook.remove()
        hicache.remove_cache(transformer)
    per_step.append(dict(counts))
    heavy_calls = [b["heavy"] - a["heavy"] for a, b in zip(per_step, per_step[1:])]
    refiner_calls = [b["refiner"] - a["refiner"] for a, b in zip(per_step, per_step[1:])]
    full = set(config.schedule.full_steps_for(STEPS))
    assert heavy_calls == [len(heavy) if s in full else 0 for s in range(STEPS)]
    assert refiner_calls == [len(refiner)] * STEPS  # the token refiner always runs

"""The tiny Qwen-Image pipelines: built locally, run diffusers' own pipeline code, and carry the cache like the real ones."""

import numpy as np
import pytest
import torch
from PIL import Image

import hicache
from hicache.testbeds.tiny import qwen_image as tiny

STEPS = 6


@pytest.fixture(scope="module")
def pipe():
    return tiny.tiny_qwen_image_pipeline(seed=0)


def _generate(pipe, **kwargs):
    return pipe("a small red circle at the top left", negative_prompt=" ", true_cfg_scale=4.0, height=64, width=64,
                num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="pt",
                **kwargs).images


def test_the_tokenizer_splits_the_templates_like_qwens():
    """The pipelines drop 34 (text-to-image) and 64 (edit) template tokens, counted on Qwen's tokenizer: the same
    counts on the tiny one, so exactly the system prompt is dropped and the prompt's words reach the transformer."""
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    tokenizer = tiny.tiny_qwen_tokenizer()
    for template, cls in zip(tiny._templates(), (QwenImagePipeline, QwenImageEditPipeline)):
        prefix = template[: template.index("<|im_start|>user\n") + len("<|im_start|>user\n")]
        dropped = {QwenImagePipeline: 34, QwenImageEditPipeline: 64}[cls]
        assert len(tokenizer(prefix)["input_ids"]) == dropped
    ids = tokenizer("a small red circle")["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(ids) == 4


def test_cache_on_the_pipeline(pipe):
    reference = _generate(pipe)
    assert torch.equal(_generate(pipe), reference)  # the tiny pipeline itself is deterministic
    handle = hicache.apply_cache(pipe.transformer, hicache.CacheConfig("hicache", interval=1, warmup=1), "qwen_image")
    try:
        assert torch.equal(_generate(pipe), reference)  # interval 1: every step full, bit-identical
    finally:
        hicache.remove_cache(pipe.transformer)
    config = hicache.CacheConfig("hicache", interval=3, warmup=2, order=2)
    handle = hicache.apply_cache(pipe.transformer, config, "qwen_image")
    try:
        first, second = _generate(pipe), _generate(pipe)
    finally:
        hicache.remove_cache(pipe.transformer)
    assert torch.equal(first, second)  # the pipeline resets every context at the end of a call
    assert 0 < (first - reference).abs().max() < 0.5
    # true CFG: a cond and an uncond forward per step, both full at the schedule's full steps
    full = len(config.schedule.full_steps_for(STEPS))
    assert handle.step_hook.full_forwards == 2 * 2 * full
    assert handle.step_hook.cached_forwards == 2 * 2 * (STEPS - full)


def test_edit_pipeline_forecasts_the_reference_tokens():
    edit = tiny.tiny_qwen_image_edit_pipeline(seed=0)
    image = Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8))
    handle = hicache.apply_cache(edit.transformer, hicache.CacheConfig("taylorseer", interval=3, warmup=2), "qwen_image")
    shapes = []
    hook = handle.forecast_hooks["transformer_blocks.1.img_mlp"]
    original_record = hook.record

    def record(state, output, step):
        shapes.append(tuple(output.shape))
        original_record(state, output, step)

    hook.record = record
    try:
        out = edit(image=image, prompt="make the circle blue", negative_prompt=" ", true_cfg_scale=4.0, height=128,
                   width=128, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    finally:
        hicache.remove_cache(edit.transformer)
    # 128 px out: 2x2 noisy tokens; the input, resized to 1024x1024 and encoded 32x: 16x16 reference tokens
    assert out.shape == (1, 3, 128, 128)
    assert set(shapes) == {(1, 4 + 256, 32)} and len(shapes) == 2 * 2  # full at steps 0 and 1, cond and uncond

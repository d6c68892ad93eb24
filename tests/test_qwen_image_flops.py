"""experiments/qwen_image_flops.py: FLOPs counted on the meta device equal a real CPU run's, and the cache's peak
memory is the official layout's: image and text tensors of 4 outputs (attn's two, img_mlp, txt_mlp) x blocks x
CFG branches x (O + 1) orders."""

import importlib.util
from pathlib import Path

import torch

import hicache
import hicache.app.speed  # noqa: F401  (counts the fused CPU attention kernel, as the app does)
from hicache.testbeds.tiny.qwen_image import tiny_qwen_image_transformer

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "qwen_image_flops.py"
spec = importlib.util.spec_from_file_location("qwen_image_flops", SCRIPT)
flops_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(flops_script)

TINY = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, axes_dims_rope=(4, 6, 6))


def _real(inputs):
    g = torch.Generator().manual_seed(0)
    return {branch: {k: torch.randn(v.shape, generator=g) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            for branch, kw in inputs.items()}


def _meta_inputs(model, edit=False):
    inputs = flops_script.meta_inputs(model, height=64, width=48, text_tokens=7, negative_tokens=3, edit=edit,
                                      reference_size=32)
    return {b: {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kw.items()} for b, kw in inputs.items()}


def test_meta_device_count_matches_a_real_run_and_caching_saves_flops():
    meta = flops_script.meta_transformer(**TINY).float()
    real = tiny_qwen_image_transformer(num_layers=2)
    steps, config = 5, hicache.CacheConfig("hicache", interval=3, warmup=1, order=2, factor_dtype="float32")
    flops = {}
    for edit, cache in ((False, None), (False, config), (True, config)):
        meta_inputs = _meta_inputs(meta, edit)
        flops[edit, cache is not None] = flops_script.loop(meta, meta_inputs, steps, cache)[0]
        assert flops[edit, cache is not None] == flops_script.loop(real, _real(meta_inputs), steps, cache)[0]
    ideal = steps / len(config.schedule.full_steps_for(steps))  # full at 0 and 3
    assert 1.5 < flops[False, False] / flops[False, True] < ideal  # embeddings, gates and output layers still run
    assert flops[True, True] > flops[False, True]  # the reference tokens cost compute too


def test_counts_extrapolated_from_one_and_two_blocks_equal_a_direct_count():
    tiny = {k: v for k, v in TINY.items() if k != "num_layers"}
    config = hicache.CacheConfig("taylorseer", interval=2, warmup=1, order=2, factor_dtype="bfloat16")

    def make_inputs(model):
        return flops_script.meta_inputs(model, height=64, width=48, text_tokens=7, negative_tokens=3)

    for cache in (None, config):
        direct = flops_script.counts(make_inputs, 3, cache, True, None, **tiny, num_layers=3)
        assert flops_script.counts(make_inputs, 3, cache, True, 3, **tiny) == direct
        assert direct[0] > 0 and (cache is None or direct[1] > 0)


def test_cache_memory_is_the_official_layout():
    """Peak factor bytes = 2 tensors per stream (attention's output and the MLP's) x blocks x 2 branches x (O + 1),
    over image and text tokens; the cache summary adds the skipped modules' shared zeros, a little."""
    meta = flops_script.meta_transformer(**TINY)
    inputs = flops_script.meta_inputs(meta, height=64, width=48, text_tokens=7, negative_tokens=3)
    image_tokens, width = (64 // 16) * (48 // 16), 32
    for order, dtype, size in ((3, "bfloat16", 2), (2, "float32", 4)):
        # full at 0, 2, 4, 6: D0 .. D3 by step 6
        config = hicache.CacheConfig("hicache", interval=2, warmup=1, order=order, factor_dtype=dtype)
        _, cache_bytes, factor_bytes = flops_script.loop(meta, inputs, 7, config)
        per_branch_tokens = {"cond": image_tokens * 2 + 7 * 2, "uncond": image_tokens * 2 + 3 * 2}
        expected = sum(per_branch_tokens.values()) * 2 * (order + 1) * width * size  # x 2 blocks
        assert factor_bytes == expected and expected < cache_bytes < 1.2 * expected


def test_flops_table_prints_the_readme_rows():
    from hicache.app.speed import flops_table

    row = dict(method="HiCache N=7 O=3 σ=0.5", steps=50, full_steps=9, tflops=2324.1, flops_speedup=5.551,
               ideal_speedup=50 / 9, cache_gib=38.04)
    lines = flops_table([row], ["method", "steps", "full_steps", "tflops", "flops_speedup", "ideal_speedup",
                                "cache_gib"]).splitlines()
    assert lines[0] == "| Method | Steps | Full steps | Transformer PFLOPs | FLOPs speedup | Ideal (steps / full) | Cache (GiB) |"
    assert lines[2] == "| HiCache N=7 O=3 σ=0.5 | 50 | 9 | 2.3 | 5.55x | 5.56x | 38.0 |"

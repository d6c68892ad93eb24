"""experiments/hunyuan_video_flops.py: FLOPs counted on the meta device equal those of a real CPU run.

On the meta device attention decomposes into counted matmuls; on the CPU it runs PyTorch's fused CPU
kernel, which the app's speed module teaches FlopCounterMode to count: the two must agree.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

import hicache
import hicache.app.speed  # noqa: F401  (counts the fused CPU attention kernel, as the app does)
from hicache.testbeds.tiny.hunyuan_video import tiny_hunyuan_video_transformer




SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "hunyuan_video_flops.py"
spec = importlib.util.spec_from_file_location("hunyuan_video_flops", SCRIPT)
flops_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(flops_script)

TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
            pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))


def _real_inputs(meta_inputs):
    """The same shapes on the CPU, with values."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for key, value in meta_inputs.items():
        if isinstance(value, torch.Tensor):
            out[key] = torch.ones(value.shape) if key == "encoder_attention_mask" else torch.randn(value.shape, generator=g)
            if key == "guidance":
                out[key] = torch.full(value.shape, 6000.0)
        else:
            out[key] = value
    return out


def test_meta_device_count_matches_a_real_run_and_caching_saves_flops():
    meta = flops_script.meta_transformer(**TINY).float()
    meta_inputs = {k: v.float() if isinstance(v, torch.Tensor) else v
                   for k, v in flops_script.meta_inputs(meta, height=32, width=48, frames=9, text_tokens=6).items()}
    real = tiny_hunyuan_video_transformer(**{k: v for k, v in TINY.items() if k not in ("num_layers", "num_single_layers")},
                                          num_layers=2, num_single_layers=2)
    real_inputs = _real_inputs(meta_inputs)
    steps = 8
    config = hicache.CacheConfig("hicache", interval=3, warmup=2, order=2)
    for cache in (None, config):
        assert flops_script.loop_flops(meta, meta_inputs, steps, cache) == flops_script.loop_flops(
            real, real_inputs, steps, cache)
    uncached = flops_script.loop_flops(meta, meta_inputs, steps, None)
    cached = flops_script.loop_flops(meta, meta_inputs, steps, config)
    ideal = steps / len(config.schedule.full_steps_for(steps))
    assert 1.5 < uncached / cached < ideal  # the refiner, embeddings and modulations still run every step

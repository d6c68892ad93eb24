"""The memory estimate (a meta twin's forward, nothing allocated) predicts what a real cached run stores."""

import pytest
import torch

import hicache
from hicache.testbeds.tiny.flux import tiny_flux_pipeline

GEN = dict(num_inference_steps=6, output_type="pt", max_sequence_length=16)


def _measured(pipe, config, recipe, **call):
    hicache.apply_cache(pipe.transformer, config, recipe)
    try:
        pipe(**call)
        handle = pipe.transformer._hicache_handle
        forecast = sum(hook.peak_bytes for hook in handle.forecast_hooks.values())
        return forecast, handle.zero_pool.nbytes
    finally:
        hicache.remove_cache(pipe.transformer)


@pytest.mark.parametrize("dtype,config", [
    (torch.float32, hicache.CacheConfig("hicache", interval=2, warmup=1, order=2)),
    (torch.bfloat16, hicache.CacheConfig("taylorseer", interval=2, warmup=1, order=1)),
    (torch.bfloat16, hicache.CacheConfig("hicache", interval=2, warmup=1, order=2, factor_dtype="float32")),
    (torch.bfloat16, hicache.CacheConfig("fora", interval=2, warmup=1, factor_dtype="float32")),
])
def test_flux_estimate_equals_the_measured_cache(dtype, config):
    pipe = tiny_flux_pipeline(seed=0, num_layers=2, num_single_layers=2).to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    forecast, zeros = _measured(pipe, config, "flux", prompt="a red circle", height=32, width=48,
                                generator=torch.Generator().manual_seed(0), **GEN)
    estimate = hicache.estimate_memory(pipe.transformer, config, "flux", height=32, width=48, text_tokens=16,
                                       vae_scale_factor=pipe.vae_scale_factor)
    assert estimate.cache_bytes == forecast > 0
    assert estimate.stand_in_bytes == zeros > 0
    assert estimate.weight_bytes == sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    assert estimate.activation_bytes > 0


def test_inf_dit_estimate_equals_the_measured_cache_and_grows_with_area():
    from hicache.testbeds.tiny.inf_dit import tiny_inf_dit_pipeline

    pipe = tiny_inf_dit_pipeline(with_image_encoder=False)
    config = hicache.CacheConfig("hicache", interval=3, warmup=2, order=2)
    lr = torch.rand(1, 3, 8, 12)
    forecast, zeros = _measured(pipe, config, "inf_dit", image=lr, num_inference_steps=4,
                                image_embeds=torch.randn(1, 8), generator=torch.Generator().manual_seed(0))
    small = hicache.estimate_memory(pipe.transformer, config, "inf_dit", height=32, width=48)
    assert small.cache_bytes == forecast > 0 and small.stand_in_bytes == zeros == 0
    large = hicache.estimate_memory(pipe.transformer, config, "inf_dit", height=64, width=96)
    assert large.cache_bytes == 4 * small.cache_bytes  # the cache grows with the image's area
    assert large.activation_bytes > 2 * small.activation_bytes


def test_cache_summary_predicts_before_sampling():
    pipe = tiny_flux_pipeline(seed=0)
    config = hicache.CacheConfig("hicache", interval=2, warmup=1, order=2)
    hicache.apply_cache(pipe.transformer, config, "flux")
    try:
        summary = hicache.cache_summary(pipe.transformer, 6, height=32, width=32, text_tokens=16,
                                        vae_scale_factor=pipe.vae_scale_factor)
    finally:
        hicache.remove_cache(pipe.transformer)
    assert summary.cache_bytes == 0 and summary.full_forwards == 0  # nothing ran
    assert summary.estimate.cache_bytes > 0
    assert "estimated: transformer weights" in str(summary)


def test_no_input_builder_is_one_line():
    with pytest.raises(ValueError, match="has no input builder"):
        hicache.estimate_memory(torch.nn.Linear(2, 2), hicache.CacheConfig(),
                                hicache.Recipe(forecast=["x"], name="nobody"), height=8, width=8)


def test_run_py_stops_in_one_line_before_the_weights_move_when_the_run_cannot_fit(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from hicache.app.testing import TINY_OVERRIDES

    repo = Path(__file__).resolve().parents[1]
    args = [*TINY_OVERRIDES, "cache=hicache", "cache.factor_dtype=float32", "model.memory_limit_gib=0.0001",
            f"paths.outputs={tmp_path}/out", f"paths.references={tmp_path}/refs"]
    result = subprocess.run([sys.executable, str(repo / "run.py"), *args], cwd=repo, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: model tiny_flux at 16x16 does not fit cpu: weights ")
    for hint in ("cache.factor_dtype=bfloat16", "cache.order=1", "model.cpu_offload=true", "sampling.height/width"):
        assert hint in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("summary.json"))


def test_check_fits_passes_under_a_large_enough_limit():
    from omegaconf import OmegaConf

    from hicache.app.memory_check import check_fits, component_bytes

    pipe = tiny_flux_pipeline(seed=0)
    cfg = OmegaConf.create({"model": {"name": "tiny_flux", "dtype": "float32", "recipe": "flux", "memory_limit_gib": 1.0,
                                      "call_kwargs": {"max_sequence_length": 16}},
                            "sampling": {"steps": 4, "height": 16, "width": 16},
                            "cache": {"family": "hicache", "method": "hicache", "interval": 2, "warmup": 1, "order": 2}})
    check_fits(pipe, cfg, torch.device("cpu"))
    weights = sum(component_bytes(pipe).values())
    cfg.model.memory_limit_gib = weights / 2**30  # the weights alone fill it: cache and activations do not fit
    with pytest.raises(Exception, match="does not fit cpu"):
        check_fits(pipe, cfg, torch.device("cpu"))

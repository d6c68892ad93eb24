"""The cache's factors are released after the last step, before the pipeline decodes the latents with its VAE."""

import torch

import hicache
from hicache.testbeds.tiny.flux import tiny_flux_pipeline


def _live_bytes(transformer) -> int:
    handle = transformer._hicache_handle
    return sum(state.nbytes for hook in handle.forecast_hooks.values() for state in hook.state_manager._state_cache.values())


def test_factors_are_freed_before_the_vae_decode():
    pipe = tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    hicache.apply_cache(pipe.transformer, hicache.CacheConfig("hicache", interval=2, warmup=1, num_inference_steps=5), "flux")
    seen, decode = [], pipe.vae.decode

    def spy(*args, **kwargs):
        seen.append(_live_bytes(pipe.transformer))
        return decode(*args, **kwargs)

    pipe.vae.decode = spy
    steps = []
    pipe.transformer.register_forward_hook(lambda *_: steps.append(_live_bytes(pipe.transformer)))
    image = pipe("a red circle", height=32, width=32, num_inference_steps=5, output_type="pt", max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0)).images
    summary = hicache.cache_summary(pipe.transformer)
    hicache.remove_cache(pipe.transformer)
    assert image.shape == (1, 3, 32, 32)
    assert steps[:-1] and all(b > 0 for b in steps[:-1])  # held while sampling (the spy runs after the release)
    assert seen == [0]  # and gone by the decode
    assert summary.cache_bytes > 0  # the peak is still reported

"""No per-step host syncs in the hooks and forecasts: nothing reads a device number back during sampling.

On a GPU every `.item()`, `float(tensor)` or `bool(tensor)` waits for the device to finish its queue. On CPU the
same calls are counted instead: each one is made to fail while a cached sampling loop runs."""

import pytest
import torch

import hicache
import hicache.hooks
from hicache.testbeds.tiny.flux import tiny_flux_transformer


@pytest.mark.parametrize("method", ["fora", "taylorseer", "hicache", "hi_taylor", "hicache_analytic"])
def test_cached_sampling_reads_nothing_back(method):
    model = tiny_flux_transformer(1, 1)
    hicache.apply_cache(model, hicache.CacheConfig(method, interval=3, warmup=2, order=2), "flux")
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 4, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3))
    timesteps = [torch.tensor([1.0 - i / 8]) for i in range(8)]
    with pytest.MonkeyPatch.context() as mp:
        # Applied to a bare transformer, the step hook's new-loop detection reads the model's timestep
        # argument once per step (StepHook._timestep, a sync per step on a GPU; see its docstring; applied to a
        # pipeline it reads the scheduler instead: tests/test_new_loop.py). It is kept out of this test so that
        # everything else is held to no reads at all.
        mp.setattr(hicache.hooks.StepHook, "_timestep", lambda self, args, kwargs: None)
        for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
            mp.setattr(torch.Tensor, name, _fail)
        with torch.inference_mode():
            for t in timesteps:
                with model.cache_context("cond"):
                    model(**inputs, timestep=t)
    assert hicache.cache_summary(model).cached_forwards == 4


def _fail(self, *args, **kwargs):
    raise AssertionError("a device value was read back to the host during sampling")


def test_the_sr_table_times_each_image_synchronised_with_the_device(monkeypatch):
    from hicache.app import speed
    from hicache.app.sr_experiment import Variant, run_variant
    from hicache.testbeds.tiny.inf_dit import tiny_inf_dit_pipeline

    synced = []
    monkeypatch.setattr(speed, "synchronize", lambda device: synced.append(device))
    pipe = tiny_inf_dit_pipeline()
    _, cost = run_variant(pipe, Variant("hicache", dict(method="hicache", interval=2, warmup=1), 2),
                          [torch.rand(3, 8, 8), torch.rand(3, 8, 8)], seed=0)
    assert synced == [pipe._execution_device] * 4  # before and after each of the two timed images
    assert cost["seconds_per_image"] > 0


def test_inf_dit_sampling_reads_nothing_back():
    from hicache.testbeds.tiny.inf_dit import tiny_inf_dit_pipeline

    pipe = tiny_inf_dit_pipeline(with_image_encoder=False)
    hicache.apply_cache(pipe.transformer, hicache.CacheConfig("hicache_analytic", interval=2, warmup=1), "inf_dit")
    import numpy as np
    from PIL import Image

    # a PIL input: the validation of a tensor input reads its range once per call, before sampling
    lr = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    embeds = torch.randn(1, 8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hicache.hooks.StepHook, "_timestep", lambda self, args, kwargs: None)  # see the test above
        for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
            mp.setattr(torch.Tensor, name, _fail)
        out = pipe(lr, num_inference_steps=3, image_embeds=embeds, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 32, 32)

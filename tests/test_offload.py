"""CPU offload in both orders (offload then cache, cache then offload), model and sequential, on CPU with
device="cpu": the cache works call after call, and `remove_cache` leaves accelerate's hooks in place."""

import accelerate.hooks
import pytest
import torch

import hicache
from hicache.testbeds.tiny.flux import tiny_flux_pipeline

GEN = dict(height=32, width=32, num_inference_steps=6, output_type="pt", max_sequence_length=16)
CONFIG = dict(method="hicache", interval=3, warmup=1, order=2)


def generate(pipe):
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), **GEN).images


def new_pipe():
    pipe = tiny_flux_pipeline(seed=0, num_layers=2, num_single_layers=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def references():
    pipe = new_pipe()
    hicache.apply_cache(pipe.transformer, hicache.CacheConfig(**CONFIG), "flux")
    cached = generate(pipe)
    hicache.remove_cache(pipe.transformer)
    return cached, generate(pipe)


@pytest.fixture
def offload_calls(monkeypatch):
    """Transformer modules whose accelerate offload hook ran (model offload: the root; sequential: its layers)."""
    calls = []
    for cls in (accelerate.hooks.CpuOffload, accelerate.hooks.AlignDevicesHook):
        original = cls.pre_forward

        def spy(self, module, *args, original=original, **kwargs):
            calls.append(module)
            return original(self, module, *args, **kwargs)

        monkeypatch.setattr(cls, "pre_forward", spy)
    return calls


@pytest.mark.parametrize("order", ["offload_then_cache", "cache_then_offload"])
def test_model_offload_in_both_orders(references, offload_calls, order):
    cached_ref, uncached_ref = references
    pipe = new_pipe()
    config = hicache.CacheConfig(**CONFIG)
    if order == "offload_then_cache":
        pipe.enable_model_cpu_offload(device="cpu")
        hicache.apply_cache(pipe.transformer, config, "flux")
    else:
        hicache.apply_cache(pipe.transformer, config, "flux")
        pipe.enable_model_cpu_offload(device="cpu")
    assert torch.equal(generate(pipe), cached_ref)
    # the second call too: the pipeline re-applied its offload hooks at the end of the first
    assert torch.equal(generate(pipe), cached_ref)
    assert hicache.cache_summary(pipe.transformer).cached_forwards == 2 * 4
    hicache.remove_cache(pipe.transformer)
    offload_calls.clear()
    assert torch.equal(generate(pipe), uncached_ref)
    assert pipe.transformer in offload_calls, "accelerate's offload hook on the transformer is gone after remove_cache"


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 4, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3))


@torch.no_grad()
def sample(transformer, steps=6):
    """The pipelines' loop: one cache context per step, hook state reset at the end of the call."""
    x, inputs = None, _inputs()
    for i in range(steps):
        with transformer.cache_context("cond"):
            out = transformer(**{**inputs, "hidden_states": inputs["hidden_states"] if x is None else x},
                              timestep=torch.tensor([1.0 - i / steps])).sample
        x = (inputs["hidden_states"] if x is None else x) - out / steps
    transformer._reset_stateful_cache()
    return x


@pytest.mark.parametrize("order", ["offload_then_cache", "cache_then_offload"])
def test_sequential_offload_in_both_orders(offload_calls, order):
    """What `enable_sequential_cpu_offload` does to each component (`accelerate.cpu_offload`: a hook on every module
    with weights, which live on the meta device between calls). On CPU with device="cpu" the pipeline-level call
    fails inside accelerate for this torch/transformers (a Parameter turned plain tensor in
    set_module_tensor_to_device, with or without a cache), so the transformer is offloaded alone."""
    from accelerate import cpu_offload

    from hicache.testbeds.tiny.flux import tiny_flux_transformer

    reference = tiny_flux_transformer(num_layers=2, num_single_layers=2)
    config = hicache.CacheConfig(**CONFIG)
    hicache.apply_cache(reference, config, "flux")
    cached_ref = sample(reference)
    hicache.remove_cache(reference)
    uncached_ref = sample(reference)

    model = tiny_flux_transformer(num_layers=2, num_single_layers=2)
    if order == "offload_then_cache":
        cpu_offload(model, execution_device=torch.device("cpu"))
        hicache.apply_cache(model, config, "flux")
    else:
        hicache.apply_cache(model, config, "flux")
        cpu_offload(model, execution_device=torch.device("cpu"))
    assert torch.equal(sample(model), cached_ref)
    assert torch.equal(sample(model), cached_ref)
    hicache.remove_cache(model)
    offload_calls.clear()
    assert torch.equal(sample(model), uncached_ref)
    offloaded = {m for m in model.modules() if m._parameters and any(p is not None for p in m._parameters.values())}
    assert offloaded <= set(offload_calls), "some layers lost their offload hook in remove_cache"
    assert all(p.device.type == "meta" for p in model.parameters())  # weights still offloaded between calls


def test_the_apps_cpu_offload_path_renders_repeatedly(tmp_path):
    """`model.cpu_offload=true`: references, then two cached renders, on one offloaded pipeline."""
    from hicache.app.pipelines import forget_pipelines
    from hicache.app.testing import TINY_OVERRIDES, run_overrides

    forget_pipelines()
    try:
        (summary,) = run_overrides([*TINY_OVERRIDES, "cache=hicache", "cache.interval=2", "cache.warmup=1",
                                    "model.cpu_offload=true", "model.device=cpu", "+model.reuse=false",
                                    f"paths.outputs={tmp_path}"])
    finally:
        forget_pipelines()
    assert summary["num_outputs"] == 2 and summary["psnr"] > 0
    assert summary["ideal_speedup"] == 2.0

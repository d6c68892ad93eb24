"""State starts fresh at every new sampling loop, for any model and any loop.

diffusers pipelines reset the cache's state at the end of a call, but only for `CacheMixin` models and only
when the call finishes. These tests drive models and loops that get no such reset: a tiny
`SD3Transformer2DModel` (not a `CacheMixin`) in a custom loop, loops interrupted mid-way, timesteps that rise
instead of fall, Heun's repeated timesteps, and a model with no timestep argument at all.
"""

import pytest
import torch
from diffusers import SD3Transformer2DModel
from torch import nn

import hicache

SD3_RECIPE = hicache.Recipe(forecast=[r"transformer_blocks\.\d+\.(attn|ff|ff_context)"], name="sd3_blocks")
CONFIG = hicache.CacheConfig("hicache", interval=3, warmup=2, order=2)
STEPS = 7


@pytest.fixture(scope="module")
def sd3():
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(encoder_hidden_states=torch.randn(1, 5, 16, generator=g), pooled_projections=torch.randn(1, 16, generator=g))
    return model, inputs, torch.randn(1, 4, 8, 8, generator=g)


@torch.no_grad()
def euler(model, inputs, x, steps=STEPS, stop_at=None):
    """A flow-matching Euler loop, timesteps falling from 1000 as in diffusers' pipelines."""
    for i in range(steps):
        if i == stop_at:
            raise KeyboardInterrupt
        t = 1.0 - i / steps
        v = model(hidden_states=x, timestep=torch.tensor([1000 * t]), **inputs).sample
        x = x - v / steps
    return x


class _Wrap(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(2, 2)

    def forward(self, x):
        return self.inner(x)


def test_a_model_called_outside_a_context_says_how_to_open_one():
    model = _Wrap()
    hicache.apply_cache(model, CONFIG, hicache.Recipe(forecast=["inner"], name="wrap"))
    with pytest.raises(ValueError, match=r"_Wrap was called outside a cache context; wrap the call.*hicache\.cache_context") as err:
        model(torch.ones(2))
    assert "\n" not in str(err.value)


def test_sd3_loops_in_one_context_start_fresh_each_time(sd3):
    """`SD3Transformer2DModel` has no CacheMixin and its pipeline opens no cache context; with one
    `hicache.cache_context` around several loops (or pipeline calls), every loop must start from step 0."""
    model, inputs, x = sd3
    hicache.apply_cache(model, CONFIG, SD3_RECIPE)
    try:
        with hicache.cache_context(model, "cond"):
            first = euler(model, inputs, x)
            second = euler(model, inputs, x)
            with pytest.raises(KeyboardInterrupt):
                euler(model, inputs, x, stop_at=4)
            after_interrupt = euler(model, inputs, x)
        summary = hicache.cache_summary(model, STEPS)
    finally:
        hicache.remove_cache(model)
    uncached = euler(model, inputs, x)
    assert not torch.equal(first, uncached)  # it really cached
    assert torch.equal(second, first) and torch.equal(after_interrupt, first)
    assert summary.full_steps == [0, 1, 4]
    # three whole loops (full at 0, 1, 4) and one stopped before step 4 (full at 0, 1; cached 2, 3)
    assert summary.full_forwards == 3 * 3 + 2 and summary.cached_forwards == 3 * 4 + 2


class Clock(nn.Module):
    """Returns its step's timestep through a forecast submodule; counts real computations."""

    def __init__(self):
        super().__init__()
        self.f = Line()

    def forward(self, x, timestep):
        return self.f(timestep)


class Line(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, t):
        self.calls += 1
        return t * torch.ones(2)


CLOCK = hicache.Recipe(forecast=["f"], name="clock")


def _run(model, timesteps, **context):
    with hicache.cache_context(model, "cond", **context):
        return [model(torch.zeros(1), torch.tensor(float(t))) for t in timesteps]


def test_rising_timesteps_are_one_loop_and_a_fall_starts_the_next():
    """Some pipelines count time up (1 - sigma): the direction is learnt from the loop itself."""
    model = Clock()
    hicache.apply_cache(model, hicache.CacheConfig("fora", interval=4, warmup=1), CLOCK)
    outs = _run(model, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.0, 0.1, 0.2])
    # full at steps 0 and 4 of the first loop, step 0 of the second (it used to go on as steps 6, 7, 8)
    assert [float(o[0]) for o in outs] == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.4, 0.4, 0.0, 0.0, 0.0])
    assert model.f.calls == 3


def test_heun_repeated_timesteps_do_not_start_a_new_loop():
    model = Clock()
    hicache.apply_cache(model, hicache.CacheConfig("fora", interval=2, warmup=1), CLOCK)
    _run(model, [10.0, 8.0, 8.0, 6.0, 6.0, 4.0, 4.0])  # Heun: two forwards per step, the second at the next sigma
    assert model.f.calls == 4  # steps 0, 2, 4, 6


def test_step_index_zero_starts_a_new_loop_for_a_model_without_a_timestep():
    model = nn.Sequential(Line())
    hicache.apply_cache(model, hicache.CacheConfig("fora", interval=5, warmup=1), hicache.Recipe(forecast=["0"]))
    for _ in range(3):
        for i in range(3):
            with hicache.cache_context(model, "cond", step_index=i):
                model(torch.tensor(float(i)))
    assert model[0].calls == 3  # step 0 of each loop (without the reset: steps 0 and 5 of one long loop)


def test_reset_cache_starts_a_new_loop_when_nothing_else_can_tell():
    model = nn.Sequential(Line())
    hicache.apply_cache(model, hicache.CacheConfig("fora", interval=5, warmup=1), hicache.Recipe(forecast=["0"]))
    with hicache.cache_context(model, "cond"):
        for _ in range(3):
            for i in range(3):
                model(torch.tensor(float(i)))
            hicache.reset_cache(model)  # inside the context: the next loop still runs in it
    assert model[0].calls == 3


def test_the_readmes_sd3_recipe_checks_out_and_its_wrong_variant_is_named(sd3):
    model, inputs, x = sd3
    example = dict(hidden_states=x, timestep=torch.tensor([500.0]), **inputs)
    recipe = hicache.Recipe(name="sd3", forecast=[r"transformer_blocks\.\d+\.(attn|ff|ff_context)"],
                            skip_broadcast=[r"transformer_blocks\.\d+\.norm2"])
    assert hicache.check_recipe(model, recipe, example).ok
    wrong = hicache.Recipe(name="sd3_wrong", forecast=[r"transformer_blocks\.\d+\.(attn|ff)"],
                           skip=[r"transformer_blocks\.\d+\.norm1"])
    assert list(hicache.check_recipe(model, wrong, example).live) == ["transformer_blocks.0.norm1", "transformer_blocks.1.norm1"]


def test_a_meta_timestep_is_not_read():
    """FLOP counting runs the cached model on the meta device, where a timestep has no value to compare."""
    from hicache.hooks import StepHook
    from hicache.schedule import Schedule

    hook = StepHook(Schedule())
    hook.initialize_hook(Clock())
    assert hook._timestep((torch.zeros(1), torch.tensor(0.5)), {}) == 0.5
    assert hook._timestep((), {"timestep": torch.tensor([3.0, 7.0])}) == 7.0
    assert hook._timestep((torch.zeros(1),), {"timestep": torch.full((1,), 0.5, device="meta")}) is None


def test_a_cache_applied_to_a_pipeline_finds_new_loops_without_reading_the_timestep(monkeypatch):
    """Applied to the pipeline, the step hook learns a call's first step from its scheduler (on the host), so it
    never reads the timestep back from the device (a sync per step on a GPU), and a call interrupted mid-loop
    still leaves nothing behind: the next call equals a fresh one."""
    from hicache.testbeds.tiny.flux import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed=0, num_layers=1, num_single_layers=1)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(height=32, width=32, num_inference_steps=STEPS, output_type="pt", max_sequence_length=16)

    def call(stop_at=None):
        def stop(p, i, t, tensors):
            if i == stop_at:
                raise KeyboardInterrupt
            return tensors
        return pipe("a red circle", generator=torch.Generator().manual_seed(0), callback_on_step_end=stop, **kwargs).images

    reads = []
    monkeypatch.setattr(hicache.hooks.StepHook, "_timestep", lambda self, args, kwargs: reads.append(1))
    hicache.apply_cache(pipe, CONFIG, "flux")
    try:
        first = call()
        with pytest.raises(KeyboardInterrupt):
            call(stop_at=3)  # the pipeline's end-of-call reset never runs
        after_interrupt = call()
    finally:
        hicache.remove_cache(pipe.transformer)
    assert reads == [] and torch.equal(after_interrupt, first)
    assert not torch.equal(first, call())  # it really cached

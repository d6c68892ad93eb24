"""The hooks on a toy model whose submodules follow known trajectories of the step."""

import pytest
import torch
from torch import nn

import hicache


class Line(nn.Module):
    """Output a + b*s for the step s it is fed; counts how often it really computes."""

    def __init__(self, a, b, as_tuple=False):
        super().__init__()
        self.a, self.b, self.as_tuple, self.calls = a, b, as_tuple, 0

    def forward(self, s):
        self.calls += 1
        y = torch.full((2, 3), self.a) + self.b * s
        return (y, 2 * y) if self.as_tuple else y


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Module()
        self.block.f = Line(1.0, 0.5)
        self.block.g = Line(-2.0, 1.5, as_tuple=True)
        self.block.h = Line(3.0, 1.0)
        self.head = Line(0.0, 0.0)

    def forward(self, s):
        self.head(s)
        a, b = self.block.g(s)
        return self.block.f(s) + a + b + self.block.h(s)


RECIPE = hicache.Recipe(forecast=[r"block\.(f|g)"], skip=[r"block\.h"], name="toy")


def run(model, steps, context="cond"):
    outs = []
    with hicache.cache_context(model, context):
        for s in range(steps):
            outs.append(model(torch.tensor(float(s))))
    return outs


def test_linear_trajectories_are_forecast_exactly_and_skipped_modules_return_zeros():
    model = Toy()
    hicache.apply_cache(model, hicache.CacheConfig("taylorseer", interval=3, warmup=2, order=1), RECIPE)
    outs = run(model, 10)
    full = [0, 1, 4, 7]
    for s, out in enumerate(outs):
        f = 1.0 + 0.5 * s
        g = -2.0 + 1.5 * s
        h = 3.0 + s if s in full else 0.0
        torch.testing.assert_close(out, torch.full((2, 3), f + 3 * g + h))
    assert model.block.f.calls == model.block.g.calls == model.block.h.calls == len(full)
    assert model.head.calls == 10  # unhooked modules always run
    summary = hicache.cache_summary(model, 10)
    assert summary.full_steps == full and summary.full_forwards == 4 and summary.cached_forwards == 6
    assert summary.forecast_modules == ["block.f", "block.g"] and summary.skip_modules == ["block.h"]
    # order 1 in float32: f keeps D0, D1 (2 x 6 floats); g the same for each of its two outputs; plus h's zeros
    assert summary.cache_bytes == 3 * 2 * 6 * 4 + 6 * 4


def test_fora_reuses_the_last_full_output():
    model = Toy()
    hicache.apply_cache(model, hicache.CacheConfig("fora", interval=4, warmup=1), RECIPE)
    outs = run(model, 4)
    torch.testing.assert_close(outs[3], torch.full((2, 3), 1.0 + 3 * -2.0 + 0.0))


def test_calls_outside_a_cache_context_fail_clearly():
    model = Toy()
    hicache.apply_cache(model, hicache.CacheConfig("hicache"), RECIPE)
    with pytest.raises(ValueError, match="cache context"):
        model(torch.tensor(0.0))


def test_contexts_keep_separate_histories():
    together, alone = Toy(), Toy()
    cfg = hicache.CacheConfig("taylorseer", interval=3, warmup=1, order=1)
    hicache.apply_cache(together, cfg, RECIPE)
    hicache.apply_cache(alone, cfg, RECIPE)
    interleaved = {"cond": [], "uncond": []}
    for s in range(7):
        for name, shift in (("cond", 0.0), ("uncond", 100.0)):
            with hicache.cache_context(together, name):
                interleaved[name].append(together(torch.tensor(s + shift)))
    with hicache.cache_context(alone, "uncond"):
        single = [alone(torch.tensor(s + 100.0)) for s in range(7)]
    for a, b in zip(interleaved["uncond"], single):
        torch.testing.assert_close(a, b)


def test_remove_and_validation():
    model = Toy()
    with pytest.raises(ValueError, match="matches no module of Toy"):
        hicache.apply_cache(model, hicache.CacheConfig("hicache"), hicache.Recipe(forecast=["nothing"]))
    with pytest.raises(ValueError, match="matches both"):
        hicache.apply_cache(model, hicache.CacheConfig("hicache"), hicache.Recipe(forecast=["block.f"], skip=["block.f"]))
    hicache.apply_cache(model, hicache.CacheConfig("hicache"), RECIPE)
    with pytest.raises(ValueError, match="already applied"):
        hicache.apply_cache(model, hicache.CacheConfig("hicache"), RECIPE)
    hicache.remove_cache(model)
    assert torch.equal(model(torch.tensor(5.0)), Toy()(torch.tensor(5.0)))
    with pytest.raises(ValueError, match="not applied"):
        hicache.remove_cache(model)


def test_method_none_attaches_no_hooks():
    model = Toy()
    hicache.apply_cache(model, hicache.CacheConfig("none"), RECIPE)
    assert not hasattr(model.block.f, "_diffusers_hook") and not hasattr(model, "_diffusers_hook")
    assert model(torch.tensor(1.0)).shape == (2, 3)


def test_an_interval_longer_than_the_loop_warns_once_per_step_count():
    """interval=100 on 50 steps used to forecast 47 steps in a row without a word."""
    model = Toy()
    hicache.apply_cache(model, hicache.CacheConfig("fora", interval=100, warmup=3), RECIPE)
    with pytest.warns(UserWarning, match="at 50 steps the schedule is full only at \\[0, 1, 2\\]") as record:
        for _ in range(2):  # two calls of 50 steps: one warning
            with hicache.cache_context(model, "cond", num_inference_steps=50):
                for s in range(50):
                    model(torch.tensor(float(s)))
            hicache.reset_cache(model)
    assert len([w for w in record if "schedule is full only" in str(w.message)]) == 1


def test_a_sensible_schedule_does_not_warn():
    import warnings

    model = Toy()
    hicache.apply_cache(model, hicache.CacheConfig("fora", interval=7, warmup=3, num_inference_steps=50), RECIPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(model, 50)

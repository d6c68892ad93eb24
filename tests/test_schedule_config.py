import pytest
import torch

import hicache
from hicache.schedule import Schedule, same_cost_steps


def test_paper_schedule_n7_w3_on_50_steps():
    s = Schedule(interval=7, warmup=3)
    assert s.full_steps_for(50) == [0, 1, 2, 9, 16, 23, 30, 37, 44]
    assert s.ideal_speedup(50) == pytest.approx(50 / 9)
    assert same_cost_steps(50, s) == 9


def test_interval_one_is_every_step_and_explicit_lists_replace_the_rule():
    assert Schedule(interval=1, warmup=1).full_steps_for(6) == list(range(6))
    assert Schedule(full_steps=[5, 0, 2]).full_steps_for(8) == [0, 2, 5]


def test_final_full_steps_need_the_step_count():
    s = Schedule(interval=5, warmup=1, final_full_steps=2)
    assert s.full_steps_for(12) == [0, 5, 10, 11]
    assert s.is_full(11) is False  # unknown length: the rule alone
    assert s.is_full(11, num_steps=12) is True


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sigma=0.0), r"sigma must be a number in \(0, 2\]"),
        (dict(sigma=-1.0), r"sigma must be a number in \(0, 2\]"),
        # inf, 1e6 and NaN gave NaN or black images with exit code 0
        (dict(sigma=float("inf")), r"sigma must be a number in \(0, 2\].*got inf"),
        (dict(sigma=1e6), r"sigma must be a number in \(0, 2\].*got 1000000.0"),
        (dict(sigma=float("nan")), r"sigma must be a number in \(0, 2\].*got nan"),
        (dict(sigma=2.5), r"sigma must be a number in \(0, 2\]"),
        (dict(sigma="0.5"), r"sigma must be a number"),
        (dict(sigma=True), r"sigma must be a number"),
        (dict(method="hicache_analytic", analytic_sigma_max=float("inf")), r"analytic_sigma_max must be a number in"),
        (dict(order=-1), "order must be >= 0"),
        (dict(interval=0), "interval must be >= 1"),
        (dict(warmup=0), "warmup must be >= 1"),
        # floats were truncated silently (2.7 -> 2), 1.5 failed with a traceback at the first step
        (dict(interval=2.7), "interval must be an integer, got 2.7"),
        (dict(interval=7.0), "interval must be an integer, got 7.0"),
        (dict(interval=True), "interval must be an integer, got True"),
        (dict(warmup=2.5), "warmup must be an integer"),
        (dict(order=1.5), "order must be an integer, got 1.5"),
        (dict(final_full_steps=1.5), "final_full_steps must be an integer"),
        (dict(num_inference_steps=50.5), "num_inference_steps must be an integer"),
        (dict(full_steps=[0, 2.5]), "every entry of full_steps must be an integer, got 2.5"),
        (dict(full_steps=[0, False]), "every entry of full_steps must be an integer, got False"),
        (dict(method="taylor"), "unknown cache method"),
        (dict(full_steps=[1, 2]), "must contain step 0"),
        (dict(factor_dtype="float33"), "not a torch dtype"),
        # an integer dtype failed with a traceback at the first step
        (dict(factor_dtype="int8"), "factor_dtype 'int8' is not a floating dtype"),
        (dict(factor_dtype=torch.int64), "is not a floating dtype"),
    ],
)
def test_config_rejects_bad_values_with_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        hicache.CacheConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_config_accepts_the_ends_of_the_sigma_range_and_numpy_ints():
    import numpy as np

    assert hicache.CacheConfig(sigma=2.0, interval=np.int64(5), full_steps=[0, np.int32(3)]).schedule.full_steps == (0, 3)
    assert hicache.CacheConfig(sigma=1e-3).sigma == 1e-3


def test_a_schedule_with_fewer_than_two_full_steps_after_warm_up_explains_itself():
    message = Schedule(interval=100, warmup=3).sparse_warning(50)
    assert "full only at [0, 1, 2]" in message and "47 steps in a row" in message and "interval <= 23" in message
    assert Schedule(interval=23, warmup=3).sparse_warning(50) is None  # full at 2, 25, 48
    assert Schedule(interval=24, warmup=3).sparse_warning(50) is not None  # full at 2, 26 only
    assert Schedule(interval=7, warmup=3).sparse_warning(50) is None
    assert Schedule(interval=7, warmup=3).sparse_warning(3) is None  # every step full: nothing forecast
    assert "list more full steps" in Schedule(full_steps=[0]).sparse_warning(10)


def test_config_accepts_dtype_names():
    assert hicache.CacheConfig(factor_dtype="bfloat16").factor_dtype is torch.bfloat16
    assert hicache.CacheConfig(factor_dtype="torch.float32").factor_dtype is torch.float32


def test_recipe_rejects_bad_regex_and_unknown_names():
    with pytest.raises(ValueError, match="bad regex"):
        hicache.Recipe(forecast=["blocks.("])
    with pytest.raises(ValueError, match="unknown recipe"):
        hicache.get_recipe("nope")
    assert "flux" in hicache.available_recipes()

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
        (dict(sigma=0.0), "sigma must be > 0"),
        (dict(sigma=-1.0), "sigma must be > 0"),
        (dict(order=-1), "order must be >= 0"),
        (dict(interval=0), "interval must be >= 1"),
        (dict(warmup=0), "warmup must be >= 1"),
        (dict(method="taylor"), "unknown cache method"),
        (dict(full_steps=[1, 2]), "must contain step 0"),
        (dict(factor_dtype="float33"), "not a torch dtype"),
    ],
)
def test_config_rejects_bad_values_with_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        hicache.CacheConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_config_accepts_dtype_names():
    assert hicache.CacheConfig(factor_dtype="bfloat16").factor_dtype is torch.bfloat16
    assert hicache.CacheConfig(factor_dtype="torch.float32").factor_dtype is torch.float32


def test_recipe_rejects_bad_regex_and_unknown_names():
    with pytest.raises(ValueError, match="bad regex"):
        hicache.Recipe(forecast=["blocks.("])
    with pytest.raises(ValueError, match="unknown recipe"):
        hicache.get_recipe("nope")
    assert "flux" in hicache.available_recipes()

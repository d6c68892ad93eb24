"""Gaussianity statistics and offline forecast replay: known distributions and known trajectories."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the analysis/ scripts live at the repo root

from analysis import forecast_error, gaussianity  # noqa: E402
from hicache.schedule import Schedule  # noqa: E402
from hicache.testbeds.tiny.flux import tiny_flux_pipeline  # noqa: E402
from hicache.trajectories import Series, collect_pipeline_runs  # noqa: E402





def make_series(values: torch.Tensor) -> Series:
    return Series(key="cond/blocks.0.f/0", branch="cond", name="blocks.0.f", block="blocks.0", module="f", output=0,
                  steps=list(range(values.shape[0])), values=values)


def polynomial_series(coeffs, num_steps=12, shape=(1, 6, 4), seed=0):
    """F(s) = sum_i c_i s^i * A_i with fixed random tensors A_i."""
    g = torch.Generator().manual_seed(seed)
    bases = [torch.randn(shape, generator=g) for _ in coeffs]
    values = torch.stack([sum(c * s**i * b for i, (c, b) in enumerate(zip(coeffs, bases))) for s in range(num_steps)])
    return make_series(values), bases


def test_differences_are_the_exact_finite_differences_of_a_cubic():
    series, bases = polynomial_series([1.0, 0.5, 0.25, 0.1])
    diffs = {(s, o): d for s, o, d in gaussianity.differences(series, 3)}
    # third difference of a cubic c3 s^3 with unit steps is 6 c3, the same at every step
    for step in range(3, 12):
        torch.testing.assert_close(diffs[(step, 3)], 6 * 0.1 * bases[3], rtol=1e-4, atol=1e-4)
    # first difference is F(s) - F(s-1)
    torch.testing.assert_close(diffs[(5, 1)], series.values[5] - series.values[4])
    # stride 2 divides by the step distance
    strided = {(s, o): d for s, o, d in gaussianity.differences(series, 1, stride=2)}
    torch.testing.assert_close(strided[(4, 1)], (series.values[4] - series.values[2]) / 2)
    assert (1, 1) not in strided


@pytest.mark.parametrize("family, sampler", [
    ("gaussian", lambda rng, n: rng.standard_normal(n)),
    ("laplace", lambda rng, n: rng.laplace(size=n)),
    ("student_t", lambda rng, n: rng.standard_t(2.5, size=n)),
])
def test_univariate_stats_identify_the_family(family, sampler):
    rng = np.random.default_rng(0)
    x = sampler(rng, 4000).reshape(-1, 8)
    row = gaussianity.univariate_stats(x, sample_size=2000, rng=np.random.default_rng(1))
    assert row["best_fit"] == family
    if family == "gaussian":
        assert abs(row["excess_kurtosis"]) < 0.3 and row["dagostino_p"] > 0.01 and row["shapiro_p"] > 0.01
    else:
        assert row["excess_kurtosis"] > 1.5 and row["dagostino_p"] < 1e-3 and row["shapiro_p"] < 1e-3
        assert row["anderson_p"] <= 0.01


def test_henze_zirkler_accepts_gaussian_and_rejects_heavy_tails():
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((32, 32))
    gaussian = rng.standard_normal((300, 32)) @ mixing
    heavy = rng.standard_t(2, size=(300, 32)) @ mixing
    assert gaussianity.multivariate_normality(gaussian, dims=5, seed=0)["hz_p"] > 0.05
    assert gaussianity.multivariate_normality(heavy, dims=5, seed=0)["hz_p"] < 1e-3


def test_energy_test_accepts_gaussian_and_rejects_heavy_tails_and_two_modes():
    rng = np.random.default_rng(1)
    mixing = rng.standard_normal((32, 32))
    gaussian = rng.standard_normal((300, 32)) @ mixing
    heavy = rng.standard_t(2, size=(300, 32)) @ mixing
    two_modes = np.concatenate([rng.standard_normal((150, 32)) - 3, rng.standard_normal((150, 32)) + 3]) @ mixing
    assert gaussianity.multivariate_normality(gaussian, dims=5, seed=0)["energy_p"] > 0.05
    assert gaussianity.multivariate_normality(heavy, dims=5, seed=0)["energy_p"] <= 0.01
    assert gaussianity.energy_normality(two_modes[:, :3], seed=0)["energy_p"] <= 0.01


def test_linear_trajectory_is_forecast_exactly_by_taylor_but_not_by_fora():
    series, _ = polynomial_series([1.0, 0.3], num_steps=20)
    cached = [s for s in range(20) if not Schedule(interval=4, warmup=3).is_full(s, 20)]
    taylor = forecast_error.replay(series, forecast_error.ReplayConfig("taylorseer", 4, 1, float("nan")))
    fora = forecast_error.replay(series, forecast_error.ReplayConfig("fora", 4, 0, float("nan")))
    assert [r["step"] for r in taylor] == cached == [r["step"] for r in fora]
    assert max(r["rel_l2"] for r in taylor) < 1e-5
    assert min(r["rel_l2"] for r in fora) > 1e-3
    # hi_taylor at sigma = 1 is exactly TaylorSeer
    hi = forecast_error.replay(series, forecast_error.ReplayConfig("hi_taylor", 4, 1, 1.0))
    assert [r["rel_l2"] for r in hi] == pytest.approx([r["rel_l2"] for r in taylor], abs=1e-6)


def test_config_grid_varies_only_what_each_method_uses():
    grid = forecast_error.config_grid(intervals=[5], orders=[1, 2], sigmas=[0.3, 0.6])
    by_method = pd.Series([c.method for c in grid]).value_counts().to_dict()
    assert by_method == {"fora": 1, "taylorseer": 2, "hicache": 4, "hi_taylor": 4, "hicache_analytic": 2}
    with pytest.raises(ValueError, match="unknown method"):
        forecast_error.config_grid(methods=["nope"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pipe = tiny_flux_pipeline()
    out = tmp_path_factory.mktemp("traj")
    collect_pipeline_runs(pipe, ["a red circle"], [0, 1], out, blocks=r"single_transformer_blocks\.0", num_tokens=16,
                          progress=False, num_inference_steps=10, height=32, width=32, guidance_scale=3.5)
    return out


def test_gaussianity_cli_writes_report_and_figures(runs, tmp_path):
    gaussianity.main([str(runs), "--out", str(tmp_path), "--sample-size", "200", "--step-every", "3"])
    rows = pd.read_csv(tmp_path / "gaussianity.csv")
    assert set(rows["order"]) == {1, 2, 3} and set(rows["series"]) == {"single_transformer_blocks.0.proj_out"}
    assert rows[["excess_kurtosis", "shapiro_p", "hz_p", "best_fit"]].notna().all().all()
    summary = pd.read_csv(tmp_path / "gaussianity_summary.csv")
    assert len(summary) == 3 and summary["hz_pass"].between(0, 1).all()
    # the pooled test sees the token vectors of both runs
    pooled = pd.read_csv(tmp_path / "gaussianity_pooled_hz.csv")
    assert (pooled["runs"] == 2).all() and (pooled["hz_pooled_n"] == 2 * rows["hz_n"].max()).all()
    assert summary["hz_pooled_pass"].between(0, 1).all() and summary["energy_pooled_pass"].between(0, 1).all()
    assert rows["energy_p"].between(0, 1).all() and summary["energy_pass"].between(0, 1).all()
    assert "| block" in (tmp_path / "gaussianity.md").read_text()
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {"hist_p000_s0.png", "qq_p000_s0.png", "kurtosis_heatmap.png"}


def test_forecast_error_cli_writes_report_and_figures(runs, tmp_path):
    forecast_error.main([str(runs), "--out", str(tmp_path), "--intervals", "3", "--orders", "1", "2",
                         "--sigmas", "0.2", "0.8", "--reference-interval", "3"])
    summary = pd.read_csv(tmp_path / "forecast_error_summary.csv")
    assert set(summary["method"]) == set(forecast_error.METHODS)
    assert (summary["count"] == 2 * len([s for s in range(10) if not Schedule(3, 3).is_full(s, 10)])).all()
    assert (summary["mean"] > 0).all()
    assert "Best sigma" in (tmp_path / "forecast_error.md").read_text()
    assert len(list((tmp_path / "figures").glob("*.png"))) == 3


def test_missing_runs_give_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="no trajectory files"):
        gaussianity.main([str(tmp_path / "empty")])


def test_replay_matches_the_live_cache_at_the_first_cached_step():
    """Up to the first cached step the cached and uncached runs see the same inputs, so the offline
    replay's error there must equal the error of the forecast the live hooks return."""
    import hicache
    from hicache.trajectories import TrajectoryRecorder

    pipe = tiny_flux_pipeline()
    call = dict(prompt="a red circle", num_inference_steps=6, height=32, width=32, guidance_scale=3.5,
                max_sequence_length=16, output_type="latent")
    name = "single_transformer_blocks.0.proj_out"
    recorder = TrajectoryRecorder(pipe.transformer, "flux", blocks=r"single_transformer_blocks\.0", num_tokens=None)
    try:
        pipe(generator=torch.Generator().manual_seed(0), **call)
    finally:
        recorder.remove()
    values = torch.stack([v for _, v in recorder._features[("cond", name, 0)]])
    series = make_series(values)

    config = forecast_error.ReplayConfig("hicache", interval=3, order=2, sigma=0.7, warmup=2)
    first_cached = next(s for s in range(6) if not Schedule(3, 2).is_full(s, 6))
    replayed = {r["step"]: r["rel_l2"] for r in forecast_error.replay(series, config)}

    outputs = []
    module = dict(pipe.transformer.named_modules())[name]
    handle = module.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    hicache.apply_cache(pipe.transformer, hicache.CacheConfig("hicache", interval=3, warmup=2, order=2, sigma=0.7), "flux")
    try:
        pipe(generator=torch.Generator().manual_seed(0), **call)
    finally:
        hicache.remove_cache(pipe.transformer)
        handle.remove()
    live = outputs[first_cached]
    live_error = float((live - values[first_cached]).norm() / values[first_cached].norm())
    assert live_error > 1e-4  # a real forecast, not a copy of the reference
    assert live_error == pytest.approx(replayed[first_cached], rel=1e-4)

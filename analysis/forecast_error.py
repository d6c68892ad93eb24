"""How well does each basis forecast the recorded features? An offline replay, no resampling.

Every method is replayed on the exact full-compute trajectories (`hicache.trajectories`) with the
core's own `Schedule` (which steps are full) and `DifferenceHistory` (the differences and the
forecast): at full steps the history is updated with the recorded feature, at cached steps the
forecast is compared with the recorded feature by relative L2 error ``||F_hat - F|| / ||F||``.

This isolates the forecast from error feedback: in real caching the input of later steps is itself
perturbed by earlier forecasts, which this replay does not model. In exchange, a whole grid of
interval N, order O and sigma costs seconds, which makes it the sigma ablation without resampling.

CLI: ``python -m analysis.forecast_error RUNS... --out outputs/analysis/forecast_error`` writes
``forecast_error.csv`` (per run, series, config and cached step), ``forecast_error_summary.csv``
(mean over cached steps, series and runs per config), ``forecast_error_blocks.csv`` (per block),
``forecast_error.md`` and figures (error against sigma, against N, and per step).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from hicache.forecast import METHODS, AnalyticSigma, DifferenceHistory
from hicache.schedule import Schedule
from hicache.trajectories import Series, load_trajectories, trajectory_files

SIGMA_METHODS = ("hicache", "hi_taylor")
DEFAULT_INTERVALS = (3, 5, 7)
DEFAULT_ORDERS = (1, 2, 3)
DEFAULT_SIGMAS = tuple(np.round(np.linspace(0.1, 1.0, 10), 2))


@dataclass(frozen=True)
class ReplayConfig:
    method: str
    interval: int
    order: int
    sigma: float
    warmup: int = 3


def config_grid(methods: Sequence[str] = METHODS, intervals: Iterable[int] = DEFAULT_INTERVALS,
                orders: Iterable[int] = DEFAULT_ORDERS, sigmas: Iterable[float] = DEFAULT_SIGMAS,
                warmup: int = 3) -> list[ReplayConfig]:
    """Every distinct config: sigma only varies for hicache/hi_taylor, order not at all for fora
    (its value is recorded as 0 and its sigma as NaN, so groupings stay honest)."""
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    grid = []
    for method in methods:
        for n in intervals:
            for o in ([0] if method == "fora" else orders):
                for s in (sigmas if method in SIGMA_METHODS else [float("nan")]):
                    grid.append(ReplayConfig(method, int(n), int(o), float(s), warmup))
    return grid


def replay(series: Series, config: ReplayConfig, analytic: AnalyticSigma | None = None) -> list[dict]:
    """Relative L2 error of the forecast at every cached step of one recorded series."""
    num_steps = len(series.steps)
    if series.steps != list(range(num_steps)):
        raise ValueError(f"{series.label}: replay needs every step 0..S-1 recorded, got {series.steps[:5]}...")
    schedule = Schedule(interval=config.interval, warmup=config.warmup)
    sigma = 0.5 if np.isnan(config.sigma) else config.sigma
    history = DifferenceHistory(config.method, config.order, sigma, config.warmup, torch.float32, analytic)
    rows = []
    for step in range(num_steps):
        value = series.values[step]
        if schedule.is_full(step, num_steps):
            history.update(value, step)
            continue
        forecast = history.forecast(step)
        reference = value.float()
        error = float(torch.linalg.vector_norm(forecast.float() - reference) / torch.linalg.vector_norm(reference).clamp_min(1e-12))
        rows.append(dict(step=step, k=step - history.last_step, rel_l2=error, sigma_used=history.current_sigma))
    return rows


def replay_runs(paths, grid: Sequence[ReplayConfig], analytic: AnalyticSigma | None = None,
                progress: bool = True) -> pd.DataFrame:
    """Replay every config of ``grid`` on every series of every trajectory file."""
    rows = []
    files = trajectory_files(paths)
    for path in files:
        trajectories = load_trajectories(path)
        for series in tqdm(trajectories.series, desc=f"replay {path.name}", disable=not progress):
            for config in grid:
                base = dict(run=path.stem, series=series.label, block=series.block, module=series.module,
                            output=series.output, **asdict(config))
                rows.extend({**base, **r} for r in replay(series, config, analytic))
    return pd.DataFrame(rows)


CONFIG_KEYS = ["method", "interval", "order", "sigma"]


def summarise(rows: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Mean (and median, max) relative L2 over cached steps, series and runs, per config."""
    keys = CONFIG_KEYS + list(by)
    return (rows.groupby(keys, dropna=False)["rel_l2"].agg(mean="mean", median="median", max="max", count="count")
            .reset_index())


def best_configs(summary: pd.DataFrame) -> pd.DataFrame:
    """Per method and interval, the (order, sigma) of least mean error."""
    index = summary.groupby(["method", "interval"])["mean"].idxmin()
    return summary.loc[index].sort_values(["interval", "mean"]).reset_index(drop=True)


def best_sigma(summary: pd.DataFrame) -> pd.DataFrame:
    """For hicache and hi_taylor, the sigma of least mean error per (interval, order)."""
    part = summary[summary["method"].isin(SIGMA_METHODS)]
    if part.empty:
        return part
    index = part.groupby(["method", "interval", "order"])["mean"].idxmin()
    return part.loc[index, ["method", "interval", "order", "sigma", "mean"]].reset_index(drop=True)


# -- figures -------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_error_vs_sigma(summary: pd.DataFrame, path: Path) -> Path:
    """Per interval: hicache and hi_taylor error against sigma per order; sigma-free methods as lines."""
    plt = _pyplot()
    intervals = sorted(summary["interval"].unique())
    fig, axes = plt.subplots(1, len(intervals), figsize=(4.2 * len(intervals), 3.4), squeeze=False, sharey=False)
    colors = {1: "tab:blue", 2: "tab:orange", 3: "tab:green", 4: "tab:red"}
    for ax, n in zip(axes[0], intervals):
        part = summary[summary["interval"] == n]
        for (method, order), group in part[part["method"].isin(SIGMA_METHODS)].groupby(["method", "order"]):
            group = group.sort_values("sigma")
            ax.plot(group["sigma"], group["mean"], "-o" if method == "hicache" else "--s", ms=3,
                    color=colors.get(order, "k"), label=f"{method} O={order}")
        for (method, order), group in part[~part["method"].isin(SIGMA_METHODS)].groupby(["method", "order"]):
            style = {"fora": "-", "taylorseer": "-.", "hicache_analytic": ":"}[method]
            ax.axhline(float(group["mean"].iloc[0]), linestyle=style, lw=1, alpha=0.7,
                       color="k" if method == "fora" else colors.get(order, "k"),
                       label=method + (f" O={order}" if method != "fora" else ""))
        ax.set_yscale("log")
        ax.set_xlabel("sigma")
        ax.set_title(f"N = {n}", fontsize=9)
    axes[0][0].set_ylabel("mean relative L2 error (cached steps)")
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_error_vs_interval(summary: pd.DataFrame, path: Path) -> Path:
    """Per method, the error of its best (order, sigma) at each interval N."""
    plt = _pyplot()
    best = best_configs(summary)
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for method, group in best.groupby("method"):
        group = group.sort_values("interval")
        ax.plot(group["interval"], group["mean"], "-o", ms=4, label=method)
    ax.set_yscale("log")
    ax.set_xlabel("interval N")
    ax.set_ylabel("mean relative L2 error, best O and sigma")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_error_per_step(rows: pd.DataFrame, summary: pd.DataFrame, interval: int, path: Path) -> Path:
    """At one interval, each method's best config: error at every cached step (mean over series)."""
    plt = _pyplot()
    best = best_configs(summary)
    best = best[best["interval"] == interval]
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    for _, cfg in best.iterrows():
        mask = (rows["method"] == cfg["method"]) & (rows["interval"] == interval) & (rows["order"] == cfg["order"])
        if not np.isnan(cfg["sigma"]):
            mask &= np.isclose(rows["sigma"], cfg["sigma"])
        per_step = rows[mask].groupby("step")["rel_l2"].mean()
        label = f"{cfg['method']} O={cfg['order']}" + ("" if np.isnan(cfg["sigma"]) else f" s={cfg['sigma']:g}")
        ax.plot(per_step.index, per_step.values, ".-", ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("relative L2 error")
    ax.set_title(f"N = {interval}, best config per method", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# -- reports -------------------------------------------------------------------------------------
def write_report(rows: pd.DataFrame, out_dir: Path, sources: list[Path], reference_interval: int | None = None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    figure_dir = out_dir / "figures"
    figure_dir.mkdir(exist_ok=True)
    summary = summarise(rows)
    blocks = summarise(rows, by=["block", "module", "output"])
    rows.to_csv(out_dir / "forecast_error.csv", index=False)
    summary.to_csv(out_dir / "forecast_error_summary.csv", index=False)
    blocks.to_csv(out_dir / "forecast_error_blocks.csv", index=False)
    intervals = sorted(summary["interval"].unique())
    reference_interval = reference_interval if reference_interval in intervals else intervals[-1]
    figures = [
        plot_error_vs_sigma(summary, figure_dir / "error_vs_sigma.png"),
        plot_error_vs_interval(summary, figure_dir / "error_vs_interval.png"),
        plot_error_per_step(rows, summary, reference_interval, figure_dir / f"error_per_step_N{reference_interval}.png"),
    ]
    best = best_configs(summary)
    sigmas = best_sigma(summary)
    block_best = blocks.merge(best[CONFIG_KEYS], on=CONFIG_KEYS)
    block_best = block_best[block_best["interval"] == reference_interval]
    block_table = block_best.pivot_table(index=["block", "module", "output"], columns="method", values="mean").reset_index()
    lines = [
        "# Offline forecast error on recorded full-compute trajectories",
        "",
        f"Runs: {len(sources)}; {rows['series'].nunique()} series; {len(rows)} (series, config, cached step) errors. "
        "Error = relative L2 of the forecast against the recorded feature at each cached step, mean over "
        "cached steps, series and runs. No error feedback (each forecast starts from exact features).",
        "",
        "## Best (order, sigma) per method and interval",
        "",
        best.to_markdown(index=False, floatfmt=".4g"),
        "",
        "## Best sigma for hicache and hi_taylor",
        "",
        sigmas.to_markdown(index=False, floatfmt=".4g") if len(sigmas) else "(no sigma grid)",
        "",
        f"## Per block at N = {reference_interval} (each method at its best config)",
        "",
        block_table.to_markdown(index=False, floatfmt=".4g"),
        "",
    ]
    lines += [f"![{p.stem}](figures/{p.name})" for p in figures]
    (out_dir / "forecast_error.md").write_text("\n".join(lines) + "\n")
    return dict(summary=summary, best=best, best_sigma=sigmas, blocks=blocks, figures=figures)


def run(paths, out_dir: str | Path, methods=METHODS, intervals=DEFAULT_INTERVALS, orders=DEFAULT_ORDERS,
        sigmas=DEFAULT_SIGMAS, warmup: int = 3, reference_interval: int | None = 7, progress: bool = True) -> dict:
    grid = config_grid(methods, intervals, orders, sigmas, warmup)
    rows = replay_runs(paths, grid, progress=progress)
    if rows.empty:
        raise ValueError("no cached step to score: the trajectories are shorter than the warm-up")
    return write_report(rows, Path(out_dir), trajectory_files(paths), reference_interval)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="trajectory .safetensors files or folders of them")
    parser.add_argument("--out", default="outputs/analysis/forecast_error")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--intervals", type=int, nargs="+", default=list(DEFAULT_INTERVALS))
    parser.add_argument("--orders", type=int, nargs="+", default=list(DEFAULT_ORDERS))
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULT_SIGMAS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reference-interval", type=int, default=7, help="interval of the per-block table and per-step plot")
    args = parser.parse_args(argv)
    try:
        result = run(args.runs, args.out, args.methods, args.intervals, args.orders, args.sigmas, args.warmup,
                     args.reference_interval)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(result["best"].to_markdown(index=False, floatfmt=".4g"))
    print()
    print(result["best_sigma"].to_markdown(index=False, floatfmt=".4g"))
    print(f"\nwrote {Path(args.out) / 'forecast_error.md'}")


if __name__ == "__main__":
    main()

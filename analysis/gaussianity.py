"""How Gaussian are the feature differences that HiCache expands in Hermite polynomials?

HiCache's argument is that the divided differences of DiT features are close to (multivariate)
Gaussian, which makes Hermite polynomials the natural basis. This module measures that claim on
recorded trajectories (`hicache.trajectories`), per (run, block, module, output, step, order):

- moments: mean, std, skewness and excess kurtosis of the pooled elements, and the median over
  channels of the per-channel excess kurtosis (pooling channels of different scales alone makes a
  heavy-tailed mixture, so both are reported);
- univariate normality tests on a seeded subsample of elements: D'Agostino-Pearson, Shapiro-Wilk,
  Anderson-Darling (scipy.stats);
- Henze-Zirkler multivariate normality (pingouin) on the token vectors reduced by PCA, and beside it the
  energy test (the paper's multivariate test: energy statistics, here dcor's two-sample energy test of the
  reduced vectors against as many draws from the Gaussian with their mean and covariance, permutation p-value);
- maximum-likelihood fits of Gaussian, Laplace and Student-t: log-likelihood per element and AIC.

The differences are those of the core's own `DifferenceHistory` fed the full trajectory every
``stride`` steps, so they are exactly the quantities a forecast with interval ``stride`` multiplies.

CLI: ``python -m analysis.gaussianity RUNS... --out outputs/analysis/gaussianity`` writes
``gaussianity.csv`` (every row), ``gaussianity_summary.csv`` and ``gaussianity.md`` (per block,
module and order) and figures under ``figures/``.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import pingouin
import torch
from scipy import stats
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from hicache.forecast import DifferenceHistory
from hicache.trajectories import Series, Trajectories, load_trajectories, trajectory_files

ORDERS = (1, 2, 3)
FAMILIES = ("gaussian", "laplace", "student_t")
ALPHA = 0.05


def differences(series: Series, max_order: int = 3, stride: int = 1) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(step, order, D_order)`` for orders 1..max_order, from the core's `DifferenceHistory`
    updated every ``stride`` recorded steps (its differences are divided by the step distance)."""
    history = DifferenceHistory("taylorseer", order=max_order, warmup=1)
    for j in range(0, len(series.steps), stride):
        step = series.steps[j]
        history.update(series.values[j], step)
        factors = history.factors
        for order in range(1, len(factors)):
            yield step, order, factors[order]


def _token_matrix(value: torch.Tensor) -> np.ndarray:
    """(tokens, channels) observations: every leading axis but the channel axis is a sample axis."""
    value = value.double().numpy()
    return value.reshape(-1, value.shape[-1]) if value.ndim >= 2 else value.reshape(-1, 1)


def univariate_stats(x: np.ndarray, sample_size: int, rng: np.random.Generator) -> dict:
    """Moments of all elements, and tests and fits on a seeded subsample of ``sample_size`` elements."""
    flat = x.reshape(-1)
    row = dict(n=flat.size, mean=float(flat.mean()), std=float(flat.std()))
    if not row["std"] > 0:
        return row
    row["skew"] = float(stats.skew(flat))
    row["excess_kurtosis"] = float(stats.kurtosis(flat, fisher=True))
    if x.shape[0] > 3 and x.shape[1] > 1:
        per_channel = stats.kurtosis(x, axis=0, fisher=True)
        row["channel_kurtosis_median"] = float(np.nanmedian(per_channel))
    sample = rng.choice(flat, size=min(sample_size, flat.size), replace=False)
    row["n_test"] = sample.size
    if sample.size >= 20:
        row["dagostino_p"] = float(stats.normaltest(sample).pvalue)
    if sample.size >= 3:
        row["shapiro_p"] = float(stats.shapiro(sample[:5000]).pvalue)
        row["anderson_p"] = float(stats.anderson(sample, dist="norm", method="interpolate").pvalue)
    row.update(likelihood_comparison(sample))
    return row


def likelihood_comparison(sample: np.ndarray) -> dict:
    """Maximum-likelihood Gaussian, Laplace and Student-t fits: mean log-likelihood, AIC, best family."""
    z = (sample - sample.mean()) / sample.std()  # scale-free fits: the t fit is better conditioned
    fits = {
        "gaussian": (stats.norm, stats.norm.fit(z)),
        "laplace": (stats.laplace, stats.laplace.fit(z)),
        "student_t": (stats.t, stats.t.fit(z)),
    }
    out, aic = {}, {}
    for family, (dist, params) in fits.items():
        loglik = float(np.sum(dist.logpdf(z, *params)))
        out[f"loglik_{family}"] = loglik / z.size
        aic[family] = 2 * len(params) - 2 * loglik
    out["t_dof"] = float(fits["student_t"][1][0])
    out["best_fit"] = min(aic, key=aic.get)
    return out


ENERGY_RESAMPLES = 199  # permutations of the energy test: p-values in steps of 1/200


def multivariate_normality(x: np.ndarray, dims: int, seed: int) -> dict:
    """Henze-Zirkler and energy tests on the token vectors projected on their first ``dims`` principal axes."""
    dims = min(dims, x.shape[1], x.shape[0] - 2)
    if dims < 1:
        return {}
    reduced = PCA(n_components=dims, random_state=seed).fit_transform(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = pingouin.multivariate_normality(reduced, alpha=ALPHA)
    return dict(hz_n=x.shape[0], hz_dims=dims, hz_stat=float(result.hz), hz_p=float(result.pval),
                **energy_normality(reduced, seed))


def energy_normality(x: np.ndarray, seed: int, resamples: int = ENERGY_RESAMPLES) -> dict:
    """Energy test of multivariate normality: dcor's two-sample energy test (Szekely-Rizzo energy distance,
    permutation p-value) of the rows of ``x`` against as many draws from the Gaussian with their sample mean and
    covariance. The energy distance is zero only for equal distributions, so it sees any departure (tails,
    skew, several modes); fitting the Gaussian to the data first makes the test conservative."""
    import dcor

    rng = np.random.default_rng(seed)
    reference = rng.multivariate_normal(x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False)), size=len(x))
    result = dcor.homogeneity.energy_test(x, reference, num_resamples=resamples, random_state=seed)
    return dict(energy_stat=float(result.statistic), energy_p=float(result.pvalue))


@threadpool_limits.wrap(limits=1)  # small matrices: BLAS threads only add synchronisation
def analyse_trajectories(
    trajectories: Trajectories,
    orders: Iterable[int] = ORDERS,
    stride: int = 1,
    sample_size: int = 1000,
    pca_dims: int = 5,
    step_every: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """One row of statistics per (series, step, order) of one recorded run."""
    orders = sorted(set(orders))
    rng = np.random.default_rng(seed)
    meta = trajectories.meta
    rows = []
    tasks = [(s, step, order, d) for s in trajectories for step, order, d in differences(s, max(orders), stride)
             if order in orders]
    steps_kept = sorted({t[1] for t in tasks})[::step_every]
    tasks = [t for t in tasks if t[1] in set(steps_kept)]
    for series, step, order, diff in tqdm(tasks, desc=f"gaussianity {trajectories.path.name}", disable=not progress):
        x = _token_matrix(diff)
        row = dict(run=trajectories.path.stem, prompt=meta.get("prompt"), seed=meta.get("seed"), series=series.label,
                   block=series.block, module=series.module, output=series.output, branch=series.branch,
                   step=step, order=order, stride=stride)
        row.update(univariate_stats(x, sample_size, rng))
        if row.get("std", 0) > 0:
            row.update(multivariate_normality(x, pca_dims, seed))
        rows.append(row)
    return pd.DataFrame(rows)


@threadpool_limits.wrap(limits=1)
def pooled_multivariate(files: list[Path], orders: Iterable[int] = ORDERS, stride: int = 1, pca_dims: int = 5,
                        step_every: int = 1, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Henze-Zirkler and the energy test on the token vectors of every run together, per (series, step, order).

    One run of a small model has few tokens (16 image tokens on the 64 px testbed), which leaves the
    per-run test little power to reject; pooling the runs (prompts and seeds) gives it more. Series
    are read one at a time from every file, so memory is one series times the number of runs.
    """
    orders = sorted(set(orders))
    keys = list(load_trajectories(files[0], keys=()).meta["series"])
    rows = []
    for key in tqdm(keys, desc="pooled Henze-Zirkler", disable=not progress):
        pooled: dict[tuple[int, int], list[np.ndarray]] = {}
        info = None
        for path in files:
            trajectories = load_trajectories(path, keys=[key])
            if not trajectories.series:
                continue
            info = trajectories.series[0]
            for step, order, diff in differences(info, max(orders), stride):
                if order in orders:
                    pooled.setdefault((step, order), []).append(_token_matrix(diff))
        steps = sorted({step for step, _ in pooled})[::step_every]
        for (step, order), parts in sorted(pooled.items()):
            if step not in steps:
                continue
            x = np.concatenate(parts)
            if not x.std() > 0:
                continue
            result = multivariate_normality(x, pca_dims, seed)
            rows.append(dict(series=info.label, block=info.block, module=info.module, output=info.output, step=step,
                             order=order, runs=len(parts),
                             **{k.replace("hz_", "hz_pooled_").replace("energy_", "energy_pooled_"): v
                                for k, v in result.items()}))
    return pd.DataFrame(rows)


def summarise(rows: pd.DataFrame, pooled: pd.DataFrame | None = None, alpha: float = ALPHA) -> pd.DataFrame:
    """Per (block, module, output, order): median moments, share of steps where each test does not
    reject normality at ``alpha``, and how often each family fits best (by AIC)."""
    keys = ["block", "module", "output", "order"]
    out = []
    for key, group in rows.groupby(keys, sort=True):
        row = dict(zip(keys, key))
        row["rows"] = len(group)
        for col in ("excess_kurtosis", "channel_kurtosis_median", "skew", "t_dof"):
            if col in group:
                row[f"{col}_median"] = float(group[col].median())
        for test in ("dagostino_p", "shapiro_p", "anderson_p", "hz_p", "energy_p"):
            if test in group and group[test].notna().any():
                row[f"{test.removesuffix('_p')}_pass"] = float((group[test].dropna() > alpha).mean())
        if "best_fit" in group:
            counts = group["best_fit"].value_counts(normalize=True)
            for family in FAMILIES:
                row[f"best_{family}"] = float(counts.get(family, 0.0))
        if pooled is not None and len(pooled):
            match = pooled[(pooled["block"] == row["block"]) & (pooled["module"] == row["module"])
                           & (pooled["output"] == row["output"]) & (pooled["order"] == row["order"])]
            if len(match):
                row["hz_pooled_n"] = int(match["hz_pooled_n"].median())
                row["hz_pooled_pass"] = float((match["hz_pooled_p"] > alpha).mean())
                if "energy_pooled_p" in match:
                    row["energy_pooled_pass"] = float((match["energy_pooled_p"] > alpha).mean())
        out.append(row)
    return pd.DataFrame(out)


# -- figures -------------------------------------------------------------------------------------
def _pick_series(trajectories: Trajectories, max_series: int) -> list[Series]:
    """One series per module kind first (attn, ff, proj_out...), then more blocks, up to max_series."""
    chosen, kinds = [], set()
    for s in trajectories:
        if (s.module, s.output) not in kinds:
            kinds.add((s.module, s.output))
            chosen.append(s)
    rest = [s for s in trajectories if s not in chosen]
    return (chosen + rest)[:max_series]


def plot_histograms_and_qq(trajectories: Trajectories, out_dir: Path, orders=ORDERS, stride: int = 1,
                           step: int | None = None, max_series: int = 4, sample_size: int = 2000, seed: int = 0):
    """Histogram with the fitted Gaussian (log scale shows the tails) and a normal Q-Q plot, per
    series (rows) and order (columns), at one step (default: the middle of the trajectory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    series = _pick_series(trajectories, max_series)
    orders = list(orders)
    paths = []
    for kind in ("hist", "qq"):
        fig, axes = plt.subplots(len(series), len(orders), figsize=(3.2 * len(orders), 2.6 * len(series)), squeeze=False)
        for r, s in enumerate(series):
            diffs = {(st, o): d for st, o, d in differences(s, max(orders), stride)}
            steps = sorted({st for st, o in diffs if o == max(orders)})
            at = step if step is not None and step in steps else steps[len(steps) // 2] if steps else None
            for c, order in enumerate(orders):
                ax = axes[r][c]
                if at is None or (at, order) not in diffs:
                    ax.set_axis_off()
                    continue
                flat = diffs[(at, order)].double().numpy().reshape(-1)
                flat = rng.choice(flat, size=min(sample_size, flat.size), replace=False)
                z = (flat - flat.mean()) / (flat.std() or 1.0)
                if kind == "hist":
                    ax.hist(z, bins=60, density=True, color="tab:blue", alpha=0.6)
                    grid = np.linspace(z.min(), z.max(), 200)
                    ax.plot(grid, stats.norm.pdf(grid), "k-", lw=1.2, label="Gaussian")
                    ax.plot(grid, stats.laplace.pdf(grid, *stats.laplace.fit(z)), "r--", lw=1, label="Laplace")
                    ax.set_yscale("log")
                    ax.set_ylim(bottom=1e-4)
                    ax.text(0.02, 0.95, f"kurt={stats.kurtosis(z):.1f}", transform=ax.transAxes, va="top", fontsize=7)
                else:
                    (osm, osr), (slope, intercept, _) = stats.probplot(z, dist="norm")
                    ax.plot(osm, osr, ".", ms=2)
                    ax.plot(osm, slope * osm + intercept, "k-", lw=1)
                    ax.set_xlabel("normal quantile", fontsize=7)
                ax.set_title(f"{s.label}\nD{order} at step {at}", fontsize=7)
                ax.tick_params(labelsize=6)
        if kind == "hist":
            axes[0][0].legend(fontsize=6)
        fig.tight_layout()
        path = out_dir / f"{kind}_{trajectories.path.stem}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_kurtosis_heatmap(rows: pd.DataFrame, path: Path, column: str = "excess_kurtosis") -> Path:
    """Excess kurtosis per series (rows) and step (columns), one panel per order; 0 is Gaussian."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import SymLogNorm

    orders = sorted(rows["order"].unique())
    table = rows.groupby(["order", "series", "step"])[column].median()
    series = sorted(rows["series"].unique())
    fig, axes = plt.subplots(1, len(orders), figsize=(4.2 * len(orders), 0.3 * len(series) + 1.8), squeeze=False)
    vmax = max(1.0, float(np.nanpercentile(np.abs(rows[column]), 99)))
    for ax, order in zip(axes[0], orders):
        grid = table.loc[order].unstack("step").reindex(series)
        image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="RdBu_r",
                          norm=SymLogNorm(linthresh=1.0, vmin=-vmax, vmax=vmax), interpolation="nearest")
        ax.set_title(f"excess kurtosis of D{order}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        steps = list(grid.columns)
        ticks = range(0, len(steps), max(1, len(steps) // 8))
        ax.set_xticks(list(ticks), [steps[i] for i in ticks], fontsize=6)
        ax.set_yticks(range(len(series)), series if ax is axes[0][0] else [], fontsize=6)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


# -- reports -------------------------------------------------------------------------------------
def write_report(rows: pd.DataFrame, summary: pd.DataFrame, out_dir: Path, sources: list[Path], figures: list[Path]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out_dir / "gaussianity.csv", index=False)
    summary.to_csv(out_dir / "gaussianity_summary.csv", index=False)
    lines = [
        "# Gaussianity of feature differences",
        "",
        f"Runs: {len(sources)} ({', '.join(p.name for p in sources[:6])}{' ...' if len(sources) > 6 else ''}); "
        f"{len(rows)} (series, step, order) rows; difference stride {int(rows['stride'].iloc[0]) if len(rows) else '-'}.",
        "",
        f"`*_pass` = share of steps where the test does NOT reject normality at alpha={ALPHA} "
        "(D'Agostino-Pearson, Shapiro-Wilk, Anderson-Darling on element subsamples; Henze-Zirkler on PCA-reduced "
        "token vectors of one run, `energy` the energy test on the same vectors; `hz_pooled`/`energy_pooled` on the "
        "token vectors of all runs together, n = `hz_pooled_n`). "
        "`best_*` = share of steps where that family has the lowest AIC. Excess kurtosis is 0 for a Gaussian, 3 for "
        "a Laplace; `t_dof_median` is the fitted Student-t degrees of freedom (large = Gaussian-like tails).",
        "",
        summary.to_markdown(index=False, floatfmt=".3g"),
        "",
    ]
    lines += [f"![{p.stem}](figures/{p.name})" for p in figures]
    path = out_dir / "gaussianity.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(paths, out_dir: str | Path, orders=ORDERS, stride: int = 1, sample_size: int = 1000, pca_dims: int = 5,
        step_every: int = 1, seed: int = 0, figures: bool = True, progress: bool = True) -> pd.DataFrame:
    """Analyse every trajectory file in ``paths`` and write the CSV/Markdown report and figures."""
    # Every test here works on small matrices, where multithreaded BLAS only adds synchronisation
    # (a 320x128 SVD: 20 ms on one thread, 1 s on two busy cores).
    with threadpool_limits(limits=1):
        return _run(paths, out_dir, orders, stride, sample_size, pca_dims, step_every, seed, figures, progress)


def _run(paths, out_dir, orders, stride, sample_size, pca_dims, step_every, seed, figures, progress) -> pd.DataFrame:
    out_dir = Path(out_dir)
    figure_dir = out_dir / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    files = trajectory_files(paths)
    frames, figure_paths = [], []
    for i, path in enumerate(files):
        trajectories = load_trajectories(path)
        frames.append(analyse_trajectories(trajectories, orders, stride, sample_size, pca_dims, step_every, seed, progress))
        if figures and i == 0:
            figure_paths += plot_histograms_and_qq(trajectories, figure_dir, orders, stride, seed=seed)
    rows = pd.concat(frames, ignore_index=True)
    pooled = pooled_multivariate(files, orders, stride, pca_dims, step_every, seed, progress) if len(files) > 1 else None
    if pooled is not None:
        pooled.to_csv(out_dir / "gaussianity_pooled_hz.csv", index=False)
    summary = summarise(rows, pooled)
    if figures and len(rows):
        figure_paths.append(plot_kurtosis_heatmap(rows, figure_dir / "kurtosis_heatmap.png"))
    write_report(rows, summary, out_dir, files, figure_paths)
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="trajectory .safetensors files or folders of them")
    parser.add_argument("--out", default="outputs/analysis/gaussianity", help="output folder")
    parser.add_argument("--orders", type=int, nargs="+", default=list(ORDERS))
    parser.add_argument("--stride", type=int, default=1, help="difference over this many steps (the interval N)")
    parser.add_argument("--sample-size", type=int, default=1000, help="elements per univariate test and fit")
    parser.add_argument("--pca-dims", type=int, default=5, help="PCA dimensions of the Henze-Zirkler test")
    parser.add_argument("--step-every", type=int, default=1, help="analyse every k-th step only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args(argv)
    try:
        summary = run(args.runs, args.out, args.orders, args.stride, args.sample_size, args.pca_dims, args.step_every,
                      args.seed, figures=not args.no_figures)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(summary.to_markdown(index=False, floatfmt=".3g"))
    print(f"\nwrote {Path(args.out) / 'gaussianity.md'}")


if __name__ == "__main__":
    main()

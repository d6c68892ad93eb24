"""Sweep plots of a results folder: fidelity against sigma and against N, and against the measured speedup.

    python -m hicache.app.tables outputs/testbed_ablation_sigma --plot

One set of figures per table (the rows `hicache.app.tables` would put in one table), written as PNG
into ``<folder>/plots/``:

- ``<table>_sigma.png``: PSNR and SSIM against sigma, one line per (method, N, O);
- ``<table>_interval.png``: PSNR and SSIM against the interval N, one line per (method, O, sigma);
- ``<table>_speedup.png``: PSNR and SSIM against the measured latency speedup (and the FLOPs speedup),
  one point per run, labelled.

A figure whose axis varies in no row (no sigma sweep, say) is not drawn. Rows whose PSNR is infinite
(the uncached run against itself) are left out of the PSNR panels.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .tables import _sort_key, load_summaries, table_key

METRICS = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"))
SYMBOLS = {"interval": "N", "order": "O", "sigma": "σ"}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _slug(key: tuple) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(str(k) for k in key)).strip("_")


def _lines(rows: list[dict], x: str, series: tuple[str, ...]) -> dict[str, list[tuple[float, dict]]]:
    out: dict[str, list[tuple[float, dict]]] = {}
    for s in rows:
        if not _finite(s.get(x)):
            continue
        name = " ".join([str(s.get("label") or s.get("method"))] +
                        [f"{SYMBOLS[k]}={s[k]:g}" for k in series if _finite(s.get(k))])
        out.setdefault(name, []).append((float(s[x]), s))
    return {name: sorted(points, key=lambda p: p[0]) for name, points in out.items()}


def _figure(rows: list[dict], x: str, xlabel: str, series: tuple[str, ...], title: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = _lines(rows, x, series)
    if len({v for points in lines.values() for v, _ in points}) < 2:
        return None  # nothing swept along this axis
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.6), squeeze=False)
    for ax, (metric, label) in zip(axes[0], METRICS):
        for name, points in lines.items():
            xy = [(v, s[metric]) for v, s in points if _finite(s.get(metric))]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _speedup_figure(rows: list[dict], title: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_spec = [(k, h) for k, h in (("latency_speedup", "measured latency speedup"), ("flops_speedup", "FLOPs speedup"))
                 if any(_finite(s.get(k)) for s in rows)]
    if not axes_spec:
        return None
    fig, axes = plt.subplots(len(METRICS), len(axes_spec), figsize=(5 * len(axes_spec), 3.4 * len(METRICS)),
                             squeeze=False)
    for i, (metric, label) in enumerate(METRICS):
        for j, (x, xlabel) in enumerate(axes_spec):
            ax = axes[i][j]
            for s in rows:
                if _finite(s.get(x)) and _finite(s.get(metric)):
                    ax.scatter(s[x], s[metric], s=18)
                    ax.annotate(str(s.get("run") or s.get("label")), (s[x], s[metric]), fontsize=6,
                                xytext=(3, 2), textcoords="offset points")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(root: str | Path) -> list[Path]:
    """Draw every sweep figure of the results under ``root`` into ``root/plots``; the files written."""
    root = Path(root)
    summaries = load_summaries(root)
    if not summaries:
        raise FileNotFoundError(f"no summary.json under {root}")
    groups: dict[tuple, list[dict]] = {}
    for s in summaries:
        groups.setdefault(table_key(s), []).append(s)
    out_dir = root / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, rows in groups.items():
        rows = sorted(rows, key=_sort_key)
        name, model, width, height, steps, count = key
        title = f"{name}: {model}, {width}x{height}, {steps} steps, {count} prompts"
        slug = _slug(key)
        for figure in (
            _figure(rows, "sigma", "σ (dual-scaling factor)", ("interval", "order"), title, out_dir / f"{slug}_sigma.png"),
            _figure(rows, "interval", "interval N", ("order", "sigma"), title, out_dir / f"{slug}_interval.png"),
            _speedup_figure(rows, title, out_dir / f"{slug}_speedup.png"),
        ):
            if figure is not None:
                written.append(figure)
    return written

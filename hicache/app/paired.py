"""Paired comparison at equal cost: per prompt, which run is closer to the uncached output.

For an experiment folder (``outputs/testbed_lesa``), runs are grouped by their number of full model calls
(``summary.json``'s ``full_steps``: a cache's full steps, or a step-reduction run's steps), and within a group
every run is compared with every other on the same prompts (same index, same seed): a win is a strictly higher
PSNR against the uncached reference. A mean can hide a method that is better on most prompts and much worse
on a few; the counts show it (with the mean difference, its bootstrap interval and a Wilcoxon test: `paired_stats`).

    python -m hicache.app.paired outputs/testbed_lesa [--metric psnr]
"""

from __future__ import annotations

import argparse
import math
from itertools import combinations
from pathlib import Path

from .results import RunDir
from .tables import load_summaries


def paired_stats(a, b, seed: int = 0) -> dict:
    """A against B on the same prompts (higher is better): wins, ties and losses; the mean of A - B with a
    bootstrap 95 % interval (scipy.stats.bootstrap, percentile); the two-sided Wilcoxon signed-rank p-value (ties
    dropped; None under 2 differing pairs). Infinite values (identical images: PSNR inf) count in the wins and ties,
    but not in the mean, interval or test. The one implementation every paired comparison here uses."""
    import numpy as np
    from scipy.stats import bootstrap, wilcoxon

    pairs = list(zip(a, b, strict=True))
    diffs = np.asarray([x - y for x, y in pairs if math.isfinite(x) and math.isfinite(y)], dtype=float)
    mean = low = high = None
    if diffs.size:
        mean = low = high = float(diffs.mean())
        if diffs.size >= 3 and np.ptp(diffs) > 0:
            ci = bootstrap((diffs,), np.mean, n_resamples=2000, method="percentile", random_state=seed).confidence_interval
            low, high = float(ci.low), float(ci.high)
    nonzero = diffs[diffs != 0]
    return {"n": len(pairs), "a_wins": sum(x > y for x, y in pairs), "ties": sum(x == y for x, y in pairs),
            "b_wins": sum(x < y for x, y in pairs), "mean_diff": mean, "ci_low": low, "ci_high": high,
            "wilcoxon_p": float(wilcoxon(nonzero).pvalue) if nonzero.size >= 2 else None}


def _score(record: dict, metric: str) -> float | None:
    value = record.get(metric)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def win_counts(root: str | Path, metric: str = "psnr") -> list[dict]:
    """One row per pair of runs with the same number of full steps: wins of each, ties, prompts compared."""
    groups: dict[int, list[tuple[str, dict[int, dict]]]] = {}
    for summary in load_summaries(root):
        full = summary.get("full_steps")
        if not full or summary.get("method") == "none":
            continue
        records = RunDir(Path(root) / summary["run"], summary.get("fingerprint", "")).records()
        groups.setdefault(len(full), []).append((summary["run"], records))
    rows = []
    for full, runs in sorted(groups.items()):
        for (a, ra), (b, rb) in combinations(sorted(runs), 2):
            pairs = [(_score(ra[i], metric), _score(rb[i], metric)) for i in sorted(set(ra) & set(rb))]
            pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
            stats = paired_stats([x for x, _ in pairs], [y for _, y in pairs])
            rows.append({"full_steps": full, "a": a, "b": b, **stats, "prompts": stats["n"]})
    return rows


def render(root: str | Path, metric: str = "psnr") -> str:
    rows = win_counts(root, metric)
    lines = [f"Paired {metric} wins at equal full-step counts ({root})", "",
             "| Full steps | A | B | A wins | B wins | Ties | Prompts | mean A - B | 95 % CI | Wilcoxon p |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['full_steps']} | {r['a']} | {r['b']} | {r['a_wins']} | {r['b_wins']} | {r['ties']} | {r['prompts']} "
              f"| {_num(r['mean_diff'], '+.3g')} | [{_num(r['ci_low'], '.3g')}, {_num(r['ci_high'], '.3g')}] "
              f"| {_num(r['wilcoxon_p'], '.2g')} |" for r in rows]
    return "\n".join(lines)


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="an experiment's output folder, e.g. outputs/testbed_lesa")
    parser.add_argument("--metric", default="psnr", help="a per-prompt fidelity metric, higher is better (psnr, ssim)")
    args = parser.parse_args(argv)
    print(render(args.root, args.metric))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Named pairs of runs of one experiment, prompt by prompt: who wins, by how much, and how significantly.

    python -m hicache.app.compare_runs outputs/testbed_ablation_clusca clusca_N7_O1_K16_g0.005 hi_clusca_N7_O1_s0.5_K16_g0.005
    python -m hicache.app.compare_runs outputs/testbed_ablation_clusca A B C D --metrics psnr ssim   # pairs A-B and C-D

Means over prompts hide how often a method is better: with the same prompts and seeds in both runs, each
prompt is a pair. For each metric (higher is better) the table gives A's wins, ties and B's wins, the mean
of A - B, and the two-sided Wilcoxon signed-rank p-value (scipy.stats; ties dropped, "n/a" under 2 pairs).
Each run's per-prompt values come from its ``metrics.jsonl``. (`hicache.app.paired` instead counts wins of
every pair of runs with the same number of full steps.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_metrics(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is the run finished?)")
    return {r["index"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if r}


def compare(a: dict[int, dict], b: dict[int, dict], metric: str) -> dict:
    """Wins, ties and losses of A against B on ``metric`` over the prompts both runs have (`paired.paired_stats`)."""
    from .paired import paired_stats

    common = sorted(set(a) & set(b))
    pairs = [(a[i][metric], b[i][metric]) for i in common
             if isinstance(a[i].get(metric), (int, float)) and isinstance(b[i].get(metric), (int, float))]
    return {"metric": metric, **paired_stats([x for x, _ in pairs], [y for _, y in pairs])}


def render(root: Path, pairs: list[tuple[str, str]], metrics: list[str]) -> str:
    lines = ["| A | B | metric | prompts | A wins | ties | B wins | mean A - B | Wilcoxon p |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name_a, name_b in pairs:
        a, b = load_metrics(root / name_a), load_metrics(root / name_b)
        for metric in metrics:
            r = compare(a, b, metric)
            mean = "-" if r["mean_diff"] is None else f"{r['mean_diff']:+.4g}"
            p = "n/a" if r["wilcoxon_p"] is None else f"{r['wilcoxon_p']:.2g}"
            lines.append(f"| {name_a} | {name_b} | {metric} | {r['n']} | {r['a_wins']} | {r['ties']} | {r['b_wins']} "
                         f"| {mean} | {p} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hicache.app.compare_runs", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help="an experiment's outputs folder, e.g. outputs/testbed_ablation_clusca")
    parser.add_argument("runs", nargs="+", help="run names in pairs: A B [C D ...]")
    parser.add_argument("--metrics", nargs="+", default=["psnr", "ssim"], help="per-prompt metrics, higher is better")
    args = parser.parse_args(argv)
    if len(args.runs) % 2:
        parser.error("runs come in pairs: A B [C D ...]")
    try:
        print(render(Path(args.experiment), list(zip(args.runs[::2], args.runs[1::2])), args.metrics))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

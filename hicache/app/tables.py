"""Render the results of an outputs folder as Markdown tables, one per experiment.

    python -m hicache.app.tables outputs/                # every experiment under outputs/
    python -m hicache.app.tables outputs/testbed_table   # one experiment
    python -m hicache.app.tables outputs/testbed_ablation_sigma --plot   # and the sweep plots (hicache.app.plots)

Each row is one run's ``summary.json``. Rows share a table only if they share the experiment, the
model, the size, the reference steps and the number of prompts (a 4-prompt smoke sweep never sits
under the footer of the 64-prompt run). Where the paper published a number for the same model and
setting (``hicache/app/paper_numbers.yaml``, with its source), it is shown beside ours as
"ours / paper"; a setting the paper does not report shows ours alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

PAPER_NUMBERS = Path(__file__).parent / "paper_numbers.yaml"

# (header, summary key, format)
COLUMNS = (
    ("FLOPs speedup", "flops_speedup", "{:.2f}x"),
    ("Latency speedup", "latency_speedup", "{:.2f}x"),
    ("ImageReward", "image_reward", "{:.4f}"),
    ("CLIP", "clip", "{:.2f}"),
    ("PSNR", "psnr", "{:.2f}"),
    ("PSNR uint8 (wraps)", "psnr_uint8", "{:.2f}"),  # LESA's evaluation (metrics.psnr_uint8): read beside papers only
    ("SSIM", "ssim", "{:.4f}"),
    ("LPIPS", "lpips", "{:.4f}"),
    ("Checker acc.", "checker", "{:.3f}"),
    ("VBench dims", "vbench", "{:.2f}"),        # our per-video VBench dimensions, mean (hicache.app.video)
    ("VBench total", "vbench_total", "{:.2f}"),  # VBench's suite-level total score (the paper's video table)
)
METHOD_ORDER = ("none", "step_reduction", "fora", "taylorseer", "hi_taylor", "hicache", "hicache_analytic", "clusca",
                "hi_clusca")


def load_summaries(root: str | Path) -> list[dict[str, Any]]:
    root = Path(root)
    paths = [root / "summary.json"] if (root / "summary.json").is_file() else sorted(root.rglob("summary.json"))
    return [json.loads(p.read_text(encoding="utf-8")) for p in paths]


def load_paper_numbers(path: str | Path = PAPER_NUMBERS) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    return list((yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get("rows", []))


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)


def paper_row(summary: dict, paper: list[dict]) -> dict | None:
    """The paper's row for this run's model, method, steps and (N, O, sigma), if it published one."""
    for row in paper:
        if row.get("model") != summary.get("model") or row.get("method") != summary.get("method"):
            continue
        if int(row.get("steps", summary.get("steps"))) != int(summary.get("steps") or 0):
            continue
        if all(_same(row.get(k), summary.get(k)) for k in ("interval", "order", "sigma")):
            return row
    return None


def fmt(value, pattern: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return pattern.format(value)


def _sort_key(s: dict):
    method = s.get("method", "")
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, method, s.get("interval") or 0, s.get("order") or 0, s.get("sigma") or 0, s.get("clusters") or 0,
            s.get("propagation") or 0, s.get("run", ""))


def render_experiment(summaries: list[dict], paper: list[dict]) -> str:
    summaries = sorted(summaries, key=_sort_key)
    used = [c for c in COLUMNS if any(isinstance(s.get(c[1]), (int, float, str))
                                      or (paper_row(s, paper) or {}).get(c[1]) is not None for s in summaries)]
    token_wise = any(s.get("clusters") is not None for s in summaries)  # ClusCa rows: K and gamma columns
    header = ["Method", "Steps", "N", "O", "σ", *(["K", "γ"] if token_wise else []), "Images", *[c[0] for c in used]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    sources = set()
    for s in summaries:
        ref = paper_row(s, paper)
        cells = [s.get("label") or s.get("method", "?"), fmt(s.get("steps"), "{}"), fmt(s.get("interval"), "{}"),
                 fmt(s.get("order"), "{}"), fmt(s.get("sigma"), "{:g}"),
                 *([fmt(s.get("clusters"), "{}"), fmt(s.get("propagation"), "{:g}")] if token_wise else []),
                 fmt(s.get("num_outputs"), "{}")]
        for _, key, pattern in used:
            cell = fmt(s.get(key), pattern)
            if ref is not None and ref.get(key) is not None:
                cell += f" / {fmt(ref[key], pattern)}"
                sources.add(ref["source"])
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    first = summaries[0]
    notes = [f"Model {first.get('model')}, {first.get('width')}x{first.get('height')}, "
             f"{first.get('reference_steps')} reference steps, {first.get('num_outputs')} prompts, device {first.get('device')}. "
             f"Speedups and fidelity (PSNR, SSIM, LPIPS) are against the uncached {first.get('reference_steps')}-step outputs."]
    if any(s.get("latency_speedup") is not None for s in summaries):
        notes.append(latency_note(summaries))
    ref_quality = [(h, s_key) for h, s_key, _ in used if f"reference_{s_key}" in first]
    if ref_quality:
        notes.append("Uncached reference: " + ", ".join(
            f"{h} {fmt(first[f'reference_{k}'], '{:.4f}')}" for h, k in ref_quality) + ".")
    if sources:
        notes.append("Cells \"a / b\": ours / the paper's published number (" + "; ".join(sorted(sources)) + ").")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


def latency_note(summaries: list[dict]) -> str:
    pairs = sorted({s.get("latency_pairs") for s in summaries if s.get("latency_speedup") is not None},
                   key=lambda k: (k is None, k or 0))
    if None in pairs:
        return ("Latency speedup: some rows divide by stored reference timings of another run (an older version of "
                "the app); re-run them for same-process timings.")
    counts = " or ".join(str(k) for k in pairs)
    return (f"Latency speedup: the uncached and the cached pipeline timed in the same process, in turn, on {counts} "
            f"of the run's prompts after a warm-up (the uncached row is one timing, so 1.00x); the stored references "
            f"are reused for quality only.")


def table_key(s: dict) -> tuple:
    """Rows that may share one table (and its footer)."""
    return (s.get("experiment", "?"), str(s.get("model")), s.get("width"), s.get("height"),
            s.get("reference_steps"), s.get("num_outputs"))


def render(root: str | Path, paper_numbers: str | Path = PAPER_NUMBERS) -> str:
    summaries = load_summaries(root)
    if not summaries:
        raise FileNotFoundError(f"no summary.json under {root}")
    paper = load_paper_numbers(paper_numbers)
    groups: dict[tuple, list[dict]] = {}
    for s in summaries:
        groups.setdefault(table_key(s), []).append(s)
    per_experiment: dict[str, int] = {}
    for key in groups:
        per_experiment[key[0]] = per_experiment.get(key[0], 0) + 1
    parts = []
    for key, rows in sorted(groups.items(), key=lambda item: tuple(str(k) for k in item[0])):
        name, model, width, height, steps, count = key
        title = name if per_experiment[name] == 1 else f"{name} ({model}, {width}x{height}, {steps} steps, {count} prompts)"
        parts.append(f"## {title}\n\n{render_experiment(rows, paper)}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hicache.app.tables", description=__doc__.splitlines()[0])
    parser.add_argument("outputs", help="an outputs folder (all experiments) or one experiment's folder")
    parser.add_argument("--paper", default=str(PAPER_NUMBERS), help="the paper numbers YAML")
    parser.add_argument("--plot", action="store_true",
                        help="also draw PSNR/SSIM against sigma, N and the measured speedup into <outputs>/plots/")
    args = parser.parse_args(argv)
    try:
        print(render(args.outputs, args.paper))
        if args.plot:
            from .plots import plot

            for path in plot(args.outputs):
                print(f"plot: {path}", file=sys.stderr)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

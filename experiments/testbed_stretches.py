"""Which cached stretch of a schedule costs a forecast its PSNR: each stretch cached alone, the rest full.

At N=16 (50 steps, warm-up 3) the full steps are 0, 1, 2, 18, 34 and the cached stretches 3-17, 19-33,
35-49. Caching one stretch and computing every other step in full isolates that stretch's damage to the
final image (PSNR against the uncached output, the same noise throughout); the first stretch is forecast
from three full steps one step apart, the later ones from full steps N apart. Prints a Markdown table.

    python experiments/testbed_stretches.py --testbed /path/to/pipeline --interval 16 --prompts 8
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

METHODS = (("TaylorSeer O=2", dict(method="taylorseer", order=2)),
           ("HiCache O=2 s=0.5", dict(method="hicache", order=2, sigma=0.5)),
           ("FORA", dict(method="fora")))


def _regime():
    spec = importlib.util.spec_from_file_location("testbed_regime", Path(__file__).with_name("testbed_regime.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def stretches(interval: int, steps: int, warmup: int = 3) -> tuple[list[int], list[range]]:
    """The full steps of the library's interval rule and the cached stretches between them."""
    import hicache

    full = hicache.CacheConfig(method="fora", interval=interval, warmup=warmup).schedule.full_steps_for(steps)
    bounds = list(full) + [steps]
    return full, [range(a + 1, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a + 1]


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", default=None, help="FluxPipeline folder (default: the shipped testbed)")
    parser.add_argument("--interval", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--mu", type=float, default=None, help="schedule shift exponent, as testbed_regime.py --mu")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    regime = _regime()
    import hicache
    from hicache.testbeds.flux_shapes import PIPELINE_CALL_KWARGS, TESTBED_DIR, heldout_captions, load_pipeline
    from hicache.testbeds.flux_shapes.dataset import variation_of

    pipe = load_pipeline(args.testbed) if args.testbed else load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    if args.mu is not None:
        try:
            pipe.scheduler = regime.with_shift(pipe.scheduler, args.mu)
        except ValueError as err:
            parser.error(str(err))
    kwargs = dict(PIPELINE_CALL_KWARGS)
    if args.resolution is not None:
        kwargs.update(height=args.resolution, width=args.resolution)
    captions = heldout_captions(args.prompts, seed=args.seed, variation=variation_of(args.testbed or TESTBED_DIR))
    reference = regime.sample(pipe, captions, args.steps, args.seed, args.prompts, kwargs)
    full, gaps = stretches(args.interval, args.steps)
    plans = [("whole schedule", full)] + [
        (f"only {g.start}-{g.stop - 1} cached", [s for s in range(args.steps) if s not in g]) for g in gaps
    ]

    def score(images) -> float:
        return float(np.mean(regime.fidelity(images, reference)["psnr"]))

    lines = [f"N={args.interval}, {args.steps} steps, full steps {full}, {args.prompts} captions; PSNR (dB) vs the uncached output", "",
             "| method | " + " | ".join(name for name, _ in plans) + " |", "|---|" + "---|" * len(plans)]
    for label, cache in METHODS:
        cells = []
        for _, plan in plans:
            hicache.apply_cache(pipe.transformer, hicache.CacheConfig(full_steps=plan, num_inference_steps=args.steps, **cache), recipe="flux")
            try:
                cells.append(score(regime.sample(pipe, captions, args.steps, args.seed, args.prompts, kwargs)))
            finally:
                hicache.remove_cache(pipe.transformer)
        lines.append(f"| {label} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    sampler = score(regime.sample(pipe, captions, len(full), args.seed, args.prompts, kwargs))
    lines += ["", f"The equal-cost {len(full)}-step sampler: {sampler:.2f} dB."]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()

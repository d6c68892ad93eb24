"""Measure the regime of a FLUX testbed: how hard caching is on it, and how curved its flows are.

Issue 16 asks whether a testbed's dynamics resemble a real model's. On its held-out captions, from
the same starting noise for every method, this script generates the uncached `--steps`-step image
(the reference) and, at each interval N, the images of

- step reduction: the k full steps of the cache schedule (warm-up 3) run as a plain k-step sampler,
  i.e. the few-step sampler of equal cost;
- FORA, TaylorSeer O=1 and O=2, HiCache O=2 at several sigmas (all warm-up 3),

and reports PSNR/SSIM of each against the reference (scikit-image, as the app's metrics), paired
per-prompt win counts with a bootstrap 95 % interval of the mean paired PSNR difference, and the
straightness of the reference trajectories: PSNR of the k-step sampler for k = 5, 9, 13, the mean
cosine between successive velocities (read off the latents the pipeline's step callback sees), and
the chord / path-length ratio of the latent path (1 = a straight line). It checks the issue's
conditions (a) and (b), prints the checker accuracy of the reference for (c), and writes
`regime.md`, `regime.json` and `regime.png` into `outputs/testbed_regime/<name>/`. Asserts nothing.

    python experiments/testbed_regime.py                          # the shipped testbed, 16 captions
    python experiments/testbed_regime.py --quick                  # pilot: 8 captions, N in {7, 16}
    python experiments/testbed_regime.py --testbed /path/to/pipeline --prompts 32 --name mine
    python experiments/testbed_regime.py --mu 1.15                # sampled at FLUX.1-dev's 1024 px shift
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import hicache
from hicache.app.metrics.fidelity import psnr, ssim
from hicache.testbeds.flux_shapes.build import with_shift  # noqa: F401  (also testbed_stretches.py and the tests use it from here)

INTERVALS = (5, 7, 9, 13, 16)
SIGMAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
QUICK_INTERVALS = (7, 16)
QUICK_SIGMAS = (0.3, 0.5, 0.8)
STRAIGHTNESS_STEPS = (5, 9, 13)
WARMUP = 3
PSNR_CAP = 100.0  # identical images have infinite PSNR; capped so means stay finite
GAP_DB = 3.0  # condition (a): the better cache beats the equal-cost sampler by this much at N = 7 and 16
TS_RANGE_DB = (24.0, 38.0)  # condition (b): TaylorSeer O=2 at N = 7


@dataclass(frozen=True)
class Method:
    """One way to spend the budget of interval N: a cache config, or (cache=None) the k-step sampler."""

    name: str
    interval: int
    cache: dict | None = None


def methods_for(interval: int, sigmas) -> list[Method]:
    common = dict(interval=interval, warmup=WARMUP)
    return [
        Method("steps", interval),
        Method("FORA", interval, dict(method="fora", **common)),
        Method("TaylorSeer O=1", interval, dict(method="taylorseer", order=1, **common)),
        Method("TaylorSeer O=2", interval, dict(method="taylorseer", order=2, **common)),
        *(Method(f"HiCache O=2 s={s:g}", interval, dict(method="hicache", order=2, sigma=s, **common)) for s in sigmas),
    ]


def full_step_count(interval: int, steps: int) -> int:
    """k, the number of full steps the cache schedule runs (what the equal-cost sampler gets)."""
    config = hicache.CacheConfig(method="fora", interval=interval, warmup=WARMUP)
    return len(config.schedule.full_steps_for(steps))


@dataclass
class Trace:
    """Latents of the reference runs, to measure how curved the sampling path is."""

    start: list[torch.Tensor] = field(default_factory=list)
    after: list[torch.Tensor] = field(default_factory=list)

    def pre_hook(self, module, args, kwargs):
        if not self.start:
            self.start.append(kwargs["hidden_states"].detach().clone())

    def callback(self, pipe, step, timestep, callback_kwargs):
        self.after.append(callback_kwargs["latents"].detach().clone())
        return {}

    def straightness(self) -> tuple[np.ndarray, np.ndarray]:
        """(cosine of successive velocities per step and sample, chord/path ratio per sample)."""
        path = torch.stack([self.start[0], *self.after]).flatten(2)  # (steps + 1, B, D)
        deltas = path[1:] - path[:-1]  # each step's Euler move, a negative multiple of its velocity
        cosines = torch.nn.functional.cosine_similarity(deltas[1:], deltas[:-1], dim=-1)  # (steps - 1, B)
        chord = (path[-1] - path[0]).norm(dim=-1)
        ratio = chord / deltas.norm(dim=-1).sum(0)
        return cosines.numpy(), ratio.numpy()


def sample(pipe, captions, steps, seed, batch, call_kwargs, traces: list[Trace] | None = None):
    """Images for `captions`; batch b starts from the noise of generator seed + b for every method.

    With `traces`, one `Trace` per batch is appended to it."""
    images = []
    for b, lo in enumerate(range(0, len(captions), batch)):
        prompts = captions[lo : lo + batch]
        kwargs = dict(call_kwargs)
        if kwargs.get("true_cfg_scale", 1.0) > 1:
            kwargs["negative_prompt"] = [""] * len(prompts)  # FluxPipeline's true CFG needs a negative prompt
        hook = None
        if traces is not None:
            part = Trace()
            hook = pipe.transformer.register_forward_pre_hook(part.pre_hook, with_kwargs=True)
            kwargs["callback_on_step_end"] = part.callback
        try:
            out = pipe(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed + b), **kwargs)
        finally:
            if hook is not None:
                hook.remove()
        if traces is not None:
            traces.append(part)
        images.extend(out.images)
    return images


def fidelity(images, references) -> dict[str, list[float]]:
    return {
        "psnr": [min(PSNR_CAP, psnr(im, ref)) for im, ref in zip(images, references)],
        "ssim": [ssim(im, ref) for im, ref in zip(images, references)],
    }


def paired(a, b, seed: int = 0) -> dict:
    """Per-prompt wins of a over b and a bootstrap 95 % interval of the mean of a - b (dB): `paired_stats`."""
    from hicache.app.paired import paired_stats

    return paired_stats([float(x) for x in a], [float(y) for y in b], seed)


def effective_mu(pipe, height: int, width: int) -> float | None:
    """The shift exponent FluxPipeline will sample this size at (None: a scheduler with a fixed shift)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = pipe.scheduler.config
    if not config.get("use_dynamic_shifting"):
        return None
    patch = pipe.vae_scale_factor * 2  # latent pixels per token side: the VAE's factor times FLUX's 2x2 packing
    tokens = (height // patch) * (width // patch)
    return float(calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.15)))


def _mu_text(result: dict) -> str:
    mu, asked = result.get("mu"), result["args"].get("mu")
    if asked is not None:
        return f"{asked} (--mu)"
    return "fixed by the scheduler's shift" if mu is None else f"{mu:.3g} (the scheduler's own)"


def checker_accuracy(images, captions) -> float | None:
    """The shapes checker's attribute accuracy, or None when the captions are not in its grammar."""
    from hicache.testbeds.flux_shapes import accuracy, check

    try:
        return accuracy([check(im, cap) for im, cap in zip(images, captions)])
    except ValueError:
        return None


def measure(pipe, captions, args, call_kwargs, stated_captions=None) -> dict:
    """`stated_captions`: fully stated held-out captions for (c) when `captions` leave attributes unsaid."""
    steps, seed, batch = args.steps, args.seed, args.batch
    intervals = [int(n) for n in args.intervals]
    sigmas = [float(s) for s in args.sigmas]
    t0 = time.perf_counter()

    traces: list[Trace] = []
    reference = sample(pipe, captions, steps, seed, batch, call_kwargs, traces=traces)
    cos_parts, ratio_parts = zip(*(part.straightness() for part in traces))
    cosines, ratios = np.concatenate(cos_parts, axis=1), np.concatenate(ratio_parts)
    ref_seconds = (time.perf_counter() - t0) / len(captions)

    few = {}
    for k in sorted(set(args.straightness_steps) | {full_step_count(n, steps) for n in intervals}):
        images = sample(pipe, captions, k, seed, batch, call_kwargs)
        few[k] = {**fidelity(images, reference), "checker": checker_accuracy(images, captions)}

    rows = []
    for n in tqdm(intervals, desc="intervals"):
        for method in methods_for(n, sigmas):
            k = full_step_count(n, steps)
            if method.cache is None:
                scores = few[k]
            else:
                hicache.apply_cache(pipe.transformer, hicache.CacheConfig(**method.cache), recipe="flux")
                try:
                    images = sample(pipe, captions, steps, seed, batch, call_kwargs)
                finally:
                    hicache.remove_cache(pipe.transformer)
                scores = {**fidelity(images, reference), "checker": checker_accuracy(images, captions)}
            rows.append({"method": method.name, "interval": n, "full_steps": k, "cache": method.cache, **scores})

    def row(name, n):
        return next(r for r in rows if r["method"] == name and r["interval"] == n)

    comparisons = []
    mid_sigma = min(sigmas, key=lambda s: abs(s - 0.5))
    hc = f"HiCache O=2 s={mid_sigma:g}"
    for n in intervals:
        ts, hi, st = row("TaylorSeer O=2", n)["psnr"], row(hc, n)["psnr"], row("steps", n)["psnr"]
        best = np.maximum(ts, hi).tolist()
        for a_name, a, b_name, b in (
            (hc, hi, "TaylorSeer O=2", ts),
            ("TaylorSeer O=2", ts, "steps", st),
            (hc, hi, "steps", st),
            ("max(TaylorSeer O=2, HiCache)", best, "steps", st),
        ):
            comparisons.append({"interval": n, "a": a_name, "b": b_name, **paired(a, b, seed)})

    conditions = {}
    for n in (7, 16):
        if n in intervals:
            gap = max(np.mean(row("TaylorSeer O=2", n)["psnr"]), np.mean(row(hc, n)["psnr"])) - np.mean(row("steps", n)["psnr"])
            conditions[f"a_gap_N{n}_dB"] = float(gap)
            conditions[f"a_N{n}_holds"] = bool(gap >= GAP_DB)
    if 7 in intervals:
        ts7 = float(np.mean(row("TaylorSeer O=2", 7)["psnr"]))
        conditions["b_taylorseer_N7_dB"] = ts7
        conditions["b_holds"] = bool(TS_RANGE_DB[0] <= ts7 <= TS_RANGE_DB[1])
    conditions["c_checker_accuracy_reference"] = checker_accuracy(reference, captions)
    if stated_captions is not None and list(stated_captions) != list(captions):
        # (c) compares testbeds: score every testbed on the same fully stated captions
        stated = sample(pipe, stated_captions, steps, seed, batch, call_kwargs)
        conditions["c_checker_accuracy_stated"] = checker_accuracy(stated, stated_captions)
    else:
        conditions["c_checker_accuracy_stated"] = conditions["c_checker_accuracy_reference"]

    return {
        "steps": steps,
        "prompts": len(captions),
        "captions": list(captions),
        "call_kwargs": {k: v for k, v in call_kwargs.items() if k != "callback_on_step_end"},
        "reference_seconds_per_image": ref_seconds,
        "straightness": {
            "few_step_psnr": {str(k): float(np.mean(few[k]["psnr"])) for k in args.straightness_steps},
            "few_step_ssim": {str(k): float(np.mean(few[k]["ssim"])) for k in args.straightness_steps},
            "velocity_cosine_mean": float(cosines.mean()),
            "velocity_cosine_per_step": cosines.mean(axis=1).tolist(),
            "chord_over_path": float(ratios.mean()),
        },
        "rows": rows,
        "comparisons": comparisons,
        "conditions": conditions,
        "minutes": (time.perf_counter() - t0) / 60,
    }


def _fmt(v, p=2):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"


def markdown(result: dict, title: str) -> str:
    intervals = sorted({r["interval"] for r in result["rows"]})
    names = list(dict.fromkeys(r["method"] for r in result["rows"]))
    by = {(r["method"], r["interval"]): r for r in result["rows"]}
    ks = {n: by[("steps", n)]["full_steps"] for n in intervals}
    head = "| method | " + " | ".join(f"N={n} ({ks[n]} full)" for n in intervals) + " |"
    rule = "|---|" + "---|" * len(intervals)
    lines = [f"# Regime: {title}", "",
             f"{result['prompts']} held-out captions, {result['steps']} steps, call {result['call_kwargs']}, "
             f"schedule shift exponent {_mu_text(result)}, "
             f"{result['reference_seconds_per_image']:.3f} s per reference image, {result['minutes']:.1f} min in all.", "",
             "## PSNR vs the uncached output (dB, mean over prompts)", "", head, rule]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_fmt(float(np.mean(by[(name, n)]["psnr"]))) for n in intervals) + " |")
    lines += ["", "## SSIM vs the uncached output", "", head, rule]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_fmt(float(np.mean(by[(name, n)]["ssim"])), 4) for n in intervals) + " |")
    s = result["straightness"]
    lines += ["", "## Trajectory straightness", "",
              "| k-step sampler vs reference | " + " | ".join(f"k={k}" for k in s["few_step_psnr"]) + " |",
              "|---|" + "---|" * len(s["few_step_psnr"]),
              "| PSNR (dB) | " + " | ".join(_fmt(v) for v in s["few_step_psnr"].values()) + " |",
              "| SSIM | " + " | ".join(_fmt(v, 4) for v in s["few_step_ssim"].values()) + " |", "",
              f"Mean cosine between successive velocities: {s['velocity_cosine_mean']:.4f}; "
              f"chord / path length of the latent path: {s['chord_over_path']:.4f} (1 = straight).", "",
              "## Paired per-prompt comparisons (PSNR, a - b)", "",
              "| N | a | b | a wins | mean a - b (dB) | bootstrap 95 % CI |", "|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        lines.append(f"| {c['interval']} | {c['a']} | {c['b']} | {c['a_wins']}/{c['n']} | {_fmt(c['mean_diff'])} | "
                     f"[{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}] |")
    c = result["conditions"]
    lines += ["", "## Issue 16 conditions", ""]
    for n in (7, 16):
        if f"a_gap_N{n}_dB" in c:
            lines.append(f"- (a) N={n}: best of TaylorSeer O=2 / HiCache O=2 minus the equal-cost sampler = "
                         f"{c[f'a_gap_N{n}_dB']:.2f} dB (needs >= {GAP_DB:g}): {'holds' if c[f'a_N{n}_holds'] else 'fails'}")
    if "b_taylorseer_N7_dB" in c:
        lines.append(f"- (b) TaylorSeer O=2 at N=7: {c['b_taylorseer_N7_dB']:.2f} dB (needs {TS_RANGE_DB[0]:g}-"
                     f"{TS_RANGE_DB[1]:g}): {'holds' if c['b_holds'] else 'fails'}")
    acc = c["c_checker_accuracy_reference"]
    lines.append(f"- (c) checker accuracy of the reference images: {'-' if acc is None else f'{100 * acc:.1f} %'}")
    stated = c.get("c_checker_accuracy_stated")
    if stated is not None and stated != acc:
        lines.append(f"- (c) on as many fully stated held-out captions (comparable across testbeds): {100 * stated:.1f} %")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(dict.fromkeys(r["method"] for r in result["rows"]))
    for name in names:
        rows = sorted((r for r in result["rows"] if r["method"] == name), key=lambda r: r["interval"])
        style = dict(lw=2.5, color="black", ls="--") if name == "steps" else {}
        left.plot([r["interval"] for r in rows], [np.mean(r["psnr"]) for r in rows], marker="o", label=name, **style)
    left.set_xlabel("interval N (steps: the equal-cost k-step sampler)")
    left.set_ylabel("PSNR vs uncached (dB)")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    cos = result["straightness"]["velocity_cosine_per_step"]
    right.plot(range(1, len(cos) + 1), cos, marker=".")
    right.set_xlabel("step")
    right.set_ylabel("cosine(v_step, v_step-1)")
    right.set_title(f"mean {result['straightness']['velocity_cosine_mean']:.4f}")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", default=None, help="FluxPipeline folder (default: the shipped testbed)")
    parser.add_argument("--prompts", type=int, default=None, help="held-out captions (default 16, quick 8)")
    parser.add_argument("--quick", action="store_true", help="pilot mode: N in {7, 16}, sigmas 0.3/0.5/0.8, 8 captions")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--intervals", type=int, nargs="+", default=None)
    parser.add_argument("--sigmas", type=float, nargs="+", default=None)
    parser.add_argument("--straightness-steps", type=int, nargs="+", default=list(STRAIGHTNESS_STEPS))
    parser.add_argument("--true-cfg", type=float, default=None,
                        help="true classifier-free guidance scale (default: the testbed's PIPELINE_CALL_KWARGS)")
    parser.add_argument("--resolution", type=int, default=None, help="image size (default: the testbed's)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance scale of a guidance-distilled testbed (FLUX.1-dev: 3.5); refused without a guidance embedding")
    parser.add_argument("--mu", type=float, default=None,
                        help="the schedule's shift exponent at any size (FLUX.1-dev at 1024 px: 1.15, shift e^1.15 = 3.16); "
                             "default: the testbed scheduler's own (the shipped one: 1.15; FLUX's size rule gives 64 tokens 0.47)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16, help="captions per pipeline call")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default=None, help="output folder name under --out")
    parser.add_argument("--out", default="outputs/testbed_regime")
    args = parser.parse_args(argv)
    args.intervals = args.intervals or list(QUICK_INTERVALS if args.quick else INTERVALS)
    args.sigmas = args.sigmas or list(QUICK_SIGMAS if args.quick else SIGMAS)
    args.prompts = args.prompts or (8 if args.quick else 16)
    if args.steps < 2 or any(n < 1 for n in args.intervals) or args.prompts < 1:
        parser.error("--steps must be >= 2, --intervals >= 1 and --prompts >= 1")
    torch.set_num_threads(args.threads)

    from hicache.testbeds.flux_shapes import PIPELINE_CALL_KWARGS, TESTBED_DIR, heldout_captions, load_pipeline
    from hicache.testbeds.flux_shapes.dataset import DEFAULT_VARIATION, variation_of

    pipe = load_pipeline(args.testbed) if args.testbed else load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    if args.mu is not None:
        try:
            pipe.scheduler = with_shift(pipe.scheduler, args.mu)
        except ValueError as err:
            parser.error(str(err))
    call_kwargs = dict(PIPELINE_CALL_KWARGS)
    if args.true_cfg is not None:
        call_kwargs["true_cfg_scale"] = args.true_cfg
    if args.resolution is not None:
        call_kwargs.update(height=args.resolution, width=args.resolution)
    if args.guidance is not None:
        if not pipe.transformer.config.get("guidance_embeds"):  # FluxPipeline would ignore the scale without a word
            parser.error("--guidance needs a guidance-distilled transformer (guidance_embeds); this one has none: "
                         "use --true-cfg for classifier-free guidance")
        call_kwargs["guidance_scale"] = args.guidance
    variation = variation_of(args.testbed or TESTBED_DIR)  # the caption distribution it was trained on
    captions = heldout_captions(args.prompts, seed=args.seed, variation=variation)
    stated = heldout_captions(args.prompts, seed=args.seed, variation=DEFAULT_VARIATION)

    result = measure(pipe, captions, args, call_kwargs, stated_captions=stated)
    result["testbed"] = str(args.testbed or "shipped")
    result["mu"] = effective_mu(pipe, call_kwargs["height"], call_kwargs["width"])
    result["args"] = {k: v for k, v in vars(args).items()}
    name = args.name or datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result, f"{result['testbed']}{' (quick)' if args.quick else ''}")
    (out / "regime.md").write_text(text)
    (out / "regime.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "regime.png")
    print(text)
    print(f"wrote {out}/regime.md, regime.json, regime.png")
    return out


if __name__ == "__main__":
    main()

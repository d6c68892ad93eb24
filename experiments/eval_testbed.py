"""Caching on the shipped testbed: checker accuracy, fidelity to full compute, and speed.

On the held-out captions, generates with full compute (50 steps) and with FORA N=7, TaylorSeer
N=7 O=2 and HiCache N=7 O=2 sigma=0.5 (warm-up 3 for all), all from the same seeds, and prints a
Markdown table: checker attribute accuracy, PSNR/SSIM of each cached image against the full-compute
image of the same caption and seed, wall-clock and process-CPU seconds per image, and speedups over
full compute. Prints the VAE reconstruction PSNR of held-out dataset images too. Asserts nothing.

    python experiments/eval_testbed.py                   # 64 held-out captions
    python experiments/eval_testbed.py --captions 8      # quick look
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from tqdm import tqdm

import hicache
from hicache.app.metrics.fidelity import psnr, ssim
from hicache.testbed import PIPELINE_CALL_KWARGS, ShapesDataset, accuracy, check, heldout_captions, load_pipeline
from hicache.testbed.train import reconstruction_psnr

METHODS = {
    "full compute": None,
    "FORA N=7": dict(method="fora", interval=7, warmup=3),
    "TaylorSeer N=7 O=2": dict(method="taylorseer", interval=7, warmup=3, order=2),
    "HiCache N=7 O=2 sigma=0.5": dict(method="hicache", interval=7, warmup=3, order=2, sigma=0.5),
}


def generate(pipe, captions: list[str], steps: int, seed: int, batch: int, desc: str):
    """Images plus (wall, CPU) seconds spent inside the pipeline calls."""
    images, wall, cpu = [], 0.0, 0.0
    for lo in tqdm(range(0, len(captions), batch), desc=desc, leave=False):
        generator = torch.Generator().manual_seed(seed + lo)
        t0, c0 = time.perf_counter(), time.process_time()
        out = pipe(captions[lo : lo + batch], num_inference_steps=steps, generator=generator, **PIPELINE_CALL_KWARGS)
        wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
        images.extend(out.images)
    return images, wall, cpu


def fidelity(images, references) -> tuple[float, float]:
    return (float(np.mean([psnr(im, ref) for im, ref in zip(images, references)])),
            float(np.mean([ssim(im, ref) for im, ref in zip(images, references)])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1, help="images per pipeline call (1: per-image latency)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is far faster on a busy shared CPU)")
    parser.add_argument("--folder", default=None, help="pipeline folder (default: the shipped testbed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = load_pipeline(args.folder) if args.folder else load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    captions = heldout_captions(args.captions, seed=args.seed)

    held = ShapesDataset(seed=args.seed + 10_000)
    originals = [held[i][0] for i in range(args.captions)]
    vae_psnr, reconstructions = reconstruction_psnr(pipe.vae, originals)
    reconstructions = [(r.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for r in reconstructions]
    vae_acc = accuracy([check(r, held.scene(i).caption) for i, r in enumerate(reconstructions)])

    rows, reference = [], None
    for name, kwargs in tqdm(METHODS.items(), desc="methods"):
        if kwargs is not None:
            hicache.apply_cache(pipe.transformer, hicache.CacheConfig(**kwargs), recipe="flux")
        try:
            images, wall, cpu = generate(pipe, captions, args.steps, args.seed, args.batch, name)
        finally:
            if kwargs is not None:
                hicache.remove_cache(pipe.transformer)
        if reference is None:
            reference, ref_wall, ref_cpu = images, wall, cpu
        acc = accuracy([check(im, cap) for im, cap in zip(images, captions)])
        psnr, ssim = fidelity(images, reference) if kwargs is not None else (float("nan"), float("nan"))
        rows.append((name, acc, psnr, ssim, wall / len(captions), ref_wall / wall, cpu / len(captions), ref_cpu / cpu))

    print(f"\nTestbed: {len(captions)} held-out captions, {args.steps} steps, batch {args.batch}, "
          f"{args.threads} threads.\nVAE reconstruction of {len(originals)} unseen dataset images: PSNR {vae_psnr:.2f} dB, "
          f"checker accuracy {100 * vae_acc:.1f} % (the originals score ~100 %).\n")
    print("| method | checker accuracy | PSNR vs full (dB) | SSIM vs full | wall s/image | wall speedup | CPU s/image | CPU speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for name, acc, psnr, ssim, wall, wall_x, cpu, cpu_x in rows:
        fmt = lambda v, p: "-" if np.isnan(v) else f"{v:.{p}f}"  # noqa: E731
        print(f"| {name} | {100 * acc:.1f} % | {fmt(psnr, 2)} | {fmt(ssim, 4)} | {wall:.3f} | {wall_x:.2f}x | {cpu:.3f} | {cpu_x:.2f}x |")


if __name__ == "__main__":
    main()

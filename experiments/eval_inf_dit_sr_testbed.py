"""Evaluate an Inf-DiT SR testbed beyond its 16-scene gate: more held-out scenes, and the one-step denoiser.

The training script's gate is the mean PSNR over the first 16 held-out scenes; 16 images leave a few tenths of a
dB of sampling noise in a comparison with bicubic. This prints the same figure on the first ``--n`` held-out scenes
(the first 16 are the gate's), split into the gate's and the rest, and on a validation split of 16 other held-out
captions (for choosing training settings without looking at the gate's scenes), plus the one-step denoiser D(HR + sigma n; sigma)
at a few noise levels on the gate's scenes: at high sigma that is the model's regression from the LR image alone,
which tells a weak model from a sampler that loses what the model knows. Prints Markdown; asserts nothing.

    python experiments/eval_inf_dit_sr_testbed.py                          # the shipped testbed, 128 scenes
    python experiments/eval_inf_dit_sr_testbed.py --testbed outputs/train_inf_dit_sr/<run> --n 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hicache.models.inf_dit.image_encoder import encode_lr_image
from hicache.models.inf_dit.pipeline import bicubic_resize
from hicache.testbeds.inf_dit_sr.data import downscale, heldout_pairs, render_scenes
from hicache.testbeds import WEIGHTS_DIR
from hicache.testbeds.inf_dit_sr.train import evaluate_gate, load_testbed, psnr

GATE_IMAGES = 16


def validation_pairs(size: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out scenes of another seed whose captions are not among the gate's: never trained on, never gated on."""
    from hicache.testbeds.flux_shapes.dataset import heldout_scenes

    gate = {scene.caption for scene in heldout_scenes(GATE_IMAGES, seed=0)}
    scenes = [scene for scene in heldout_scenes(4 * n, seed=1) if scene.caption not in gate][:n]
    hr = render_scenes(scenes, size)
    return hr, downscale(hr)


@torch.no_grad()
def one_step_psnr(pipe, hr: torch.Tensor, lr: torch.Tensor, sigma: float, seed: int = 0) -> float:
    """Mean PSNR of EDM's denoiser applied once to HR + sigma * noise ([0, 1] images in and out)."""
    lr_pm = lr * 2 - 1
    up = bicubic_resize(lr_pm, tuple(hr.shape[-2:])).clamp(-1, 1)
    noisy = hr * 2 - 1 + torch.randn(hr.shape, generator=torch.Generator().manual_seed(seed)) * sigma
    embeds = encode_lr_image(pipe.image_encoder, lr_pm)
    denoised = pipe.denoise(noisy, torch.full((len(hr),), sigma), up, lr_pm, embeds, 0, 1, float(sigma))
    return float(psnr(((denoised + 1) / 2).clamp(0, 1), hr).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", default=str(WEIGHTS_DIR / "inf_dit_sr"))
    parser.add_argument("--n", type=int, default=128, help="held-out scenes (the first 16 are the gate's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[40.0, 8.0, 1.0, 0.1])
    args = parser.parse_args()
    if args.n <= GATE_IMAGES:
        parser.error(f"--n must exceed the gate's {GATE_IMAGES} scenes")
    torch.set_num_threads(args.threads)

    pipe = load_testbed(args.testbed)
    meta = json.loads((Path(args.testbed) / "testbed.json").read_text())
    if meta["data"]["source"] != "procedural":
        parser.error(f"{args.testbed} was trained on {meta['data']['source']!r}; this evaluates procedural scenes")
    hr, lr = heldout_pairs(args.n, meta["model"]["hr_size"], "procedural")
    print(f"{args.testbed}: {args.steps} Heun steps, one sampler seed per image (the image's index)\n")
    print("| held-out scenes | images | SR (dB) | bicubic (dB) | SR - bicubic |")
    print("|---|---|---|---|---|")
    for label, lo, hi in (("the gate's", 0, GATE_IMAGES), ("the rest", GATE_IMAGES, args.n), ("all", 0, args.n)):
        # seed = lo: image i is sampled with seed i in every row (evaluate_gate seeds image j of a slice with seed + j)
        gate = evaluate_gate(pipe, hr[lo:hi], lr[lo:hi], steps=args.steps, seed=lo)
        print(f"| {label} ({lo}-{hi - 1}) | {hi - lo} | {gate['psnr_sr']:.2f} | {gate['psnr_bicubic']:.2f} "
              f"| {gate['psnr_sr'] - gate['psnr_bicubic']:+.2f} |")
    val = evaluate_gate(pipe, *validation_pairs(meta["model"]["hr_size"]), steps=args.steps, seed=0)
    print(f"| validation split (other captions) | {val['n']} | {val['psnr_sr']:.2f} | {val['psnr_bicubic']:.2f} "
          f"| {val['psnr_sr'] - val['psnr_bicubic']:+.2f} |")
    print("\nOne-step denoiser on the gate's scenes, PSNR (dB): "
          + ", ".join(f"sigma {s:g}: {one_step_psnr(pipe, hr[:GATE_IMAGES], lr[:GATE_IMAGES], s):.2f}"
                      for s in args.sigmas))


if __name__ == "__main__":
    main()

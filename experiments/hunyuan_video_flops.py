"""Transformer FLOPs of HunyuanVideo text-to-video with each cache, at full size, without weights or a GPU.

The real `HunyuanVideoTransformer3DModel` (its default config: 20 double- and 40 single-stream blocks,
24 heads of 128, 12.8B parameters) is built on PyTorch's meta device, so no memory is allocated and
no weight is needed; `FlopCounterMode` counts the matmul/attention FLOPs of a whole denoising loop
(TaylorSeer's protocol by default: 480x640, 65 frames, 256 text tokens, 50 steps) with the cache
attached through `hicache.apply_cache`, exactly as the pipeline runs it. The ratio to the uncached
loop is the FLOPs speedup the paper's video table reports.

    python experiments/hunyuan_video_flops.py                      # the hunyuan_video_table rows
    python experiments/hunyuan_video_flops.py --height 720 --width 1280 --frames 129
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

import hicache
from hicache.app.speed import flops_table

# The rows of conf/experiment/hunyuan_video_table.yaml: (label, CacheConfig keyword arguments).
TABLE_ROWS = (
    ("original", dict(method="none")),
    ("FORA N=5", dict(method="fora", interval=5, warmup=1, order=0)),
    ("TaylorSeer N=5 O=1", dict(method="taylorseer", interval=5, warmup=1, order=1)),
    ("TaylorSeer N=7 O=2", dict(method="taylorseer", interval=7, warmup=3, order=2)),
    ("HiCache N=5 O=1", dict(method="hicache", interval=5, warmup=1, order=1, sigma=0.5)),
    ("HiCache N=7 O=2", dict(method="hicache", interval=7, warmup=3, order=2, sigma=0.5)),
)


def meta_transformer(**config):
    from diffusers import HunyuanVideoTransformer3DModel

    with torch.device("meta"):
        return HunyuanVideoTransformer3DModel(**config).to(torch.bfloat16).eval()


def meta_inputs(model, height: int, width: int, frames: int, text_tokens: int, batch: int = 1):
    """Inputs of the shapes the pipeline feeds (VAE: 8x spatial, 4x temporal compression)."""
    c = model.config
    latent_frames = (frames - 1) // 4 + 1
    meta = dict(device="meta", dtype=torch.bfloat16)
    return dict(
        hidden_states=torch.empty(batch, c.in_channels, latent_frames, height // 8, width // 8, **meta),
        encoder_hidden_states=torch.empty(batch, text_tokens, c.text_embed_dim, **meta),
        encoder_attention_mask=torch.ones(batch, text_tokens, **meta),
        pooled_projections=torch.empty(batch, c.pooled_projection_dim, **meta),
        guidance=torch.full((batch,), 6000.0, **meta),
        return_dict=False,
    )


@torch.no_grad()
def loop_flops(model, inputs: dict, steps: int, config: hicache.CacheConfig | None) -> int:
    """Total FLOPs of ``steps`` transformer calls, each in the "cond" cache context like the pipeline's."""
    if config is not None and config.method != "none":
        hicache.apply_cache(model, config, "hunyuan_video")
    try:
        with FlopCounterMode(display=False) as counter:
            for i in tqdm(range(steps), desc=config.method if config else "none", leave=False):
                x = inputs["hidden_states"]
                timestep = torch.full((x.shape[0],), 1000.0 * (1 - i / steps), device=x.device)
                if config is not None and config.method != "none":
                    with hicache.cache_context(model, "cond", num_inference_steps=steps):
                        model(timestep=timestep, **inputs)
                else:
                    model(timestep=timestep, **inputs)
        return int(counter.get_total_flops())
    finally:
        if config is not None and config.method != "none":
            hicache.remove_cache(model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--frames", type=int, default=65)
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)

    model = meta_transformer()
    inputs = meta_inputs(model, args.height, args.width, args.frames, args.text_tokens)
    rows = []
    baseline = None
    for label, kwargs in tqdm(TABLE_ROWS, desc="caches"):
        config = hicache.CacheConfig(**kwargs)
        flops = loop_flops(model, inputs, args.steps, config)
        baseline = baseline or flops
        full = len(config.schedule.full_steps_for(args.steps)) if config.method != "none" else args.steps
        rows.append({"method": label, "full_steps": full, "tflops": flops / 1e12, "flops_speedup": baseline / flops,
                     "ideal_speedup": args.steps / full})
    print(f"HunyuanVideo transformer, {args.width}x{args.height}, {args.frames} frames, "
          f"{args.text_tokens} text tokens, {args.steps} steps (FlopCounterMode on the meta device)\n")
    print(flops_table(rows, ["method", "full_steps", "tflops", "flops_speedup", "ideal_speedup"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Transformer FLOPs and cache memory of Qwen-Image with each cache, at full size, without weights or a GPU.

The real `QwenImageTransformer2DModel` (its default config, which is Qwen-Image's: 60 double-stream blocks,
24 heads of 128, joint text width 3584, 20.43B parameters) is built on PyTorch's meta device, so no memory is
allocated and no weight is needed. `FlopCounterMode` counts the matmul/attention FLOPs of a whole denoising loop
run as `QwenImagePipeline` runs it (by default the official protocol: 1328x1328, i.e. 83x83 = 6889 image tokens,
50 steps, true CFG, so a cond and an uncond call per step in their own cache contexts), with the cache attached
through `hicache.apply_cache`. The ratio to the uncached loop is the FLOPs speedup, printed beside the ideal
(steps / full steps). ``--edit`` adds a 1024x1024 reference image's 64x64 = 4096 tokens to the image stream, as
`QwenImageEditPipeline` does.

The cache's peak memory is `hicache.cache_summary(...).cache_bytes` after the loop (the factors are meta tensors
of the real shapes and dtypes), in bf16 factors as the official code stores them (``--factor-dtype float32``: the
core's float32).

On the meta device a block still costs a fraction of a second of Python (PyTorch's reference decompositions), so
60 blocks x 100 calls x 7 rows would take hours on a CPU. The 60 blocks are identical, so FLOPs and cache bytes are
affine in the depth: by default the loop is counted on the real model with 1 and with 2 blocks, at full width and
full sequence length, and extrapolated, count(60) = count(1) + 59 (count(2) - count(1)) (exact: the test checks it
against a direct count). ``--full-depth`` counts all blocks directly.

    python experiments/qwen_image_flops.py                      # the qwen_image_table rows, 1328x1328
    python experiments/qwen_image_flops.py --edit --height 1024 --width 1024
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
from hicache.schedule import Schedule, same_cost_steps

# The rows of conf/experiment/qwen_image_table.yaml: (label, CacheConfig keyword arguments); step reduction runs
# the uncached model for as many steps as N=7, W=3 runs in full.
TABLE_ROWS = (
    ("original", dict(method="none")),
    ("step reduction (N=7 cost)", dict(method="none", step_reduction=(7, 3))),
    ("FORA N=7", dict(method="fora", interval=7, warmup=3, order=0)),
    ("TaylorSeer N=6 O=2", dict(method="taylorseer", interval=6, warmup=3, order=2)),
    ("TaylorSeer N=8 O=2", dict(method="taylorseer", interval=8, warmup=3, order=2)),
    ("HiCache N=7 O=3 σ=0.5", dict(method="hicache", interval=7, warmup=3, order=3, sigma=0.5)),
    ("HiCache N=5 O=2 σ=0.6", dict(method="hicache", interval=5, warmup=3, order=2, sigma=0.6)),
)
VAE_SCALE, PATCH = 8, 2  # Qwen-Image's VAE downsamples 8x, the transformer packs 2x2 latents into a token


def meta_transformer(**config):
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        return QwenImageTransformer2DModel(**config).to(torch.bfloat16).eval()


def meta_inputs(model, height: int, width: int, text_tokens: int, negative_tokens: int, edit: bool = False,
                reference_size: int = 1024, batch: int = 1):
    """The cond and uncond inputs of the shapes the pipeline feeds, image latents packed 2x2."""
    c = model.config
    meta = dict(device="meta", dtype=torch.bfloat16)
    h, w = height // VAE_SCALE // PATCH, width // VAE_SCALE // PATCH
    shapes = [(1, h, w)]
    if edit:
        r = reference_size // VAE_SCALE // PATCH
        shapes.append((1, r, r))
    tokens = sum(f * a * b for f, a, b in shapes)
    hidden = torch.empty(batch, tokens, c.in_channels, **meta)

    def branch(text):
        return dict(hidden_states=hidden, encoder_hidden_states=torch.empty(batch, text, c.joint_attention_dim, **meta),
                    encoder_hidden_states_mask=None, img_shapes=[shapes] * batch, return_dict=False)

    return {"cond": branch(text_tokens), "uncond": branch(negative_tokens)}


@torch.no_grad()
def loop(model, inputs: dict, steps: int, config: hicache.CacheConfig | None, cfg: bool = True) -> tuple[int, int, int]:
    """(total FLOPs, peak cache bytes, of which forecast factors) of ``steps`` denoising steps: a cond call (and an
    uncond one with ``cfg``) per step, each in its own cache context, like `QwenImagePipeline`. The cache bytes are
    `cache_summary`'s: the factors plus the shared zeros that skipped modules stand in with."""
    cached = config is not None and config.method != "none"
    if cached:
        hicache.apply_cache(model, config, "qwen_image")
    branches = ("cond", "uncond") if cfg else ("cond",)
    try:
        with FlopCounterMode(display=False) as counter:
            for i in tqdm(range(steps), desc=config.method if config else "none", leave=False):
                x = inputs["cond"]["hidden_states"]
                timestep = torch.full((x.shape[0],), 1.0 - i / steps, device=x.device, dtype=x.dtype)
                for name in branches:
                    with model.cache_context(name):
                        model(timestep=timestep, **inputs[name])
        if not cached:
            return int(counter.get_total_flops()), 0, 0
        factor_bytes = sum(h.peak_bytes for h in hicache.api._handle(model).forecast_hooks.values())
        return int(counter.get_total_flops()), hicache.cache_summary(model, steps).cache_bytes, factor_bytes
    finally:
        if cached:
            model._reset_stateful_cache()
            hicache.remove_cache(model)


def counts(make_inputs, steps: int, config, cfg: bool, depth: int | None, **model_config) -> tuple[int, int, int]:
    """(FLOPs, peak cache bytes, factor bytes) of the loop on the model of ``model_config`` (``make_inputs(model)`` gives its
    inputs), counted directly (``depth=None``) or at depths 1 and 2 and extrapolated to ``depth`` blocks."""
    if depth is None:
        model = meta_transformer(**model_config)
        return loop(model, make_inputs(model), steps, config, cfg)
    one, two = (counts(make_inputs, steps, config, cfg, None, **model_config, num_layers=n) for n in (1, 2))
    return tuple(a + (depth - 1) * (b - a) for a, b in zip(one, two))


def table(make_inputs, steps: int, factor_dtype: str, cfg: bool = True, depth: int | None = None,
          **model_config) -> list[dict]:
    rows, baseline = [], None
    for label, kwargs in tqdm(TABLE_ROWS, desc="caches"):
        kwargs = dict(kwargs)
        reduction = kwargs.pop("step_reduction", None)
        run_steps = same_cost_steps(steps, Schedule(*reduction)) if reduction else steps
        config = hicache.CacheConfig(**kwargs, factor_dtype=factor_dtype) if kwargs["method"] != "none" else None
        flops, cache_bytes, _ = counts(make_inputs, run_steps, config, cfg, depth, **model_config)
        baseline = baseline or flops
        full = len(config.schedule.full_steps_for(steps)) if config else run_steps
        rows.append({"method": label, "steps": run_steps, "full_steps": full, "tflops": flops / 1e12,
                     "flops_speedup": baseline / flops, "ideal_speedup": steps / full, "cache_gib": cache_bytes / 2**30})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=1328)
    parser.add_argument("--width", type=int, default=1328)
    parser.add_argument("--text-tokens", type=int, default=32, help="prompt tokens after the template's system part")
    parser.add_argument("--negative-tokens", type=int, default=6, help="tokens of the negative prompt ' '")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--edit", action="store_true", help="add a 1024x1024 reference image's tokens (Qwen-Image-Edit)")
    parser.add_argument("--no-cfg", action="store_true", help="one call per step (true_cfg_scale=1)")
    parser.add_argument("--factor-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--full-depth", action="store_true", help="count all blocks instead of extrapolating from 1 and 2")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)

    import inspect

    from diffusers import QwenImageTransformer2DModel

    # the default config's depth, which is Qwen-Image's (60)
    layers = inspect.signature(QwenImageTransformer2DModel.__init__).parameters["num_layers"].default

    def make_inputs(model):
        return meta_inputs(model, args.height, args.width, args.text_tokens, args.negative_tokens, edit=args.edit)

    rows = table(make_inputs, args.steps, args.factor_dtype, cfg=not args.no_cfg,
                 depth=None if args.full_depth else layers)
    what = "Qwen-Image-Edit (+ 4096 reference tokens)" if args.edit else "Qwen-Image"
    calls = "1 call" if args.no_cfg else "2 calls (true CFG)"
    print(f"{what} transformer, {args.width}x{args.height}, {args.text_tokens}/{args.negative_tokens} text tokens "
          f"(cond/uncond), {args.steps} steps, {calls} per step; FlopCounterMode on the meta device; "
          f"cache peak with {args.factor_dtype} factors"
          + ("" if args.full_depth else f"; counted with 1 and 2 blocks, extrapolated to {layers}") + "\n")
    print(flops_table(rows, ["method", "steps", "full_steps", "tflops", "flops_speedup", "ideal_speedup", "cache_gib"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

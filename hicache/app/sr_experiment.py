"""The paper's super-resolution table on Inf-DiT: cache variants vs the full 20-step sampler.

For each HR image (a folder, or the SR testbed's held-out images: by default the held-out set of the data
source the testbed was trained on, as recorded in its testbed.json) the LR input is its x4
antialiased-bicubic downscale. Every variant super-resolves every image with the same seed; the
scores are PSNR / SSIM (scikit-image) and optionally LPIPS against the HR image and against the
full (uncached, 20-step) output, transformer FLOPs (`FlopCounterMode`) and wall-clock latency,
with speedups relative to the full run. One step of the cache is one transformer forward.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import hicache

from hicache.models.inf_dit.checkpoint import RELEASED_WEIGHTS_HINT
from hicache.testbeds.inf_dit_sr.data import SOURCES, downscale, heldout_pairs
from hicache.testbeds.inf_dit_sr.train import load_testbed

logger = logging.getLogger(__name__)


class SRSetupError(RuntimeError):
    """Missing weights / data / metric models: shown as one line by the entry point."""


def load_sr_pipeline(kind: str, path: str, dtype: str = "float32", device: str = "cpu"):
    from hicache.models.inf_dit.pipeline import InfDiTPipeline

    torch_dtype = getattr(torch, dtype)
    p = Path(path)
    if kind == "testbed":
        if not (p / "transformer" / "config.json").is_file():
            raise SRSetupError(f"no Inf-DiT SR testbed at {p}: train one with "
                               f"python run.py experiment=inf_dit_sr_testbed_train train.export_dir={p}")
        pipe = load_testbed(p)
    elif kind == "released":
        if (p / "transformer" / "config.json").is_file():
            pipe = InfDiTPipeline.from_converted(p, torch_dtype=torch_dtype)
        elif p.is_file() or (p / "mp_rank_00_model_states.pt").is_file():
            pipe = InfDiTPipeline.from_sat_checkpoint(p, torch_dtype=torch_dtype)
        else:
            raise SRSetupError(f"Inf-DiT weights not found at {p} (mp_rank_00_model_states.pt or a converted folder): "
                               f"{RELEASED_WEIGHTS_HINT}; then set model.path=<it> or INF_DIT_PATH=<it>")
    else:
        raise SRSetupError(f"model.kind must be 'testbed' or 'released', got {kind!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def testbed_data_source(path: str) -> str:
    """The data source a testbed folder was trained on (testbeds from before the option: photos)."""
    meta = Path(path) / "testbed.json"
    return json.loads(meta.read_text()).get("data", {}).get("source", "photos") if meta.is_file() else "photos"


def load_hr_images(source: str, n: int | None, folder: str | None, size: int, multiple: int,
                   heldout_source: str = "photos") -> list[torch.Tensor]:
    """HR images (3, H, W) in [0, 1]: ``heldout`` = the held-out set of ``heldout_source`` (the testbed's own),
    or a named source's held-out set (procedural | photos | mixed), or a folder centre-cropped to ``multiple``."""
    if source == "heldout":
        source = heldout_source
    if source in SOURCES:
        hr, _ = heldout_pairs(n or 16, size, source)
        return list(hr)
    if source != "folder":
        raise SRSetupError(f"data.source must be heldout, folder or one of {', '.join(SOURCES)}, got {source!r}")
    from PIL import Image

    files = sorted(f for f in Path(folder or "").glob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    if not folder or not files:
        raise SRSetupError(f"no HR images (png/jpg/bmp) in data.folder={folder!r}")
    images = []
    for f in files[: n or None]:
        x = torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
        h, w = x.shape[-2:]
        nh, nw = h // multiple * multiple, w // multiple * multiple
        if nh == 0 or nw == 0:
            raise SRSetupError(f"{f} is {h}x{w} px, smaller than one {multiple} px block")
        top, left = (h - nh) // 2, (w - nw) // 2
        images.append(x[:, top : top + nh, left : left + nw].contiguous())
    return images


@dataclass
class Variant:
    name: str
    cache: dict | None          # hicache.CacheConfig kwargs, or None for the uncached sampler
    steps: int                  # Heun steps (2 * steps - 1 transformer forwards)


def resolve_variants(spec: dict, steps: int) -> list[Variant]:
    """Variants from the config; ``match_cost_of: <name>`` gives the plain sampler the same forward count."""
    variants = {}
    for name, v in spec.items():
        if "match_cost_of" in v:
            continue
        variants[name] = Variant(name, dict(v["cache"]) if v.get("cache") else None, int(v.get("steps", steps)))
    for name, v in spec.items():
        if "match_cost_of" in v:
            other = variants[v["match_cost_of"]]
            forwards = len(hicache.CacheConfig(**other.cache).schedule.full_steps_for(2 * other.steps - 1))
            variants[name] = Variant(name, None, max(1, math.ceil((forwards + 1) / 2)))
    return [variants[name] for name in spec]


def sr_metrics(lpips_model=None):
    """Score functions on (3, H, W) [0, 1] tensors."""
    from hicache.app.metrics.fidelity import psnr, ssim

    def as_uint8(x):
        return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()

    def scores(out, ref, prefix):
        a, b = as_uint8(out), as_uint8(ref)
        result = {f"psnr_{prefix}": psnr(a, b), f"ssim_{prefix}": ssim(a, b)}
        if lpips_model is not None:
            with torch.no_grad():
                result[f"lpips_{prefix}"] = float(lpips_model(out[None] * 2 - 1, ref[None] * 2 - 1).item())
        return result

    return scores


def load_lpips():
    from hicache.app.metrics.fidelity import alexnet_weights_file

    weights = alexnet_weights_file()
    if not weights.is_file():
        raise SRSetupError(f"LPIPS needs torchvision's AlexNet weights: put {weights.name} at {weights} "
                           f"(or run with metrics.lpips=false)")
    import lpips

    return lpips.LPIPS(net="alex", verbose=False).eval()


def run_variant(pipe, variant: Variant, lr_images: list[torch.Tensor], seed: int, recipe: str = "inf_dit"):
    from hicache.app.speed import count_transformer_flops, stopwatch

    if variant.cache is not None:
        hicache.apply_cache(pipe.transformer, hicache.CacheConfig(**variant.cache), recipe)
    outputs, seconds, flops = [], 0.0, 0
    try:
        for i, lr in enumerate(tqdm(lr_images, desc=variant.name, leave=False)):
            generator = torch.Generator().manual_seed(seed + i)
            if i == 0:  # transformer FLOPs of one image (same size for every image of a run), separate pass
                with count_transformer_flops(pipe.transformer) as counted:
                    pipe(lr[None], num_inference_steps=variant.steps, generator=torch.Generator().manual_seed(seed),
                         output_type="pt")
                flops = counted["flops"]
                if variant.cache is not None:
                    summary = hicache.cache_summary(pipe.transformer)
                    full, cached = summary.full_forwards, summary.cached_forwards
                else:
                    full, cached = 2 * variant.steps - 1, 0
            with stopwatch(pipe._execution_device) as clock:  # synchronised with the device, as app/speed.py times
                out = pipe(lr[None], num_inference_steps=variant.steps, generator=generator, output_type="pt").images[0]
            seconds += clock["seconds"]
            outputs.append(out)
    finally:
        if variant.cache is not None:
            hicache.remove_cache(pipe.transformer)
    return outputs, {"seconds_per_image": seconds / len(lr_images), "flops_per_image": flops,
                     "full_forwards": full, "cached_forwards": cached}


def run_table(pipe, hr_images: list[torch.Tensor], variants: list[Variant], seed: int, lpips: bool, out_dir: Path,
              save_images: int = 4) -> list[dict]:
    """Run every variant, score it and write results.json / results.md (+ a few PNGs) to ``out_dir``."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    scores = sr_metrics(load_lpips() if lpips else None)
    lr_images = [downscale(hr[None])[0] for hr in hr_images]
    rows, reference, base = [], None, None
    for variant in tqdm(variants, desc="SR variants"):
        outputs, cost = run_variant(pipe, variant, lr_images, seed)
        if reference is None:
            if variant.cache is not None:
                raise SRSetupError("the first variant must be the uncached full sampler (the fidelity reference)")
            reference, base = outputs, cost
        per_image = [{**scores(o, hr, "hr"), **scores(o, ref, "full")} for o, hr, ref in zip(outputs, hr_images, reference)]
        row = {"variant": variant.name, "steps": variant.steps, "cache": variant.cache, **cost,
               "flops_speedup": base["flops_per_image"] / cost["flops_per_image"],
               "latency_speedup": base["seconds_per_image"] / cost["seconds_per_image"]}
        for key in per_image[0]:
            values = [p[key] for p in per_image]
            row[key] = float(np.mean(values)) if all(np.isfinite(values)) else float("inf")
        rows.append(row)
        for i, o in enumerate(outputs[:save_images]):
            Image.fromarray((o.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(
                out_dir / f"{variant.name}_{i}.png")
        logger.info("%s: PSNR/HR %.2f, PSNR/full %.2f, FLOPs x%.2f, latency x%.2f", variant.name, row["psnr_hr"],
                    row["psnr_full"], row["flops_speedup"], row["latency_speedup"])
    bicubic = [((torch.nn.functional.interpolate(lr[None], size=hr.shape[-2:], mode="bicubic", antialias=True,
                                                 align_corners=False)[0]).clamp(0, 1)) for lr, hr in zip(lr_images, hr_images)]
    bic = [scores(b, hr, "hr") for b, hr in zip(bicubic, hr_images)]
    rows.append({"variant": "bicubic", **{k: float(np.mean([s[k] for s in bic])) for k in bic[0]}})
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2))
    (out_dir / "results.md").write_text(markdown_table(rows))
    return rows


def markdown_table(rows: list[dict]) -> str:
    cols = ["variant", "steps", "full_forwards", "psnr_hr", "ssim_hr", "lpips_hr", "psnr_full", "ssim_full",
            "lpips_full", "flops_speedup", "latency_speedup"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) and c != "psnr_full" else
                         ("inf" if v == float("inf") else f"{v:.2f}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

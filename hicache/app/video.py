"""Video support for the app: HunyuanVideo loaders, the ``video`` output kind, video metrics, W&B videos.

Registered through the app's extension points, so the runner is the same for images and videos:

- loaders ``hunyuan_video`` (`HunyuanVideoPipeline` from ``model.path``) and ``tiny_hunyuan_video``
  (the random tiny pipeline of `hicache.testbeds.tiny.hunyuan_video`, written to ``model.path`` once, then loaded
  with ``from_pretrained`` exactly like the real one);
- output kind ``video``: frames as a ``(T, H, W, 3)`` uint8 array, stored as *lossless* RGB H.264
  (libx264rgb, crf 0) so that a reference read back from disk is bit-identical and PSNR/SSIM/LPIPS
  measure the cache, not the codec; `write_preview_mp4` writes the usual lossy yuv420p mp4 that
  browsers and W&B play;
- metrics ``video_psnr``, ``video_ssim``, ``video_lpips`` (reported as ``psnr``, ``ssim``,
  ``lpips``: the image metrics per frame, mean over frames) and ``vbench`` (VBench's per-video
  custom-input dimensions, mean over the configured dimensions, in %);
- prompt source ``vbench``: VBench's standard prompt suite (``data=vbench``);
- `wandb_videos`: cached and reference videos side by side, as playable mp4s for the W&B logger.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from .errors import SetupError
from .files import temp_file
from .metrics import BUILDERS, Metric, register_metric
from .metrics import fidelity
from .outputs import OUTPUT_KINDS, OutputKind
from .pipelines import from_pretrained, register_loader, resolve_dtype
from .prompts import SOURCES

logger = logging.getLogger(__name__)

FPS = 24  # HunyuanVideo's frame rate; VBench's motion dimensions read it from the file


# ----------------------------------------------------------------------------- frames and files

def as_frames(video: Any) -> np.ndarray:
    """A pipeline's video (list of PIL frames, float array in [0, 1], or uint8 array) as (T, H, W, 3) uint8."""
    if isinstance(video, np.ndarray) and video.dtype == np.uint8:
        frames = video
    elif isinstance(video, (list, tuple)) and video and isinstance(video[0], Image.Image):
        frames = np.stack([np.asarray(f.convert("RGB"), dtype=np.uint8) for f in video])
    else:
        array = video.detach().cpu().float().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
        frames = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected video frames of shape (T, H, W, 3), got {frames.shape}")
    return frames


def extract_video(result) -> np.ndarray:
    """The first video of a diffusers video pipeline's output."""
    return as_frames(result.frames[0])


def _write(frames: np.ndarray, path: Path, codec: str, pix_fmt_out: str, output_params: list[str],
           macro_block_size: int, fps: int) -> None:
    import imageio_ffmpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, ".tmp.mp4")
    os.close(fd)
    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        tmp, (width, height), fps=fps, codec=codec, pix_fmt_in="rgb24", pix_fmt_out=pix_fmt_out,
        macro_block_size=macro_block_size, output_params=output_params, ffmpeg_log_level="error",
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    os.replace(tmp, path)


def write_lossless_mp4(frames: np.ndarray, path: str | Path, fps: int = FPS) -> None:
    """RGB H.264 at crf 0: read back bit-identical (plays in ffmpeg/VLC, not in browsers)."""
    _write(as_frames(frames), Path(path), "libx264rgb", "rgb24", ["-crf", "0", "-preset", "medium"], 1, fps)


def write_preview_mp4(frames: np.ndarray, path: str | Path, fps: int = FPS) -> None:
    """The usual lossy yuv420p H.264 that browsers and W&B play (sides padded to even sizes)."""
    _write(as_frames(frames), Path(path), "libx264", "yuv420p", ["-crf", "18"], 2, fps)


def read_mp4(path: str | Path) -> np.ndarray:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3) for buf in reader]
    if not frames:
        raise ValueError(f"{path} holds no frames")
    return np.stack(frames)


OUTPUT_KINDS["video"] = OutputKind(".mp4", extract_video, write_lossless_mp4, read_mp4)


# ----------------------------------------------------------------------------- loaders

HUNYUAN_VIDEO_HINT = (
    "download the diffusers-format HunyuanVideo (huggingface-cli download hunyuanvideo-community/HunyuanVideo "
    "--local-dir <folder>) and set model.path=<folder> or HUNYUAN_VIDEO_PATH=<folder>"
)


def _vae_options(pipe, model: DictConfig):
    """VAE tiling/slicing: decoding 65 frames at 480x640 needs them on most GPUs."""
    if model.get("vae_tiling", False):
        pipe.vae.enable_tiling()
    if model.get("vae_slicing", False):
        pipe.vae.enable_slicing()
    return pipe


@register_loader("hunyuan_video")
def _hunyuan_video(model: DictConfig):
    from diffusers import HunyuanVideoPipeline

    if not model.get("download_hint"):
        model = DictConfig({**model, "download_hint": HUNYUAN_VIDEO_HINT})
    return _vae_options(from_pretrained(HunyuanVideoPipeline, model), model)


@register_loader("tiny_hunyuan_video")
def _tiny_hunyuan_video(model: DictConfig):
    """The random tiny HunyuanVideoPipeline, saved to ``model.path`` on first use and loaded from there."""
    from diffusers import HunyuanVideoPipeline

    from hicache.testbeds.tiny.hunyuan_video import save_tiny_hunyuan_video_pipeline

    if not model.get("path"):
        raise SetupError("model=tiny_hunyuan_video needs model.path=<folder to write the tiny pipeline to>")
    folder = Path(str(model.path)).expanduser()
    if not (folder / "model_index.json").is_file():
        logger.info("writing the tiny HunyuanVideo pipeline (seed %s) to %s", model.get("seed", 0), folder)
        save_tiny_hunyuan_video_pipeline(folder, seed=int(model.get("seed", 0)))
    pipe = HunyuanVideoPipeline.from_pretrained(str(folder), torch_dtype=resolve_dtype(model.dtype))
    return _vae_options(pipe, model)


# ----------------------------------------------------------------------------- metrics

def _frame_images(video) -> list[Image.Image]:
    return [Image.fromarray(f) for f in as_frames(video)]


def _per_frame_mean(image_metric):
    """An image metric applied frame by frame to two videos of the same shape, averaged over frames."""
    def score(output, reference) -> float:
        out, ref = _frame_images(output), _frame_images(reference)
        if len(out) != len(ref):
            raise ValueError(f"videos differ in length: {len(out)} vs {len(ref)} frames")
        return float(np.mean([image_metric(a, b) for a, b in zip(out, ref)]))

    return score


@register_metric("video_psnr")
def _video_psnr(options: DictConfig, device: torch.device) -> Metric:
    return Metric("psnr", "fidelity", _per_frame_mean(fidelity.psnr))


@register_metric("video_ssim")
def _video_ssim(options: DictConfig, device: torch.device) -> Metric:
    return Metric("ssim", "fidelity", _per_frame_mean(fidelity.ssim))


@register_metric("video_lpips")
def _video_lpips(options: DictConfig, device: torch.device) -> Metric:
    image_lpips = BUILDERS["lpips"](options, device)  # same weights check, same one-line error
    return Metric("lpips", "fidelity", _per_frame_mean(image_lpips.fn))


VBENCH_CUSTOM_DIMENSIONS = (
    "subject_consistency", "background_consistency", "motion_smoothness", "dynamic_degree",
    "aesthetic_quality", "imaging_quality", "temporal_flickering", "temporal_style", "overall_consistency",
    "human_action",
)


def vbench_cache_dir() -> Path:
    """Where VBench keeps its scoring models (``VBENCH_CACHE_DIR``, else ``~/.cache/vbench``)."""
    return Path(os.environ.get("VBENCH_CACHE_DIR") or Path.home() / ".cache" / "vbench").expanduser()


@register_metric("vbench")
def _vbench(options: DictConfig, device: torch.device) -> Metric:
    """VBench per video, in its custom-input mode (any prompt), mean over ``options.dimensions``, in %.

    This is not VBench's weighted total score, which needs the whole standard prompt suite with five
    videos per prompt; it scores each generated video on the dimensions that need no suite metadata.
    """
    dimensions = list(options.get("dimensions") or VBENCH_CUSTOM_DIMENSIONS)
    unknown = sorted(set(dimensions) - set(VBENCH_CUSTOM_DIMENSIONS))
    if unknown:
        raise SetupError(f"metrics.vbench.dimensions {unknown} need VBench's standard suite; "
                         f"per-video dimensions: {', '.join(VBENCH_CUSTOM_DIMENSIONS)}")
    try:
        from vbench import VBench
    except ImportError:
        raise SetupError("metrics.vbench needs the `vbench` package and its models: pip install vbench, "
                         f"then put its scoring models in {vbench_cache_dir()} (or set VBENCH_CACHE_DIR)") from None
    cache = vbench_cache_dir()
    if not cache.is_dir() or not any(cache.iterdir()):
        raise SetupError(f"metrics.vbench: VBench's scoring models are not in {cache}; download them there "
                         f"(see VBench's README) or set VBENCH_CACHE_DIR=<folder>")
    workdir = Path(tempfile.mkdtemp(prefix="hicache_vbench_"))
    scorer = VBench(device, None, str(workdir / "results"))

    def score(output, prompt: str) -> float:
        video_path = workdir / "video.mp4"
        write_preview_mp4(output, video_path)
        name = f"eval_{os.getpid()}"
        try:
            scorer.evaluate(videos_path=str(video_path), name=name, prompt_list=[prompt],
                            dimension_list=dimensions, local=True, mode="custom_input")
        except (OSError, AssertionError, RuntimeError) as err:
            reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            raise SetupError(f"VBench could not score a video ({reason}); check its models in {cache}") from None
        results = json.loads((workdir / "results" / f"{name}_eval_results.json").read_text())
        per_dimension = [float(results[d][1][0]["video_results"]) for d in dimensions]
        return 100.0 * float(np.mean(per_dimension))  # in %, as VBench reports

    return Metric("vbench", "quality", score)


VIDEO_METRICS = ("video_psnr", "video_ssim", "video_lpips", "vbench")


def check_metrics(model: DictConfig, metrics: DictConfig) -> None:
    """Fail before any rendering when a video model is given image metrics (they cannot read videos)."""
    if model.get("output", "image") != "video":
        return
    enabled = [name for name, options in metrics.items()
               if isinstance(options, DictConfig) and options.get("enabled", False)]
    wrong = [name for name in enabled if name not in VIDEO_METRICS]
    if wrong:
        raise SetupError(f"model {model.name} makes videos, but metrics {', '.join(wrong)} score images; "
                         f"use metrics=video (or metrics=video_paper): {', '.join(VIDEO_METRICS)}")


# ----------------------------------------------------------------------------- prompts

def _vbench_prompts(data: DictConfig) -> list[str]:
    """VBench's standard suite: ``data.file`` if set, else the full-info JSON of the installed package."""
    from .prompts import read_prompt_file

    if data.get("file"):
        path = Path(str(data.file)).expanduser()
        if path.suffix == ".json" and path.is_file():
            return [entry["prompt_en"] for entry in json.loads(path.read_text(encoding="utf-8"))]
        return read_prompt_file(path, data.get("column"))
    try:
        import vbench
    except ImportError:
        raise SetupError("data=vbench needs the `vbench` package (pip install vbench) or a prompt list: "
                         "data.file=<VBench_full_info.json or all_dimension.txt>") from None
    path = Path(vbench.__file__).parent / "VBench_full_info.json"
    if not path.is_file():
        raise SetupError(f"data=vbench: {path} is missing; set data.file=<VBench_full_info.json or all_dimension.txt>")
    return [entry["prompt_en"] for entry in json.loads(path.read_text(encoding="utf-8"))]


SOURCES["vbench"] = _vbench_prompts


# ----------------------------------------------------------------------------- W&B

def side_by_side(left, right) -> np.ndarray:
    """Two videos of the same length side by side (left | right), frame by frame."""
    a, b = as_frames(left), as_frames(right)
    if len(a) != len(b):
        raise ValueError(f"videos differ in length: {len(a)} vs {len(b)} frames")
    return np.concatenate([a, b], axis=2)


def wandb_videos(pairs: list[tuple[Any, Any]], run_dir: str | Path, fps: int = FPS) -> list:
    """Each (cached, reference) pair as one playable mp4 (cached left, reference right) for ``wandb.log``."""
    import wandb

    folder = Path(run_dir) / "media"
    media = []
    for i, (cached, reference) in enumerate(pairs):
        path = folder / f"{i:05d}_cached_vs_reference.mp4"
        write_preview_mp4(side_by_side(cached, reference), path, fps=fps)
        media.append(wandb.Video(str(path), format="mp4", caption="left: cached, right: uncached reference"))
    return media

"""Quality of an output against its prompt: CLIP score, ImageReward, and the testbed's checker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from ..errors import SetupError
from . import Metric, register_metric


def _require_hub_model(repo_or_path: str, what: str) -> None:
    """Fail in one line unless ``repo_or_path`` is a local folder or already in the hub cache."""
    if Path(repo_or_path).expanduser().is_dir():
        return
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_or_path, local_files_only=True)
    except Exception:
        raise SetupError(
            f"{what} needs the model {repo_or_path!r}: download it (huggingface-cli download {repo_or_path}) "
            f"into the hub cache, or set metrics.clip.model=<local folder>"
        ) from None


@register_metric("clip")
def _clip(options: DictConfig, device: torch.device) -> Metric:
    from torchmetrics.multimodal.clip_score import CLIPScore

    name = str(options.get("model", "openai/clip-vit-large-patch14"))
    _require_hub_model(name, "CLIP score")
    scorer = CLIPScore(model_name_or_path=name).to(device)

    @torch.no_grad()
    def score(output, prompt: str) -> float:
        image = torch.from_numpy(np.asarray(output.convert("RGB"))).permute(2, 0, 1).to(device)
        return float(scorer(image, prompt).item())

    return Metric("clip", "quality", score)


@register_metric("image_reward")
def _image_reward(options: DictConfig, device: torch.device) -> Metric:
    try:
        import ImageReward as reward_models
    except ImportError:
        raise SetupError("ImageReward needs the `image-reward` package: pip install image-reward") from None
    checkpoint = Path(str(options.checkpoint)).expanduser()
    med_config = Path(str(options.med_config)).expanduser()
    missing = [p for p in (checkpoint, med_config) if not p.is_file()]
    if missing:
        raise SetupError(
            f"ImageReward needs {' and '.join(str(p) for p in missing)} (files ImageReward.pt and med_config.json "
            f"of the hub repo THUDM/ImageReward); download them there or set metrics.image_reward.checkpoint/med_config"
        )
    model = reward_models.load(str(checkpoint), device=str(device), med_config=str(med_config)).eval()

    @torch.no_grad()
    def score(output, prompt: str) -> float:
        return float(model.score(prompt, output))

    return Metric("image_reward", "quality", score)


@register_metric("checker")
def _checker(options: DictConfig, device: torch.device) -> Metric:
    """The testbed's attribute checker: the fraction of the caption's attributes the image shows."""
    try:
        from hicache.testbeds.flux_shapes import check
    except ImportError:
        raise SetupError("metrics.checker needs the testbed package hicache.testbeds.flux_shapes (issue 3) on this checkout") from None

    def accuracy(output, prompt: str) -> float:
        verdicts = check(output, prompt)
        return float(np.mean([bool(v) for v in verdicts.values()])) if verdicts else float("nan")

    return Metric("checker", "quality", accuracy)

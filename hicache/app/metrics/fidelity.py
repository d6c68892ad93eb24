"""Fidelity to the uncached output: PSNR and SSIM (scikit-image) and LPIPS (AlexNet).

`psnr` is the correct PSNR (float arithmetic) and the default; `psnr_uint8` is the wrapping variant the official
LESA evaluation computes (see its docstring), off by default, for reading our tables beside published ones.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ..errors import SetupError
from . import Metric, register_metric


def as_uint8(image) -> np.ndarray:
    """An (H, W, 3) uint8 array from a PIL image or an array already in that form."""
    if isinstance(image, np.ndarray):
        return image.astype(np.uint8, copy=False)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def psnr(output, reference) -> float:
    a, b = as_uint8(output), as_uint8(reference)
    if np.array_equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(b, a, data_range=255))


def psnr_uint8(output, reference) -> float:
    """PSNR as the official LESA image evaluation computes it: on uint8 arrays, so ``a - b`` and its square wrap
    modulo 256 (``np.mean((img1 - img2) ** 2)`` on ``cv2.imread`` images), then ``20 log10(255 / sqrt(mse))``.

    Not a fidelity measure: every wrapped square is below 256, so the score is at least 24.07 dB whatever the
    images, unrelated images score about 27.9 dB (random noise or two unrelated photos; their true PSNR is
    8-11 dB), a black image against a photo 28.4 dB, and differences that are multiples of 16 vanish (+16 on
    every pixel scores 48.5 dB, or inf if nothing clips). Below |difference| 16 nothing wraps, so near-identical
    images score as with `psnr`. Here only to read tables beside papers that report it; `psnr` is the real one.
    """
    a, b = as_uint8(output), as_uint8(reference)
    wrapped = (a - b) ** 2  # uint8 arithmetic on purpose: both the difference and the square wrap
    mse = float(np.mean(wrapped))
    if mse == 0:
        return float("inf")
    return float(20 * np.log10(255.0 / np.sqrt(mse)))


def ssim(output, reference) -> float:
    a, b = as_uint8(output), as_uint8(reference)
    win = min(7, *a.shape[:2])
    win -= 1 - win % 2  # odd window, no larger than tiny test images
    return float(structural_similarity(b, a, data_range=255, channel_axis=2, win_size=win))


@register_metric("psnr")
def _psnr(options: DictConfig, device: torch.device) -> Metric:
    return Metric("psnr", "fidelity", psnr)


@register_metric("psnr_uint8")
def _psnr_uint8(options: DictConfig, device: torch.device) -> Metric:
    return Metric("psnr_uint8", "fidelity", psnr_uint8)


@register_metric("ssim")
def _ssim(options: DictConfig, device: torch.device) -> Metric:
    return Metric("ssim", "fidelity", ssim)


def alexnet_weights_file() -> Path:
    """Where torchvision looks for the ImageNet AlexNet that LPIPS builds on."""
    from torchvision.models import AlexNet_Weights

    url = AlexNet_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def to_lpips_tensor(image, device: torch.device) -> torch.Tensor:
    array = torch.from_numpy(as_uint8(image)).permute(2, 0, 1).float()
    return (array / 127.5 - 1.0).unsqueeze(0).to(device)


@register_metric("lpips")
def _lpips(options: DictConfig, device: torch.device) -> Metric:
    net = options.get("net", "alex")
    for package, pip_name in (("torchvision", "torchvision"), ("lpips", "lpips")):
        if importlib.util.find_spec(package) is None:  # optional: "n/a" unless metrics.lpips.required=true
            raise SetupError(f"LPIPS needs the {package} package: pip install {pip_name} (or metrics.lpips.enabled=false)")
    if net == "alex":
        weights = alexnet_weights_file()
        if not weights.is_file():
            raise SetupError(
                f"LPIPS needs torchvision's AlexNet weights: put {weights.name} (from torchvision's "
                f"AlexNet_Weights.IMAGENET1K_V1) at {weights} (or set TORCH_HOME)"
            )
    import lpips

    try:
        model = lpips.LPIPS(net=net, verbose=False).to(device).eval()
    except OSError as err:  # urllib's URLError is an OSError: the backbone download failed
        raise SetupError(f"LPIPS ({net}) could not get its torchvision backbone weights ({err}); "
                         f"put them in {Path(torch.hub.get_dir()) / 'checkpoints'}") from None

    @torch.no_grad()
    def score(output, reference) -> float:
        return float(model(to_lpips_tensor(output, device), to_lpips_tensor(reference, device)).item())

    return Metric("lpips", "fidelity", score)

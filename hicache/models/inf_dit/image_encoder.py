"""The CLIP image tower that conditions Inf-DiT: OpenCLIP ViT-L/14's visual part, weights from the checkpoint.

The official `OpenClipImageEncoder` wraps a whole OpenCLIP ViT-L/14 (datacomp_xl_s13b_b90k) with the
text transformer deleted; only ``encode_image(normalize=True)`` is used, so only the visual tower is
kept here. Its weights travel inside the Inf-DiT checkpoint (``image_encoder.model.visual.*``), so
nothing is downloaded: the architecture is built by open_clip with ``pretrained=None``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SAT_PREFIX = "image_encoder.model.visual."
CLIP_ARCH = "ViT-L-14"
CLIP_IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_clip_visual(arch: str = CLIP_ARCH, device: str | torch.device = "cpu") -> nn.Module:
    """A randomly initialised OpenCLIP visual tower of ``arch`` (no download; ``device="meta"`` to only count)."""
    try:
        import open_clip
    except ImportError:
        raise ImportError("the Inf-DiT image encoder needs open_clip: pip install open_clip_torch") from None
    return open_clip.create_model(arch, pretrained=None, device=device).visual


def official_clip_parameter_count(arch: str = CLIP_ARCH) -> int:
    """Parameters of the official encoder module: the whole OpenCLIP model minus its text transformer and
    ln_final (which the official code deletes); token embedding and text projection stay, unused."""
    import open_clip

    model = open_clip.create_model(arch, pretrained=None, device="meta")
    dropped = {id(p) for m in (model.transformer, model.ln_final) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in dropped)


def clip_visual_from_sat_state_dict(state: dict[str, torch.Tensor], arch: str = CLIP_ARCH) -> nn.Module:
    """The visual tower with the ``image_encoder.model.visual.*`` weights of an official checkpoint (strict)."""
    visual_state = {k[len(SAT_PREFIX):]: v for k, v in state.items() if k.startswith(SAT_PREFIX)}
    if not visual_state:
        raise KeyError(f"no '{SAT_PREFIX}*' keys in the checkpoint: it does not carry the CLIP image tower")
    visual = build_clip_visual(arch)
    visual.load_state_dict(visual_state, strict=True)
    return visual.eval()


def clip_preprocess(lr_image: torch.Tensor, image_size: int = CLIP_IMAGE_SIZE) -> torch.Tensor:
    """The official preprocessing of the LR image in [-1, 1]: to [0, 1], bicubic resize of the short
    side to 224, centre crop, CLIP normalisation (torchvision, as the official code)."""
    from torchvision.transforms import v2 as T

    x = (lr_image + 1) / 2
    x = T.functional.resize(x, image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True)
    x = T.functional.center_crop(x, [image_size, image_size])
    return T.functional.normalize(x, list(CLIP_MEAN), list(CLIP_STD))


@torch.no_grad()
def encode_lr_image(visual: nn.Module, lr_image: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) LR image in [-1, 1] -> (B, D) L2-normalised CLIP image embedding."""
    dtype = next(visual.parameters()).dtype
    features = visual(clip_preprocess(lr_image.float()).to(dtype))
    if isinstance(features, tuple):
        features = features[0]
    return F.normalize(features.float(), dim=-1)

"""A tiny, randomly initialised Inf-DiT for tests and smoke runs (same classes as the released model).

Every parameter is drawn at random, including those the official initialisation zeroes (adaLN,
final layer, key offsets, LR position embeddings), so that every code path shows in the output.
"""

from __future__ import annotations

import torch

from hicache.models.inf_dit.pipeline import InfDiTPipeline
from hicache.models.inf_dit.transformer import InfDiTTransformer2DModel

#: 2 layers, 64 wide, 4 heads; blocks of 16 px (8 tokens a side), so an LR multiple of 4 px.
TINY_CONFIG = dict(num_layers=2, hidden_size=64, num_attention_heads=4, patch_size=2, image_block_size=16,
                   image_size=32, vector_dim=8, sr_scale=4)


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> torch.nn.Module:
    """Fan-in-scaled Gaussian weights everywhere, LayerNorm weights around 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=generator) * scale / fan_in**0.5 * (1 if p.ndim > 1 else 0.4))
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return model


def tiny_inf_dit_transformer(seed: int = 0, **overrides) -> InfDiTTransformer2DModel:
    return randomize_(InfDiTTransformer2DModel(**{**TINY_CONFIG, **overrides}), seed).eval()


def tiny_clip_visual(output_dim: int = 8, seed: int = 0) -> torch.nn.Module:
    """A one-layer OpenCLIP `VisionTransformer` at 224 px standing in for ViT-L/14 (same call signature)."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(image_size=224, patch_size=32, width=32, layers=1, heads=2, mlp_ratio=2.0,
                             output_dim=output_dim).eval()


def tiny_inf_dit_pipeline(seed: int = 0, with_image_encoder: bool = True, **overrides) -> InfDiTPipeline:
    transformer = tiny_inf_dit_transformer(seed, **overrides)
    encoder = tiny_clip_visual(transformer.config.vector_dim, seed) if with_image_encoder else None
    pipe = InfDiTPipeline(transformer=transformer, image_encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe

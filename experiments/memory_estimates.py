"""The accelerator memory of every paper experiment's default setting, counted without weights or a GPU.

Every component of each pipeline is built on the meta device from its published configuration (so its weights
are counted exactly, in the experiment's dtype), and `hicache.estimate_memory` predicts the cache and a full
step's activations from one forward of the meta transformer at the experiment's sampling shape. The VAE decode
runs after the cache is released, so it is not added. Prints a Markdown table (README: "Memory").

    python experiments/memory_estimates.py
"""

from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm

import hicache
from hicache.memory import GiB

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def _bytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


def _meta(build, dtype=torch.bfloat16):
    with torch.device("meta"):
        return torch.nn.Module.to(build(), dtype)


def clip_l():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, projection_dim=768))


def flux_dev():
    """(transformer, other components' bytes, call shape) of FLUX.1-dev: T5-XXL encoder, CLIP-L, the 16-channel VAE."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    transformer = _meta(lambda: FluxTransformer2DModel(**FLUX_DEV))
    t5 = _meta(lambda: T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                               num_heads=64, feed_forward_proj="gated-gelu")))
    vae = _meta(lambda: AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                      block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                      use_quant_conv=False, use_post_quant_conv=False))
    return transformer, _bytes(t5, _meta(clip_l), vae)


def hunyuan_video():
    """HunyuanVideo: the 12.8B transformer, the Llava-Llama-3-8B text encoder, CLIP-L, the causal 3D VAE."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
    from transformers import LlamaConfig, LlamaModel

    transformer = _meta(HunyuanVideoTransformer3DModel)
    llama = _meta(lambda: LlamaModel(LlamaConfig(vocab_size=128320, hidden_size=4096, intermediate_size=14336,
                                                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)))
    vae = _meta(AutoencoderKLHunyuanVideo)
    return transformer, _bytes(llama, _meta(clip_l), vae)


def inf_dit():
    """The released Inf-DiT and its OpenCLIP ViT-L/14 image encoder."""
    from open_clip.transformer import VisionTransformer

    from hicache.models.inf_dit.checkpoint import RELEASED_CONFIG
    from hicache.models.inf_dit.transformer import InfDiTTransformer2DModel

    transformer = _meta(lambda: InfDiTTransformer2DModel(**RELEASED_CONFIG))
    visual = _meta(lambda: VisionTransformer(image_size=224, patch_size=14, width=1024, layers=24, heads=16,
                                             mlp_ratio=4.0, output_dim=768))
    return transformer, _bytes(visual)


# (experiment, model builder, recipe, shape, cache configs)
N7O2 = dict(method="hicache", interval=7, warmup=3, order=2)
ROWS = (
    ("flux_hicache (FLUX.1-dev, 1024x1024)", flux_dev, "flux", dict(height=1024, width=1024, text_tokens=512)),
    ("hunyuan_video_hicache (65 x 480x640)", hunyuan_video, "hunyuan_video",
     dict(height=480, width=640, frames=65, text_tokens=256)),
    ("infdit_table, HR 1024x1024", inf_dit, "inf_dit", dict(height=1024, width=1024)),
    ("infdit_table, HR 2048x2048", inf_dit, "inf_dit", dict(height=2048, width=2048)),
)
CACHES = (("HiCache O=2, output-dtype (bf16) factors", dict(N7O2)),
          ("HiCache O=2, float32 factors", dict(N7O2, factor_dtype="float32")),
          ("HiCache O=1, bf16", dict(N7O2, order=1)),
          ("FORA", dict(method="fora", interval=7, warmup=3)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity-gib", type=float, default=80 * 1e9 / GiB, help="device memory (default 80 GB)")
    args = parser.parse_args(argv)
    built = {}
    print(f"| experiment | cache | weights (all components) | cache | activations | total | fits {args.capacity_gib:.1f} GiB |")
    print("|---|---|---|---|---|---|---|")
    for label, build, recipe, shape in tqdm(ROWS, desc="experiments", leave=False):
        if build not in built:
            built[build] = build()
        transformer, others = built[build]
        for cache_label, kwargs in CACHES:
            e = hicache.estimate_memory(transformer, hicache.CacheConfig(**kwargs), recipe, **shape)
            weights = e.weight_bytes + others
            total = weights + e.cache_total_bytes + e.activation_bytes
            print(f"| {label} | {cache_label} | {weights / GiB:.1f} | {e.cache_total_bytes / GiB:.1f} "
                  f"| {e.activation_bytes / GiB:.1f} | {total / GiB:.1f} | {'yes' if total <= args.capacity_gib * GiB else 'no'} |",
                  flush=True)


if __name__ == "__main__":
    main()

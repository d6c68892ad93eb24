"""Inf-DiT (`hicache.models.inf_dit.InfDiTTransformer2DModel`), as in the paper's super-resolution table.

Every block's self-attention output and MLP output (both pre-residual) and layer 0's LR
cross-attention output are forecast; a cached step runs only the embeddings, the adaLN
modulations, the LayerNorms and the residual adds. One step is one transformer forward, so with
the Heun sampler 20 sampling steps are 39 cache steps (N, warm-up and full steps count forwards).
"""

import torch

from ..memory import register_input_builder
from . import Recipe, register_recipe

INF_DIT = register_recipe(
    Recipe(
        name="inf_dit",
        forecast=(
            r"transformer_blocks\.\d+\.attn",
            r"transformer_blocks\.0\.cross_attn",
            r"transformer_blocks\.\d+\.ff",
        ),
    )
)


@register_input_builder("inf_dit")
def inf_dit_inputs(config, *, height: int, width: int, batch: int = 1, dtype=torch.bfloat16, device=None, **_):
    """One Inf-DiT forward at an HR size of ``height`` x ``width`` px (the whole image at once, as the pipeline
    runs it: the cache's factors grow with the image's area)."""
    empty = dict(device=device, dtype=dtype)
    return dict(
        hidden_states=torch.empty(batch, config.in_channels, height, width, **empty),
        timestep=torch.ones(batch, **empty),
        lr_image=torch.empty(batch, 3, height // config.sr_scale, width // config.sr_scale, **empty),
        image_embeds=torch.empty(batch, config.vector_dim, **empty),
        return_dict=False,
    )

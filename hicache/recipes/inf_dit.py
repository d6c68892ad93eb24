"""Inf-DiT (`hicache.models.inf_dit.InfDiTTransformer2DModel`), as in the paper's super-resolution table.

Every block's self-attention output and MLP output (both pre-residual) and layer 0's LR
cross-attention output are forecast; a cached step runs only the embeddings, the adaLN
modulations, the LayerNorms and the residual adds. One step is one transformer forward, so with
the Heun sampler 20 sampling steps are 39 cache steps (N, warm-up and full steps count forwards).
"""

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

"""FLUX (`FluxTransformer2DModel`), as in the paper and the official HiCache code.

Double-stream blocks: the pre-gate attention outputs (``attn`` returns the image and text outputs
as a tuple) and the pre-gate image and text MLP outputs are forecast. Single-stream blocks: the
pre-gate ``proj_out`` output is forecast, and the attention and MLP input projection that only feed
it are skipped. A cached step then runs only the embeddings, modulation, gates and residual adds.
"""

from . import Recipe, register_recipe

FLUX = register_recipe(
    Recipe(
        name="flux",
        forecast=(
            r"transformer_blocks\.\d+\.attn",
            r"transformer_blocks\.\d+\.ff",
            r"transformer_blocks\.\d+\.ff_context",
            r"single_transformer_blocks\.\d+\.proj_out",
        ),
        skip=(
            r"single_transformer_blocks\.\d+\.attn",
            r"single_transformer_blocks\.\d+\.proj_mlp",
        ),
    )
)

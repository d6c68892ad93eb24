"""FLUX (`FluxTransformer2DModel`), as in the paper and the official HiCache code.

Double-stream blocks: the pre-gate attention outputs (``attn`` returns the image and text outputs
as a tuple) and the pre-gate image and text MLP outputs are forecast. Single-stream blocks: the
pre-gate ``proj_out`` output is forecast, and the attention and MLP input projection that only feed
it are skipped, as are the LayerNorms in front of forecast modules and the rotary embedding
(``pos_embed``) that only attention reads, and the adaLN modulation linears compute only their gate
rows. A cached step then runs only the embeddings, the gates and the residual adds.
"""

from . import double_single_stream, register_recipe

FLUX = register_recipe(double_single_stream("flux"))

from .lesa import LesaRecipe, register_lesa_recipe  # noqa: E402

# LESA forecasts the image hidden state after the last single-stream block, the input of ``norm_out``
# (diffusers' single-stream blocks already return the image tokens alone); the embeddings of the image, text
# and positions and every block only feed it. ``time_text_embed`` runs: ``norm_out`` reads its ``temb``.
FLUX_LESA = register_lesa_recipe(LesaRecipe(
    name="flux",
    target="norm_out",
    io="input",
    skip=(r"x_embedder", r"context_embedder", r"pos_embed", r"transformer_blocks\.\d+",
          r"single_transformer_blocks\.\d+"),
    timestep_scale=1.0,
))

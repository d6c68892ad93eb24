"""FLUX (`FluxTransformer2DModel`), as in the paper and the official HiCache code.

Double-stream blocks: the pre-gate attention outputs (``attn`` returns the image and text outputs
as a tuple) and the pre-gate image and text MLP outputs are forecast. Single-stream blocks: the
pre-gate ``proj_out`` output is forecast, and the attention and MLP input projection that only feed
it are skipped, as are the LayerNorms in front of forecast modules and the rotary embedding
(``pos_embed``) that only attention reads, and the adaLN modulation linears compute only their gate
rows. A cached step then runs only the embeddings, the gates and the residual adds.

ClusCa / Hi-ClusCa (official HiCache tree, ``DoubleStreamBlock.forward``, type "ClusCa"): at a cached
step every double-stream block recomputes its image MLP ``ff`` (BFL ``img_mlp``) and its text MLP
``ff_context`` (``txt_mlp``) for one token per cluster. The tokens are picked from the input of
``norm2`` / ``norm2_context`` (the residual stream after the attention add, as the official code
picks them from ``img``/``txt`` there); those LayerNorms and the adaLN MLP shift and scale (chunks 3
and 4 of ``norm1(_context).linear``) then run on the K tokens only. Only the image MLP propagates
(the official code leaves the text propagation out). ClusCa clusters at every full step on the last
double-stream block's output, ``(encoder_hidden_states, hidden_states)``: image = element 1, text =
element 0. Single-stream blocks and the attentions are forecast as for TaylorSeer / HiCache.
"""

import torch

from ..memory import register_input_builder
from . import ClusterSource, FreshTokens, double_single_stream, register_recipe

DOUBLE_STREAM_FRESH_TOKENS = (
    FreshTokens(module=r"transformer_blocks\.\d+\.ff", select=r"transformer_blocks\.\d+\.norm2",
                stream="image", propagate=True),
    FreshTokens(module=r"transformer_blocks\.\d+\.ff_context", select=r"transformer_blocks\.\d+\.norm2_context",
                stream="text", propagate=False),
)
# image before text: the order of the official K-means calls, hence of their random draws
DOUBLE_STREAM_CLUSTER_SOURCES = (
    ClusterSource(stream="image", module=r"transformer_blocks\.\d+", output=1),
    ClusterSource(stream="text", module=r"transformer_blocks\.\d+", output=0),
)

FLUX = register_recipe(double_single_stream(
    "flux",
    fresh_tokens=DOUBLE_STREAM_FRESH_TOKENS,
    cluster_sources=DOUBLE_STREAM_CLUSTER_SOURCES,
    fresh_live_chunks={
        r"transformer_blocks\.\d+\.norm1(_context)?\.linear": (6, (2, 3, 4, 5)),  # + MLP shift and scale
        r"single_transformer_blocks\.\d+\.norm\.linear": (3, (2,)),
    },
))

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

@register_input_builder("flux")
def flux_inputs(config, *, height: int, width: int, batch: int = 1, text_tokens: int = 512, dtype=torch.bfloat16,
                device=None, vae_scale_factor: int = 8, **_):
    """`FluxTransformer2DModel` inputs as `FluxPipeline` feeds them: latents packed 2x2 into tokens of a
    ``vae_scale_factor``-times smaller latent image, ``text_tokens`` T5 tokens (max_sequence_length)."""
    tokens = (height // (2 * vae_scale_factor)) * (width // (2 * vae_scale_factor))
    empty = dict(device=device, dtype=dtype)
    return dict(
        hidden_states=torch.empty(batch, tokens, config.in_channels, **empty),
        encoder_hidden_states=torch.empty(batch, text_tokens, config.joint_attention_dim, **empty),
        pooled_projections=torch.empty(batch, config.pooled_projection_dim, **empty),
        timestep=torch.ones(batch, **empty),
        img_ids=torch.zeros(tokens, 3, **empty),
        txt_ids=torch.zeros(text_tokens, 3, **empty),
        guidance=torch.ones(batch, **empty) if config.guidance_embeds else None,
        return_dict=False,
    )

"""HunyuanVideo (`HunyuanVideoTransformer3DModel`, text-to-video and its token-replace I2V variant).

The block layout is FLUX's, in 3D: 20 double-stream blocks, then 40 single-stream blocks, each
called positionally and returning ``(hidden_states, encoder_hidden_states)``.

Double-stream blocks: ``attn`` returns the video and text attention outputs as a tuple, after
``to_out``/``to_add_out`` but before the ``gate_msa``/``c_gate_msa`` gates and the residual add, so
the tuple is forecast as is; ``ff`` and ``ff_context`` are forecast before ``gate_mlp``/``c_gate_mlp``
and the residual. Single-stream blocks: ``proj_out`` is forecast (the block multiplies its output by
the gate and adds the residual afterwards), and the attention, ``proj_mlp`` and ``act_mlp`` that only
feed it are skipped, as are the LayerNorms in front of forecast modules and the rotary embedding
(``rope``) that only attention reads (`double_single_stream`, shared with FLUX). The token refiner
(``context_embedder``), the embeddings, the AdaLN modulation linears (at cached steps only their gate
rows), the gates, the residual adds and the output norm/projection run at every step.

The patterns are anchored on the top-level block lists, so the refiner's own ``attn``/``ff``
(``context_embedder.token_refiner.refiner_blocks.*``) never match.
"""

import torch

from ..memory import register_input_builder
from . import double_single_stream, register_recipe

HUNYUAN_VIDEO = register_recipe(double_single_stream("hunyuan_video"))

from .lesa import LesaRecipe, register_lesa_recipe  # noqa: E402

# LESA forecasts the model output. Here it is taken as the output of ``proj_out``, before the unpatchify
# reshape and permute: the predictor is elementwise along the history axis (and its loss a mean), so forecasting
# a permutation of the output is the same forecast, and ``proj_out`` and ``norm_out`` need not run. Everything
# before them (embeddings, token refiner, rotary embedding, blocks) only feeds them. The pipeline passes
# timestep = 1000 t.
HUNYUAN_VIDEO_LESA = register_lesa_recipe(LesaRecipe(
    name="hunyuan_video",
    target="proj_out",
    io="output",
    skip=(r"x_embedder", r"context_embedder", r"time_text_embed", r"rope", r"transformer_blocks\.\d+",
          r"single_transformer_blocks\.\d+", r"norm_out"),
    timestep_scale=1e-3,
))

@register_input_builder("hunyuan_video")
def hunyuan_video_inputs(config, *, height: int, width: int, frames: int = 65, batch: int = 1, text_tokens: int = 256,
                         dtype=torch.bfloat16, device=None, vae_scale_factor: int = 8, vae_temporal_factor: int = 4, **_):
    """`HunyuanVideoTransformer3DModel` inputs as `HunyuanVideoPipeline` feeds them (VAE: 8x spatial, 4x temporal
    compression; ``text_tokens`` Llama tokens, max_sequence_length)."""
    latent_frames = (frames - 1) // vae_temporal_factor + 1
    empty = dict(device=device, dtype=dtype)
    return dict(
        hidden_states=torch.empty(batch, config.in_channels, latent_frames, height // vae_scale_factor,
                                  width // vae_scale_factor, **empty),
        encoder_hidden_states=torch.empty(batch, text_tokens, config.text_embed_dim, **empty),
        encoder_attention_mask=torch.ones(batch, text_tokens, **empty),
        pooled_projections=torch.empty(batch, config.pooled_projection_dim, **empty),
        timestep=torch.ones(batch, **empty),
        guidance=torch.ones(batch, **empty) * 6000.0,
        return_dict=False,
    )

"""Qwen-Image (`QwenImageTransformer2DModel`), as the official HiCache Qwen-Image backend caches it.

The same transformer class serves Qwen-Image, Qwen-Image-Edit and Qwen-Image-Edit-Plus (the edit
pipelines concatenate the reference image's latents to the image tokens, so the forecast image-stream
tensors hold noisy and reference tokens alike). Each of the 60 ``transformer_blocks`` is a
double-stream (MMDiT) block returning ``(encoder_hidden_states, hidden_states)``; four outputs are
forecast, all before their gates and residual adds, as the official block forward caches
``img_attn``/``txt_attn``/``img_mlp``/``txt_mlp``:

- ``attn`` returns the image and text attention outputs as a tuple (after ``to_out``/``to_add_out``),
  forecast as one tuple;
- ``img_mlp`` and ``txt_mlp``, the pre-gate MLP outputs.

What a cached step does not need is skipped (``tests/test_recipe_skips.py`` proves each one dead):

- the LayerNorms in front of the forecast modules (``img_norm1``, ``txt_norm1``, ``img_norm2``,
  ``txt_norm2``: no affine, their outputs are only modulated per channel and fed to the forecast
  modules) stand in with one token of zeros (``skip_broadcast``);
- the rotary embedding (``pos_embed``), which only attention reads;
- the whole text stream: only the image stream reaches ``norm_out``, so at a cached step the text
  residual stream is computed by nobody's request. The text input projection (``txt_in``, full-size
  zeros: the model reads the text length and the mask's shape from its output) and the RMSNorm in
  front of it (``txt_norm``) are skipped, and so is the text modulation (``txt_mod``: its gates only
  scale text-stream terms). The text forecasts themselves (``attn``'s second output, ``txt_mlp``) are
  still formed at cached steps, as the official code does (wasted work, as the official code's; they
  are small: text tokens only);
- of the image modulation linear (``img_mod.1``: shift, scale, gate of the attention, then of the
  MLP) a cached step reads only the gates, chunks 2 and 5 of 6 (``live_chunks``). With
  ``zero_cond_t`` (Edit-Plus-2511) ``img_mod`` runs on a doubled batch, which live chunks survive.

Always run: ``img_in``, ``time_text_embed`` (the gates depend on the current t), the image
modulation's gate rows, the gating multiplies and residual adds, ``norm_out`` and ``proj_out``.

ClusCa / Hi-ClusCa. The official tree has no ClusCa for Qwen-Image (its Qwen backend accepts only
original/TaylorSeer/HiCache: ``../shared/research/qwen_image.md``), so this is the FLUX double-stream
rule carried over, block for block (``recipes/flux.py``; Qwen-Image has only double-stream blocks): at a
cached step every block recomputes ``img_mlp`` and ``txt_mlp`` for one token per cluster, picked from
the input of ``img_norm2``/``txt_norm2`` (the residual stream after the attention add), which then run
on the K tokens with the MLP shift and scale (chunks 3 and 4 of ``img_mod.1``/``txt_mod.1``); only the
image MLP propagates; clusters come from the last block's output ``(encoder_hidden_states,
hidden_states)``. The fresh text tokens need the true text stream, so the text input (``txt_norm``,
``txt_in``) and modulation (``txt_mod``, gates plus MLP shift and scale) run at cached steps too;
``txt_norm1`` (it feeds only the forecast attention) stays skipped. As in the official FLUX code, the fresh
text tokens reach no output: the text stream feeds the image only through the attention, which a cached
step forecasts (a few MLP rows and the small text projections: kept to match the FLUX rule and the issue,
``tests/test_qwen_image_recipe.py`` checks they see the true text stream). Edit-Plus-2511's ``zero_cond_t``
modulates each token by its own index, which K selected tokens do not carry, so it is refused.
"""

import torch

from ..memory import register_input_builder
from . import ClusterSource, FreshTokens, Recipe, register_recipe

BLOCK = r"transformer_blocks\.\d+\."

QWEN_IMAGE = register_recipe(
    Recipe(
        name="qwen_image",
        forecast=(BLOCK + "attn", BLOCK + "img_mlp", BLOCK + "txt_mlp"),
        skip=(r"pos_embed", r"txt_in", BLOCK + "txt_mod"),
        skip_broadcast=(r"txt_norm", BLOCK + r"(img|txt)_norm[12]"),
        live_chunks={BLOCK + r"img_mod\.1": (6, (2, 5))},
        fresh_tokens=(
            FreshTokens(module=BLOCK + "img_mlp", select=BLOCK + "img_norm2", stream="image", propagate=True),
            FreshTokens(module=BLOCK + "txt_mlp", select=BLOCK + "txt_norm2", stream="text", propagate=False),
        ),
        cluster_sources=(  # image first, as in the flux recipe (the order of the K-means draws)
            ClusterSource(stream="image", module=r"transformer_blocks\.\d+", output=1),
            ClusterSource(stream="text", module=r"transformer_blocks\.\d+", output=0),
        ),
        fresh_run=(r"txt_norm", r"txt_in", BLOCK + "txt_mod"),
        fresh_live_chunks={BLOCK + r"(img|txt)_mod\.1": (6, (2, 3, 4, 5))},  # + MLP shift and scale
        fresh_refused={"zero_cond_t": "its modulation picks per-token parameters by token index, which the K "
                                      "recomputed tokens do not carry"},
    )
)

from .lesa import LesaRecipe, register_lesa_recipe  # noqa: E402

# LESA forecasts the image hidden state after ``norm_out`` and before ``proj_out`` (the input of ``proj_out``), per
# CFG branch (a predictor with ``branches: [cond, uncond]`` under true CFG); the embeddings, the text stream, the
# rotary embedding, every block and ``norm_out`` itself (and the time embedding, which only the blocks and
# ``norm_out`` read) only feed it. The pipeline passes timestep = t; the official stage thresholds are 0.9 / 0.4.
QWEN_IMAGE_LESA = register_lesa_recipe(LesaRecipe(
    name="qwen_image",
    target="proj_out",
    io="input",
    skip=(r"img_in", r"txt_norm", r"txt_in", r"time_text_embed", r"pos_embed", r"transformer_blocks\.\d+",
          r"norm_out"),
    timestep_scale=1.0,
    stage_thresholds=(0.9, 0.4),
))


@register_input_builder("qwen_image")
def qwen_image_inputs(config, *, height: int, width: int, batch: int = 1, text_tokens: int = 128, dtype=torch.bfloat16,
                      device=None, vae_scale_factor: int = 8, **_):
    """`QwenImageTransformer2DModel` inputs as `QwenImagePipeline` feeds them: latents packed 2x2 into tokens of a
    ``vae_scale_factor``-times smaller latent image, ``text_tokens`` Qwen2.5-VL tokens (the prompt's length)."""
    rows, cols = height // vae_scale_factor // 2, width // vae_scale_factor // 2
    empty = dict(device=device, dtype=dtype)
    return dict(
        hidden_states=torch.empty(batch, rows * cols, config.in_channels, **empty),
        encoder_hidden_states=torch.empty(batch, text_tokens, config.joint_attention_dim, **empty),
        encoder_hidden_states_mask=torch.ones(batch, text_tokens, dtype=torch.long, device=device),
        timestep=torch.ones(batch, **empty),
        img_shapes=[[(1, rows, cols)]] * batch,
        return_dict=False,
    )

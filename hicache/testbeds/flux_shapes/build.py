"""Construct the untrained testbed `FluxPipeline`: the real diffusers/transformers classes, small.

Everything is built from configs and a local word-level vocabulary (the hub is unreachable), so the
trained folder loads with a plain `FluxPipeline.from_pretrained(folder)` like any downloaded FLUX.
Sizes are chosen so that training fits an hour on 2 CPU cores and a 50-step 64 px image takes
about a second: a VAE with x8 downsampling to 8x8x16 latents (16 packed image tokens; x4, 64 tokens,
reconstructs the 10-pixel shapes better but the transformer then learns more slowly) and a FLUX
transformer with a few double- and single-stream blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dataset import VOCABULARY

MAX_TEXT_TOKENS = 24  # longest grammar caption is 22 words + </s>


@dataclass
class TestbedSizes:
    """Architecture knobs (the Hydra config's `model` group maps onto these)."""

    __test__ = False  # not a pytest class

    vae_channels: tuple[int, ...] = (16, 32, 64, 64)
    vae_latent_channels: int = 16
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    num_layers: int = 2
    num_single_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)
    max_text_tokens: int = MAX_TEXT_TOKENS


def build_tokenizer(max_length: int = MAX_TEXT_TOKENS):
    """Word-level fast tokenizer over the caption grammar; appends </s> like CLIP/T5 tokenizers.

    The trailing </s> matters: `CLIPTextModel` pools the hidden state at the first </s>, which,
    under CLIP's causal mask, is the only position that has seen the whole caption.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(VOCABULARY))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def build_vae(sizes: TestbedSizes):
    from diffusers import AutoencoderKL

    n = len(sizes.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=sizes.vae_latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(sizes.vae_channels),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.0,  # set from the latent statistics after VAE training
        shift_factor=0.0,
    )


def build_text_encoders(sizes: TestbedSizes, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=sizes.text_width,
            intermediate_size=2 * sizes.text_width,
            num_attention_heads=sizes.text_heads,
            num_hidden_layers=sizes.text_layers,
            max_position_embeddings=sizes.max_text_tokens,
            projection_dim=sizes.text_width,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=sizes.text_width,
            d_kv=sizes.text_width // sizes.text_heads,
            d_ff=2 * sizes.text_width,
            num_layers=sizes.text_layers,
            num_heads=sizes.text_heads,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )
    return clip, t5


def build_transformer(sizes: TestbedSizes):
    from diffusers import FluxTransformer2DModel

    if sum(sizes.axes_dims_rope) != sizes.attention_head_dim:
        raise ValueError(f"axes_dims_rope {sizes.axes_dims_rope} must sum to attention_head_dim {sizes.attention_head_dim}")
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * sizes.vae_latent_channels,  # FLUX packs 2x2 latent patches into one token
        num_layers=sizes.num_layers,
        num_single_layers=sizes.num_single_layers,
        attention_head_dim=sizes.attention_head_dim,
        num_attention_heads=sizes.num_attention_heads,
        joint_attention_dim=sizes.text_width,
        pooled_projection_dim=sizes.text_width,
        guidance_embeds=False,
        axes_dims_rope=tuple(sizes.axes_dims_rope),
    )


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1's scheduler settings; the resolution-dependent shift is computed by the pipeline
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def with_shift(scheduler, mu: float):
    """The FLUX scheduler with its shift exponent fixed at `mu` for every image size.

    FluxPipeline interpolates mu linearly in the token count between base_shift (256 tokens) and
    max_shift (4096), so a 16- or 64-token testbed samples at mu 0.46 (shift 1.6) where FLUX.1-dev at
    1024 px samples at 1.15 (shift 3.2); with base_shift == max_shift the interpolation returns mu
    everywhere, and the folder saved from it keeps that schedule."""
    if not scheduler.config.get("use_dynamic_shifting"):
        raise ValueError(f"a fixed mu needs a scheduler with use_dynamic_shifting (FLUX's); {type(scheduler).__name__} "
                         f"here shifts by its fixed shift={scheduler.config.get('shift')}")
    return type(scheduler).from_config(scheduler.config, base_shift=mu, max_shift=mu)


def build_pipeline(sizes: TestbedSizes | None = None, seed: int = 0):
    """The untrained testbed pipeline, deterministic in `seed`."""
    from diffusers import FluxPipeline

    sizes = sizes or TestbedSizes()
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizer(sizes.max_text_tokens), build_tokenizer(sizes.max_text_tokens)
    vae = build_vae(sizes)
    clip, t5 = build_text_encoders(sizes, tokenizer)
    transformer = build_transformer(sizes)
    return FluxPipeline(
        scheduler=build_scheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )

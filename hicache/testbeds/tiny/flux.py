"""Tiny, randomly initialised diffusers pipelines built from configs, for tests and smoke runs.

The hub is unreachable here, so nothing may be fetched: every component, the tokenizers included,
is built locally. The models are the real diffusers classes at toy sizes, so the code path is the
one a GPU user runs on the real weights.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

TINY_WORDS = (
    "a an the of on in at with and small large big tiny red green blue yellow white black orange purple "
    "circle square triangle star cat dog photo picture painting top bottom left right center middle "
    "background striped plain gradient"
).split()


def word_tokenizer(words=TINY_WORDS, model_max_length: int = 77):
    """A word-level fast tokenizer over ``words`` (plus letters and digits), built without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in list(words) + list(string.ascii_lowercase + string.digits + string.punctuation):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    from tokenizers import normalizers

    tok.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def tiny_flux_transformer(num_layers: int = 1, num_single_layers: int = 1, seed: int = 0, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    config = dict(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    )
    config.update(overrides)
    return FluxTransformer2DModel(**config).eval()


def tiny_flux_pipeline(seed: int = 0, num_layers: int = 1, num_single_layers: int = 1):
    """A `FluxPipeline` with random tiny components: 4 image tokens per 16 px, runs in milliseconds."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    transformer = tiny_flux_transformer(num_layers, num_single_layers, seed=seed, in_channels=16)
    torch.manual_seed(seed + 1)
    tokenizer = word_tokenizer(model_max_length=16)
    tokenizer_2 = word_tokenizer(model_max_length=16)
    vocab = len(tokenizer)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=16, projection_dim=32, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
        )
    ).eval()
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0,
        )
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler()
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
        tokenizer_2=tokenizer_2, transformer=transformer,
    )


def save_tiny_flux_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline as a `from_pretrained` folder, like a downloaded model."""
    folder = Path(folder)
    tiny_flux_pipeline(seed).save_pretrained(folder)
    return folder

"""A tiny, randomly initialised `HunyuanVideoPipeline` built from configs, for tests and smoke runs.

Every component is the real diffusers/transformers class at toy size (transformer, 3D causal VAE
with HunyuanVideo's 8x spatial / 4x temporal compression, Llama and CLIP text encoders), so the
pipeline runs exactly the code a GPU user runs on ``hunyuanvideo-community/HunyuanVideo``. The hub
is unreachable, so the two tokenizers are word-level fast tokenizers built here.

The pipeline wraps prompts in a Llama-3 chat template and crops the template's tokens from the
encoder output by count (``crop_start``, 95 for the real Llama-3 tokenizer). A word-level tokenizer
splits the template differently, so `tiny_prompt_template` gives the same template with the crop
measured on the tiny tokenizer; pass it as ``prompt_template=`` to keep the prompt words.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import torch

from .flux import TINY_WORDS

LLAMA_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>")
CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
UNK = "<unk>"

# The pipeline tokenises the template plus the prompt to ``max_sequence_length + crop_start`` tokens.
TINY_MAX_SEQUENCE_LENGTH = 16
CLIP_MAX_LENGTH = 77  # the pipeline pads CLIP prompts to 77 tokens, whatever the tokenizer says


def _default_template() -> dict:
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return DEFAULT_PROMPT_TEMPLATE


def _word_level(words, specials: tuple[str, ...], bos: str, eos: str | None, pad: str, model_max_length: int):
    """A lower-casing word-level tokenizer that adds ``bos`` (and ``eos``) around every text, like the originals."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in (*specials, UNK, *words, *string.ascii_lowercase, *string.digits, *string.punctuation):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = f"{bos} $A" + (f" {eos}" if eos else "")
    special_ids = [(t, vocab[t]) for t in (bos, eos) if t]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special_ids)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos or bos, pad_token=pad, unk_token=UNK,
        model_max_length=model_max_length,
    )
    fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (bos, eos, pad)]})
    return fast


def tiny_llama_tokenizer():
    """Llama-3-like: the chat-template specials, a BOS on every text, the template's words in the vocabulary."""
    template_words = re.findall(r"[a-z]+", _default_template()["template"].lower())
    return _word_level(
        list(dict.fromkeys([*TINY_WORDS, *template_words])), LLAMA_SPECIALS, bos="<|begin_of_text|>", eos=None,
        pad="<|end_of_text|>", model_max_length=512,
    )


def tiny_clip_tokenizer():
    """CLIP-like: ``<|startoftext|> ... <|endoftext|>``, padded with ``<|endoftext|>``."""
    return _word_level(
        TINY_WORDS, CLIP_SPECIALS, bos="<|startoftext|>", eos="<|endoftext|>", pad="<|endoftext|>",
        model_max_length=CLIP_MAX_LENGTH,
    )


def tiny_prompt_template(tokenizer) -> dict:
    """The pipeline's default template, with ``crop_start`` measured on ``tokenizer`` (BOS included)."""
    template = _default_template()["template"]
    prefix = template[: template.index("{}")]
    crop_start = len(tokenizer(prefix)["input_ids"])
    return {"template": template, "crop_start": crop_start}


def tiny_hunyuan_video_transformer(num_layers: int = 2, num_single_layers: int = 2, seed: int = 0, **overrides):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    config = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4),
    )
    config.update(overrides)
    return HunyuanVideoTransformer3DModel(**config).eval()


def tiny_hunyuan_video_vae(seed: int = 0):
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(seed)
    return AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    ).eval()


def tiny_hunyuan_video_pipeline(seed: int = 0, num_layers: int = 2, num_single_layers: int = 2):
    """A `HunyuanVideoPipeline` with random tiny components; a 9-frame 32x32 video takes about a second."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    transformer = tiny_hunyuan_video_transformer(num_layers, num_single_layers, seed=seed)
    vae = tiny_hunyuan_video_vae(seed=seed + 1)
    tokenizer, tokenizer_2 = tiny_llama_tokenizer(), tiny_clip_tokenizer()
    torch.manual_seed(seed + 2)
    llama = LlamaModel(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=transformer.config.text_embed_dim, intermediate_size=37,
            num_hidden_layers=3,  # the pipeline takes the hidden state 2 layers before the last
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer_2), hidden_size=transformer.config.pooled_projection_dim, intermediate_size=37,
            num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=CLIP_MAX_LENGTH,
            projection_dim=transformer.config.pooled_projection_dim, bos_token_id=tokenizer_2.bos_token_id,
            eos_token_id=tokenizer_2.eos_token_id, pad_token_id=tokenizer_2.pad_token_id,
        )
    ).eval()
    return HunyuanVideoPipeline(
        text_encoder=llama, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip, tokenizer_2=tokenizer_2,
    )


def save_tiny_hunyuan_video_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline as a `from_pretrained` folder, laid out like a downloaded model."""
    folder = Path(folder)
    tiny_hunyuan_video_pipeline(seed).save_pretrained(folder)
    return folder


def tiny_call_kwargs(pipe) -> dict:
    """Call arguments that fit the tiny pipeline: its prompt template and a short text sequence."""
    return {"prompt_template": tiny_prompt_template(pipe.tokenizer), "max_sequence_length": TINY_MAX_SEQUENCE_LENGTH}

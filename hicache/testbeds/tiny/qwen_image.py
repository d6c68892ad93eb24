"""Tiny, randomly initialised Qwen-Image pipelines built from configs, for tests and smoke runs.

Every component is the real diffusers/transformers class at toy size: `QwenImageTransformer2DModel`,
`AutoencoderKLQwenImage`, and a Qwen2.5-VL text encoder (`Qwen2_5_VLForConditionalGeneration`, its
vision tower included, which the edit pipeline feeds the input image). So the pipelines run exactly
the code a GPU user runs on ``Qwen/Qwen-Image`` and ``Qwen/Qwen-Image-Edit``. The hub is unreachable,
so the tokenizer is a word-level fast tokenizer built here, with Qwen's chat specials.

The pipelines drop the system part of their prompt template from the encoder output by count
(``prompt_template_encode_start_idx``: 34 tokens for text-to-image, 64 for edit, on the real
tokenizer). The tiny tokenizer splits words, punctuation runs, English contractions and newlines the
way Qwen's byte-level BPE splits those two templates, so both counts hold on it too (tested): the
prompt's own words are what reaches the transformer, as with the real model.

The edit pipeline resizes every input image to about 1024x1024 (``calculate_dimensions(1024 * 1024,
ratio)``) before VAE-encoding it, whatever the output size. The tiny edit VAE therefore downsamples
32x (five stages instead of three), so the reference image is 16x16 packed tokens, and the tiny
image processor caps the vision tower's input at 56x56 pixels (4 image tokens in the prompt).
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import torch

from hicache.testbeds.tiny.flux import TINY_WORDS

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")
UNK = "<unk>"
# Words, then runs of punctuation, English contractions and newlines: how Qwen's BPE splits its templates.
PRE_TOKENIZER_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d|\w+|[^\w\s']+|'|\n"

# Edit instructions of the tiny edit set (hicache.app.qwen_image.EDIT_INSTRUCTIONS) use these words too.
EDIT_WORDS = ("make change turn replace remove add into to colour color from shape move it its".split())

TEXT_HIDDEN = 32  # the text encoder's hidden size = the transformer's joint_attention_dim
VISION_PATCH = 14
VISION_MERGE = 2
VISION_MAX_PIXELS = 56 * 56  # 4x4 patches of 14 px -> 2x2 merged image tokens in the prompt


def _templates() -> list[str]:
    """The prompt templates of `QwenImagePipeline` and `QwenImageEditPipeline`, as the installed diffusers sets them
    in ``__init__`` (read from its source: building a pipeline needs every component)."""
    import ast
    import inspect

    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    out = []
    for cls in (QwenImagePipeline, QwenImageEditPipeline):
        source = inspect.getsource(cls.__init__)
        out += [ast.literal_eval(m) for m in re.findall(r'self\.prompt_template_encode = (".*?")\n', source)]
    if len(out) != 2:
        raise RuntimeError("diffusers' Qwen-Image pipelines no longer set prompt_template_encode in __init__")
    return out


def tiny_qwen_tokenizer(extra_words=()):
    """A word-level fast tokenizer with Qwen's chat and vision specials (no download)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Split(Regex(PRE_TOKENIZER_PATTERN), behavior="removed", invert=True)
    words = []
    for template in _templates():
        words += [p for p, _ in pre.pre_tokenize_str(template.lower().replace("{}", " "))]
    vocab: dict[str, int] = {}
    for token in (*QWEN_SPECIALS, UNK, *TINY_WORDS, *EDIT_WORDS, *extra_words, *words,
                  *string.ascii_lowercase, *string.digits, *string.punctuation, "\n"):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=UNK, model_max_length=32768)
    fast.add_special_tokens({"additional_special_tokens": [s for s in QWEN_SPECIALS if s not in ("<|im_end|>", "<|endoftext|>")]})
    return fast


def tiny_qwen_image_transformer(num_layers: int = 2, seed: int = 0, **overrides):
    """A `QwenImageTransformer2DModel` with 2 heads of 16 (hidden 32) on 16-channel latents packed 2x2."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    config = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=num_layers, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(4, 6, 6))
    config.update(overrides)
    return QwenImageTransformer2DModel(**config).eval()


def tiny_qwen_image_vae(seed: int = 0, downsamples: int = 3):
    """`AutoencoderKLQwenImage` with 4 latent channels, 2**downsamples spatial compression."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=4, z_dim=4, dim_mult=[1] * (downsamples + 1), num_res_blocks=0, attn_scales=[],
        temperal_downsample=[False] * downsamples, latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ).eval()


def tiny_qwen_text_encoder(tokenizer, seed: int = 0):
    """A Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) at toy size, vision tower included."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, in_channels=3,
                           patch_size=VISION_PATCH, spatial_merge_size=VISION_MERGE, temporal_patch_size=2,
                           out_hidden_size=TEXT_HIDDEN, window_size=VISION_PATCH * VISION_MERGE * 2,
                           fullatt_block_indexes=[0]),
        **ids,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_processor(tokenizer):
    """`Qwen2VLProcessor` with a small image budget, so the prompt holds a few image tokens."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(patch_size=VISION_PATCH, merge_size=VISION_MERGE, temporal_patch_size=2,
                                            min_pixels=VISION_MAX_PIXELS, max_pixels=VISION_MAX_PIXELS)
    video_processor = Qwen2VLVideoProcessor(patch_size=VISION_PATCH, merge_size=VISION_MERGE, temporal_patch_size=2)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # Qwen-Image's scheduler config: dynamic shift on the image sequence length.
    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
        shift=1.0, shift_terminal=0.02, use_dynamic_shifting=True, time_shift_type="exponential",
    )


def tiny_qwen_image_pipeline(seed: int = 0, num_layers: int = 2):
    """A `QwenImagePipeline` with random tiny components (VAE 8x): a 64x64 image is 16 image tokens."""
    from diffusers import QwenImagePipeline

    tokenizer = tiny_qwen_tokenizer()
    return QwenImagePipeline(
        scheduler=_scheduler(), vae=tiny_qwen_image_vae(seed + 1, downsamples=3),
        text_encoder=tiny_qwen_text_encoder(tokenizer, seed + 2), tokenizer=tokenizer,
        transformer=tiny_qwen_image_transformer(num_layers, seed=seed),
    )


def tiny_qwen_image_edit_pipeline(seed: int = 0, num_layers: int = 2):
    """A `QwenImageEditPipeline` with random tiny components (VAE 32x, see the module docstring)."""
    from diffusers import QwenImageEditPipeline

    tokenizer = tiny_qwen_tokenizer()
    return QwenImageEditPipeline(
        scheduler=_scheduler(), vae=tiny_qwen_image_vae(seed + 1, downsamples=5),
        text_encoder=tiny_qwen_text_encoder(tokenizer, seed + 2), tokenizer=tokenizer,
        processor=tiny_qwen_processor(tokenizer), transformer=tiny_qwen_image_transformer(num_layers, seed=seed),
    )


def save_tiny_pipeline(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny ``kind`` ("qwen_image" or "qwen_image_edit") pipeline as a `from_pretrained` folder."""
    builders = {"qwen_image": tiny_qwen_image_pipeline, "qwen_image_edit": tiny_qwen_image_edit_pipeline}
    if kind not in builders:
        raise ValueError(f"unknown tiny Qwen-Image pipeline {kind!r}; known: {', '.join(builders)}")
    folder = Path(folder)
    builders[kind](seed).save_pretrained(folder)
    return folder

"""`InfDiTTransformer2DModel`: the network of the official Inf-DiT `DiffusionEngine`, in plain PyTorch.

It computes what the official `model_forward` computes (the network F of EDM, before the
preconditioning, which the pipeline applies) in the default ``full`` inference mode. The official
quirks are kept on purpose, since the released weights were trained with them:

- the input is concat(noisy HR, bicubic-upsampled LR), both already scaled by c_in (done by the caller);
- the conditioning is a 192-channel cos/sin embedding of c_noise through an MLP, plus an MLP of the
  CLIP image vector, then SiLU; every adaLN applies SiLU once more before its linear layer;
- adaLN has no gates (shift/scale only) and all LayerNorms of the trunk are affine-free;
- the self-attention is block attention with a shared q/k LayerNorm, pix2struct 2-D RoPE with
  positions modulo 8 * image_size / patch_size, and learned per-neighbour key offsets (see `attention`);
- layer 0 cross-attends to the LR image and is followed by an affine LayerNorm instead of the
  affine-free one;
- the final LayerNorm of the trunk is followed by the final layer's own LayerNorm (applied twice).

Submodules named for the caching core: ``transformer_blocks.{i}.attn`` and ``.ff`` return their
outputs before the residual add, and so does ``transformer_blocks.0.cross_attn``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .attention import InfDiTBlockAttention, InfDiTLRCrossAttention, rope_cos_sin, rope_position_ids


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class InfDiTTimeEmbedding(nn.Module):
    """EDM-style Fourier embedding of c_noise (cos then sin, 192 channels by default) and an MLP."""

    def __init__(self, hidden_size: int, num_channels: int = 192, max_positions: int = 10000):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.linear_1 = nn.Linear(num_channels, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = (1 / self.max_positions) ** (torch.arange(half, dtype=torch.float32, device=c_noise.device) / half)
        angles = torch.outer(c_noise, freqs.to(c_noise.dtype))
        x = torch.cat([angles.cos(), angles.sin()], dim=1)
        return self.linear_2(F.silu(self.linear_1(x)))


class InfDiTVectorEmbedding(nn.Module):
    """MLP of the (L2-normalised) CLIP image embedding of the LR image."""

    def __init__(self, vector_dim: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(vector_dim, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, vector: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(vector)))


class InfDiTFeedForward(nn.Module):
    def __init__(self, hidden_size: int, inner_size: int):
        super().__init__()
        self.proj_in = nn.Linear(hidden_size, inner_size)
        self.proj_out = nn.Linear(inner_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(F.gelu(self.proj_in(x), approximate="tanh"))


class InfDiTBlock(nn.Module):
    """Pre-LN adaLN block without gates; block 0 also carries the LR cross-attention."""

    def __init__(self, hidden_size: int, num_heads: int, block_tokens: int, mlp_ratio: int, eps: float,
                 lr_block_tokens: int | None = None, lr_patch_size: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=eps)
        self.attn = InfDiTBlockAttention(hidden_size, num_heads, block_tokens, eps=eps)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=eps)
        if lr_block_tokens is not None:
            self.cross_attn = InfDiTLRCrossAttention(hidden_size, num_heads, block_tokens, lr_block_tokens,
                                                     lr_patch_size=lr_patch_size, eps=eps)
            self.norm_cross = nn.LayerNorm(hidden_size, eps=eps)
        else:
            self.cross_attn = None
        self.ff = InfDiTFeedForward(hidden_size, mlp_ratio * hidden_size)
        self.adaln_modulation = nn.Linear(hidden_size, 4 * hidden_size)

    def forward(self, hidden_states, emb, rope, grid, lr_image=None):
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaln_modulation(F.silu(emb)).chunk(4, dim=1)
        hidden_states = hidden_states + self.attn(_modulate(self.norm1(hidden_states), shift_msa, scale_msa), rope, grid)
        if self.cross_attn is not None:
            hidden_states = hidden_states + self.cross_attn(self.norm2(hidden_states), lr_image, grid)
            mlp_input = self.norm_cross(hidden_states)
        else:
            mlp_input = self.norm2(hidden_states)
        return hidden_states + self.ff(_modulate(mlp_input, shift_mlp, scale_mlp))


class InfDiTTransformer2DModel(ModelMixin, ConfigMixin, CacheMixin):
    """The Inf-DiT super-resolution transformer (defaults: the released 4x model).

    Call: ``model(hidden_states, timestep, lr_image, image_embeds)`` with ``hidden_states`` =
    c_in * concat(noisy HR, upsampled LR) of shape (B, 6, H, W), H and W multiples of
    ``image_block_size``; ``timestep`` = c_noise = log(sigma) / 4, shape (B,) or scalar;
    ``lr_image`` (B, 3, H/4, W/4) in [-1, 1]; ``image_embeds`` (B, vector_dim). Returns F, the raw
    network output (B, out_channels, H, W), which EDM's preconditioning turns into the denoised image.
    """

    _supports_gradient_checkpointing = False
    _no_split_modules = ["InfDiTBlock"]

    @register_to_config
    def __init__(
        self,
        num_layers: int = 28,
        hidden_size: int = 1280,
        num_attention_heads: int = 16,
        patch_size: int = 4,
        image_block_size: int = 128,
        image_size: int = 512,
        vector_dim: int = 768,
        sr_scale: int = 4,
        in_channels: int = 6,
        out_channels: int = 3,
        lr_patch_size: int = 2,
        mlp_ratio: int = 4,
        time_embed_channels: int = 192,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if hidden_size % num_attention_heads or (hidden_size // num_attention_heads) % 4:
            raise ValueError(f"hidden_size {hidden_size} must split into heads of a size divisible by 4 "
                             f"({num_attention_heads} heads)")
        if image_block_size % patch_size:
            raise ValueError(f"image_block_size {image_block_size} must be a multiple of patch_size {patch_size}")
        if image_block_size % (sr_scale * lr_patch_size):
            raise ValueError(f"image_block_size {image_block_size} must be a multiple of "
                             f"sr_scale * lr_patch_size = {sr_scale * lr_patch_size}")
        self.block_tokens = image_block_size // patch_size
        self.lr_block_tokens = image_block_size // sr_scale // lr_patch_size
        self.rope_period = 8 * image_size // patch_size

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.time_embedding = InfDiTTimeEmbedding(hidden_size, time_embed_channels)
        self.vector_embedding = InfDiTVectorEmbedding(vector_dim, hidden_size)
        self.transformer_blocks = nn.ModuleList(
            InfDiTBlock(hidden_size, num_attention_heads, self.block_tokens, mlp_ratio, norm_eps,
                        lr_block_tokens=self.lr_block_tokens if i == 0 else None, lr_patch_size=lr_patch_size)
            for i in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.adaln_out = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def check_inputs(self, hidden_states, lr_image, image_embeds) -> None:
        """One-line errors for shapes the block structure cannot take."""
        cfg = self.config
        if hidden_states.ndim != 4 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(f"hidden_states must be (B, {cfg.in_channels}, H, W), got {tuple(hidden_states.shape)}")
        batch, _, height, width = hidden_states.shape
        if height % cfg.image_block_size or width % cfg.image_block_size or height == 0 or width == 0:
            raise ValueError(f"Inf-DiT needs H and W to be non-zero multiples of image_block_size="
                             f"{cfg.image_block_size}, got {height}x{width}")
        lr_shape = (batch, 3, height // cfg.sr_scale, width // cfg.sr_scale)
        if lr_image is None or tuple(lr_image.shape) != lr_shape:
            got = None if lr_image is None else tuple(lr_image.shape)
            raise ValueError(f"lr_image must have shape {lr_shape} (HR / sr_scale), got {got}")
        if image_embeds is None or tuple(image_embeds.shape) != (batch, cfg.vector_dim):
            got = None if image_embeds is None else tuple(image_embeds.shape)
            raise ValueError(f"image_embeds must have shape {(batch, cfg.vector_dim)}, got {got}")

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor | float, lr_image: torch.Tensor,
                image_embeds: torch.Tensor, return_dict: bool = True):
        self.check_inputs(hidden_states, lr_image, image_embeds)
        cfg = self.config
        batch, _, height, width = hidden_states.shape
        grid = (height // cfg.patch_size, width // cfg.patch_size)

        timestep = torch.as_tensor(timestep, dtype=hidden_states.dtype, device=hidden_states.device)
        timestep = timestep.reshape(-1).expand(batch)
        emb = F.silu(self.time_embedding(timestep) + self.vector_embedding(image_embeds.to(hidden_states.dtype)))

        positions = rope_position_ids(grid, self.rope_period, device=hidden_states.device)
        rope = rope_cos_sin(positions, cfg.hidden_size // cfg.num_attention_heads, self.rope_period)

        x = self.patch_embed(hidden_states).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            x = block(x, emb, rope, grid, lr_image=lr_image.to(x.dtype))

        shift, scale = self.adaln_out(F.silu(emb)).chunk(2, dim=1)
        x = _modulate(self.norm_out(self.norm_out(x)), shift, scale)
        x = self.proj_out(x)
        p, c = cfg.patch_size, cfg.out_channels
        x = x.reshape(batch, grid[0], grid[1], p, p, c).permute(0, 5, 1, 3, 2, 4)
        sample = x.reshape(batch, c, height, width)
        if not return_dict:
            return (sample,)
        return Transformer2DModelOutput(sample=sample)

    @classmethod
    def from_sat_checkpoint(cls, path, num_layers: int = 28, hidden_size: int = 1280, num_attention_heads: int = 16,
                            patch_size: int = 4, image_block_size: int = 128, image_size: int = 512,
                            vector_dim: int = 768, sr_scale: int = 4, torch_dtype: torch.dtype | None = None):
        """Load the released ``mp_rank_00_model_states.pt`` (defaults: the released model's flags)."""
        from .checkpoint import from_sat_state_dict, load_sat_checkpoint

        state = load_sat_checkpoint(path)
        model = cls(num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                    patch_size=patch_size, image_block_size=image_block_size, image_size=image_size,
                    vector_dim=vector_dim, sr_scale=sr_scale)
        model.load_state_dict(from_sat_state_dict(state, num_layers), strict=True, assign=True)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        return model.eval()

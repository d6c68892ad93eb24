"""Inf-DiT's attention: block self-attention over neighbouring blocks and the LR cross-attention.

Inf-DiT never lets a token see the whole image. The token grid is cut into square blocks
(``image_block_size / patch_size`` tokens a side) and each block's queries attend to the keys of
four blocks: itself, its top-left, left and top neighbours. That is what lets the released model
generate images of unbounded size block by block; in the default ``full`` inference mode all
blocks run at once, which is what this port computes. Blocks on the top or left border reuse
themselves (or their border neighbour) for the missing neighbours, and a learned offset per
neighbour slot is added to the keys so the four copies are distinguishable.

Layer 0 also cross-attends from each block to a 3x3 neighbourhood of low-resolution tokens
(the LR image patchified 2x2, zero-padded at the image border), with learned absolute position
embeddings on both sides instead of RoPE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Order of the key/value slots of a block, as in the official code (its learned offsets follow it).
NEIGHBOUR_SLOTS = ("self", "top_left", "left", "top")


def to_blocks(x: torch.Tensor, grid: tuple[int, int], block: int) -> torch.Tensor:
    """(B, h*w, ...) tokens in raster order -> (B, h/block, w/block, block*block, ...)."""
    h, w = grid
    rest = x.shape[2:]
    x = x.reshape(x.shape[0], h // block, block, w // block, block, *rest)
    x = x.transpose(2, 3)
    return x.reshape(x.shape[0], h // block, w // block, block * block, *rest)


def from_blocks(x: torch.Tensor, grid: tuple[int, int], block: int) -> torch.Tensor:
    """Inverse of `to_blocks`: (B, h/block, w/block, block*block, ...) -> (B, h*w, ...)."""
    h, w = grid
    rest = x.shape[4:]
    x = x.reshape(x.shape[0], h // block, w // block, block, block, *rest)
    x = x.transpose(2, 3)
    return x.reshape(x.shape[0], h * w, *rest)


def gather_neighbour_blocks(x: torch.Tensor) -> torch.Tensor:
    """(B, X, Y, L, ...) -> (B, X, Y, 4L, ...): each block followed by its top-left, left and top blocks.

    A missing neighbour (first row or column) is the border block itself, which is what the official
    replicate-padding of the block grid amounts to. (Shifts by slicing: cheap to differentiate.)
    """
    top = torch.cat([x[:, :1], x[:, :-1]], dim=1)
    left = torch.cat([x[:, :, :1], x[:, :, :-1]], dim=2)
    top_left = torch.cat([top[:, :, :1], top[:, :, :-1]], dim=2)
    return torch.cat([x, top_left, left, top], dim=3)


def rope_position_ids(grid: tuple[int, int], period: int, device=None) -> torch.Tensor:
    """(h*w, 2) integer (row, column) positions in raster order, modulo ``period`` (8 * image_size / patch)."""
    h, w = grid
    index = torch.arange(h * w, device=device)
    return torch.stack([index // w, index % w], dim=-1) % period


def rope_cos_sin(positions: torch.Tensor, head_dim: int, table_size: int, theta: float = 10000.0):
    """pix2struct 2-D rotary angles for (N, 2) positions: the first half of each head rotates with the row,
    the second half with the column, adjacent channel pairs forming the rotation planes.

    The official table holds ``t = arange(P) / P * P`` rather than integers; it is rebuilt the same way
    so the angles match bit for bit.
    """
    dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device)[: dim // 2].float() / dim))
    t = torch.arange(table_size, device=positions.device) / table_size * table_size
    angles_row = (t[positions[:, 0]][:, None] * inv_freq).repeat_interleave(2, dim=-1)
    angles_col = (t[positions[:, 1]][:, None] * inv_freq).repeat_interleave(2, dim=-1)
    angles = torch.cat([angles_row, angles_col], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, N, H, D) rotated by (N, D) cos/sin with interleaved channel pairs."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos[:, None, :].to(x.dtype) + rotated * sin[:, None, :].to(x.dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(b, s, H, D) layout in and out, as flash-attn's, through PyTorch's fused attention."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class InfDiTBlockAttention(nn.Module):
    """Self-attention of one layer over each block and its top-left, left and top neighbours.

    One affine LayerNorm normalises both q and k per head (the official code builds a separate k
    LayerNorm but applies the q one to both), then RoPE, then the per-slot key offsets.
    """

    def __init__(self, hidden_size: int, num_heads: int, block_tokens: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.block_tokens = block_tokens
        self.to_qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.norm_qk = nn.LayerNorm(self.head_dim, eps=eps)
        self.key_offsets = nn.Parameter(torch.zeros(len(NEIGHBOUR_SLOTS), num_heads, self.head_dim))
        self.to_out = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], grid: tuple[int, int]):
        batch, tokens, _ = hidden_states.shape
        q, k, v = self.to_qkv(hidden_states).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(dim=2)
        q, k = self.norm_qk(q), self.norm_qk(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        q, k, v = (to_blocks(t, grid, self.block_tokens) for t in (q, k, v))
        k, v = gather_neighbour_blocks(k), gather_neighbour_blocks(v)
        slot_len = self.block_tokens**2
        k = k + self.key_offsets.repeat_interleave(slot_len, dim=0).to(k.dtype)

        lead = q.shape[:3]
        out = _sdpa(q.flatten(0, 2), k.flatten(0, 2), v.flatten(0, 2))
        out = from_blocks(out.unflatten(0, lead), grid, self.block_tokens).reshape(batch, tokens, -1)
        return self.to_out(out)


class InfDiTLRCrossAttention(nn.Module):
    """Layer 0's cross-attention from each block to the 3x3 neighbourhood of LR tokens around it.

    The LR image (at HR/4, in [-1, 1]) is patchified 2x2 by ``lr_proj``; its token grid is cut into
    blocks matching the HR blocks and each gets a 3-block-wide window (zero outside the image).
    """

    def __init__(self, hidden_size: int, num_heads: int, block_tokens: int, lr_block_tokens: int,
                 lr_patch_size: int = 2, lr_channels: int = 3, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.block_tokens = block_tokens
        self.lr_block_tokens = lr_block_tokens
        self.lr_patch_size = lr_patch_size
        self.lr_proj = nn.Conv2d(lr_channels, hidden_size, kernel_size=lr_patch_size, stride=lr_patch_size)
        self.to_q = nn.Linear(hidden_size, hidden_size)
        self.to_kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.norm_q = nn.LayerNorm(self.head_dim, eps=eps)
        self.norm_k = nn.LayerNorm(self.head_dim, eps=eps)
        self.query_pos = nn.Parameter(torch.zeros(1, block_tokens**2, num_heads, self.head_dim))
        self.key_pos = nn.Parameter(torch.zeros(1, (3 * lr_block_tokens) ** 2, num_heads, self.head_dim))
        self.to_out = nn.Linear(hidden_size, hidden_size)

    def lr_windows(self, lr_image: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) LR image -> (B * blocks, (3 * lr_block)^2, hidden): one zero-padded window per block."""
        tokens = self.lr_proj(lr_image)
        batch, channels = tokens.shape[:2]
        lb = self.lr_block_tokens
        windows = F.unfold(tokens, kernel_size=3 * lb, stride=lb, padding=lb)
        windows = windows.view(batch, channels, 3 * lb, 3 * lb, -1).permute(0, 4, 2, 3, 1)
        return windows.reshape(-1, (3 * lb) ** 2, channels)

    def forward(self, hidden_states: torch.Tensor, lr_image: torch.Tensor, grid: tuple[int, int]):
        batch, tokens, _ = hidden_states.shape
        q = self.to_q(hidden_states).unflatten(-1, (self.num_heads, self.head_dim))
        q = to_blocks(q, grid, self.block_tokens)
        lead = q.shape[:3]
        q = self.norm_q(q.flatten(0, 2)) + self.query_pos.to(q.dtype)

        windows = self.lr_windows(lr_image)
        k, v = self.to_kv(windows).unflatten(-1, (2, self.num_heads, self.head_dim)).unbind(dim=2)
        k = self.norm_k(k) + self.key_pos.to(k.dtype)

        out = _sdpa(q, k, v)
        out = from_blocks(out.unflatten(0, lead), grid, self.block_tokens).reshape(batch, tokens, -1)
        return self.to_out(out)

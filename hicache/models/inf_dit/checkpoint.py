"""Strict key mapping between the official SwissArmyTransformer checkpoint and the port.

The released ``mp_rank_00_model_states.pt`` is a DeepSpeed file, ``{"module": state_dict, ...}``, whose
keys follow SwissArmyTransformer's layout (``transformer.layers.{i}...``, ``mixins.{name}...``).
Tensors the port has no use for are dropped *by name* (`DROPPED`); any other key the mapping does
not know, and any port parameter the file lacks, is an error naming it, so a wrong checkpoint or a
wrong config can never load silently.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

#: The flags of the official ``generate_sr_big_cli.sh`` (the released 4x model).
RELEASED_CONFIG = dict(num_layers=28, hidden_size=1280, num_attention_heads=16, patch_size=4, image_block_size=128,
                       image_size=512, vector_dim=768, sr_scale=4)

#: Where the official README says the released weights are, for error messages.
RELEASED_WEIGHTS_HINT = ("download the official Inf-DiT weights from https://cloud.tsinghua.edu.cn/f/6e313f7e1236468e973b/"
                         "?dl=1 (link in the THUDM/Inf-DiT README) and pass the path of its mp_rank_00_model_states.pt")

#: Official parameters the official forward never uses (the issue's 332,160 at the released config).
UNUSED_PARAMETERS = {
    r"transformer\.position_embeddings\.weight": "SAT's absolute position table, never added (the adaLN mixin returns None)",
    r"mixins\.adaln_layer\.k_layer_norm\.\d+\.(weight|bias)": "built but unused: the q LayerNorm normalises k too",
}

#: Official keys with no counterpart in the port, and why.
DROPPED = {
    **UNUSED_PARAMETERS,
    r"mixins\.adaln_layer\.rope\.freqs_(cos|sin)": "RoPE tables, recomputed from positions",
    r"image_encoder\..*": "the CLIP tower, loaded separately (see image_encoder.py)",
}

_GLOBAL = {
    "mixins.patch_embed.proj": "patch_embed",
    "time_embed.mlp.0": "time_embedding.linear_1",
    "time_embed.mlp.2": "time_embedding.linear_2",
    "cond_embed.map_vector.0": "vector_embedding.linear_1",
    "cond_embed.map_vector.2": "vector_embedding.linear_2",
    "mixins.final_layer.adaLN_modulation.1": "adaln_out",
    "mixins.final_layer.linear": "proj_out",
    "mixins.adaln_layer.proj_lr": "transformer_blocks.0.cross_attn.lr_proj",
    "mixins.adaln_layer.cross_attention.query": "transformer_blocks.0.cross_attn.to_q",
    "mixins.adaln_layer.cross_attention.key_value": "transformer_blocks.0.cross_attn.to_kv",
    "mixins.adaln_layer.cross_attention.dense": "transformer_blocks.0.cross_attn.to_out",
    "mixins.adaln_layer.cross_q_ln": "transformer_blocks.0.cross_attn.norm_q",
    "mixins.adaln_layer.cross_k_ln": "transformer_blocks.0.cross_attn.norm_k",
    "mixins.adaln_layer.post_cross_attention_layernorm": "transformer_blocks.0.norm_cross",
}
_GLOBAL_PARAMS = {
    "mixins.adaln_layer.lr_query_position_embedding": "transformer_blocks.0.cross_attn.query_pos",
    "mixins.adaln_layer.lr_key_position_embedding": "transformer_blocks.0.cross_attn.key_pos",
}
_PER_LAYER = {
    "transformer.layers.{i}.attention.query_key_value": "transformer_blocks.{i}.attn.to_qkv",
    "transformer.layers.{i}.attention.dense": "transformer_blocks.{i}.attn.to_out",
    "transformer.layers.{i}.mlp.dense_h_to_4h": "transformer_blocks.{i}.ff.proj_in",
    "transformer.layers.{i}.mlp.dense_4h_to_h": "transformer_blocks.{i}.ff.proj_out",
    "mixins.adaln_layer.q_layer_norm.{i}": "transformer_blocks.{i}.attn.norm_qk",
    "mixins.adaln_layer.adaLN_modulations.{i}.1": "transformer_blocks.{i}.adaln_modulation",
}
_KEY_OFFSETS = "mixins.adaln_layer.re_pos_embed"  # (layers, 4, heads, head_dim), split per layer


class CheckpointMismatch(ValueError):
    pass


def _module_map(num_layers: int) -> dict[str, str]:
    """Official parameter key -> port key, for every parameter except the stacked key offsets."""
    mapping = {}
    for sat, port in _GLOBAL.items():
        for leaf in ("weight", "bias"):
            mapping[f"{sat}.{leaf}"] = f"{port}.{leaf}"
    mapping.update(_GLOBAL_PARAMS)
    for i in range(num_layers):
        for sat, port in _PER_LAYER.items():
            for leaf in ("weight", "bias"):
                mapping[f"{sat.format(i=i)}.{leaf}"] = f"{port.format(i=i)}.{leaf}"
    return mapping


def is_dropped(key: str) -> bool:
    return any(re.fullmatch(pattern, key) for pattern in DROPPED)


def unused_parameter_count(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for k, v in state.items() if any(re.fullmatch(p, k) for p in UNUSED_PARAMETERS))


def from_sat_state_dict(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Official-named state dict -> port state dict; unknown or missing keys raise `CheckpointMismatch`."""
    mapping = _module_map(num_layers)
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state.items():
        if key in mapping:
            out[mapping[key]] = value
        elif key == _KEY_OFFSETS:
            if value.shape[0] != num_layers:
                raise CheckpointMismatch(f"{key} has {value.shape[0]} layers, the config has num_layers={num_layers}")
            for i in range(num_layers):
                out[f"transformer_blocks.{i}.attn.key_offsets"] = value[i]
        elif not is_dropped(key):
            unexpected.append(key)
    if unexpected:
        raise CheckpointMismatch(f"unexpected key(s) in the Inf-DiT checkpoint: {', '.join(sorted(unexpected)[:8])}"
                                 f"{' ...' if len(unexpected) > 8 else ''} (wrong checkpoint or num_layers?)")
    missing = sorted(set(mapping.values()) - set(out)) + ([] if _KEY_OFFSETS in state else [_KEY_OFFSETS])
    if missing:
        inverse = {v: k for k, v in mapping.items()}
        names = [inverse.get(m, m) for m in missing]
        raise CheckpointMismatch(f"missing key(s) in the Inf-DiT checkpoint: {', '.join(names[:8])}"
                                 f"{' ...' if len(names) > 8 else ''}")
    return out


def to_sat_state_dict(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Port state dict -> official names (without the dropped tensors): the inverse of `from_sat_state_dict`."""
    inverse = {port: sat for sat, port in _module_map(num_layers).items()}
    out, offsets, unexpected = {}, {}, []
    for key, value in state.items():
        match = re.fullmatch(r"transformer_blocks\.(\d+)\.attn\.key_offsets", key)
        if match:
            offsets[int(match.group(1))] = value
        elif key in inverse:
            out[inverse[key]] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointMismatch(f"port key(s) with no official name: {', '.join(sorted(unexpected)[:8])}")
    if sorted(offsets) != list(range(num_layers)):
        raise CheckpointMismatch(f"key_offsets found for layers {sorted(offsets)}, expected 0..{num_layers - 1}")
    out[_KEY_OFFSETS] = torch.stack([offsets[i] for i in range(num_layers)])
    return out


def load_sat_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``module`` state dict of an official checkpoint file, with a one-line error if it is absent."""
    path = Path(path)
    if path.is_dir():
        path = path / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise FileNotFoundError(f"Inf-DiT checkpoint not found at {path}: {RELEASED_WEIGHTS_HINT}")
    try:
        data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        # DeepSpeed also pickles its run arguments next to the weights; the file is the official release.
        data = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    if not isinstance(data, dict) or "module" not in data:
        raise CheckpointMismatch(f"{path} is not a SwissArmyTransformer/DeepSpeed checkpoint (no 'module' entry)")
    return data["module"]

"""Inf-DiT (ECCV 2024), the 4x pixel-space super-resolution DiT, ported from the official
SwissArmyTransformer code to plain PyTorch + diffusers so it runs without flash-attn or DeepSpeed."""

from .checkpoint import RELEASED_CONFIG, from_sat_state_dict, load_sat_checkpoint, to_sat_state_dict
from .pipeline import InfDiTPipeline
from .transformer import InfDiTTransformer2DModel

__all__ = [
    "InfDiTTransformer2DModel",
    "InfDiTPipeline",
    "RELEASED_CONFIG",
    "from_sat_state_dict",
    "to_sat_state_dict",
    "load_sat_checkpoint",
]

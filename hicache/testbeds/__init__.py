"""Testbeds: small models trained here, and tiny random builders of every backbone, for testing on a CPU.

No real weights can be downloaded where this project is developed and tested, so every claim is checked on
models that live here. This package holds all of them, apart from the model ports themselves
(`hicache.models`) and the caching core (`hicache`):

- `flux_shapes`: the trained FLUX testbed (captioned shapes): its data, checker, builder and trainer;
- `inf_dit_sr`: the trained Inf-DiT super-resolution testbed: its data and trainer;
- `tiny`: tiny random pipelines of the real diffusers classes (FLUX, HunyuanVideo, Inf-DiT, ...);
- `weights/<testbed>/`: the shipped trained weights, one folder per testbed, packaged with the library.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

__all__ = ["WEIGHTS_DIR"]

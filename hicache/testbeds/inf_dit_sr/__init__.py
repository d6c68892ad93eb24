"""The Inf-DiT super-resolution testbed: x4 pairs of procedural scenes or photo crops (`data`) and the trainer
of a small `InfDiTTransformer2DModel` (`train`); its weights ship in `hicache/testbeds/weights/inf_dit_sr/`."""

"""Moved to `hicache.testbeds.flux_shapes.dataset` (kept for one release)."""

from hicache._moved import alias

alias(__name__, "hicache.testbeds.flux_shapes.dataset")

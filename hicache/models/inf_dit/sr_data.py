"""Moved to `hicache.testbeds.inf_dit_sr.data` (kept for one release)."""

from hicache._moved import alias

alias(__name__, "hicache.testbeds.inf_dit_sr.data")

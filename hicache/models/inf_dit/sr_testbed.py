"""Moved to `hicache.testbeds.inf_dit_sr.train` (kept for one release)."""

from hicache._moved import alias

alias(__name__, "hicache.testbeds.inf_dit_sr.train")

"""Moved to `hicache.testbeds.tiny.inf_dit` (kept for one release)."""

from hicache._moved import alias

alias(__name__, "hicache.testbeds.tiny.inf_dit")

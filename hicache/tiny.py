"""Moved to `hicache.testbeds.tiny.flux` (kept for one release)."""

from hicache._moved import alias

alias(__name__, "hicache.testbeds.tiny.flux")

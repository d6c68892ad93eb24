"""Moved to `hicache.testbeds.tiny.hunyuan_video` (kept for one release)."""

from hicache._moved import alias

alias(__name__, "hicache.testbeds.tiny.hunyuan_video")

"""Moved to `hicache.app.sr_experiment` (kept for one release)."""

from hicache._moved import alias

alias(__name__, "hicache.app.sr_experiment")

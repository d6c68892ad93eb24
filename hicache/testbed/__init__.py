"""Moved to `hicache.testbeds.flux_shapes` (kept for one release): the FLUX testbed's code now lives with the
other testbeds, and its weights in `hicache/testbeds/weights/flux_shapes/`."""

import warnings

from hicache._moved import REMOVED_IN
from hicache.testbeds.flux_shapes import *  # noqa: F401,F403
from hicache.testbeds.flux_shapes import __all__  # noqa: F401

warnings.warn(f"`hicache.testbed` moved to `hicache.testbeds.flux_shapes`; the old path will be removed in hicache "
              f"{REMOVED_IN}", FutureWarning, stacklevel=2)

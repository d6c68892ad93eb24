"""Old import paths of modules that moved in the one-home-per-concern layout (0.2), kept for one release.

Each old module is a stub that calls `alias`, which makes the old name *the same module object* as the new one
(so classes and module state are shared, and `isinstance` checks keep working) and warns once, at import.
"""

from __future__ import annotations

import importlib
import sys
import warnings

REMOVED_IN = "0.3"


def alias(old: str, new: str) -> None:
    """Make `import old` give module `new`, with a FutureWarning naming the new path."""
    warnings.warn(f"`{old}` moved to `{new}`; the old path will be removed in hicache {REMOVED_IN}",
                  FutureWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)

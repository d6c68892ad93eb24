"""Moved to `hicache.app.tables` (kept for one release): `python -m hicache.tables` still renders, with a warning."""

import sys

if __name__ == "__main__":
    import warnings

    from hicache._moved import REMOVED_IN

    warnings.warn(f"`python -m hicache.tables` moved to `python -m hicache.app.tables`; the old path will be removed "
                  f"in hicache {REMOVED_IN}", FutureWarning, stacklevel=1)
    from hicache.app.tables import main

    sys.exit(main())
else:
    from hicache._moved import alias

    alias(__name__, "hicache.app.tables")

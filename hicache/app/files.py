"""Files as the user's own tools would write them: atomic (temporary file, then rename) and with the umask's mode."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file(folder: str | Path, suffix: str) -> tuple[int, str]:
    """`tempfile.mkstemp` in ``folder``, but with the mode a plain ``open`` would give (0666 minus the umask),
    not mkstemp's 0600: results and the shared references must stay readable to the user's group."""
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=suffix)
    os.fchmod(fd, 0o666 & ~umask())
    return fd, tmp

"""Installing a version folder: everything staged beside `models/`, then one atomic rename."""

from __future__ import annotations

import os
from pathlib import Path


def install(staging: Path, models_dir: Path, version: str) -> Path | None:
    """Move a complete staging folder to `models_dir/<version>` in one atomic rename.

    Returns the new folder, or None when that version is already installed (the same
    .tflite bytes): the installed one is left alone.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / version
    if target.exists():
        return None
    # mkdtemp made the folder private (0700); an installed version is readable by all, like
    # any folder created under the usual umask.
    staging.chmod(0o755)
    for path in staging.iterdir():
        _fsync(path)  # the files are on disk before the rename makes them visible
    try:
        # rename(2) of a directory is atomic on one filesystem: readers of models/ see the
        # whole version folder or none of it, never a half-written one.
        os.rename(staging, target)
    except OSError:
        if target.exists():  # another run installed the same version meanwhile
            return None
        raise
    _fsync(models_dir)
    return target


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

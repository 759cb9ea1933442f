"""The on-disk cache's folder and its files, shared by the slice cache (``data.dataset``) and the aligned-volume
cache (``data.align``): where it lives (cfg.cache_dir, else $MRIRECON_CACHE_DIR, else ~/.cache/mrirecon_jax; never
inside the data folder), atomic .npz writes, and reads that turn an unreadable file into a rebuild.
"""

from __future__ import annotations

import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Optional, TypeVar

import numpy as np

from mrirecon_jax.config import Config

CACHE_DIR_ENV = "MRIRECON_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/mrirecon_jax"
_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)

T = TypeVar("T")


def cache_root(cfg: Config) -> Optional[Path]:
    """The cache folder of a config; None (with a warning) when it would sit inside the data folder, which is
    never written."""
    root = Path(cfg.cache_dir or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser().absolute()
    if cfg.data_dir is not None and root.resolve().is_relative_to(Path(cfg.data_dir).expanduser().resolve()):
        warnings.warn(f"Cache directory {root} is inside the data directory; not caching.", stacklevel=3)
        return None
    return root


def read_npz(path: Path, parse: Callable[[np.lib.npyio.NpzFile], T]) -> Optional[T]:
    """`parse` of the arrays in `path`; None, with a warning, when the file cannot be read (it is then rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return parse(npz)
    except _READ_ERRORS as error:
        warnings.warn(f"Cache file {path} is unreadable ({error}); rebuilding it.", stacklevel=3)
        return None


def write_npz(path: Path, arrays: dict, *, compressed: bool = False, what: str = "data cache") -> bool:
    """Writes `arrays` to `path` atomically (temp file + rename, so a reader never sees half a file); warns and
    returns False if that fails."""
    temp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            (np.savez_compressed if compressed else np.savez)(f, **arrays)
        os.replace(temp, path)
        return True
    except OSError as error:
        if temp is not None and os.path.exists(temp):
            os.remove(temp)
        warnings.warn(f"Cannot write the {what} at {path} ({error}); continuing without it.", stacklevel=3)
        return False

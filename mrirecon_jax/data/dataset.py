"""The dataset of a run: clean model-grid slices of a folder of volumes (or the demo source), split by subject,
cached on disk keyed by the input files and every setting that shaped them."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from absl import logging

from mrirecon_jax import distributed
from mrirecon_jax.config import Config, UserError
from mrirecon_jax.data import demo, volumes
from mrirecon_jax.data.prepare import prepare_volume

# Bump whenever the arrays produced for the same inputs change, so stale caches are not read.
CACHE_FORMAT_VERSION = 2
CACHE_DIR_ENV = "MRIRECON_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/mrirecon_jax"
# The settings that shape the slices of one volume (the split settings join them for a split dataset).
SLICE_SETTINGS = ("plane", "slices", "slab_mm", "image_size", "skull_strip")
SPLIT_SETTINGS = ("val_fraction", "max_subjects", "seed")

Reader = Callable[[], tuple[np.ndarray, tuple[float, float, float]]]  # -> (canonical volume, zooms)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Train and validation slices, (N, H, W, 1) float32 in [0, 1], split by subject."""

    train: np.ndarray
    val: np.ndarray
    train_subjects: tuple[str, ...]
    val_subjects: tuple[str, ...]
    train_slice_subject: np.ndarray  # (N,) index into train_subjects for each training slice
    val_slice_subject: np.ndarray  # (M,) index into val_subjects for each validation slice
    source: str  # one human sentence saying where the slices came from
    cache_path: Optional[str] = None  # the cache file read or written; None when caching was not possible
    cache_hit: bool = False


def split_subjects(ids: Sequence[str], val_fraction: float, seed: int,
                   max_subjects: Optional[int] = None) -> tuple[list[str], list[str]]:
    """Disjoint (train, val) subject lists, each sorted; deterministic for a seed."""
    unique = sorted(set(ids))
    if len(unique) < 2:
        raise UserError(f"A train/validation split needs at least 2 subjects, found {len(unique)}.")
    order = np.random.default_rng(seed).permutation(len(unique))
    chosen = [unique[i] for i in order][:max_subjects]
    n_val = min(max(1, round(val_fraction * len(chosen))), len(chosen) - 1)
    return sorted(chosen[n_val:]), sorted(chosen[:n_val])


def volume_readers(data_dir: Optional[str]) -> tuple[list[tuple[str, Reader]], object, str]:
    """([(subject id, reader)], what identifies the inputs for the cache, a sentence naming the source) for a folder
    of NIfTI volumes, or for the demo source when `data_dir` is None."""
    if data_dir is None:
        subjects, source = demo.demo_volumes()
        template = demo.mni_template_path()
        inputs = {"demo": {"n_subjects": demo.DEMO_SUBJECTS, "seed": demo.DEMO_SEED,
                           "template": volumes.fingerprint(template) if template else "phantom"}}
        return [(s, lambda v=v, z=z: (v, z)) for s, v, z in subjects], inputs, source
    paths = volumes.find_volumes(data_dir)
    readers = [(volumes.subject_id(p), functools.partial(volumes.load_volume, p)) for p in paths]
    n_subjects = len({s for s, _ in readers})
    folder = Path(data_dir).expanduser().absolute()
    return readers, [volumes.fingerprint(p) for p in paths], f"{len(paths)} NIfTI volumes of {n_subjects} subjects " \
                                                            f"from {folder}."


# ---------------------------------------------------------------------------------------------------- the cache

def _cache_file(cfg: Config, key: dict) -> Optional[Path]:
    """Where the arrays for this key live; None (with a warning) if the cache would sit inside the data folder."""
    cache_dir = Path(cfg.cache_dir or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser().absolute()
    if cfg.data_dir is not None and cache_dir.resolve().is_relative_to(Path(cfg.data_dir).expanduser().resolve()):
        warnings.warn(f"Cache directory {cache_dir} is inside the data directory; not caching.", stacklevel=3)
        return None
    full = {"format": CACHE_FORMAT_VERSION, **key, **{name: getattr(cfg, name) for name in SLICE_SETTINGS}}
    return cache_dir / f"{hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()}.npz"


_ARRAYS = ("train", "val", "train_slice_subject", "val_slice_subject")
_STRINGS = ("train_subjects", "val_subjects")


def _read_cache(path: Path) -> Optional[Dataset]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return Dataset(**{name: npz[name] for name in _ARRAYS},
                           **{name: tuple(str(s) for s in npz[name]) for name in _STRINGS},
                           source=str(npz["source"]), cache_path=str(path), cache_hit=True)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        warnings.warn(f"Cache file {path} is unreadable ({error}); rebuilding it.", stacklevel=3)
        return None


def _write_cache(path: Path, dataset: Dataset) -> bool:
    """Writes the arrays atomically (temp file + rename); warns and returns False if that fails."""
    temp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{name: getattr(dataset, name) for name in _ARRAYS},
                     **{name: np.array(getattr(dataset, name), dtype=str) for name in _STRINGS},
                     source=np.array(dataset.source))
        os.replace(temp, path)
        return True
    except OSError as error:
        if temp is not None and os.path.exists(temp):
            os.remove(temp)
        warnings.warn(f"Cannot write the data cache at {path} ({error}); continuing without it.", stacklevel=3)
        return False


def _cached(cfg: Config, key: dict, build: Callable[[], Dataset]) -> Dataset:
    """The dataset for `key` from the cache, or built and then cached."""
    path = _cache_file(cfg, key)
    if path is not None and path.is_file():
        cached = _read_cache(path)
        if cached is not None:
            logging.info("Data: %s Read from cache %s.", cached.source, path)
            return cached
    dataset = build()
    if path is not None and _write_cache(path, dataset):
        dataset = dataclasses.replace(dataset, cache_path=str(path))
    logging.info("Data: %s %d train / %d validation slices.", dataset.source, len(dataset.train), len(dataset.val))
    return dataset


# ---------------------------------------------------------------------------------------------------- datasets

def _assemble(cfg: Config, readers, train_ids: Sequence[str], val_ids: Sequence[str], source: str) -> Dataset:
    """Prepare every volume of the chosen subjects (prepare_volume, as everywhere) and stack train and validation."""
    place = {s: (0, i) for i, s in enumerate(train_ids)} | {s: (1, i) for i, s in enumerate(val_ids)}
    sides = ([], [])  # (subject index, (n, S, S, 1) clean slices) per volume, for train and validation
    for subject, read in readers:
        if subject in place:
            side, index = place[subject]
            sides[side].append((index, prepare_volume(*read(), cfg).clean()))
    size = cfg.image_size
    stacked = []
    for side in sides:
        images = np.concatenate([s for _, s in side]) if side else np.zeros((0, size, size, 1), np.float32)
        owners = np.concatenate([np.full(len(s), i, np.int32) for i, s in side]) if side else np.zeros(0, np.int32)
        stacked.append((images, owners))
    (train, train_owner), (val, val_owner) = stacked
    return Dataset(train=train, val=val, train_subjects=tuple(train_ids), val_subjects=tuple(val_ids),
                   train_slice_subject=train_owner, val_slice_subject=val_owner, source=source)


def load_dataset(cfg: Config, share: tuple[int, int] = (0, 1), cache: Optional[Callable] = None) -> Dataset:
    """Subject-split clean slices for a config: from cfg.data_dir, or the demo source when it is None; cached.

    `share` = (process index, process count): the training subjects are those of that process's share
    (``distributed.process_share``), the validation subjects all of them. `cache(cfg, key, build)` reads or builds
    the dataset of a key (default: the .npz cache; ``data.stream.streamed`` keeps the training slices on disk).
    """
    readers, inputs, source = volume_readers(cfg.data_dir)

    def build():
        train_ids, val_ids = split_subjects([s for s, _ in readers], cfg.val_fraction, cfg.seed, cfg.max_subjects)
        return _assemble(cfg, readers, distributed.process_share(train_ids, *share), val_ids, source)

    key = {"inputs": inputs, **{name: getattr(cfg, name) for name in SPLIT_SETTINGS}}
    if share[1] > 1:
        key["process_share"] = list(share)
    return (cache or _cached)(cfg, key, build)


def load_unseen_subjects(cfg: Config, data_dir) -> Dataset:
    """Every subject in `data_dir` as validation slices (no split, `train` empty), prepared exactly as `cfg`
    prepares its own data; cached like :func:`load_dataset`."""
    readers, inputs, source = volume_readers(str(data_dir))
    cfg = cfg.replace(data_dir=str(data_dir))
    subjects = sorted({s for s, _ in readers})
    return _cached(cfg, {"every_subject": inputs},
                   lambda: _assemble(cfg, readers, [], subjects, f"{source[:-1]}, every subject (no split)."))

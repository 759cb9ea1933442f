"""The dataset of a run: clean model-grid slices of a folder of volumes (or the demo source), split by subject,
cached on disk keyed by the input files and every setting that shaped them.

A file that cannot be used (``volumes.BadVolume``) is skipped with a warning that names it and says why; the
dataset records the sentences, and ``--strict`` turns any of them into an error.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from absl import logging

from mrirecon_jax import distributed
from mrirecon_jax.config import Config, UserError
from mrirecon_jax.data import align, cache, demo, volumes
from mrirecon_jax.data.prepare import prepare_volume

# Bump whenever the arrays produced for the same inputs change, so stale caches are not read.
CACHE_FORMAT_VERSION = 3
# The settings that shape the slices of one volume (the split settings join them for a split dataset).
SLICE_SETTINGS = ("plane", "slices", "slab_mm", "val_slab_mm", "image_size", "skull_strip", "preprocess")
SPLIT_SETTINGS = ("val_fraction", "max_subjects", "seed")


@dataclasses.dataclass(frozen=True)
class Reader:
    """Reads one volume: `name` is what messages call it; calling gives (canonical volume, zooms), appending the
    repairs made to `repairs` (see ``volumes.load_volume``)."""

    name: str
    load: Callable[[Optional[list]], tuple[np.ndarray, tuple[float, float, float]]]

    def __call__(self, repairs: Optional[list] = None):
        return self.load(repairs)


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
    skipped: tuple[str, ...] = ()  # one sentence per file of the chosen subjects that was skipped, and why
    repaired: tuple[str, ...] = ()  # one sentence per repair made to a file that was used
    skipped_subjects: tuple[str, ...] = ()  # chosen subjects left without any usable file
    cache_path: Optional[str] = None  # the cache file read or written; None when caching was not possible
    cache_hit: bool = False

    def report(self) -> dict:
        """What a run records of its data (split.json): the source, the subjects, the counts, the skipped files."""
        return {"source": self.source, "train_subjects": list(self.train_subjects),
                "val_subjects": list(self.val_subjects), "n_train_slices": len(self.train),
                "n_val_slices": len(self.val), "n_subjects_used": len(self.train_subjects) + len(self.val_subjects),
                "n_subjects_skipped": len(self.skipped_subjects), "skipped_subjects": list(self.skipped_subjects),
                "skipped_files": list(self.skipped), "repaired_files": list(self.repaired)}


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
        return [(s, Reader(f"demo subject {s}", functools.partial(_in_memory, v, z))) for s, v, z in subjects], \
            inputs, source
    paths = volumes.find_volumes(data_dir)
    readers = [(volumes.subject_id(p), Reader(f"NIfTI file {p}", functools.partial(volumes.load_volume, p)))
               for p in paths]
    n_subjects = len({s for s, _ in readers})
    folder = Path(data_dir).expanduser().absolute()
    return readers, [volumes.fingerprint(p) for p in paths], f"{len(paths)} NIfTI volumes of {n_subjects} subjects " \
                                                            f"from {folder}."


def _in_memory(volume, zooms, repairs=None):
    """A reader's load of a volume held in memory (a function, not a lambda, so readers can go to a worker)."""
    del repairs
    return volume, zooms


# ---------------------------------------------------------------------------------------------------- the cache

def _cache_file(cfg: Config, key: dict) -> Optional[Path]:
    """Where the arrays for this key live; None (with a warning) if the cache would sit inside the data folder."""
    root = cache.cache_root(cfg)
    if root is None:
        return None
    full = {"format": CACHE_FORMAT_VERSION, **key, **{name: getattr(cfg, name) for name in SLICE_SETTINGS}}
    return root / f"{hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()}.npz"


_ARRAYS = ("train", "val", "train_slice_subject", "val_slice_subject")
_STRINGS = ("train_subjects", "val_subjects", "skipped", "repaired", "skipped_subjects")


def _read_cache(path: Path) -> Optional[Dataset]:
    return cache.read_npz(path, lambda npz: Dataset(
        **{name: npz[name] for name in _ARRAYS}, **{name: tuple(str(s) for s in npz[name]) for name in _STRINGS},
        source=str(npz["source"]), cache_path=str(path), cache_hit=True))


def _write_cache(path: Path, dataset: Dataset) -> bool:
    """Writes the arrays atomically; warns and returns False if that fails."""
    return cache.write_npz(path, {**{name: getattr(dataset, name) for name in _ARRAYS},
                                  **{name: np.array(getattr(dataset, name), dtype=str) for name in _STRINGS},
                                  "source": np.array(dataset.source)})


def _cached(cfg: Config, key: dict, build: Callable[[], Dataset]) -> Dataset:
    """The dataset for `key` from the cache, or built and then cached; refused under cfg.strict when a file was
    skipped."""
    path = _cache_file(cfg, key)
    dataset = _read_cache(path) if path is not None and path.is_file() else None
    if dataset is not None:
        logging.info("Data: %s Read from cache %s.", dataset.source, path)
        for sentence in dataset.skipped:
            logging.warning("Skipped when the cache was built: %s", sentence)
    else:
        dataset = build()
        if path is not None and _write_cache(path, dataset):
            dataset = dataclasses.replace(dataset, cache_path=str(path))
    if dataset.skipped and cfg.strict:
        raise UserError(f"{dataset.skipped[0][:-1]}; --strict refuses any unusable file "
                        f"({len(dataset.skipped)} in all).")
    if dataset.skipped:
        logging.warning("Data: %d file(s) skipped, %d subject(s) left without a usable file; the run's split.json "
                        "lists them.", len(dataset.skipped), len(dataset.skipped_subjects))
    logging.info("Data: %s %d train / %d validation slices.", dataset.source, len(dataset.train), len(dataset.val))
    return dataset


# ---------------------------------------------------------------------------------------------------- datasets

def _prepare_subjects(cfg: Config, readers, subjects: Sequence[str]):
    """Prepare the files of `subjects` as every job does (prepare_volume); an unusable file is skipped with a
    warning. Returns ({subject: [clean slices per file]} of the usable subjects, skipped sentences, repair
    sentences)."""
    files: dict[str, list[Reader]] = {}
    for subject, read in readers:
        files.setdefault(subject, []).append(read)
    align_in_parallel(cfg, [read for subject in subjects for read in files[subject]])
    prepared: dict[str, list[np.ndarray]] = {}
    skipped: list[str] = []
    repaired: list[str] = []
    for subject in subjects:
        for read in files[subject]:
            repairs: list[str] = []
            try:
                slices = prepare_volume(*read(repairs), cfg, name=read.name).clean()
            except volumes.BadVolume as bad:
                logging.warning("Skipping a file: %s", bad)
                skipped.append(str(bad))
                continue
            prepared.setdefault(subject, []).append(slices)
            repaired.extend(repairs)
    return prepared, skipped, repaired


def align_in_parallel(cfg: Config, reads: Sequence[Reader]) -> None:
    """With --preprocess=brain, register the files of `reads` that are not in the aligned cache (data.align) in
    worker processes, one per available CPU core, each writing its result to that cache; a sequential pass of
    prepare_volume then reads them from it, so the slices are those of a sequential run and an unusable file is
    skipped and reported by that pass. Nothing happens without a cache, or with fewer than 2 files to register or
    2 cores."""
    if cfg.preprocess != "brain" or cache.cache_root(cfg) is None:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    missing = _not_aligned_yet(cfg, reads) if cores > 1 else []
    workers = min(cores, len(missing))
    if workers < 2:
        return
    start = time.perf_counter()
    try:
        # 'spawn': the parent may hold JAX's threads, which a forked child would inherit in an unknown state.
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_quiet_worker) as pool:
            registered = sum(pool.map(_align_into_cache, missing, itertools.repeat(cfg)))
    except Exception as error:  # noqa: BLE001  (only a speed-up: the sequential pass does all that is left)
        logging.warning("Data: registering in worker processes failed (%s: %s); registering one file at a time. "
                        "(A script that builds data must start its work under `if __name__ == \"__main__\":`.)",
                        type(error).__name__, error)
        return
    logging.info("Data: %d of %d files registered to the template in %d processes in %.0f s.", registered,
                 len(reads), workers, time.perf_counter() - start)


def _not_aligned_yet(cfg: Config, reads: Sequence[Reader]) -> list[Reader]:
    """The reads whose volume is not in the aligned cache. Each file is read here once more, quietly: the pass that
    uses it reports its repairs, or the reason it is unusable."""
    root, missing = cache.cache_root(cfg), []
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        for read in reads:
            try:
                volume, zooms = read()
            except volumes.BadVolume:
                continue
            if not align.cache_path(root, volume, zooms).is_file():
                missing.append(read)
    finally:
        logging.set_verbosity(verbosity)
    return missing


def _quiet_worker() -> None:
    """A registration worker says nothing: the sequential pass after it reports every warning once."""
    logging.set_verbosity(logging.ERROR)
    warnings.simplefilter("ignore")


def _align_into_cache(read: Reader, cfg: Config) -> bool:
    """In a worker: prepare one file, which writes its alignment to the aligned cache; False when that failed. The
    failure is left to the sequential pass, which meets it again and reports it as it always has."""
    try:
        prepare_volume(*read(), cfg, name=read.name)
        return True
    except Exception:  # noqa: BLE001  (reported by the sequential pass)
        return False


def _assemble(cfg: Config, prepared: dict, train_ids: Sequence[str], val_ids: Sequence[str], source: str,
              skipped: list, repaired: list) -> Dataset:
    """Stack the prepared slices of the train and validation subjects (those with a usable file) into a Dataset;
    a side whose subjects all lack one is an error."""
    sides, used_sides = [], []
    for what, ids in (("training", train_ids), ("validation", val_ids)):
        used = [s for s in ids if s in prepared]
        if ids and not used:
            raise UserError(f"No {what} subject has a usable file{_nothing_usable(skipped)}")
        used_sides.append(tuple(used))
        parts = [(i, p) for i, s in enumerate(used) for p in prepared[s]]
        images = np.concatenate([p for _, p in parts]) if parts else np.zeros((0, cfg.image_size,
                                                                                cfg.image_size, 1), np.float32)
        owners = np.concatenate([np.full(len(p), i, np.int32) for i, p in parts]) if parts else np.zeros(0, np.int32)
        sides.append((images, owners))
    (train, train_owner), (val, val_owner) = sides
    return Dataset(train=train, val=val, train_subjects=used_sides[0], val_subjects=used_sides[1],
                   train_slice_subject=train_owner, val_slice_subject=val_owner, source=source,
                   skipped=tuple(skipped), repaired=tuple(repaired),
                   skipped_subjects=tuple(s for s in (*train_ids, *val_ids) if s not in prepared))


def _nothing_usable(skipped: list) -> str:
    return f"; {len(skipped)} file(s) were skipped, the first because: {skipped[0]}" if skipped else "."


def load_dataset(cfg: Config, share: tuple[int, int] = (0, 1), cache: Optional[Callable] = None) -> Dataset:
    """Subject-split clean slices for a config: from cfg.data_dir, or the demo source when it is None; cached.

    `share` = (process index, process count): the training subjects are those of that process's share
    (``distributed.process_share``), the validation subjects all of them. `cache(cfg, key, build)` reads or builds
    the dataset of a key (default: the .npz cache; ``data.stream.streamed`` keeps the training slices on disk).
    The split is made over every subject found; a subject without a usable file drops out of its side. Validation
    slices are those of ``cfg.for_validation()`` (the validation slab, when the run has one).
    """
    readers, inputs, source = volume_readers(cfg.data_dir)

    def build():
        train_ids, val_ids = split_subjects([s for s, _ in readers], cfg.val_fraction, cfg.seed, cfg.max_subjects)
        train_ids = distributed.process_share(train_ids, *share)
        prepared, skipped, repaired = _prepare_subjects(cfg, readers, train_ids)
        held_out, val_skipped, val_repaired = _prepare_subjects(cfg.for_validation(), readers, val_ids)
        return _assemble(cfg, {**prepared, **held_out}, train_ids, val_ids, source, skipped + val_skipped,
                         repaired + val_repaired)

    key = {"inputs": inputs, **{name: getattr(cfg, name) for name in SPLIT_SETTINGS}}
    if share[1] > 1:
        key["process_share"] = list(share)
    return (cache or _cached)(cfg, key, build)


def load_unseen_subjects(cfg: Config, data_dir) -> Dataset:
    """Every subject in `data_dir` with a usable file as validation slices (no split, `train` empty), prepared
    exactly as `cfg` prepares its own validation slices; cached like :func:`load_dataset`."""
    readers, inputs, source = volume_readers(str(data_dir))
    cfg = cfg.for_validation().replace(data_dir=str(data_dir))

    def build():
        subjects = sorted({s for s, _ in readers})
        prepared, skipped, repaired = _prepare_subjects(cfg, readers, subjects)
        return _assemble(cfg, prepared, [], subjects, f"{source[:-1]}, every subject (no split).", skipped,
                         repaired)

    return _cached(cfg, {"every_subject": inputs}, build)

"""Training slices streamed from disk: a memory-mapped .npy store of a dataset, and the two loaders that turn
training slices into the step's batches.

Both loaders give the same batches for a step: each epoch's order is a permutation drawn from (seed, epoch)
(:func:`batch_indices`), so a run may switch loaders when resumed and a resumed run reads on exactly where it
stopped. ``memory`` indexes an array in RAM. ``grain`` maps step numbers to batches with grain
(``MapDataset.range(...).map(...)``), read by random access from the memory-mapped store in worker processes
(``--data_workers``) with prefetching, so training never holds the slices in memory. Each process streams its
own share of the training subjects (``dataset.load_dataset``'s `share`). The store sits beside the .npz cache
(``<key>.stream/``: ``train.npy``, the other arrays in ``arrays.npz``, the rest in ``meta.json``); it is built from
the dataset the first time (prepared as for the memory loader, once), written to a temporary folder and renamed
into place, so it is complete or absent. Validation slices are held in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Union

import grain
import numpy as np
from absl import flags, logging

from mrirecon_jax.config import Config, UserError
from mrirecon_jax.data import dataset as dataset_lib

LOADERS = ("memory", "grain")
STORE_SUFFIX = ".stream"
PREFETCH_BATCHES = 4  # batches each grain process reads ahead


def check_loader(name: str) -> None:
    """Refuse an unknown --data_loader."""
    if name not in LOADERS:
        raise UserError(f"Unknown --data_loader={name!r}; choose one of {', '.join(LOADERS)}.")


# ---------------------------------------------------------------------------------------------------- batch order

@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(seed: int, step: int, steps_per_epoch: int, batch_size: int, n: int) -> np.ndarray:
    """The indices (into n slices) of the batch of training step `step`: epoch step // steps_per_epoch reads its
    own permutation in order, batch_size at a time (the rest of each epoch is left out)."""
    epoch, within = divmod(step, steps_per_epoch)
    return _epoch_order(seed, epoch, n)[within * batch_size:(within + 1) * batch_size]


_OPEN_LOCK = threading.Lock()


class _ReadBatch(grain.transforms.Map):
    """grain transform: step -> that step's batch, read from an array or (re-opened in each worker) a .npy file."""

    def __init__(self, source: Union[str, np.ndarray], n: int, seed: int, steps_per_epoch: int, batch_size: int):
        self._source, self._order = source, (seed, steps_per_epoch, batch_size, n)
        self._slices = None if isinstance(source, str) else source

    def __getstate__(self):  # a memory map is opened afresh in each process
        return {**self.__dict__, "_slices": None if isinstance(self._source, str) else self._source}

    def map(self, step):
        if self._slices is None:
            with _OPEN_LOCK:  # grain's threads map at once; CPython 3.11's parser (np.load's header) is not safe
                if self._slices is None:
                    self._slices = np.load(self._source, mmap_mode="r")
        indices = batch_indices(self._order[0], int(step), *self._order[1:])
        return np.asarray(self._slices[indices])


def memory_batches(slices: np.ndarray, seed: int, steps_per_epoch: int, batch_size: int, start: int,
                   stop: int) -> Iterator[np.ndarray]:
    """The batches of steps start..stop-1 from slices in memory."""
    for step in range(start, stop):
        yield slices[batch_indices(seed, step, steps_per_epoch, batch_size, len(slices))]


def grain_batches(slices: Union[str, np.ndarray], n: int, seed: int, steps_per_epoch: int, batch_size: int,
                  start: int, stop: int, workers: int) -> grain.DatasetIterator:
    """The batches of steps start..stop-1 through grain, read from `slices` (a .npy path, memory-mapped, or an
    array) by `workers` processes (0: threads of this one), each reading PREFETCH_BATCHES ahead; close it after."""
    steps = grain.MapDataset.range(start, stop).map(_ReadBatch(slices, n, seed, steps_per_epoch, batch_size))
    batches = steps.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=PREFETCH_BATCHES))
    if workers:
        if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags; outside run.py keep their defaults
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                                   per_worker_buffer_size=PREFETCH_BATCHES))
    return iter(batches)


def training_batches(cfg: Config, slices: np.ndarray, steps_per_epoch: int, batch_size: int, start: int,
                     stop: int) -> Iterator[np.ndarray]:
    """The local training batches of steps start..stop-1 through cfg.data_loader; a memory-mapped store is
    streamed from its file."""
    check_loader(cfg.data_loader)
    if cfg.data_loader == "memory":
        return memory_batches(slices, cfg.seed, steps_per_epoch, batch_size, start, stop)
    source = str(slices.filename) if isinstance(slices, np.memmap) else slices
    return grain_batches(source, len(slices), cfg.seed, steps_per_epoch, batch_size, start, stop, cfg.data_workers)


# ---------------------------------------------------------------------------------------------------- the store

_NOT_STORED = ("train", "cache_path", "cache_hit")


def write_store(folder: Path, dataset: dataset_lib.Dataset) -> None:
    """`dataset` as a store at `folder` (which must not exist): written beside it, then renamed into place."""
    temp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        np.save(temp / "train.npy", np.ascontiguousarray(dataset.train, np.float32))
        fields = {f.name: getattr(dataset, f.name) for f in dataclasses.fields(dataset) if f.name not in _NOT_STORED}
        np.savez(temp / "arrays.npz", **{k: v for k, v in fields.items() if isinstance(v, np.ndarray)})
        (temp / "meta.json").write_text(json.dumps({k: v for k, v in fields.items()
                                                    if not isinstance(v, np.ndarray)}))
        os.replace(temp, folder)
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # left only when another process stored the same key first


def read_store(folder: Path) -> dataset_lib.Dataset:
    """The dataset of a store, its training slices memory-mapped (read from disk as they are indexed)."""
    with np.load(folder / "arrays.npz", allow_pickle=False) as arrays:
        loaded = {name: arrays[name] for name in arrays.files}
    meta = json.loads((folder / "meta.json").read_text())
    meta = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()}
    return dataset_lib.Dataset(train=np.load(folder / "train.npy", mmap_mode="r"), **loaded, **meta,
                               cache_path=str(folder), cache_hit=True)


def streamed(cfg: Config, key: dict, build: Callable[[], dataset_lib.Dataset]) -> dataset_lib.Dataset:
    """``load_dataset``'s cache for the grain loader: the dataset of `key` with its training slices memory-mapped
    from the store, which is made from the .npz cache (read or built) the first time."""
    npz = dataset_lib._cache_file(cfg, key)  # noqa: SLF001  (the store is named after the cache it is made from)
    if npz is None:
        warnings.warn("The training slices cannot be stored outside the data folder; holding them in memory.",
                      stacklevel=2)
        return build()
    folder = npz.with_suffix(STORE_SUFFIX)
    if not folder.is_dir():
        dataset = dataset_lib._cached(cfg, key, build)  # noqa: SLF001
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            write_store(folder, dataset)
        except OSError as error:
            if not folder.is_dir():  # (else another run stored the same slices first)
                warnings.warn(f"Cannot write the slice store at {folder} ({error}); holding the slices in memory.",
                              stacklevel=2)
                return dataset
        del dataset
    try:
        dataset = read_store(folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"The slice store {folder} is unreadable ({error}); delete it to rebuild it.") from None
    logging.info("Data: %s %d train slices streamed from %s.", dataset.source, len(dataset.train), folder)
    return dataset


# ---------------------------------------------------------------------------------------------------- throughput

def loader_throughput(image_size: int, batch_size: int, workers: int, steps: int = 50,
                      n_slices: int = 1024) -> float:
    """Slices per second that the grain loader delivers from a memory-mapped store of `n_slices` random slices
    (image_size square), with `workers` processes, over `steps` batches after a warm-up that starts them."""
    with tempfile.TemporaryDirectory(prefix="mrirecon-loader-") as folder:
        path = Path(folder) / "train.npy"
        slices = np.lib.format.open_memmap(path, "w+", np.float32, (n_slices, image_size, image_size, 1))
        slices[:] = np.random.default_rng(0).random(slices.shape, np.float32)
        slices.flush()
        del slices
        steps_per_epoch = max(n_slices // batch_size, 1)
        warmup = (workers + 1) * PREFETCH_BATCHES  # until every worker has started and filled its buffer
        batches = grain_batches(str(path), n_slices, 0, steps_per_epoch, batch_size, 0, warmup + steps, workers)
        try:
            for _ in range(warmup):
                next(batches)
            start = time.perf_counter()
            count = sum(len(batch) for batch in batches)
            seconds = time.perf_counter() - start
        finally:
            close(batches)
    return count / max(seconds, 1e-9)


def close(batches) -> None:
    """Stop a loader's workers and threads (a memory loader has none)."""
    stop = getattr(batches, "close", None)
    if stop is not None:
        stop()

"""The streaming loader: the memory-mapped store of a dataset, and grain batches that are the memory loader's,
covering every training slice of every process's share once per epoch."""

import dataclasses
from collections import Counter

import numpy as np
import pytest

from mrirecon_jax.config import Config, UserError
from mrirecon_jax.data import dataset as dataset_lib
from mrirecon_jax.data import stream

SLICES = dict(model="tiny", image_size=16, slices=2, slab_mm=None)


def _rows(images) -> list[bytes]:
    return [row.tobytes() for row in np.asarray(images)]


def test_grain_loader_yields_every_training_slice_once_per_epoch_across_processes(cache_dir):
    """Two processes' shares, streamed from their stores through grain (one with a worker process): each epoch
    the processes together yield every training slice of the full split exactly once, reshuffled per epoch, the
    very batches of the memory loader, and a loader started mid-run continues the sequence."""
    cfg = Config(**SLICES, cache_dir=str(cache_dir), data_loader="grain")
    every = dataset_lib.load_dataset(cfg)  # one process: all the training subjects
    shares = [dataset_lib.load_dataset(cfg, (i, 2), stream.streamed) for i in (0, 1)]
    assert all(isinstance(share.train, np.memmap) for share in shares)
    assert sorted(shares[0].train_subjects + shares[1].train_subjects) == sorted(every.train_subjects)
    batch, epochs = 2, 2
    steps = min(len(share.train) for share in shares) // batch
    assert steps * batch * 2 == len(every.train)  # (so that no slice is left out of an epoch)
    seen = [[], []]  # per epoch, the rows both processes yielded
    for share, workers in zip(shares, (0, 1)):
        loader = stream.training_batches(cfg.replace(data_workers=workers), share.train, steps, batch, 0,
                                         epochs * steps)
        batches = list(loader)
        stream.close(loader)
        memory = list(stream.memory_batches(np.asarray(share.train), cfg.seed, steps, batch, 0, epochs * steps))
        assert len(batches) == epochs * steps and all(b.shape == (batch, 16, 16, 1) for b in batches)
        assert all(np.array_equal(g, m) for g, m in zip(batches, memory))
        for epoch in range(epochs):
            seen[epoch] += _rows(np.concatenate(batches[epoch * steps:(epoch + 1) * steps]))
        later = stream.grain_batches(str(share.train.filename), len(share.train), cfg.seed, steps, batch, 3,
                                     epochs * steps, 0)
        assert all(np.array_equal(g, m) for g, m in zip(later, memory[3:]))
    for rows in seen:
        assert Counter(rows) == Counter(_rows(every.train))
    assert seen[0] != seen[1]  # a new order each epoch


def test_store_reads_back_what_was_stored_and_is_not_rebuilt(tmp_path):
    cfg = Config(**SLICES, cache_dir=str(tmp_path))
    rng = np.random.default_rng(0)
    built = dataset_lib.Dataset(train=rng.random((6, 16, 16, 1), np.float32), val=rng.random((2, 16, 16, 1),
                                np.float32), train_subjects=("a", "b"), val_subjects=("c",),
                                train_slice_subject=np.array([0, 0, 0, 1, 1, 1], np.int32),
                                val_slice_subject=np.zeros(2, np.int32), source="Six random slices.")
    first = stream.streamed(cfg, {"test": 1}, lambda: built)

    def must_not_build():
        raise AssertionError("the store should have been read")

    again = stream.streamed(cfg, {"test": 1}, must_not_build)
    for read in (first, again):
        assert isinstance(read.train, np.memmap) and read.cache_hit
        for field in dataclasses.fields(built):
            if field.name not in ("cache_path", "cache_hit"):
                assert np.array_equal(getattr(read, field.name), getattr(built, field.name)), field.name
    assert [p.suffix for p in sorted(tmp_path.iterdir())] == [".npz", stream.STORE_SUFFIX]  # no temporary left


def test_unknown_loader_is_a_user_error_and_the_loader_throughput_is_measured():
    with pytest.raises(UserError, match="--data_loader='disk'; choose one of memory, grain"):
        stream.check_loader("disk")
    assert stream.loader_throughput(16, 4, 0, steps=5, n_slices=64) > 0

"""Shared fixtures and helpers: where the real data lives (read in place, never written), small files, and one
tiny trained run on the demo source that the tests needing a model share."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

# One XLA compilation cache for the session and the processes it starts: the many tiny models compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="mrirecon-jax-tests-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The suite compiles about 4,000 distinct XLA programs and runs most of them a few times: without LLVM's
# optimisations each compiles several times faster, with results equal up to float rounding
# (docs/cpu-performance.md).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # once: xdist's workers inherit the controller's
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import nibabel as nib
import numpy as np
import pytest
from absl import flags

from mrirecon_jax import train
from mrirecon_jax.config import Config
from mrirecon_jax.data.prepare import prepare_volume

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
IXI_DIR = SHARED_DATA / "ixi-t1-2mm"
GLIOMA_DIR = SHARED_DATA / "lesions" / "tcga-du-7294"

needs_ixi = pytest.mark.skipif(not IXI_DIR.is_dir(), reason=f"shared IXI data not found at {IXI_DIR}")
needs_glioma = pytest.mark.skipif(not GLIOMA_DIR.is_dir(), reason=f"shared glioma case not found at {GLIOMA_DIR}")

# The tiny run the model tests share: 32 px, 4 central axial slices of the demo source, a few steps.
TINY_RUN = dict(model="tiny", image_size=32, slices=4, slab_mm=None, batch_size=8, epochs=2, max_steps=4,
                learning_rate=3e-3, eval_batch_size=16, corruptions="augmented")


def write_nifti(path, volume, affine=None) -> Path:
    nib.Nifti1Image(np.asarray(volume), np.eye(4) if affine is None else affine).to_filename(str(path))
    return Path(path)


def symlink_subset(source: Path, folder: Path, count: int, start: int = 0) -> Path:
    """A new folder of symlinks to `count` volumes of `source` (sorted), so that nothing is ever written beside
    the shared files, even by a refusal that regresses."""
    folder.mkdir(parents=True)
    for path in sorted(source.glob("*.nii.gz"))[start:start + count]:
        (folder / path.name).symlink_to(path)
    return folder


def clean_slices(volume, zooms, plane: str, image_size: int, count: int) -> np.ndarray:
    """(count, S, S) clean slices of the central slab, as training prepares them."""
    cfg = Config(plane=plane, image_size=image_size, slices=count)
    return prepare_volume(volume, zooms, cfg).clean()[..., 0]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One slice cache for the whole session (the demo source is prepared once)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cache_dir) -> Path:
    """The workdir of a tiny U-Net trained a few steps on the demo source (TINY_RUN)."""
    workdir = tmp_path_factory.mktemp("tiny") / "run"
    train.train_and_evaluate(Config(**TINY_RUN, cache_dir=str(cache_dir)), workdir)
    return workdir


def cli(*args) -> tuple[int, str, str]:
    """run.py's main in this process: (exit code, stdout, stderr)."""
    import run  # run.py defines its absl flags on import

    flags.FLAGS.unparse_flags()
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            flags.FLAGS(["run.py", *args])
            run.main(["run.py"])
        except SystemExit as exit_:
            code = exit_.code
        except flags.Error as error:
            print(f"FATAL Flags parsing error: {error}", file=sys.stderr)
            code = 1
    flags.FLAGS.unparse_flags()
    return code, out.getvalue(), err.getvalue()


def error_line(code: int, stderr: str) -> str:
    """The one sentence an error ends with."""
    assert code == 1, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith(("error: ", "FATAL Flags parsing error"))]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]



"""The corruption gallery: a panel for every corruption, the PNG run.py writes, and never writing into the data."""

import math
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from scipy import ndimage

from conftest import IXI_DIR, ROOT, needs_ixi, symlink_subset
from mrirecon_jax import corruptions, gallery
from mrirecon_jax.config import Config, UserError


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ})


def test_panels_cover_every_corruption_with_its_kspace():
    r, c = np.mgrid[0:32, 0:32] / 32 - 0.5
    image = ndimage.gaussian_filter(((r / 0.4) ** 2 + (c / 0.35) ** 2 <= 1).astype(np.float32) * 0.6, 0.8)[..., None]
    image[0, 0] = 1.0  # the slice maximum, so the patch (clipped to it) shows
    panels = gallery.corruption_panels(image, seed=0)
    assert list(panels) == ["clean", "patch", *corruptions.CORRUPTIONS]
    clean, clean_kspace = panels["clean"]
    np.testing.assert_array_equal(clean, image[..., 0])
    spectrum = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image[..., 0]), norm="ortho"))
    np.testing.assert_allclose(clean_kspace, np.log1p(np.abs(spectrum)), atol=1e-4)
    for name, (corrupted, kspace) in panels.items():
        assert corrupted.shape == kspace.shape == (32, 32)
        if name != "clean":
            assert np.abs(corrupted - clean).max() > 1e-2, name


@needs_ixi
def test_gallery_of_a_real_ixi_slice(tmp_path):
    output = tmp_path / "new" / "gallery.png"
    result = run("--mode=gallery", f"--data_dir={IXI_DIR}", f"--output={output}", "--image_size=48")
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(output) in result.stdout
    picture = matplotlib.image.imread(output)
    rows = math.ceil((2 + len(corruptions.CORRUPTIONS)) / gallery.COLUMNS)
    assert picture.shape[:2] == (round(3.9 * rows * 100), round(1.9 * gallery.COLUMNS * 100))
    assert picture[..., :3].std() > 0.05  # not a blank figure


@needs_ixi
def test_gallery_refuses_to_write_into_the_data(tmp_path):
    ixi_dir = symlink_subset(IXI_DIR, tmp_path / "ixi", 2)  # a regression writes here, never into ../shared
    inside = ixi_dir / "gallery.png"
    result = run("--mode=gallery", f"--data_dir={ixi_dir}", f"--output={inside}")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1 and "inside --data_dir" in errors[0]
    assert "Traceback" not in result.stderr and not inside.exists()
    cfg = Config(data_dir=str(ixi_dir))
    first_input = sorted(ixi_dir.glob("*.nii.gz"))[0]
    before = first_input.stat()
    for output in (first_input, ixi_dir / "sub" / ".." / "gallery.png"):
        with pytest.raises(UserError):
            gallery.save_gallery(cfg, output)
    assert first_input.stat().st_mtime_ns == before.st_mtime_ns and first_input.stat().st_size == before.st_size
    with pytest.raises(UserError, match="png"):
        gallery.save_gallery(cfg, tmp_path / "gallery.jpg")

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from conftest import IXI_DIR, needs_ixi
from mrirecon_jax import metrics


def _noisy_pair(seed, shape=(4, 48, 48, 1), noise=0.08):
    rng = np.random.default_rng(seed)
    target = rng.random(shape).astype(np.float32)
    pred = np.clip(target + noise * rng.standard_normal(shape), 0, 1).astype(np.float32)
    return pred, target


def test_ssim_matches_scikit_image_on_random_images():
    pred, target = _noisy_pair(0)
    ours = np.asarray(metrics.ssim(jnp.asarray(pred), jnp.asarray(target)))
    ref = [structural_similarity(target[i, ..., 0], pred[i, ..., 0], data_range=1.0) for i in range(len(pred))]
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@needs_ixi
def test_ssim_matches_scikit_image_on_real_slices():
    volume = nib.load(sorted(IXI_DIR.glob("*.nii.gz"))[0]).get_fdata(dtype=np.float32)
    slices = np.stack([volume[:, 60 + i, :] for i in range(3)])[..., None]
    slices = (slices - slices.min()) / (slices.max() - slices.min())
    blurred = (slices + np.roll(slices, 1, axis=1) + np.roll(slices, 1, axis=2)) / 3
    ours = np.asarray(metrics.ssim(jnp.asarray(blurred), jnp.asarray(slices)))
    ref = [structural_similarity(slices[i, ..., 0], blurred[i, ..., 0], data_range=1.0) for i in range(3)]
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert 0.3 < min(ref) < 0.999


def test_psnr_and_mse_are_the_standard_definitions():
    pred, target = _noisy_pair(1)
    out = metrics.slice_metrics(jnp.asarray(pred), jnp.asarray(target), jnp.zeros_like(target))
    mse = np.mean((pred - target) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(out["mse_slice"]), mse, rtol=1e-5)
    ref_psnr = [peak_signal_noise_ratio(target[i], pred[i], data_range=1.0) for i in range(len(pred))]
    np.testing.assert_allclose(np.asarray(out["psnr_slice"]), ref_psnr, rtol=1e-4)
    assert np.all(np.isnan(np.asarray(out["ssim_patch"])))  # no patch: no patch value


def test_bounding_box_mask_matches_numpy():
    mask = np.zeros((3, 20, 20, 1), np.float32)
    mask[0, 3, 4] = mask[0, 10, 15] = 1  # two points: the box spans them
    mask[1, 5:7, 2:18] = 1
    box = np.asarray(metrics.bounding_box_mask(jnp.asarray(mask)))
    assert box[0, 3:11, 4:16].all() and box[0].sum() == 8 * 12
    assert box[1, 5:7, 2:18].all() and box[1].sum() == 2 * 16
    assert box[2].sum() == 0


def test_patch_metrics_only_see_the_rectangle():
    pred, target = _noisy_pair(2, (1, 64, 64, 1))
    mask = np.zeros_like(target)
    mask[0, 28:34, 20:44] = 1
    base = metrics.slice_metrics(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
    changed = pred.copy()
    changed[0, :10] = 1 - changed[0, :10]  # far from the rectangle and its SSIM windows
    moved = metrics.slice_metrics(jnp.asarray(changed), jnp.asarray(target), jnp.asarray(mask))
    for name in ("ssim_patch", "psnr_patch", "mse_patch"):
        assert float(moved[name][0]) == pytest.approx(float(base[name][0]), rel=1e-6)
    assert float(moved["mse_slice"][0]) > float(base["mse_slice"][0])
    inside = np.mean((pred[0, 28:34, 20:44] - target[0, 28:34, 20:44]) ** 2)
    assert float(base["mse_patch"][0]) == pytest.approx(inside, rel=1e-5)

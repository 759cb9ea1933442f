import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrirecon_jax import losses
from mrirecon_jax.config import UserError


def _pair(seed=0, shape=(2, 32, 32, 1)):
    k1, k2 = jax.random.split(jax.random.key(seed))
    target = jax.random.uniform(k1, shape)
    pred = jnp.clip(target + 0.1 * jax.random.normal(k2, shape), 0, 1)
    return pred, target


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_loss_is_zero_for_a_perfect_prediction_and_positive_otherwise(name):
    pred, target = _pair()
    loss = losses.get_loss(name)
    assert abs(float(loss(target, target))) < 1e-5
    assert float(loss(pred, target)) > 1e-3


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_loss_gradients_are_finite_and_nonzero(name):
    pred, target = _pair(1)
    grad = jax.grad(losses.get_loss(name))(pred, target)
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.abs(grad).sum()) > 0


def test_ssim_loss_is_one_minus_dm_pix_ssim():
    pred, target = _pair(2)
    expected = 1.0 - jnp.mean(pix.ssim(pred, target))
    np.testing.assert_allclose(float(losses.ssim_loss(pred, target)), float(expected), atol=1e-6)


def test_ssim7_loss_is_one_minus_the_metric_scikit_image_computes():
    from skimage.metrics import structural_similarity

    pred, target = _pair(5)
    expected = np.mean([structural_similarity(np.asarray(t[..., 0]), np.asarray(p[..., 0]), data_range=1.0)
                        for p, t in zip(pred, target)])
    # The same window; scikit-image's sample covariance (49/48) is the only difference.
    np.testing.assert_allclose(1.0 - float(losses.get_loss("ssim7")(pred, target)), expected, atol=1e-4)
    assert abs(float(losses.ssim_loss(pred, target)) - float(losses.get_loss("ssim7")(pred, target))) > 1e-3


@pytest.mark.parametrize("name, ssim_name", [("ssim_l1", "ssim"), ("ssim7_l1", "ssim7")])
def test_ssim_l1_is_the_weighted_mix(name, ssim_name):
    pred, target = _pair(3)
    a = losses.SSIM_L1_ALPHA
    expected = a * losses.get_loss(ssim_name)(pred, target) + (1 - a) * losses.l1_loss(pred, target)
    np.testing.assert_allclose(float(losses.get_loss(name)(pred, target)), float(expected), atol=1e-6)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_weights_ignore_errors_outside_the_mask(name):
    pred, target = _pair(4, (1, 64, 64, 1))
    # Wide enough a margin for the coarsest scale of ms_ssim7, whose 7 px window spans 28 px here.
    weights = jnp.zeros_like(target).at[:, 24:40, 24:40].set(1.0)
    far_off = pred.at[:, :2, :].set(1.0 - pred[:, :2, :])  # changes only rows far outside the mask
    loss = losses.get_loss(name)
    np.testing.assert_allclose(float(loss(pred, target, weights)), float(loss(far_off, target, weights)), rtol=1e-6)
    assert float(loss(pred, target)) != pytest.approx(float(loss(far_off, target)))


def _reference_ms_ssim(pred, target):
    """MS-SSIM written out with scipy's box filter and numpy (population statistics, the loss's clipping aside)."""
    from scipy.ndimage import uniform_filter

    def box(z):
        return uniform_filter(z, size=losses.UNIFORM_WINDOW, mode="constant")[3:-3, 3:-3]

    exponents = np.asarray(losses.MS_SSIM_WEIGHTS) / sum(losses.MS_SSIM_WEIGHTS)
    scores = []
    for p, t in zip(np.asarray(pred, np.float64)[..., 0], np.asarray(target, np.float64)[..., 0]):
        score = 1.0
        for scale, exponent in enumerate(exponents):
            mu_p, mu_t = box(p), box(t)
            var_p, var_t, cov = box(p * p) - mu_p ** 2, box(t * t) - mu_t ** 2, box(p * t) - mu_p * mu_t
            cs = (2 * cov + 0.03 ** 2) / (var_p + var_t + 0.03 ** 2)
            lum = (2 * mu_p * mu_t + 0.01 ** 2) / (mu_p ** 2 + mu_t ** 2 + 0.01 ** 2)
            score *= np.mean(cs * lum if scale == len(exponents) - 1 else cs) ** exponent
            p = p.reshape(p.shape[0] // 2, 2, p.shape[1] // 2, 2).mean(axis=(1, 3))
            t = t.reshape(t.shape[0] // 2, 2, t.shape[1] // 2, 2).mean(axis=(1, 3))
        scores.append(score)
    return 1.0 - np.mean(scores)


def test_ms_ssim_loss_matches_the_multi_scale_definition():
    pred, target = _pair(6, (2, 64, 64, 1))
    np.testing.assert_allclose(float(losses.get_loss("ms_ssim7")(pred, target)), _reference_ms_ssim(pred, target),
                               atol=1e-5)
    # Not the single-scale loss under another name.
    assert abs(float(losses.get_loss("ms_ssim7")(pred, target)) - float(losses.get_loss("ssim7")(pred, target))) > 1e-3


def test_ms_ssim_loss_refuses_images_too_small_for_its_coarsest_scale():
    assert losses.checked_loss("ms_ssim7", 32) is losses.ms_ssim_loss
    with pytest.raises(UserError, match="at least 28 px"):
        losses.checked_loss("ms_ssim7", 16)
    assert losses.checked_loss("ssim7", 16) is losses.ssim_uniform_loss


def test_unknown_loss_is_a_user_error():
    with pytest.raises(UserError, match="ssim_l1"):
        losses.get_loss("perceptual")


def test_foreground_mask_is_the_head_dilated_and_ignores_the_slices_units():
    rows, cols = np.mgrid[0:32, 0:32]
    disc = ((rows - 16) ** 2 + (cols - 16) ** 2 <= 8 ** 2).astype(np.float32)
    head = 0.8 * disc + 0.02  # dim air around a bright head
    head[16, 16] = 0.02  # a dark pixel inside (a sulcus): the dilation closes it
    batch = jnp.asarray(np.stack([head, 500.0 * head])[..., None])  # two units, one head
    mask = np.asarray(losses.foreground_mask(batch))[..., 0]
    near = ((rows - 16) ** 2 + (cols - 16) ** 2 <= (8 + losses.FOREGROUND_DILATION) ** 2)
    far = ((rows - 16) ** 2 + (cols - 16) ** 2 > (8 + 2 * losses.FOREGROUND_DILATION) ** 2)
    for m in mask:
        assert set(np.unique(m)) == {0.0, 1.0}
        assert m[near].all() and not m[far].any()
    np.testing.assert_array_equal(mask[0], mask[1])

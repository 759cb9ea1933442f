"""Tests for mrirecon_jax.corruptions: definitions, invariances, the artifact physics and the policy."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from mrirecon_jax import corruptions as C

KEY = jax.random.key(0)
AUGMENTED = C.parse_policy("augmented")
KINDS = tuple(C.CORRUPTIONS)
# Kinds whose outcome does not depend on the key.
DETERMINISTIC = {"downsample", "downsample_x4", "kspace_crop", "kspace_crop_x4"}
# Parameters at which each kind must be the identity. A kind added to CORRUPTIONS without an entry here fails.
ZERO_STRENGTH = {
    "downsample": dict(factor=1),
    "downsample_x4": dict(factor=1),
    "kspace_crop": dict(factor=1),
    "kspace_crop_x4": dict(factor=1),
    "gibbs": dict(keep_fraction_range=(1.0, 1.0)),
    "gibbs_pe": dict(keep_fraction_range=(1.0, 1.0)),
    "ghost": dict(intensity_range=(0.0, 0.0)),
    "noise": dict(snr_range=(math.inf, math.inf)),
    "spike": dict(intensity_range=(0.0, 0.0)),
    "motion": dict(max_degrees=0.0, max_shift=0.0),
    "bias": dict(max_coefficient=0.0),
    "undersample_random_x4": dict(center_fraction=1.0),
    "undersample_random_x8": dict(center_fraction=1.0),
    "undersample_equispaced_x4": dict(center_fraction=1.0),
    "undersample_equispaced_x8": dict(center_fraction=1.0),
    "downsample_wide": dict(factor=1),
    "gibbs_wide": dict(keep_fraction_range=(1.0, 1.0)),
    "ghost_wide": dict(intensity_range=(0.0, 0.0)),
    "coarse_noise": dict(std=0.0),
}
# Kinds that may return the real part of their k-space edit (so values below 0).
# Real parts; Lanczos and cubic filters undershoot; additive coarse noise dips below the foreground's low values.
SIGNED = {"gibbs_wide", "ghost_wide", "downsample_wide", "coarse_noise"}


def all_kinds(key, image):
    """Every kind of CORRUPTIONS applied to ``image`` with ``key``, stacked: (len(KINDS), H, W, C)."""
    return jnp.stack([C.CORRUPTIONS[name](key, image) for name in KINDS])


@jax.jit
def kind_gradients(image):
    """d sum(f(KEY, image)) / d image for every kind, stacked like all_kinds."""
    return jnp.stack([jax.grad(lambda x, f=C.CORRUPTIONS[name]: jnp.sum(f(KEY, x)))(image) for name in KINDS])


# Compiled once per shape and dtype and shared by the tests (XLA compiles dominate the test time on a small CPU).
ALL = jax.jit(all_kinds)
ALL_BATCH = jax.jit(jax.vmap(all_kinds))
BATCH = jax.jit(C.corrupt_batch, static_argnames="policy")
IMAGE = jax.jit(C.corrupt_image, static_argnames="policy")


def phantom(size=64, corner_max=True):
    """A smooth brain-like slice in [0, 1]: a head disc with a brighter rim, darker ventricles and a blob.

    Everything in the central region is <= 0.8; with ``corner_max`` one corner pixel is 1.0 (the maximum).
    """
    r, c = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    img = np.zeros((size, size), np.float32)
    head = (r / 0.42) ** 2 + (c / 0.36) ** 2
    img[head <= 1.0] = 0.55
    img[(head > 0.85) & (head <= 1.0)] = 0.75
    img[((r + 0.05) / 0.12) ** 2 + ((np.abs(c) - 0.07) / 0.05) ** 2 <= 1.0] = 0.2
    img[((r - 0.15) / 0.06) ** 2 + ((c + 0.12) / 0.06) ** 2 <= 1.0] = 0.7
    img = ndimage.gaussian_filter(img, 0.7).clip(0.0, 0.8)
    if corner_max:
        img[0, 0] = 1.0
    return jnp.asarray(img[..., None])


# ------------------------------------------------------------------------------------------- FFT


def test_fft2c_parseval_round_trip_and_centring():
    x = jax.random.uniform(jax.random.key(1), (32, 24, 2))
    k = C.fft2c(x)
    assert k.dtype == jnp.complex64 and k.shape == x.shape
    np.testing.assert_allclose(jnp.linalg.norm(k), jnp.linalg.norm(x), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(C.ifft2c(k)), np.asarray(x), atol=1e-5)
    # A constant image has all its energy in the DC term, which sits at (H // 2, W // 2).
    kc = np.abs(np.asarray(C.fft2c(jnp.ones((32, 24, 1)))))
    assert kc[16, 12, 0] == pytest.approx(np.sqrt(32 * 24), rel=1e-5)
    kc[16, 12, 0] = 0.0
    assert kc.max() < 1e-4


# ------------------------------------------------------------------------------------------- identity at zero strength


@pytest.mark.parametrize("name", KINDS)
def test_every_kind_is_the_identity_at_zero_strength(name):
    img = phantom(32)
    fn = functools.partial(C.CORRUPTIONS[name], **ZERO_STRENGTH[name])
    np.testing.assert_allclose(np.asarray(fn(KEY, img)), np.asarray(img), atol=2e-5)
    # ... and the policy's own parameters do change the image.
    assert np.abs(np.asarray(C.CORRUPTIONS[name](KEY, img)) - np.asarray(img)).max() > 1e-2


@pytest.mark.parametrize(
    "fn",
    [
        functools.partial(C.ghost, intensity_range=(0.0, 0.0), axis=1, restore_centre=False),
        lambda k, x: C.line_patch(k, x, min_opacity=0.0, max_opacity=0.0)[0],
    ],
    ids=["ghost_axis1", "patch"],
)
def test_identity_at_zero_strength_other_settings(fn):
    img = phantom()
    np.testing.assert_allclose(np.asarray(fn(KEY, img)), np.asarray(img), atol=1e-5)


def test_policy_none_is_identity():
    img = phantom()
    out, mask, kind = C.corrupt_image(KEY, img, C.parse_policy("none"))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img))
    assert mask.shape == (64, 64, 1) and float(mask.sum()) == 0.0 and int(kind) == 0


# ------------------------------------------------------------------------------------- randomness, vmap, jit, grad


def test_same_key_same_output_different_keys_differ():
    img = phantom(32)
    outs = np.stack([np.asarray(ALL(jax.random.key(i), img)) for i in range(4)])  # (keys, kinds, H, W, C)
    np.testing.assert_array_equal(outs[0], np.asarray(ALL(jax.random.key(0), img)))
    for k, name in enumerate(KINDS):
        distinct = len({o.tobytes() for o in outs[:, k]})
        # Gibbs draws a continuous keep fraction but cuts whole lines, so two keys may coincide; four should not.
        assert distinct == 1 if name in DETERMINISTIC else distinct >= 2, name


def test_patch_and_policy_keys():
    img = phantom(32)
    for fn in (lambda k: C.line_patch(k, img)[0], lambda k: IMAGE(k, img, policy=AUGMENTED)[0]):
        a, b, c = fn(KEY), fn(KEY), fn(jax.random.key(1))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_vmap_equals_loop_and_jit_equals_eager():
    img = phantom(32)
    imgs = jnp.stack([img, img[::-1], img[:, ::-1], 0.5 * img])
    keys = jax.random.split(KEY, imgs.shape[0])
    batched = ALL_BATCH(keys, imgs)
    for i in range(imgs.shape[0]):
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(ALL(keys[i], imgs[i])), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ALL(KEY, img)), np.asarray(all_kinds(KEY, img)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(C.line_patch)(KEY, img)[0]),
                               np.asarray(C.line_patch(KEY, img)[0]), atol=1e-6)


def test_policy_vmap_equals_loop_and_jit_equals_eager():
    img = phantom(32)
    imgs = jnp.stack([img, img[::-1], img[:, ::-1], 0.5 * img])
    out, masks, kinds = BATCH(KEY, imgs, policy=AUGMENTED)
    keys = jax.random.split(KEY, imgs.shape[0])
    for i in range(imgs.shape[0]):
        o, m, k = IMAGE(keys[i], imgs[i], policy=AUGMENTED)
        np.testing.assert_allclose(np.asarray(out[i]), np.asarray(o), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(masks[i]), np.asarray(m))
        assert int(kinds[i]) == int(k)
        for x, y in zip((o, m, k), C.corrupt_image(keys[i], imgs[i], AUGMENTED)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_gradients_finite_and_nonzero():
    # A zero background exercises the magnitude's gradient at 0 in the k-space corruptions.
    grads = np.asarray(kind_gradients(phantom(32, corner_max=False)))
    assert grads.shape == (len(KINDS), 32, 32, 1)
    for name, grad in zip(KINDS, grads):
        assert np.isfinite(grad).all() and np.abs(grad).sum() > 0.0, name
    patch_grad = jax.grad(lambda x: jnp.sum(C.line_patch(KEY, x)[0]))(phantom(32, corner_max=False))
    assert bool(jnp.all(jnp.isfinite(patch_grad))) and float(jnp.abs(patch_grad).sum()) > 0


def _unsigned(out):
    """The outputs of the kinds that return a magnitude (or an image product), which is never negative."""
    return out[[i for i, name in enumerate(KINDS) if name not in SIGNED]]


def test_range_shape_dtype_float32():
    # A saturated square with a sharp edge makes the k-space corruptions overshoot above 1: not clipped, as a
    # scanner's reconstruction is not.
    img = np.array(phantom(32), np.float32)
    img[12:20, 12:20] = 1.0
    out = np.asarray(ALL(KEY, jnp.asarray(img)))
    assert out.shape == (len(KINDS), 32, 32, 1) and out.dtype == np.float32
    assert np.isfinite(out).all() and _unsigned(out).min() >= 0.0
    assert out[KINDS.index("gibbs")].max() > 1.02


def test_bfloat16_and_any_even_size():
    # 30 x 40: not square and not divisible by 4 (the x4 resolution reductions).
    img = jax.image.resize(phantom(64), (30, 40, 1), "linear").astype(jnp.bfloat16)
    out = ALL(KEY, img)
    assert out.shape == (len(KINDS), 30, 40, 1) and out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all() and _unsigned(out).min() >= 0.0
    for name, o in zip(KINDS, out):
        assert np.abs(o - np.asarray(img, np.float32)).max() > 1e-2, name


def test_corrupt_batch_bfloat16():
    imgs = jnp.stack([phantom(32)] * 4).astype(jnp.bfloat16)
    out, masks, kinds = BATCH(KEY, imgs, policy=AUGMENTED)
    assert out.dtype == jnp.bfloat16 and out.shape == imgs.shape
    assert masks.dtype == jnp.float32 and masks.shape == (4, 32, 32, 1)
    assert kinds.dtype == jnp.int32 and kinds.shape == (4,)
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all() and out.min() >= 0.0


# ------------------------------------------------------------------------------------------- patch


def test_patch_mask_is_exactly_the_changed_pixels():
    img = phantom(32)
    keys = jax.random.split(jax.random.key(3), 24)
    patched, masks = jax.jit(jax.vmap(C.line_patch, in_axes=(0, None)))(keys, img)
    patched, masks = np.asarray(patched), np.asarray(masks)
    assert masks.shape == (24, 32, 32, 1) and masks.dtype == np.float32
    assert set(np.unique(masks)) <= {0.0, 1.0}
    for p, m in zip(patched, masks):
        changed = p != np.asarray(img)
        assert m.sum() > 0
        np.testing.assert_array_equal(changed, m > 0)
        assert (p[m > 0] > np.asarray(img)[m > 0]).all() and p.max() <= 1.0


def test_patch_clipped_to_slice_maximum():
    img = 0.5 * phantom()  # max 0.5
    patched, mask = C.line_patch(KEY, img, min_opacity=1.0, max_opacity=1.0)
    assert float(patched.max()) == pytest.approx(0.5)
    np.testing.assert_allclose(np.asarray(patched)[np.asarray(mask) > 0], 0.5)


@pytest.mark.parametrize("size", [32, 64])
def test_patch_geometry_and_thickness_bound(size):
    max_thick = size / 8
    lo, hi = size // 4, size - size // 4  # the central box for centre_frac = 0.5
    for i in range(16):
        key = jax.random.key(100 + i)
        points, thickness, opacity = C._line_geometry(key, size, size)
        points = np.asarray(points)
        assert 1 <= float(thickness) <= max_thick and 0.3 <= float(opacity) <= 1.0
        assert (points >= lo).all() and (points < hi).all()
        _, mask = C.line_patch(key, phantom(size))
        mask = np.asarray(mask[..., 0]) > 0
        # The widest disc inside the line has radius about thickness / 2 (+1 px of pixelisation).
        assert ndimage.distance_transform_edt(mask).max() <= max_thick / 2 + 1
        # Every mask pixel lies within thickness / 2 of the box that holds the end points.
        rows, cols = np.nonzero(mask)
        half = float(thickness) / 2
        assert rows.min() >= lo - half and rows.max() <= hi - 1 + half
        assert cols.min() >= lo - half and cols.max() <= hi - 1 + half


def test_patch_box_matches_numpy():
    def numpy_box(m):
        m = m.reshape(m.shape[0], m.shape[1], -1).any(-1)
        if not m.any():
            return [0, 0, 0, 0]
        r, c = np.nonzero(m)
        return [r.min(), r.max() + 1, c.min(), c.max() + 1]

    masks = [np.asarray(C.line_patch(jax.random.key(i), phantom())[1]) for i in range(6)]
    rect = np.zeros((64, 64, 1), np.float32)
    rect[0:5, 60:64] = 1.0
    single = np.zeros((64, 64), np.float32)
    single[63, 0] = 1.0
    masks += [rect, single, np.zeros((64, 64, 1), np.float32)]
    box_fn = jax.jit(C.patch_box)
    for m in masks:
        box = box_fn(m)
        assert box.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(box), numpy_box(m))
    batched = jax.vmap(C.patch_box)(jnp.stack([jnp.asarray(m) for m in masks[:6]]))
    np.testing.assert_array_equal(np.asarray(batched), [numpy_box(m) for m in masks[:6]])


# ------------------------------------------------------------------------------------------- artifact physics


def test_ghost_copy_at_expected_shift():
    size = 64
    img = np.zeros((size, size, 1), np.float32)
    img[10:14, 28:36] = 1.0
    out = np.asarray(C.ghost(KEY, jnp.asarray(img), num_ghosts_range=(4, 4), intensity_range=(0.8, 0.8)))
    column = out[:, 31, 0]
    ghost_rows = column[10 + size // 4:14 + size // 4]  # shifted by H / n = 16 rows
    between = column[10 + size // 8:14 + size // 8]  # half-way: no ghost there
    assert ghost_rows.min() > between.max() + 0.05
    assert column[10:14].min() > ghost_rows.max()  # the original stays the brightest
    # Along the other axis there is no copy: columns 16 px to the side of the square stay dark.
    assert out[10:14, 31 + size // 4, 0].max() < ghost_rows.min()


def test_gibbs_overshoot_of_a_step_edge():
    size, low, high = 128, 0.2, 0.6
    img = np.full((size, 8, 1), low, np.float32)
    img[size // 2:] = high
    out = np.asarray(C.gibbs(KEY, jnp.asarray(img), keep_fraction_range=(0.25, 0.25), axes="pe"))
    overshoot = (out.max() - high) / (high - low)
    assert 0.07 < overshoot < 0.11  # the Gibbs phenomenon: ~9 % of the jump (8.5 % measured here)
    # Ringing is along axis 0 only: every column is the same profile.
    np.testing.assert_allclose(out, np.broadcast_to(out[:, :1], out.shape), atol=1e-5)


def test_downsample_removes_high_frequencies():
    img = jax.random.uniform(jax.random.key(5), (64, 64, 1))
    out = C.downsample(KEY, img, factor=2)

    def high_energy(x):
        k = np.abs(np.asarray(C.fft2c(x))[..., 0]) ** 2
        r, c = np.mgrid[-32:32, -32:32]
        return k[(np.abs(r) >= 16) | (np.abs(c) >= 16)].sum()

    assert high_energy(out) < 0.1 * high_energy(img)
    # A constant image is unchanged, and the mean brightness is preserved.
    flat = jnp.full((64, 64, 1), 0.4)
    np.testing.assert_allclose(np.asarray(C.downsample(KEY, flat)), 0.4, atol=1e-6)
    assert float(out.mean()) == pytest.approx(float(img.mean()), abs=5e-3)
    # Any size: 30 x 40 by 4 (bins of 7.5 and 10 pixels, fractional overlaps weighted).
    flat = jnp.full((30, 40, 1), 0.4)
    np.testing.assert_allclose(np.asarray(C.downsample(KEY, flat, factor=4)), 0.4, atol=1e-6)
    with pytest.raises(ValueError, match="method"):
        C.downsample(KEY, flat, method="bicubic")



@pytest.mark.parametrize("factor,kept", [(2, 32), (4, 16)])
def test_kspace_crop_keeps_the_central_samples(factor, kept):
    img = jax.random.uniform(jax.random.key(5), (64, 64, 1))
    k = np.asarray(C.fft2c(img))
    lo = 32 - kept // 2  # the spectrum of a kept x kept image, zero-filled to 64 x 64
    cropped = np.zeros_like(k)
    cropped[lo:lo + kept, lo:lo + kept] = k[lo:lo + kept, lo:lo + kept]
    expected = np.clip(np.abs(np.asarray(C.ifft2c(cropped))), 0.0, 1.0)
    np.testing.assert_allclose(np.asarray(C.downsample(KEY, img, factor, method="kspace")), expected, atol=1e-5)


def test_motion_translation_ramp_and_rotation():
    img = np.asarray(phantom(32))
    ramp = C._shift_ramp(32, 32, jnp.array([3.0, -5.0]))
    shifted = np.real(np.asarray(C.ifft2c(C.fft2c(img) * ramp)))
    np.testing.assert_allclose(shifted, np.roll(img, (3, -5), axis=(0, 1)), atol=1e-5)
    # A quarter turn about the centre of a square image is np.rot90 (clockwise: rows run down).
    turned = np.asarray(C._rotate(jnp.asarray(img), jnp.pi / 2))
    np.testing.assert_allclose(turned, np.rot90(img, -1, axes=(0, 1)), atol=1e-4)


def test_motion_keeps_the_centre_of_kspace_from_the_unmoved_pose():
    # Moves after t ~ U(0, 1) of the lines: the lines near the centre still come from the unmoved slice, so the
    # image stays registered; the moved segments add ghost-like edges. Strong motion still correlates well.
    img = np.asarray(phantom(64))
    strong = jax.jit(jax.vmap(functools.partial(C.motion, max_degrees=15.0, max_shift=0.1), in_axes=(0, None)))
    outs = np.asarray(strong(jax.random.split(KEY, 6), jnp.asarray(img)))
    for out in outs:
        assert np.corrcoef(out.ravel(), img.ravel())[0, 1] > 0.8
    # How much changes depends on how many lines were acquired after a move; some draws change a lot.
    assert max(np.abs(out - img).max() for out in outs) > 0.2


def test_rician_noise_has_the_requested_snr():
    size, signal, snr = 128, 0.5, 20.0
    img = np.zeros((size, size, 1), np.float32)
    img[32:96, 32:96] = signal
    out = np.asarray(C.rician_noise(KEY, jnp.asarray(img), snr_range=(snr, snr)))
    sigma = signal / snr
    inside, background = out[40:88, 40:88], out[:16]
    assert inside.std() == pytest.approx(sigma, rel=0.1)
    assert inside.mean() == pytest.approx(signal, abs=0.005)
    # Where there is no signal the magnitude is Rayleigh distributed: mean sigma * sqrt(pi / 2).
    assert background.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.1)


def test_spikes_appear_where_drawn():
    size = 64
    img = jnp.full((size, size, 1), 0.3)
    one_spike = jax.jit(functools.partial(C.spike, num_spikes_range=(1, 1), intensity_range=(0.5, 0.5)))
    draw = jax.jit(C.spike_draw, static_argnums=(1, 2, 3, 4))
    checked = 0
    for i in range(6):
        key = jax.random.key(i)
        positions, active, strength = draw(key, size, size, (1, 1), (0.5, 0.5))
        row, col = (int(v) for v in np.asarray(positions)[0])
        assert bool(active[0]) and float(strength) == pytest.approx(0.5)
        if (row, col) == (size // 2, size // 2):
            continue
        out = one_spike(key, img)
        # |0.3 + 0.15 exp(i 2 pi f.x)| is a stripe pattern whose strongest frequency is the spike's offset f.
        k = np.abs(np.asarray(C.fft2c(out))[..., 0])
        k[size // 2, size // 2] = 0.0
        peak = np.unravel_index(np.argmax(k), k.shape)
        assert peak in {(row, col), ((size - row) % size, (size - col) % size)}
        checked += 1
    assert checked >= 4
    # The number of spikes is drawn from the range, inclusive.
    count_spikes = jax.jit(jax.vmap(lambda k: jnp.sum(C.spike_draw(k, size, size, (1, 3))[1])))
    counts = count_spikes(jax.random.split(KEY, 60))
    assert set(np.asarray(counts).tolist()) == {1, 2, 3}


def test_bias_field_is_a_smooth_polynomial_in_log():
    size, level, max_coefficient = 32, 0.05, 0.3  # low enough that the field never clips
    out = np.asarray(C.bias_field(KEY, jnp.full((size, size, 1), level), 3, max_coefficient))[..., 0]
    log_field = np.log(out / level).ravel()
    y = (np.arange(size) - (size - 1) / 2) / ((size - 1) / 2)
    rows, cols = np.meshgrid(y, y, indexing="ij")
    basis = np.stack([(rows ** i * cols ** j).ravel() for i in range(4) for j in range(4 - i)], axis=-1)
    coefficients = np.linalg.lstsq(basis, log_field, rcond=None)[0]
    np.testing.assert_allclose(basis @ coefficients, log_field, atol=1e-4)
    assert abs(coefficients[0]) < 1e-4  # no constant term
    assert np.abs(coefficients[1:]).max() <= max_coefficient + 1e-4
    assert np.abs(log_field).max() > 0.05


def fastmri_equispaced_mask(size, acceleration, center_fraction, offset):
    """fastMRI's EquispacedMaskFractionFunc mask for a given offset, transcribed from its definition."""
    n_low = round(size * center_fraction)
    mask = np.zeros(size, bool)
    pad = (size - n_low + 1) // 2
    mask[pad:pad + n_low] = True
    spacing = acceleration * (n_low - size) / (n_low * acceleration - size)
    mask[np.around(np.arange(offset, size - 1, spacing)).astype(int)] = True
    return mask, spacing


@pytest.mark.parametrize("size", [64, 320])
@pytest.mark.parametrize("acceleration,center_fraction", [(4, 0.08), (8, 0.04)])
def test_undersampling_masks_as_fastmri_defines_them(size, acceleration, center_fraction):
    n_low = round(size * center_fraction)
    pad = (size - n_low + 1) // 2
    keys = jax.random.split(KEY, 400)

    def masks(pattern, keys):
        return np.asarray(jax.vmap(lambda k: C.undersampling_mask(k, size, acceleration, center_fraction,
                                                                  pattern))(keys))

    random = masks("random", keys)
    assert random[:, pad:pad + n_low].all()  # the fully sampled centre
    assert random.mean() == pytest.approx(1 / acceleration, rel=0.05)  # the acceleration, on average
    assert 0 < random[:, pad - 1].mean() < 1 and 0 < random[:, pad + n_low].mean() < 1
    equispaced = masks("equispaced", keys[:40])
    _, spacing = fastmri_equispaced_mask(size, acceleration, center_fraction, 0)
    references = [fastmri_equispaced_mask(size, acceleration, center_fraction, o)[0] for o in
                  range(round(spacing))]
    for mask in equispaced:
        assert any((mask == reference).all() for reference in references)
    assert len({m.tobytes() for m in equispaced}) > 1  # the offset is drawn
    assert equispaced.sum(axis=1).mean() == pytest.approx(size / acceleration, rel=0.1)


# ------------------------------------------------------------------------------------------- policy


def test_parse_policy_named_and_composite():
    assert C.parse_policy("original") == C.Policy(True, ("downsample",), "patch+downsample")
    assert C.parse_policy("augmented") == C.Policy(
        True, ("downsample", "gibbs", "ghost"), "patch+oneof(downsample,gibbs,ghost)")
    assert C.parse_policy("none") == C.Policy(False, (), "none")
    assert C.parse_policy(" Gibbs + patch ") == C.Policy(True, ("gibbs",), "patch+gibbs")
    assert C.parse_policy("oneof(ghost, gibbs)") == C.Policy(False, ("ghost", "gibbs"), "oneof(ghost,gibbs)")
    assert C.parse_policy("patch") == C.Policy(True, (), "patch")
    assert C.parse_policy("oneof(gibbs)").spec == "gibbs"
    # Always-applied terms keep their written order around the drawn one.
    assert C.parse_policy("patch + noise + oneof(downsample, gibbs)") == C.Policy(
        True, ("downsample", "gibbs"), "patch+noise+oneof(downsample,gibbs)", before=("noise",))
    assert C.parse_policy("bias+gibbs+noise") == C.Policy(False, ("bias",), "bias+gibbs+noise",
                                                         after=("gibbs", "noise"))
    assert C.parse_policy("noise+oneof(gibbs)") == C.parse_policy("noise+gibbs")
    realistic = C.parse_policy("realistic")
    assert realistic.patch and realistic.after == ("noise",) and len(realistic.kinds) == 8
    assert {"motion", "spike", "bias", "undersample_random_x4"} <= set(realistic.kinds)
    # Canonical: parsing the canonical spec gives the same (hashable) policy.
    for name in ("original", "augmented", "realistic", "none", "patch+oneof(gibbs,ghost)", "bias+oneof(gibbs,"
                 "motion)+noise", "noise+gibbs"):
        p = C.parse_policy(name)
        assert C.parse_policy(p.spec) == p and hash(C.parse_policy(p.spec)) == hash(p)


@pytest.mark.parametrize("spec", ["foo", "patch+blur", "patch+patch", "oneof()", "oneof(gibbs,gibbs)", "patch+",
                                  "oneof(gibbs,foo)", "oneof(gibbs,ghost)+oneof(noise,bias)",
                                  "noise+oneof(noise,gibbs)", "gibbs+gibbs"])
def test_parse_policy_invalid(spec):
    with pytest.raises(ValueError, match="valid"):
        C.parse_policy(spec)


def test_policy_applies_terms_in_the_written_order():
    img = phantom()

    def high_energy(x):
        k = np.abs(np.asarray(C.fft2c(x))[..., 0]) ** 2
        r, c = np.mgrid[-32:32, -32:32]
        return k[(np.abs(r) >= 8) | (np.abs(c) >= 8)].sum()

    # Noise added after a x4 k-space crop fills the discarded high frequencies; noise added before is cropped
    # (the magnitude of the cropped complex image brings some high frequencies back, hence only a factor 2.5).
    crop_then_noise = C.corrupt_image(KEY, img, "kspace_crop_x4+noise")[0]
    noise_then_crop = C.corrupt_image(KEY, img, "noise+kspace_crop_x4")[0]
    assert high_energy(crop_then_noise) > 2.5 * high_energy(noise_then_crop)


def test_original_policy_mask_marks_the_patch_on_the_downsampled_image():
    img = phantom()
    out, mask, kind = C.corrupt_image(jax.random.key(11), img, C.parse_policy("original"))
    reduced = np.asarray(C.downsample(KEY, img))
    changed = np.asarray(out) != reduced
    assert int(kind) == 0 and mask.sum() > 0
    np.testing.assert_array_equal(changed, np.asarray(mask) > 0)


@pytest.mark.parametrize("name", ["augmented", "realistic"])
def test_kind_frequencies(name):
    n, policy = 400, C.parse_policy(name)
    imgs = jnp.broadcast_to(phantom(32), (n, 32, 32, 1))
    # Only the kinds are returned, so XLA prunes the image work and this compiles quickly.
    kinds = jax.jit(lambda k, x: C.corrupt_batch(k, x, policy)[2])(KEY, imgs)
    counts = np.bincount(np.asarray(kinds), minlength=len(policy.kinds))
    expected = n / len(policy.kinds)
    assert counts.sum() == n and len(counts) == len(policy.kinds)
    assert (np.abs(counts - expected) < 4 * np.sqrt(expected)).all(), counts


def test_kind_names_the_branch_applied():
    img = phantom(32)
    imgs = jnp.stack([img] * 4)
    reduced = np.asarray(C.downsample(KEY, img))
    seen = set()
    for i in range(4):
        out, masks, kinds = BATCH(jax.random.key(40 + i), imgs, policy=AUGMENTED)
        for o, m, k in zip(np.asarray(out), np.asarray(masks), np.asarray(kinds)):
            outside = m[..., 0] == 0  # the patch changes only the pixels in its mask
            is_down = np.allclose(o[outside], reduced[outside], atol=1e-6)
            assert is_down == (int(k) == 0)
            seen.add(int(k))
    assert seen == {0, 1, 2}


# ------------------------------------------------------------------------------------------- training variants


def test_wide_variants_draw_different_implementations_per_slice():
    """downsample_wide draws its filter per key; the signed kinds sometimes dip below the background."""
    img = phantom(32, corner_max=False)
    keys = jax.random.split(jax.random.key(7), 24)
    outs = {name: np.asarray(jax.jit(jax.vmap(C.CORRUPTIONS[name], in_axes=(0, None)))(keys, img))
            for name in ("downsample_wide", "gibbs_wide", "ghost_wide")}
    distinct = {np.round(o, 4).tobytes() for o in outs["downsample_wide"]}
    assert len(distinct) >= 6  # six implementations, some with a random width
    plain = np.asarray(C.CORRUPTIONS["downsample"](KEY, img))
    assert any(np.allclose(o, plain, atol=1e-5) for o in outs["downsample_wide"])  # the thesis's filter is one
    for name in ("gibbs_wide", "ghost_wide"):
        minima = outs[name].min(axis=(1, 2, 3))
        assert (minima < -1e-3).any() and (minima >= 0).any(), name  # real part sometimes, magnitude sometimes


def test_patch_wide_stays_within_the_slice_maximum():
    img = 0.5 * phantom()  # max 0.5
    keys = jax.random.split(jax.random.key(8), 16)
    patched, masks = jax.vmap(C.PATCHES["patch_wide"], in_axes=(0, None))(keys, img)
    assert (np.asarray(patched).max(axis=(1, 2, 3)) <= 0.5 + 1e-6).all()
    assert (np.asarray(masks).sum(axis=(1, 2, 3)) > 0).all()
    policy = C.parse_policy("augmented_wide")
    assert policy.patch_kind == "patch_wide" and policy.kinds == ("downsample_wide", "gibbs_wide", "ghost_wide")
    assert C.parse_policy(policy.spec) == policy


def test_square_pen_distance_is_the_chebyshev_distance_to_the_segment():
    points = jnp.array([[20.0, 13.0], [41.0, 50.0]])
    distance = np.asarray(C._square_distance(64, 64, points))
    t = np.linspace(0.0, 1.0, 20001)
    along_r, along_c = 20 + 21 * t, 13 + 37 * t
    for r, c in [(0, 0), (20, 13), (30, 30), (41, 50), (63, 5), (25, 40), (10, 60)]:
        expected = np.min(np.maximum(np.abs(r - along_r), np.abs(c - along_c)))
        assert distance[r, c] == pytest.approx(expected, abs=1e-3)
    round_distance = np.asarray(C._round_distance(64, 64, points))
    assert (distance <= round_distance + 1e-5).all() and (distance < round_distance - 1).any()


def test_square_pen_line_is_every_pixel_within_half_its_thickness_in_chebyshev_distance():
    img = np.zeros((64, 64, 1), np.float32)
    img[0, 0] = 1.0
    for i in range(6):
        key = jax.random.key(40 + i)
        points, thickness, opacity = (np.asarray(v) for v in C._line_geometry(key, 64, 64))
        patched, mask = C.line_patch(key, jnp.asarray(img), square_pen_probability=1.0)
        (r0, c0), (r1, c1) = points
        t = np.linspace(0.0, 1.0, 4001)
        rows, cols = np.mgrid[0:64, 0:64]
        chebyshev = np.min(np.maximum(np.abs(rows[..., None] - (r0 + t * (r1 - r0))),
                                      np.abs(cols[..., None] - (c0 + t * (c1 - c0)))), axis=-1)
        expected = chebyshev <= thickness / 2
        clear = np.abs(chebyshev - thickness / 2) > 0.02  # sampling the segment overestimates by < 0.02 px
        got = np.asarray(mask[..., 0]) > 0
        np.testing.assert_array_equal(got[clear], expected[clear])
        np.testing.assert_allclose(np.asarray(patched - img)[..., 0], opacity * got, atol=1e-6)
        assert got.sum() > np.sum(C._round_distance(64, 64, jnp.asarray(points)) <= thickness / 2) or thickness <= 2


def test_patch_wide_draws_soft_edges_and_its_mask_covers_every_changed_pixel():
    img = np.zeros((64, 64, 1), np.float32)
    img[0, 0] = 1.0  # a flat slice whose maximum (1) no line reaches: the added intensity is opacity x profile
    keys = jax.random.split(jax.random.key(9), 32)
    patched, masks = jax.jit(jax.vmap(C.PATCHES["patch_wide"], in_axes=(0, None)))(keys, jnp.asarray(img))
    added, masks = np.asarray(patched) - img, np.asarray(masks)
    assert set(np.unique(masks)) <= {0.0, 1.0}
    np.testing.assert_array_equal(added > 0, masks > 0)  # the mask is every changed pixel
    soft = [((a > 1e-4) & (a < a.max() - 1e-4)).mean() / (a > 0).mean() for a in added]  # share part-way up an edge
    assert max(soft) > 0.3 and min(soft) < 0.1  # blurred lines and nearly hard ones


def test_augmentations_keep_the_clean_frame_and_are_the_identity_at_zero_strength():
    img = phantom(32, corner_max=False) / 0.8
    still = C.geometry_jitter(KEY, img, max_degrees=0.0, scale_range=(1.0, 1.0), aspect_range=(1.0, 1.0),
                              max_shift=0.0, flip_probability=0.0)
    np.testing.assert_allclose(np.asarray(still), np.asarray(img), atol=1e-5)
    flipped = C.geometry_jitter(KEY, img, max_degrees=0.0, scale_range=(1.0, 1.0), aspect_range=(1.0, 1.0),
                                max_shift=0.0, flip_probability=1.0)
    np.testing.assert_allclose(np.asarray(flipped), np.asarray(img)[:, ::-1], atol=1e-5)
    np.testing.assert_allclose(np.asarray(C.gamma_contrast(KEY, img, gamma_range=(1.0, 1.0))), np.asarray(img),
                               atol=1e-5)
    names = C.parse_augmentation("site")
    assert names == ("geometry", "contrast", "bias", "noise") and C.parse_augmentation("") == ()
    batch = jnp.stack([img] * 6)
    out = np.asarray(jax.jit(C.augment_batch, static_argnames="names")(KEY, batch, names=names))
    assert out.shape == batch.shape and np.isfinite(out).all()
    np.testing.assert_allclose(out.min(axis=(1, 2, 3)), 0.0, atol=1e-6)
    np.testing.assert_allclose(out.max(axis=(1, 2, 3)), 1.0, atol=1e-6)
    assert len({o.tobytes() for o in out}) == 6  # each slice its own draw
    with pytest.raises(ValueError, match="augmentation"):
        C.parse_augmentation("geometry+blur")


def test_random_window_is_a_crop_drawn_from_the_key_alone():
    images = jnp.arange(6 * 16 * 12 * 2, dtype=jnp.float32).reshape(6, 16, 12, 2)
    crops = np.asarray(C.random_window(KEY, images, 8))
    assert crops.shape == (6, 8, 8, 2)
    positions = []
    for image, crop in zip(np.asarray(images), crops):  # each crop is the slice's own pixels at one position
        matches = [(r, c) for r in range(16 - 8 + 1) for c in range(12 - 8 + 1)
                   if np.array_equal(image[r:r + 8, c:c + 8], crop)]
        assert len(matches) == 1
        positions.append(matches[0])
    assert len(set(positions)) > 1  # each slice its own window
    # Another batch of the same shape, cropped with the same key, is cut at the same places.
    np.testing.assert_array_equal(np.asarray(C.random_window(KEY, -images, 8)), -crops)
    assert not np.array_equal(np.asarray(C.random_window(jax.random.key(1), images, 8)), crops)
    np.testing.assert_array_equal(np.asarray(C.random_window(KEY, images[:, :12], 12)), np.asarray(images[:, :12]))


def test_grown_masks_cover_each_mask_and_at_most_max_px_more_drawn_per_slice():
    masks = np.zeros((12, 16, 16, 1), np.float32)
    masks[:, 6:9, 5:11] = 1
    grown = np.asarray(C.grown_masks(KEY, jnp.asarray(masks), 2))
    assert grown.shape == masks.shape and set(np.unique(grown)) <= {0.0, 1.0}
    assert np.all(grown >= masks)  # every given pixel stays
    widths = sorted({int(g[..., 0].any(axis=0).sum()) for g in grown})  # 6 + 2r columns
    assert widths == [6, 8, 10]  # r = 0, 1 and 2 all drawn among 12 slices, nothing beyond
    np.testing.assert_array_equal(np.asarray(C.grown_masks(KEY, jnp.zeros_like(masks), 2)), 0.0)

"""Tests for mrirecon_jax.corruptions: definitions, invariances and the policy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from mrirecon_jax import corruptions as C

KEY = jax.random.key(0)
AUGMENTED = C.parse_policy("augmented")
# Compiled once per shape and shared by the tests (XLA compiles dominate the test time on a small CPU).
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


def patch_image(key, image):
    return C.line_patch(key, image)[0]


# name -> f(key, image) returning an image, for the parametrised invariance tests.
FUNCS = {
    "patch": patch_image,
    "downsample": C.CORRUPTIONS["downsample"],
    "gibbs": C.CORRUPTIONS["gibbs"],
    "ghost": C.CORRUPTIONS["ghost"],
    "gibbs_pe": functools.partial(C.gibbs, axes="pe"),
    "ghost_axis1": functools.partial(C.ghost, axis=1, restore_centre=False),
    "augmented": lambda k, x: C.corrupt_image(k, x, AUGMENTED)[0],
}


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


@pytest.mark.parametrize(
    "fn",
    [
        functools.partial(C.gibbs, keep_fraction_range=(1.0, 1.0), axes="both"),
        functools.partial(C.gibbs, keep_fraction_range=(1.0, 1.0), axes="pe"),
        functools.partial(C.ghost, intensity_range=(0.0, 0.0)),
        functools.partial(C.ghost, intensity_range=(0.0, 0.0), axis=1, restore_centre=False),
        functools.partial(C.downsample, factor=1),
        lambda k, x: C.line_patch(k, x, min_opacity=0.0, max_opacity=0.0)[0],
    ],
    ids=["gibbs_both", "gibbs_pe", "ghost", "ghost_axis1", "downsample", "patch"],
)
def test_identity_at_zero_strength(fn):
    img = phantom()
    np.testing.assert_allclose(np.asarray(fn(KEY, img)), np.asarray(img), atol=1e-5)


def test_policy_none_is_identity():
    img = phantom()
    out, mask, kind = C.corrupt_image(KEY, img, C.parse_policy("none"))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img))
    assert mask.shape == (64, 64, 1) and float(mask.sum()) == 0.0 and int(kind) == 0


# ------------------------------------------------------------------------------------------- randomness, vmap, jit


@pytest.mark.parametrize("name", ["patch", "ghost", "augmented"])
def test_same_key_same_output_different_key_different_output(name):
    img = phantom()
    fn = FUNCS[name]
    a, b, c = fn(KEY, img), fn(KEY, img), fn(jax.random.key(1), img)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_gibbs_keys_give_different_truncations():
    # The keep fraction is continuous but the band is whole lines, so two keys may coincide; eight should not.
    img = phantom()
    outs = [np.asarray(C.gibbs(jax.random.key(i), img)) for i in range(8)]
    np.testing.assert_array_equal(outs[0], np.asarray(C.gibbs(jax.random.key(0), img)))
    assert len({o.tobytes() for o in outs}) >= 3


def test_corrupt_batch_keys():
    imgs = jnp.stack([phantom(32)] * 4)
    a = BATCH(KEY, imgs, policy=AUGMENTED)
    b = BATCH(KEY, imgs, policy=AUGMENTED)
    c = BATCH(jax.random.key(7), imgs, policy=AUGMENTED)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.abs(np.asarray(a[0]) - np.asarray(c[0])).max() > 1e-3
    # Identical slices in one batch get different corruptions.
    assert np.abs(np.asarray(a[0][0]) - np.asarray(a[0][1])).max() > 1e-3


def test_vmap_equals_python_loop():
    img = phantom(32)
    imgs = jnp.stack([img, img[::-1], img[:, ::-1], 0.5 * img])
    out, masks, kinds = BATCH(KEY, imgs, policy=AUGMENTED)
    keys = jax.random.split(KEY, imgs.shape[0])
    for i in range(imgs.shape[0]):
        o, m, k = IMAGE(keys[i], imgs[i], policy=AUGMENTED)
        np.testing.assert_allclose(np.asarray(out[i]), np.asarray(o), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(masks[i]), np.asarray(m))
        assert int(kinds[i]) == int(k)
    # The random k-space corruptions on their own (jitted on both sides: compiles are cheaper than eager).
    for name in ("gibbs", "ghost"):
        fn = C.CORRUPTIONS[name]
        batched, single = jax.jit(jax.vmap(fn))(keys, imgs), jax.jit(fn)
        for i in range(imgs.shape[0]):
            np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(single(keys[i], imgs[i])), atol=1e-5)


@pytest.mark.parametrize("name", ["patch", "downsample", "gibbs", "ghost"])
def test_jit_equals_eager(name):
    img = phantom(32)
    fn = FUNCS[name]
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(KEY, img)), np.asarray(fn(KEY, img)), atol=1e-5)


def test_jit_corrupt_image_with_static_policy_equals_eager():
    img = phantom(32)
    for i in range(3):
        key = jax.random.key(20 + i)
        jitted, eager = IMAGE(key, img, policy=AUGMENTED), C.corrupt_image(key, img, AUGMENTED)
        for x, y in zip(jitted, eager):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


# ------------------------------------------------------------------------------------------- gradients, range, dtype


@pytest.mark.parametrize("name", list(FUNCS))
def test_gradient_finite_and_nonzero(name):
    # A zero background exercises the magnitude's gradient at 0 in the k-space corruptions.
    img = phantom(32, corner_max=False)
    grad = jax.grad(lambda x: jnp.sum(FUNCS[name](KEY, x)))(img)
    assert grad.shape == img.shape
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.abs(grad).sum()) > 0.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", list(FUNCS))
def test_range_shape_dtype(name, dtype):
    # A saturated square with a sharp edge makes Gibbs / ghost overshoot above 1 before clipping.
    img = np.array(phantom(32), np.float32)
    img[12:20, 12:20] = 1.0
    img = jnp.asarray(img, dtype)
    out = FUNCS[name](KEY, img)
    assert out.shape == img.shape and out.dtype == dtype
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


def test_corrupt_batch_bfloat16():
    imgs = jnp.stack([phantom(32)] * 4).astype(jnp.bfloat16)
    out, masks, kinds = BATCH(KEY, imgs, policy=AUGMENTED)
    assert out.dtype == jnp.bfloat16 and out.shape == imgs.shape
    assert masks.dtype == jnp.float32 and masks.shape == (4, 32, 32, 1)
    assert kinds.dtype == jnp.int32 and kinds.shape == (4,)
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


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
    assert 0.05 < overshoot < 0.14
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
    with pytest.raises(ValueError):
        C.downsample(KEY, jnp.zeros((30, 30, 1)), factor=4)


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
    # Canonical: parsing the canonical spec gives the same (hashable) policy.
    for name in ("original", "augmented", "none", "patch+oneof(gibbs,ghost)"):
        p = C.parse_policy(name)
        assert C.parse_policy(p.spec) == p and hash(C.parse_policy(p.spec)) == hash(p)


@pytest.mark.parametrize("spec", ["foo", "patch+blur", "gibbs+ghost", "patch+patch", "oneof()",
                                  "oneof(gibbs,gibbs)", "patch+", "oneof(gibbs,foo)"])
def test_parse_policy_invalid(spec):
    with pytest.raises(ValueError, match="valid"):
        C.parse_policy(spec)


def test_original_policy_mask_marks_the_patch_on_the_downsampled_image():
    img = phantom()
    out, mask, kind = C.corrupt_image(jax.random.key(11), img, C.parse_policy("original"))
    reduced = np.asarray(C.downsample(KEY, img))
    changed = np.asarray(out) != reduced
    assert int(kind) == 0 and mask.sum() > 0
    np.testing.assert_array_equal(changed, np.asarray(mask) > 0)


def test_augmented_kind_frequencies():
    n = 300
    imgs = jnp.broadcast_to(phantom(32), (n, 32, 32, 1))
    # Only the kinds are returned, so XLA prunes the image work and this compiles quickly.
    kinds = jax.jit(lambda k, x: C.corrupt_batch(k, x, AUGMENTED)[2])(KEY, imgs)
    counts = np.bincount(np.asarray(kinds), minlength=3)
    assert counts.sum() == n and len(counts) == 3
    assert ((counts / n >= 0.20) & (counts / n <= 0.47)).all(), counts


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

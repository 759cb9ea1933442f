"""Issue 15: aligned preprocessing (N4, registration to the template), the detection scores against oracles,
healthy-threshold calibration, the coarse-noise and inpainting corruptions, and the lesion-folder layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from conftest import GLIOMA_DIR, needs_glioma
from mrirecon_jax import corruptions, infer, metrics
from mrirecon_jax.config import Config, UserError
from mrirecon_jax.data import align
from mrirecon_jax.data.prepare import prepare_volume, template_brain


def test_registration_recovers_a_known_affine_within_a_voxel():
    atlas = align.template()
    sitk = align._sitk()
    known = sitk.AffineTransform(3)
    known.SetMatrix([1.05, 0.04, 0.0, -0.03, 0.97, 0.02, 0.0, 0.0, 1.02])
    known.SetTranslation([4.0, -6.0, 3.0])
    known.SetCenter([n * z / 2 for n, z in zip(atlas.volume.shape, atlas.zooms)])
    moved = align.resample(atlas.volume, atlas.zooms, known.GetInverse(), atlas.volume.shape, atlas.zooms)
    found = align.register(atlas.volume, atlas.zooms, moved, atlas.zooms)
    points = np.argwhere(atlas.brain)[::97] * np.asarray(atlas.zooms)
    # moved(known(p)) = template(p), so the transform found (template point -> moved point) should be `known`.
    error = [np.linalg.norm(np.subtract(found.TransformPoint(p.tolist()), known.TransformPoint(p.tolist())))
             for p in points]
    assert np.max(error) < atlas.zooms[0]


def test_n4_removes_a_smooth_bias_field():
    atlas = align.template()
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in atlas.volume.shape], indexing="ij")
    field = np.exp(0.3 * grid[0] + 0.2 * grid[1] ** 2).astype(np.float32)
    corrected = align.n4(atlas.volume * field, atlas.zooms, atlas.brain)
    ratio = np.log(corrected[atlas.brain] / np.maximum(atlas.volume[atlas.brain], 1e-3))
    before = np.log(field[atlas.brain])
    white = atlas.volume[atlas.brain] > np.percentile(atlas.volume[atlas.brain], 60)
    assert np.std(ratio[white]) < 0.5 * np.std(before[white])


@needs_glioma
def test_a_skull_stripped_atlas_scan_is_detected_and_training_and_detection_prepare_alike():
    from mrirecon_jax.data import volumes

    volume, zooms = volumes.load_volume(GLIOMA_DIR / "t1.nii.gz")
    volume, zooms = volume[::2, ::2, ::2], tuple(2 * z for z in zooms)  # 2 mm: the same case, 8x faster
    cfg = Config(preprocess="brain", image_size=32)
    trained = prepare_volume(volume, zooms, cfg)
    detected = prepare_volume(volume, zooms, cfg, whole_volume=True, with_brain=True)
    assert trained.aligned.stripped
    np.testing.assert_array_equal(trained.clean(), detected.clean())
    np.testing.assert_array_equal(trained.geometry.indices, align.brain_slices())
    assert trained.clean().min() >= 0 and trained.clean().max() <= 1
    assert (detected.brain <= template_brain(cfg)).all() and detected.brain.mean() > 0.8 * template_brain(cfg).mean()
    lesion, _ = volumes.load_volume(GLIOMA_DIR / "lesion_mask.nii.gz", mask=True)
    lesion = lesion[::2, ::2, ::2]
    on_grid = detected.on_grid(lesion > 0)
    assert (on_grid & detected.brain).sum() > 0.9 * on_grid.sum() > 0


def synthetic_lesions(count=6, size=32):
    """Brain-like slices with blobs, their brain and lesion masks."""
    key = jax.random.key(0)
    yy, xx = np.mgrid[:size, :size]
    brain = ((yy - size / 2) ** 2 / (0.4 * size) ** 2 + (xx - size / 2) ** 2 / (0.35 * size) ** 2) <= 1
    clean = np.where(brain, 0.6, 0.0)[None].repeat(count, 0)[..., None].astype(np.float32)
    brains = np.repeat(brain[None, ..., None], count, 0)
    keys = jax.random.split(key, count)
    images, masks = jax.vmap(corruptions.lesion_blob)(keys, jnp.asarray(clean), jnp.asarray(brains))
    return np.asarray(images)[..., 0], np.asarray(clean)[..., 0], brain[None].repeat(count, 0), \
        (np.asarray(masks)[..., 0] > 0)


def predictor_returning(fn, size=32):
    return infer.Predictor(cfg=Config(image_size=size, eval_batch_size=8), apply=fn)


@pytest.mark.parametrize("score", ["residual", "inpaint"])
def test_every_score_against_oracles(score, monkeypatch):
    images, clean, brain, truth = synthetic_lesions()

    def perfect_model(predictor, slices):  # returns the healthy slice, in each frame predict gives
        x, offset, scale = (np.asarray(a)[..., 0] for a in infer._normalise_input(jnp.asarray(slices[..., None])))
        return infer.Prediction(reconstruction=clean, inputs=x, outputs=(clean - offset) / scale)

    monkeypatch.setattr(infer, "predict", perfect_model)
    perfect = infer.score_maps(predictor_returning(None), images, brain, (score,))[score][0]
    noise = np.random.default_rng(0).random(images.shape).astype(np.float32)
    table = {"perfect": metrics.auroc(perfect[brain], truth[brain]),
             "noise": metrics.auroc(infer.postprocess(noise, brain)[brain], truth[brain])}
    assert table["perfect"] > 0.95, table
    assert abs(table["noise"] - 0.5) < 0.05, table


def test_combined_score_and_healthy_threshold_flags_the_asked_fraction():
    rng = np.random.default_rng(1)
    healthy = rng.gamma(2.0, 1.0, 200_000)
    threshold = metrics.healthy_threshold(healthy, 0.01)
    assert abs(np.mean(healthy >= threshold) - 0.01) < 0.001
    fresh = rng.gamma(2.0, 1.0, 200_000)
    assert abs(np.mean(fresh >= threshold) - 0.01) < 0.002
    images, clean, brain, truth = synthetic_lesions()
    identity = predictor_returning(lambda x: x)
    maps = infer.score_maps(identity, images, brain, ("residual", "inpaint", "combined"),
                            thresholds={"residual": 1.0, "inpaint": 2.0})
    np.testing.assert_allclose(maps["combined"][0], (maps["residual"][0] + maps["inpaint"][0] / 2) / 2, rtol=1e-6)


def test_segmentation_drops_small_components():
    amap = np.zeros((4, 20, 20), np.float32)
    amap[1:3, 2:8, 2:8] = 1.0  # 72 voxels
    amap[2, 15, 15] = 1.0  # a single voxel
    kept = infer.segment(amap, 0.5)
    assert kept[1:3, 2:8, 2:8].all() and not kept[2, 15, 15]


def test_coarse_noise_is_jittable_low_frequency_with_the_right_spread():
    image = jnp.full((64, 64, 1), 0.5).at[:4].set(0.0)
    keys = jax.random.split(jax.random.key(0), 64)
    noisy = jax.jit(jax.vmap(lambda k, x: corruptions.coarse_noise(k, x)), )(keys, jnp.repeat(image[None], 64, 0))
    added = np.asarray(noisy - image)[..., 0]
    assert (added[:, :4] == 0).all()  # a zero background stays zero
    inside = added[:, 8:56, 8:56]
    assert 0.1 < inside.std() < 0.2 and abs(inside.mean()) < 0.02
    # Low frequency: neighbouring pixels nearly equal, unlike white noise.
    assert np.corrcoef(inside[:, :, :-1].ravel(), inside[:, :, 1:].ravel())[0, 1] > 0.9
    policy = corruptions.parse_policy("coarse_noise")
    assert policy.kinds == ("coarse_noise",)


def test_inpainting_masks_cover_every_pixel_once_and_train_as_a_patch():
    phases = [np.asarray(corruptions.grid_mask(64, 48, phase=p)) for p in range(corruptions.INPAINT_PHASES)]
    np.testing.assert_array_equal(np.sum(phases, axis=0), 1)
    for hidden in phases:
        assert abs(hidden.mean() - 1 / corruptions.INPAINT_PHASES) < 0.05
        labels, count = scipy.ndimage.label(hidden)
        assert count > 4  # separate squares, each with visible neighbours
    image = jnp.full((64, 64, 1), 0.7)
    policy = corruptions.parse_policy("inpaint_grid")
    out, mask, _ = jax.jit(lambda k, x: corruptions.corrupt_image(k, x, policy))(jax.random.key(3), image)
    out, mask = np.asarray(out), np.asarray(mask)
    assert policy.patch and abs(mask.mean() - 0.25) < 0.05
    assert (out[mask > 0] == 0).all() and np.allclose(out[mask == 0], 0.7)


def test_lesion_folders_are_found_by_their_documented_names(tmp_path):
    for case, names in {"a": ["t1.nii.gz", "flair.nii.gz", "lesion_mask.nii.gz"],
                        "b": ["sub-b_T1w.nii.gz", "sub-b_t1ce.nii.gz", "sub-b_seg.nii.gz"],
                        "c": ["flair.nii.gz"]}.items():
        (tmp_path / case).mkdir()
        for name in names:
            (tmp_path / case / name).write_bytes(b"")
    found = {name: (t1.name, mask.name) for name, t1, mask in infer.lesion_cases(tmp_path)}
    assert found == {"a": ("t1.nii.gz", "lesion_mask.nii.gz"), "b": ("sub-b_T1w.nii.gz", "sub-b_seg.nii.gz")}
    (tmp_path / "b" / "sub-b_mask.nii.gz").write_bytes(b"")
    with pytest.raises(UserError, match="lesion mask"):
        infer.lesion_cases(tmp_path)
    with pytest.raises(UserError, match="No lesion case"):
        infer.lesion_cases(tmp_path / "c")


def test_skull_strip_is_refused_with_a_pointer_to_preprocess_brain():
    with pytest.raises(UserError, match="--preprocess=brain"):
        Config(skull_strip=True)
    with pytest.raises(UserError, match="--preprocess"):
        Config(preprocess="mni")

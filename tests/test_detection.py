"""Issue 15: aligned preprocessing (N4, registration to the template), its per-file cache and parallel registration,
scores on the input's grid through the inverse registration, the detection scores against oracles, healthy-threshold
calibration, the coarse-noise and inpainting corruptions, and the lesion-folder layout."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage

from conftest import GLIOMA_DIR, needs_glioma, write_nifti
from mrirecon_jax import corruptions, infer, metrics
from mrirecon_jax.config import Config, UserError
from mrirecon_jax.data import align, dataset, volumes
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


def cropped_template(start=(10, 20, 4), stop=(None, None, -10)):
    """The MNI template (with its head) cut unevenly and at 4 mm, and its brain mask there: an input whose grid is
    not the template's, which registration must bring back by a known shift."""
    atlas = align.template()
    crop = tuple(slice(a, b, 2) for a, b in zip(start, stop))
    return atlas.volume[crop], (4.0, 4.0, 4.0), atlas.brain[crop]


def dice(a, b) -> float:
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


@pytest.fixture(scope="module")
def aligned_template(tmp_path_factory):
    """The cropped template prepared once with --preprocess=brain, into a fresh aligned cache."""
    volume, zooms, brain = cropped_template()
    cfg = Config(preprocess="brain", image_size=64, cache_dir=str(tmp_path_factory.mktemp("aligned-cache")))
    return volume, zooms, brain, cfg, prepare_volume(volume, zooms, cfg, whole_volume=True)


def test_the_aligned_cache_gives_the_same_slices_without_registering_again(aligned_template, monkeypatch):
    volume, zooms, _, cfg, fresh = aligned_template
    (cached,) = (Path(cfg.cache_dir) / align.ALIGNED_CACHE_FOLDER).glob("*.npz")
    real_register, calls = align.register, []

    def register_once(*args):
        calls.append(args)
        if len(calls) > 1:
            raise AssertionError("registered again")
        return real_register(*args)

    monkeypatch.setattr(align, "register", register_once)
    lesion = np.zeros(volume.shape, bool)
    lesion[10:16, 12:18, 8:12] = True
    for size in (48, 64):  # another image size reads the same aligned volume
        hit = prepare_volume(volume, zooms, cfg.replace(image_size=size), whole_volume=True)
    assert calls == []
    np.testing.assert_array_equal(hit.clean(), fresh.clean())
    np.testing.assert_array_equal(hit.brain, fresh.brain)
    np.testing.assert_array_equal(hit.on_grid(lesion), fresh.on_grid(lesion))
    np.testing.assert_array_equal(hit.to_input(fresh.slices), fresh.to_input(fresh.slices))
    np.testing.assert_array_equal(align.transform_matrix(hit.aligned.transform),
                                  align.transform_matrix(fresh.aligned.transform))
    assert (hit.aligned.input_shape, hit.aligned.stripped) == (fresh.aligned.input_shape, fresh.aligned.stripped)
    # An unreadable cache file is rebuilt, with a warning, to the same result.
    cached.write_bytes(b"not an npz")
    calls.clear()
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = prepare_volume(volume, zooms, cfg, whole_volume=True)
    assert len(calls) == 1
    np.testing.assert_array_equal(rebuilt.clean(), fresh.clean())
    with np.load(cached) as arrays:  # rewritten, readable
        np.testing.assert_array_equal(align.Aligned.from_arrays(arrays).volume, fresh.aligned.volume)


def test_a_map_from_the_template_lands_on_the_input_brain(aligned_template):
    """The template's brain on the model grid, brought back through the registration of a shifted, 4 mm copy of
    the template, covers that copy's brain (a wrong direction would move it by twice the 20-40 mm shift)."""
    volume, _, brain, cfg, prepared = aligned_template
    back = prepared.to_input(template_brain(cfg).astype(np.float32)) >= 0.5
    assert back.shape == volume.shape
    assert dice(back, brain) > 0.9
    assert dice(prepared.aligned.input_brain(volume), brain) > 0.9


def test_detect_writes_an_aligned_map_on_the_input_files_grid(aligned_template, tmp_path):
    """--resample_to_input with --preprocess=brain: the map goes back through the inverse registration onto the
    grid, array order and affine of the file (stored left-right flipped here), and is scored there."""
    volume, zooms, _, cfg, _ = aligned_template
    stored = np.diag([-zooms[0], zooms[1], zooms[2], 1.0])
    stored[0, 3] = zooms[0] * (volume.shape[0] - 1)
    source = write_nifti(tmp_path / "t1.nii.gz", volume[::-1].astype(np.float32), stored)
    lesion = np.zeros(volume.shape, np.uint8)
    lesion[12:18, 14:20, 10:14] = 1
    mask_path = write_nifti(tmp_path / "lesion.nii.gz", lesion[::-1], stored)
    # A model whose residual is 1 everywhere: the map is the brain of the model grid, eroded as every map is.
    prepared = prepare_volume(volume, zooms, cfg, whole_volume=True, with_brain=True)
    brain = prepared.to_input(infer.eroded(prepared.brain, infer.ERODE_PX).astype(np.float32)) >= 0.5
    predictor = infer.Predictor(cfg=cfg.replace(eval_batch_size=16), apply=lambda x: x - 1.0)
    summary = infer.detect(predictor, source, tmp_path / "map.nii.gz", lesion_mask_path=mask_path,
                           resample_to_input=True)
    image = nib.load(tmp_path / "map.nii.gz")
    assert image.shape == volume.shape and np.allclose(image.affine, stored)
    written = np.asarray(image.dataobj)[::-1]  # canonical again
    assert dice(written >= 0.5, brain) > 0.97
    assert summary["grid"]["grid"].startswith("input") and summary["n_pixels"] == summary["grid"]["brain_voxels"]
    assert summary["n_positive"] == np.sum(lesion > 0)  # the mask as given, all inside the brain


@needs_glioma
def test_a_lesion_map_scores_on_the_input_grid_after_the_round_trip(tmp_path):
    """The lesion mask brought to the model grid (template space) as the anomaly map, brought back to the input's
    grid and scored there against the mask as given."""
    volume, zooms = volumes.load_volume(GLIOMA_DIR / "t1.nii.gz")
    volume, zooms = volume[::2, ::2, ::2], tuple(2 * z for z in zooms)  # 2 mm: the same case, 8x faster
    lesion = volumes.load_volume(GLIOMA_DIR / "lesion_mask.nii.gz", mask=True)[0][::2, ::2, ::2] > 0
    cfg = Config(preprocess="brain", image_size=64, cache_dir=str(tmp_path))
    prepared = prepare_volume(volume, zooms, cfg, whole_volume=True, with_brain=True)
    grid = infer.scoring_grid(prepared, volume)
    assert grid.on_input and grid.brain.shape == volume.shape
    assert not grid.brain[volume == volume[0, 0, 0]].any()  # a skull-stripped input: its background is left out
    assert grid.brain[lesion].mean() > 0.9
    # 10 model voxels (the template's largest in-plane side over 64 px, squared, x 2 mm) in voxels of 8 mm^3.
    side_mm = 2.0 * max(align.template().volume.shape[:2]) / 64
    assert grid.min_component_voxels == round(10 * side_mm ** 2 * 2.0 / 8.0)
    scores = grid.scores(prepared.on_grid(lesion).astype(np.float32), lesion, threshold=0.5)
    assert scores["auroc"] > 0.95 and scores["dice_at_healthy_threshold"] > 0.7, scores
    assert scores["n_pixels"] == grid.brain.sum()


def test_parallel_registration_gives_the_sequential_slices_and_skips_bad_files(tmp_path, monkeypatch):
    """Files registered by worker processes into the aligned cache, then read from it (the parent may not register),
    give the slices of a sequential run; an unreadable file and one too small to register (which fails in its
    worker) are skipped by both alike, with the same sentences."""
    folder = tmp_path / "data"
    folder.mkdir()
    volume, zooms, _ = cropped_template()
    write_nifti(folder / "a.nii.gz", volume, np.diag([*zooms, 1.0]))
    (folder / "c.nii.gz").write_bytes(b"not a NIfTI")
    write_nifti(folder / "d.nii.gz", np.arange(6 ** 3, dtype=np.float32).reshape(6, 6, 6))
    readers, _, _ = dataset.volume_readers(str(folder))
    results = {}
    for mode, cores in (("parallel", {0, 1}), ("sequential", {0})):
        cfg = Config(data_dir=str(folder), preprocess="brain", image_size=32, cache_dir=str(tmp_path / mode))
        with monkeypatch.context() as patch:
            patch.setattr(os, "sched_getaffinity", lambda _: cores)
            if mode == "parallel":
                patch.setattr(align, "register", lambda *_: pytest.fail("the parent process registered"))
            results[mode] = dataset._prepare_subjects(cfg, readers, ["a", "c", "d"])
    (parallel, parallel_skipped, _), (sequential, sequential_skipped, _) = results["parallel"], results["sequential"]
    assert list(parallel) == list(sequential) == ["a"]
    np.testing.assert_array_equal(parallel["a"][0], sequential["a"][0])
    assert parallel_skipped == sequential_skipped and len(parallel_skipped) == 2
    assert "c.nii.gz cannot be read" in parallel_skipped[0] and "d.nii.gz has 6x6x6 voxels" in parallel_skipped[1]
    assert len(list((tmp_path / "parallel" / align.ALIGNED_CACHE_FOLDER).glob("*.npz"))) == 1


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

    def perfect_model(predictor, slices, masks=None):  # returns the healthy slice, in each frame predict gives
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
                            reference=infer.HealthyReference({"residual": 1.0, "inpaint": 2.0}, {}))
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


def test_detection_settings_come_from_the_run_unless_given():
    cfg = Config(scores="inpaint,combined,residual", residual="neg", median_px=5)
    own = infer.DetectionSettings().of_run(cfg)
    assert own.names == ("inpaint", "residual", "combined") and own.residual == "neg" and own.median_px == 5
    given = infer.DetectionSettings(scores="residual", median_px=1).of_run(cfg)
    assert given.names == ("residual",) and given.residual == "neg" and given.median_px == 1
    for bad, message in (({"scores": "residual,blur"}, "--scores"), ({"residual": "sq"}, "--residual"),
                         ({"median_px": 0}, "--median_px")):
        with pytest.raises(UserError, match=message):
            infer.DetectionSettings(**bad).of_run(cfg)
    with pytest.raises(UserError, match="--residual"):
        Config(residual="square")
    from mrirecon_jax.config import RESUMABLE_FIELDS
    assert {"scores", "residual", "median_px"} <= RESUMABLE_FIELDS  # they do not change what is trained


def test_normative_calibration_discounts_pixels_where_healthy_brains_vary():
    rng = np.random.default_rng(2)
    healthy = np.zeros((20, 1, 24, 24), np.float32)
    healthy[:, :, 2:10, 2:10] = rng.gamma(2.0, 0.5, (20, 1, 8, 8))  # a region whose score varies across subjects
    healthy[:, :, 14:22, 14:22] = 0.2 + 0.01 * rng.standard_normal((20, 1, 8, 8))  # a steady region
    brain = np.ones((1, 24, 24), bool)
    reference = infer.HealthyReference({}, {"inpaint": infer.normal_range(healthy, brain)})
    case = np.zeros((1, 24, 24), np.float32)
    case[0, 4:8, 4:8] = case[0, 16:20, 16:20] = 1.5  # the same raw score in both regions
    calibrated = reference.calibrated("inpaint", case)
    assert calibrated[0, 17, 17] > 5 * calibrated[0, 5, 5] > 0
    assert calibrated.min() == 0.0  # below the healthy mean is not anomalous
    assert np.array_equal(reference.calibrated("residual", case), case)  # a score without a range is unchanged

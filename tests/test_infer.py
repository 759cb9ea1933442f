"""Whole volumes in and out (geometry, orientations), the lesion generator, the detection scores against
brute-force references, the brain mask, and detection end to end on the shared glioma case."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage

from conftest import (GLIOMA_DIR, IXI_DIR, ROOT, cli, needs_glioma, needs_ixi, symlink_subset,
                      write_nifti)
from mrirecon_jax import corruptions, infer, metrics, train
from mrirecon_jax.config import Config, UserError
from mrirecon_jax.data import brain, dataset, geometry, normalise, volumes
from mrirecon_jax.data.prepare import prepare_volume



def identity(image_size, plane="axial"):
    """A 'model' that returns its input: what comes out is exactly what the preparation put in."""
    return infer.Predictor(cfg=Config(image_size=image_size, plane=plane, eval_batch_size=8), apply=lambda x: x)


def told(image_size, mask_input=0.5):
    """A 'model' with a mask channel that returns its input plus the mask it is told, in the normalised frame."""
    return infer.Predictor(cfg=Config(image_size=image_size, eval_batch_size=8, mask_input=mask_input),
                           apply=lambda x, masks=None: x if masks is None else x + masks)


def save(path, volume, affine):
    nib.Nifti1Image(np.asarray(volume, np.float32), affine).to_filename(str(path))
    return path


def linear_volume(shape, zooms):
    """Intensity linear in millimetres along every axis (kept exactly by linear interpolation), plus an offset."""
    grid = np.meshgrid(*[np.arange(n) * z for n, z in zip(shape, zooms)], indexing="ij")
    return (3.0 * grid[0] + 2.0 * grid[1] + 5.0 * grid[2] + 40.0).astype(np.float32)


# --- preparation and geometry -------------------------------------------------------------------------


@pytest.mark.parametrize("plane", ["axial", "sagittal", "coronal"])
def test_prepare_volume_is_the_slab_on_the_model_grid_and_its_clean_frame(plane):
    rng = np.random.default_rng(0)
    volume = rng.random((20, 26, 14)).astype(np.float32) * 300
    zooms = (1.5, 1.2, 2.5)
    axis = geometry.PLANE_AXES[plane]
    indices = geometry.slab_indices(volume.shape[axis], zooms[axis], 4, None)
    prepared = prepare_volume(volume, zooms, Config(plane=plane, image_size=16, slices=4))
    raw, layout = geometry.volume_slices(volume, zooms, plane, 16, indices)
    np.testing.assert_array_equal(prepared.slices, raw)
    np.testing.assert_array_equal(prepared.geometry.indices, layout.indices)
    np.testing.assert_allclose(prepared.clean()[..., 0], normalise.minmax(raw))
    whole = prepare_volume(volume, zooms, Config(plane=plane, image_size=16, slices=4), whole_volume=True)
    assert len(whole.slices) == volume.shape[axis] and whole.brain is None


def test_identity_model_lands_on_the_input_grid_without_resizing(tmp_path):
    rng = np.random.default_rng(1)
    volume = (rng.random((32, 28, 6)) * 200 + 50).astype(np.float32)  # 64 x 56 mm in-plane: padded to 32 x 32 px
    affine = np.array([[2.0, 0, 0, -31], [0, 2.0, 0, -40], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    source = save(tmp_path / "in.nii.gz", volume, affine)
    infer.reconstruct(identity(32), source, tmp_path / "model.nii.gz")
    infer.reconstruct(identity(32), source, tmp_path / "input.nii.gz", resample_to_input=True)

    back = nib.load(tmp_path / "input.nii.gz")
    assert back.shape == volume.shape and np.allclose(back.affine, affine)
    np.testing.assert_allclose(back.get_fdata(), volume, rtol=1e-4)
    assert oct(source.stat().st_mode & 0o777) == oct((tmp_path / "input.nii.gz").stat().st_mode & 0o777)
    # On the model grid every input voxel sits on a model voxel (no resizing) that holds its value.
    model = nib.load(tmp_path / "model.nii.gz")
    assert model.shape == (32, 32, 6)
    index = np.stack(np.meshgrid(*map(np.arange, volume.shape), indexing="ij"), -1).reshape(-1, 3)
    world = nib.affines.apply_affine(affine, index)
    at = nib.affines.apply_affine(np.linalg.inv(model.affine), world)
    np.testing.assert_allclose(at, np.round(at), atol=1e-6)
    at = np.round(at).astype(int)
    np.testing.assert_allclose(model.get_fdata()[tuple(at.T)], volume[tuple(index.T)], rtol=1e-4)
    assert sorted(set(at[:, 1])) == list(range(2, 30))  # the 4 padding rows split 2 / 2


def test_resized_reconstruction_goes_back_to_the_input_grid(tmp_path):
    zooms = (1.5, 2.0, 4.0)  # 60 x 48 mm in-plane: padded, then resized from 40 x 30 px to 16 x 16
    volume = linear_volume((40, 24, 5), zooms)
    affine = np.diag(zooms + (1.0,))
    affine[:3, 3] = (-30, 12, -9)
    source = save(tmp_path / "in.nii", volume, affine)
    infer.reconstruct(identity(16), source, tmp_path / "model.nii.gz")
    assert nib.load(tmp_path / "model.nii.gz").header.get_zooms() == pytest.approx((3.75, 3.75, 4.0))
    infer.reconstruct(identity(16), source, tmp_path / "back.nii.gz", resample_to_input=True)
    back = nib.load(tmp_path / "back.nii.gz").get_fdata()
    interior = (slice(4, -4), slice(4, -4), slice(None))
    error = np.abs(back - volume)[interior]
    assert error.max() < 0.01 * np.ptp(volume)  # one model voxel off would be ~ 0.1 of the range


def test_ras_lps_and_psr_inputs_agree_in_world_space(tmp_path):
    zooms = (2.0, 1.5, 3.0)
    base = nib.Nifti1Image(linear_volume((18, 24, 10), zooms) ** 1.5, np.diag(zooms + (1.0,)))
    outputs = {}
    for codes in ("RAS", "LPS", "PSR"):
        change = nib.orientations.ornt_transform(nib.orientations.io_orientation(base.affine),
                                                 nib.orientations.axcodes2ornt(codes))
        image = base.as_reoriented(change)
        assert "".join(nib.aff2axcodes(image.affine)) == codes
        source = tmp_path / f"{codes}.nii.gz"
        image.to_filename(str(source))
        infer.reconstruct(identity(16, "coronal"), source, tmp_path / f"{codes}_model.nii.gz")
        infer.reconstruct(identity(16, "coronal"), source, tmp_path / f"{codes}_back.nii.gz", resample_to_input=True)
        back = nib.load(tmp_path / f"{codes}_back.nii.gz")
        assert back.shape == image.shape and np.allclose(back.affine, image.affine)
        outputs[codes] = (nib.load(tmp_path / f"{codes}_model.nii.gz"), nib.as_closest_canonical(back))
    for codes in ("LPS", "PSR"):
        for produced, reference in zip(outputs[codes], outputs["RAS"]):
            assert np.allclose(produced.affine, reference.affine)
            np.testing.assert_allclose(produced.get_fdata(), reference.get_fdata(), rtol=1e-4)


def test_corrupted_input_is_written_beside_the_output(tmp_path):
    volume = linear_volume((32, 32, 4), (2.0, 2.0, 2.0)) ** 2
    source = save(tmp_path / "in.nii.gz", volume, np.diag([2.0, 2.0, 2.0, 1.0]))
    summary = infer.reconstruct(identity(32), source, tmp_path / "out.nii.gz", corrupt="gibbs")
    corrupted = tmp_path / "out_corrupted.nii.gz"
    assert summary["outputs"] == [str(tmp_path / "out.nii.gz"), str(corrupted)]
    out, given = nib.load(tmp_path / "out.nii.gz").get_fdata(), nib.load(corrupted).get_fdata()
    np.testing.assert_allclose(out, given, rtol=1e-5)  # the identity model reconstructs the corrupted input
    assert np.abs(given - volume).max() > 0.01 * np.ptp(volume)


def test_reconstruct_tells_a_mask_channel_model_the_given_mask_on_its_own_grid(tmp_path):
    rng = np.random.default_rng(4)
    volume = (rng.random((32, 28, 6)) * 200 + 50).astype(np.float32)  # padded to 32 x 32 px: no resizing
    affine = np.array([[2.0, 0, 0, -31], [0, 2.0, 0, -40], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    hidden = np.zeros(volume.shape, np.uint8)
    hidden[10:15, 4:9, 2:4] = 1
    source, mask = save(tmp_path / "in.nii.gz", volume, affine), save(tmp_path / "mask.nii.gz", hidden, affine)
    blind = infer.reconstruct(told(32), source, tmp_path / "blind.nii.gz", resample_to_input=True)
    given = infer.reconstruct(told(32), source, tmp_path / "told.nii.gz", resample_to_input=True, mask_path=mask)
    assert not blind["told_mask"] and given["told_mask"]
    np.testing.assert_allclose(nib.load(tmp_path / "blind.nii.gz").get_fdata(), volume, rtol=1e-4)
    brighter = nib.load(tmp_path / "told.nii.gz").get_fdata() - volume > 1.0  # + the slice's range where told
    np.testing.assert_array_equal(brighter, hidden > 0)
    # With --corrupt the model is told where the corruption's patch went.
    corrupted = infer.reconstruct(told(32), source, tmp_path / "c.nii.gz", corrupt="patch")
    changed = nib.load(tmp_path / "c.nii.gz").get_fdata() - nib.load(tmp_path / "c_corrupted.nii.gz").get_fdata()
    assert corrupted["told_mask"] and 0 < (changed > 1.0).mean() < 0.25


@pytest.mark.parametrize("case", ["over_input", "bad_extension", "mask_shape", "bad_residual", "bad_corrupt",
                                  "mask_without_channel", "told_mask_grid", "always_told_without_mask"])
def test_user_errors(tmp_path, case):
    volume = linear_volume((16, 16, 4), (2.0, 2.0, 2.0))
    source = save(tmp_path / "in.nii.gz", volume, np.diag([2.0, 2.0, 2.0, 1.0]))
    before = source.read_bytes()
    calls = {
        "over_input": (lambda: infer.reconstruct(identity(16), source, source), "overwrite the input"),
        "bad_extension": (lambda: infer.reconstruct(identity(16), source, tmp_path / "out.png"), ".nii"),
        "mask_shape": (lambda: infer.detect(identity(16), source, tmp_path / "map.nii.gz", brain_mask_path=save(
            tmp_path / "mask.nii.gz", np.ones((16, 16, 5)), np.eye(4))), "not on the grid"),
        "bad_residual": (lambda: infer.detect(identity(16), source, tmp_path / "m.nii",
                                              settings=infer.DetectionSettings(residual="sq")), "--residual"),
        "bad_corrupt": (lambda: infer.reconstruct(identity(16), source, tmp_path / "o.nii", corrupt="blur"),
                        "--corrupt"),
        "mask_without_channel": (lambda: infer.reconstruct(identity(16), source, tmp_path / "o.nii", mask_path=save(
            tmp_path / "mask.nii.gz", np.ones((16, 16, 4)), np.diag([2.0, 2.0, 2.0, 1.0]))), "without a mask channel"),
        "told_mask_grid": (lambda: infer.reconstruct(told(16), source, tmp_path / "o.nii", mask_path=save(
            tmp_path / "mask.nii.gz", np.ones((16, 16, 4)), np.eye(4))), "not on the grid"),
        "always_told_without_mask": (lambda: infer.reconstruct(told(16, 1.0), source, tmp_path / "o.nii"), "--mask"),
    }
    call, message = calls[case]
    with pytest.raises(UserError, match=message):
        call()
    assert source.read_bytes() == before
    assert not list(tmp_path.glob("o*.nii*")) and not list(tmp_path.glob("m*.nii"))


# --- the lesion generator -----------------------------------------------------------------------------


def test_lesion_blobs_vary_and_stay_inside_the_brain():
    size = 32
    yy, xx = np.mgrid[:size, :size] - size / 2 + 0.5
    brain = ((yy / 12) ** 2 + (xx / 9) ** 2 <= 1)[..., None]
    image = np.where(brain, 0.5 + 0.1 * np.sin(xx / 3)[..., None], 0.0).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), 64)
    blobs = jax.jit(jax.vmap(corruptions.lesion_blob, in_axes=(0, None, None)))
    out, masks = map(np.asarray, blobs(keys, image, brain))
    again, _ = blobs(keys, image, brain)
    np.testing.assert_array_equal(out, np.asarray(again))
    change = out - image
    assert np.all(change[:, ~brain[..., 0]] == 0) and np.all(masks[:, ~brain[..., 0]] == 0)
    assert np.all(np.abs(change[masks > 0]) >= 0.5 * 0.25 - 1e-6)  # half the smallest contrast, at least
    assert np.abs(change).max() <= 0.6 + 1e-6
    signs = np.sign(np.sum(change, axis=(1, 2, 3)))
    assert (signs > 0).sum() >= 16 and (signs < 0).sum() >= 16  # hyper- and hypo-intense
    areas = masks.sum(axis=(1, 2, 3))
    assert areas.min() >= 1 and areas.max() > 3 * areas.min()  # random size


# --- detection scores against brute-force references ----------------------------------------------------


def reference_scores(scores, labels):
    """Every threshold tried one by one: AUROC over all (positive, negative) pairs, AP and Dice by definition."""
    positive, negative = scores[labels], scores[~labels]
    pairs = positive[:, None] - negative[None, :]
    auroc = np.mean((pairs > 0) + 0.5 * (pairs == 0))
    curve = []  # (threshold, precision, recall, dice), thresholds from high to low
    for t in sorted(set(scores.tolist()), reverse=True):
        called = scores >= t
        tp = np.sum(called & labels)
        curve.append((t, tp / called.sum(), tp / labels.sum(), 2 * tp / (called.sum() + labels.sum())))
    ap, previous_recall = 0.0, 0.0
    for _, precision, recall, _ in curve:
        ap += (recall - previous_recall) * precision
        previous_recall = recall
    best = max(curve, key=lambda row: (row[3], row[0]))
    return auroc, ap, best[3], best[0]


@pytest.mark.parametrize("seed", range(6))
def test_detection_scores_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random((6, 7)) < 0.3
    scores = rng.integers(0, 6, size=labels.shape) + 2 * labels * rng.random(labels.shape)  # ties and overlap
    if seed == 0:
        scores = rng.integers(0, 3, size=labels.shape).astype(float)  # ties only
    auroc, ap, dice, threshold = reference_scores(scores.ravel(), labels.ravel())
    got = metrics.detection_scores(scores, labels)
    assert got["auroc"] == pytest.approx(auroc) and got["auprc"] == pytest.approx(ap)
    assert got["best_dice"] == pytest.approx(dice)
    assert metrics.dice_at(scores, labels, got["best_threshold"]) == pytest.approx(dice)
    assert got["n_pixels"] == 42 and got["n_positive"] == labels.sum()


def test_detection_scores_edge_cases():
    labels = np.array([0, 0, 1, 1, 0], bool)
    perfect = metrics.detection_scores(np.array([0.1, 0.2, 0.9, 0.8, 0.3]), labels)
    assert perfect["auroc"] == perfect["auprc"] == perfect["best_dice"] == 1.0 and perfect["best_threshold"] == 0.8
    assert metrics.auroc(np.ones(5), labels) == 0.5
    assert metrics.average_precision(np.ones(5), labels) == pytest.approx(0.4)  # the positive fraction
    assert np.isnan(metrics.auroc(np.arange(5.0), np.zeros(5)))
    assert np.isnan(metrics.best_dice(np.arange(5.0), np.zeros(5))[0])


# --- detection against oracles -------------------------------------------------------------------------


def test_anomaly_map_signs_filter_and_brain():
    inputs = np.zeros((1, 9, 9), np.float32)
    inputs[0, 2:5, 2:5] = 1.0  # brighter than the reconstruction: hyper-intense
    inputs[0, 5:8, 5:8] = -1.0  # darker: hypo-intense
    inputs[0, 0, 8] = 5.0  # one pixel alone: the median filter removes it
    reconstruction = np.zeros_like(inputs)
    brain = np.ones_like(inputs, bool)
    brain[0, 3, 3] = False
    pos, neg, both = (infer.postprocess(infer.signed_residual(inputs - reconstruction, r), brain)
                      for r in ("pos", "neg", "abs"))
    assert pos[0, 3, 4] == 1.0 and pos[0, 6, 6] == 0.0 and neg[0, 6, 6] == 1.0 and neg[0, 3, 4] == 0.0
    assert both[0, 3, 4] == 1.0 and both[0, 6, 6] == 1.0 and both[0, 1, 1] == 0.0
    assert both[0, 3, 3] == 0.0 and both[0, 0, 8] == 0.0  # outside the brain; a lone pixel
    with pytest.raises(UserError, match="--residual"):
        infer.signed_residual(inputs - reconstruction, "square")


def _oracle(cfg, cases):
    """A Predictor that returns each anomalous slice's clean original, in the frame of its normalised input."""
    anomalous = np.concatenate([cases.anomalous[k] for k in infer.ANOMALY_KINDS])[..., None]
    clean = np.concatenate([cases.clean] * len(infer.ANOMALY_KINDS))[..., None]
    table, offset, scale = (np.asarray(a) for a in normalise.normalise_input(jnp.asarray(anomalous)))
    answers = (clean - offset) / scale

    def apply(x):
        x = np.asarray(x)
        match = np.argmin(((x[:, None] - table[None]) ** 2).sum(axis=(2, 3, 4)), axis=1)
        return jnp.asarray(answers[match])

    return infer.Predictor(cfg=cfg, apply=apply)


def test_detection_scores_against_a_perfect_and_a_blind_predictor(cache_dir):
    cfg = Config(image_size=32, slices=4, eval_batch_size=16, cache_dir=str(cache_dir))
    readers, _, _ = dataset.volume_readers(None)
    cases = infer.synthetic_cases(cfg, readers[:8], seed=0)  # 32 anomalies of each kind
    perfect, _ = infer.score_cases(_oracle(cfg, cases), cases)
    assert perfect["kinds"]["blob"]["auroc"] > 0.95 and perfect["kinds"]["blob"]["best_dice"] > 0.5
    assert perfect["kinds"]["patch"]["auroc"] > 0.9  # the median filter erases the thinnest lines
    rng = np.random.default_rng(0)
    blind = infer.Predictor(cfg=cfg, apply=lambda x: x + 0.2 * rng.standard_normal(x.shape).astype(np.float32))
    noise, _ = infer.score_cases(blind, cases)
    for kind in infer.ANOMALY_KINDS:
        assert abs(noise["kinds"][kind]["auroc"] - 0.5) < 0.08, noise["kinds"][kind]  # chance, +- 3 sd
    assert noise["kinds"]["blob"]["best_dice"] < 0.5 * perfect["kinds"]["blob"]["best_dice"]
    assert set(perfect["per_subject"]) == set(cases.subjects)


# --- brain masks on real data --------------------------------------------------------------------------


@needs_ixi
def test_brain_mask_of_skull_on_ixi_and_skull_stripped_glioma():
    volume, zooms = volumes.load_volume(sorted(IXI_DIR.glob("*.nii.gz"))[0])
    mask = brain.brain_mask(volume, zooms)
    assert scipy.ndimage.label(mask)[1] == 1
    assert 900 < mask.sum() * np.prod(zooms) / 1000 < 2000  # an adult brain is 1.1-1.7 litres (with CSF inside)
    assert not any(np.take(mask, i, a).any() for a in range(3) for i in (0, -1))
    if not GLIOMA_DIR.is_dir():
        pytest.skip(f"glioma case not found at {GLIOMA_DIR}")
    t1, zooms = volumes.load_volume(GLIOMA_DIR / "t1.nii.gz")
    mask = brain.brain_mask(t1, zooms)
    assert mask[t1 != 0].mean() > 0.99 and mask.mean() < 0.2
    lesion, _ = volumes.load_volume(GLIOMA_DIR / "lesion_mask.nii.gz")
    assert mask[lesion > 0].mean() > 0.99


def test_aligned_preprocessing_is_cached_apart(tmp_path):
    """--preprocess=brain is part of the slice-cache key, so a second run of it reads the cache, not registers again."""
    cfg = Config(data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), image_size=32, slices=4,
                 slab_mm=None)
    key = {"inputs": []}
    assert dataset._cache_file(cfg, key) != dataset._cache_file(cfg.replace(preprocess="brain"), key)
    assert dataset._cache_file(cfg.replace(preprocess="brain"), key) == \
        dataset._cache_file(cfg.replace(preprocess="brain"), key)


# --- end to end on a tiny trained run ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ixi_run(tmp_path_factory, cache_dir):
    """A tiny U-Net trained 3 steps on 6 real IXI subjects (2 held out), 32 px, 4 central axial slices."""
    if not IXI_DIR.is_dir():
        pytest.skip(f"shared IXI data not found at {IXI_DIR}")
    root = tmp_path_factory.mktemp("tiny")
    subset = symlink_subset(IXI_DIR, root / "ixi", 6)
    cfg = Config(model="tiny", image_size=32, slices=4, slab_mm=None, max_steps=3, batch_size=8, val_fraction=0.34,
                 data_dir=str(subset), cache_dir=str(cache_dir), corruptions="augmented")
    train.train_and_evaluate(cfg, root / "run")
    return root / "run"


def test_detect_eval_then_detect_on_the_glioma_case(tiny_ixi_run, tmp_path):
    results = infer.detect_eval(tiny_ixi_run, max_subjects=2)["scores"]["residual"]
    everything = json.loads((tiny_ixi_run / "detect" / "metrics.json").read_text())
    written = everything["scores"]["residual"]
    split = json.loads((tiny_ixi_run / "split.json").read_text())
    assert everything["subjects"] == split["val_subjects"] == list(written["per_subject"])
    for name in ("patch", "blob"):
        scores = written["kinds"][name]
        assert 0 <= scores["auroc"] <= 1 and 0 < scores["auprc"] <= 1 and 0 < scores["best_dice"] <= 1
        assert scores["n_positive"] > 0
        for subject in everything["subjects"]:
            own = written["per_subject"][subject][name]
            assert 0 <= own["dice_at_val_threshold"] <= own["best_dice"] + 1e-9
    overall = written["overall"]
    assert overall["n_pixels"] == sum(written["kinds"][k]["n_pixels"] for k in ("patch", "blob"))
    assert results["overall"]["auroc"] == pytest.approx(overall["auroc"])
    assert (tiny_ixi_run / "detect" / "cases.png").stat().st_size > 10_000

    if not GLIOMA_DIR.is_dir():
        pytest.skip(f"glioma case not found at {GLIOMA_DIR}")
    anomaly = tmp_path / "map.nii.gz"
    result = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--mode=detect", f"--workdir={tiny_ixi_run}",
         f"--input={GLIOMA_DIR / 't1.nii.gz'}", f"--lesion_mask={GLIOMA_DIR / 'lesion_mask.nii.gz'}", f"--output={anomaly}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((tmp_path / "map.json").read_text())
    assert 0.0 <= scores["auroc"] <= 1.0 and 0.0 <= scores["auprc"] <= 1.0 and 0.0 <= scores["best_dice"] <= 1.0
    assert scores["n_positive"] > 0 and scores["n_pixels"] == scores["brain_pixels"]
    assert scores["val_threshold"] == written["kinds"]["blob"]["best_threshold"]
    assert 0.0 <= scores["dice_at_val_threshold"] <= scores["best_dice"]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["auroc"] == pytest.approx(scores["auroc"])
    image = nib.load(anomaly)
    assert image.shape == (32, 32, 155) and image.header.get_zooms() == pytest.approx((7.5, 7.5, 1.0))
    values = image.get_fdata()
    assert values.min() >= 0 and values.max() > 0 and (values[0] == 0).all()  # outside the brain: 0


# --- reconstruct repairs what it is given ------------------------------------------------------------------


@pytest.fixture(scope="session")
def restorer(tmp_path_factory, cache_dir):
    """A small U-Net trained 300 steps on the demo source at 32 px with the wide training policy."""
    workdir = tmp_path_factory.mktemp("restorer") / "run"
    cfg = Config(model="small", image_size=32, slices=24, batch_size=16, max_steps=300, epochs=1000,
                 learning_rate=3e-3, corruptions="augmented_wide", val_corruptions="augmented", eval_batch_size=64,
                 cache_dir=str(cache_dir))
    train.train_and_evaluate(cfg, workdir)
    return workdir


def _display_slices(path) -> np.ndarray:
    volume = nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float32)
    return np.stack([volume[:, :, k][::-1, ::-1].T for k in range(volume.shape[2])])


@pytest.mark.parametrize("resample_to_input", [False, True])
def test_reconstruct_beats_the_corrupted_input_for_every_kind_of_the_policy(restorer, tmp_path, resample_to_input):
    """Corrupted volumes in scanner-like units and anisotropic voxels through `--mode=reconstruct`: for every kind
    of the run's evaluation policy, the repaired slices are closer to the clean ones than the input by >= 0.03
    slice SSIM (scikit-image, data range 1, in the clean slices' frame)."""
    from skimage.metrics import structural_similarity

    cfg = Config.from_json((restorer / "config.json").read_text())
    clean = dataset.load_dataset(cfg).val[..., 0]
    policy = corruptions.parse_policy(cfg.eval_policy)
    for kind in policy.kinds:
        single = corruptions.parse_policy(f"patch+{kind}")
        keys = jax.random.split(jax.random.key(11), len(clean))
        corrupt = jax.jit(jax.vmap(lambda k, x: corruptions.corrupt_image(k, x, single)[0]))
        corrupted = np.asarray(corrupt(keys, jnp.asarray(clean[..., None])))[..., 0]
        units = 800.0 * corrupted + 30.0  # another scanner's intensity units
        source = tmp_path / f"{kind}.nii.gz"
        write_nifti(source, np.stack([s[::-1, ::-1].T for s in units], axis=2), np.diag([7.5, 6.0, 2.0, 1.0]))
        output = tmp_path / f"{kind}_repaired.nii.gz"
        args = [f"--input={source}", f"--output={output}"] + (["--resample_to_input"] if resample_to_input else [])
        code, _, err = cli("--mode=reconstruct", f"--workdir={restorer}", *args)
        assert code == 0, err[-2000:]
        repaired = (_display_slices(output) - 30.0) / 800.0

        def ssim(images):
            return np.mean([structural_similarity(c, np.clip(x, 0, 1), data_range=1.0) for c, x in zip(clean, images)])

        assert ssim(repaired) >= ssim(corrupted) + 0.03, kind

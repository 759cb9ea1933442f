"""The data room: reading, orientation, slab, resizing, normalisation, splitting, caching, demo source."""

import os
from pathlib import Path

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from conftest import IXI_DIR, clean_slices, needs_ixi, symlink_subset, write_nifti
from mrirecon_jax.config import Config, UserError
from mrirecon_jax.data import cache, dataset, demo, geometry, normalise, volumes


def synthetic_data_dir(root, names, shape=(20, 24, 16), seed=0):
    """A folder of small random RAS volumes with the given file names."""
    root.mkdir()
    rng = np.random.default_rng(seed)
    for name in names:
        write_nifti(root / name, rng.random(shape).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    return root


def small_config(data_dir, cache_dir, **changes):
    return Config(data_dir=None if data_dir is None else str(data_dir), cache_dir=str(cache_dir),
                  image_size=16, slices=4).replace(**changes)


# --- files and volumes ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("IXI002-Guys-0828-T1.nii.gz", "IXI002"),
    ("IXI012-HH-1211_T1.nii.gz", "IXI012"),
    ("/some/dir/IXI640-IOP-1242-T1.nii", "IXI640"),
    ("sub-01_T1w.nii.gz", "sub-01_T1w"),
    ("brain.nii", "brain"),
])
def test_subject_id(name, expected):
    assert volumes.subject_id(name) == expected


def test_find_volumes_errors_and_listing(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        volumes.find_volumes(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a volume")
    with pytest.raises(UserError, match="no .nii"):
        volumes.find_volumes(str(tmp_path / "empty"))
    root = synthetic_data_dir(tmp_path / "vols", ["b.nii.gz", "a.nii"])
    (root / "sub").mkdir()
    write_nifti(root / "sub" / "c.nii.gz", np.zeros((4, 4, 4), np.float32))
    (root / "readme.txt").write_text("x")
    found = volumes.find_volumes(str(root))
    assert [p.relative_to(root).as_posix() for p in found] == ["a.nii", "b.nii.gz", "sub/c.nii.gz"]


def test_load_volume_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        volumes.load_volume(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize("case", ["corrupt", "2d", "nan", "inf", "4d"])
def test_load_volume_rejects_bad_files(tmp_path, case):
    path = tmp_path / "x.nii.gz"
    if case == "corrupt":
        path.write_bytes(os.urandom(2000))
    elif case == "2d":
        write_nifti(path, np.ones((8, 8), np.float32))
    elif case == "4d":
        write_nifti(path, np.ones((8, 8, 8, 2), np.float32))
    else:
        volume = np.ones((8, 8, 8), np.float32)
        volume[3, 4, 5] = np.nan if case == "nan" else np.inf
        write_nifti(path, volume)
    with pytest.raises(UserError) as error:
        volumes.load_volume(path)
    assert str(path) in str(error.value)


def test_load_volume_accepts_singleton_4d(tmp_path):
    volume = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8, 1)
    loaded, zooms = volumes.load_volume(write_nifti(tmp_path / "v.nii.gz", volume))
    assert loaded.shape == (6, 7, 8) and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, volume[..., 0])
    assert zooms == (1.0, 1.0, 1.0)


def test_canonical_reorientation(tmp_path):
    """RAS, LPS and PSR files of the same anatomy load to the same RAS array and RAS-ordered zooms."""
    shape, zooms = (10, 12, 14), (1.0, 2.0, 3.0)
    ras = np.random.default_rng(0).random(shape).astype(np.float32)
    ras[-1, -1, -1] = 5.0  # the patient's right-anterior-superior corner
    ras_affine = np.diag([*zooms, 1.0])
    # LPS: axes 0 and 1 reversed; same world position for every voxel.
    lps = ras[::-1, ::-1, :]
    lps_affine = np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])
    lps_affine[:3, 3] = [(shape[0] - 1) * zooms[0], (shape[1] - 1) * zooms[1], 0]
    assert lps[0, 0, -1] == 5.0  # right (low L index), anterior (low P index), superior
    # PSR (how the shared 2 mm data is stored): array axes run to Posterior, Superior, Right.
    psr = np.ascontiguousarray(ras.transpose(1, 2, 0)[::-1])
    psr_affine = np.zeros((4, 4))
    psr_affine[0, 2], psr_affine[1, 0], psr_affine[2, 1], psr_affine[3, 3] = zooms[0], -zooms[1], zooms[2], 1
    psr_affine[1, 3] = (shape[1] - 1) * zooms[1]
    assert nib.aff2axcodes(psr_affine) == ("P", "S", "R")

    loaded = [volumes.load_volume(write_nifti(tmp_path / f"{name}.nii.gz", array, affine))
              for name, array, affine in [("ras", ras, ras_affine), ("lps", lps, lps_affine),
                                          ("psr", psr, psr_affine)]]
    for volume, volume_zooms in loaded:
        np.testing.assert_array_equal(volume, ras)
        assert volume_zooms == zooms
        assert np.unravel_index(volume.argmax(), volume.shape) == (9, 11, 13)


@pytest.mark.parametrize("plane, corner", [
    ("axial", (slice(-4, None), slice(-4, None), slice(None))),  # right, anterior
    ("coronal", (slice(-4, None), slice(None), slice(-4, None))),  # right, superior
    ("sagittal", (slice(None), slice(-4, None), slice(-4, None))),  # anterior, superior
])
def test_display_orientation_is_radiological(plane, corner):
    """Right-anterior (axial), right-superior (coronal), anterior-superior (sagittal) land top-left."""
    volume = np.zeros((16, 16, 16), np.float32)
    volume[corner] = 1.0
    image = clean_slices(volume, (2.0, 2.0, 2.0), plane, 16, 2)[0]
    assert image[:4, :4].min() == 1.0
    assert image[4:, :].max() == 0.0 and image[:, 4:].max() == 0.0


def test_to_display_is_an_involution():
    stack = np.arange(2 * 3 * 5).reshape(2, 3, 5)
    shown = geometry.to_display(stack)
    assert shown.shape == (2, 5, 3)
    np.testing.assert_array_equal(geometry.to_display(shown), stack)


# --- slab and slices ----------------------------------------------------------------------------------


def physical_extent(indices, spacing):
    return indices[0] * spacing - spacing / 2, indices[-1] * spacing + spacing / 2


def test_slab_indices_same_physical_slab():
    """51 slices at 0.94 mm and a 48 mm slab at 2 mm cover the same central ~48 mm."""
    full = geometry.slab_indices(256, 0.94, slices=51, slab_mm=None)
    two_mm = geometry.slab_indices(120, 2.0, slices=None, slab_mm=48.0)
    assert len(full) == 51 and len(two_mm) == 24
    np.testing.assert_array_equal(np.diff(two_mm), 1)
    (lo_a, hi_a), (lo_b, hi_b) = physical_extent(full, 0.94), physical_extent(two_mm, 2.0)
    assert abs((hi_a - lo_a) - (hi_b - lo_b)) < 1.0
    # Both slabs sit at the centre of their fields of view (voxel i is centred at i * spacing).
    assert abs((lo_a + hi_a) / 2 - 255 * 0.94 / 2) < 1.0
    assert abs((lo_b + hi_b) / 2 - 119 * 2.0 / 2) < 1.0


def test_slab_indices_clipping():
    np.testing.assert_array_equal(geometry.slab_indices(10, 2.0, slices=50, slab_mm=None), np.arange(10))
    np.testing.assert_array_equal(geometry.slab_indices(10, 2.0, slices=None, slab_mm=0.1), [4])
    np.testing.assert_array_equal(geometry.slab_indices(9, 1.0, slices=3, slab_mm=None), [3, 4, 5])


@pytest.mark.parametrize("plane, expected_count", [("axial", 5), ("sagittal", 5), ("coronal", 5)])
def test_extract_slices_shape_range_and_normalisation(plane, expected_count):
    rng = np.random.default_rng(1)
    volume = rng.normal(100.0, 30.0, size=(20, 24, 18)).astype(np.float32)
    out = clean_slices(volume, (1.0, 1.2, 1.5), plane, 32, expected_count)
    assert out.shape == (expected_count, 32, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out.min(axis=(1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(out.max(axis=(1, 2)), 1.0, atol=1e-6)


def test_extract_slices_constant_slice_becomes_zeros():
    volume = np.random.default_rng(2).random((12, 12, 9)).astype(np.float32) * 50
    volume[:, :, 4] = 7.0  # the central axial slice
    out = clean_slices(volume, (1.0, 1.0, 1.0), "axial", 16, 3)
    assert np.all(out[1] == 0.0)
    assert out[0].max() == pytest.approx(1.0) and out[2].max() == pytest.approx(1.0)


def test_extract_slices_keeps_physical_aspect_with_anisotropic_voxels():
    """A round disc stays round with 1.2 x 0.94 mm voxels; the field of view is padded to a square."""
    zooms, shape, radius_mm = (1.2, 0.94, 2.0), (80, 128, 3), 25.0
    x = (np.arange(shape[0]) - (shape[0] - 1) / 2) * zooms[0]
    y = (np.arange(shape[1]) - (shape[1] - 1) / 2) * zooms[1]
    disc = (x[:, None] ** 2 + y[None, :] ** 2 <= radius_mm ** 2).astype(np.float32)
    volume = np.repeat(disc[:, :, None], shape[2], axis=2)
    image = clean_slices(volume, zooms, "axial", 64, 1)[0] > 0.5
    rows = np.flatnonzero(image.any(axis=1))
    cols = np.flatnonzero(image.any(axis=0))
    expected = 2 * radius_mm / (shape[1] * zooms[1]) * 64  # the longer side (120 mm) spans the image
    assert abs(len(rows) - len(cols)) <= 1
    assert abs(len(rows) - expected) <= 1.5 and abs(len(cols) - expected) <= 1.5
    assert abs((rows[0] + rows[-1]) / 2 - 31.5) <= 1 and abs((cols[0] + cols[-1]) / 2 - 31.5) <= 1


def test_bad_plane_and_image_size_are_refused():
    volume = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(UserError, match="plane"):
        clean_slices(volume, (1, 1, 1), "transverse", 16, 1)
    with pytest.raises(UserError, match="--image_size must be at least 8"):
        clean_slices(volume, (1, 1, 1), "axial", 4, 1)


def test_a_slice_already_on_the_model_grid_passes_through_untouched():
    """Anisotropic pixels are not padded or resized when the slice already has the model's size."""
    rng = np.random.default_rng(3)
    volume = rng.random((16, 16, 3)).astype(np.float32)
    slices, layout = geometry.volume_slices(volume, (2.8, 3.75, 2.0), "axial", 16)
    np.testing.assert_array_equal(slices, geometry.to_display(np.moveaxis(volume, 2, 0)))
    assert layout.padded_shape == (16, 16) and layout.pad_before == (0, 0)
    affine = geometry.model_grid_affine(layout, np.diag([2.8, 3.75, 2.0, 1.0]))
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), (2.8, 3.75, 2.0))


def test_input_normalisation_ignores_units_and_outliers():
    """The model input is the same for a slice in any units, and a few bright pixels barely move it."""
    rng = np.random.default_rng(4)
    image = rng.random((2, 32, 32, 1)).astype(np.float32)
    base, offset, scale = normalise.normalise_input(jnp.asarray(image))
    scaled, _, _ = normalise.normalise_input(jnp.asarray(250.0 * image + 40.0))
    np.testing.assert_allclose(scaled, base, atol=1e-4)
    spiked = image.copy()
    spiked[:, :3, :3] = 5.0  # 9 of 1024 pixels, far above the rest
    moved, _, _ = normalise.normalise_input(jnp.asarray(spiked))
    assert float(jnp.abs(moved - base)[:, 3:, 3:].max()) < 0.05
    np.testing.assert_allclose(normalise.denormalise(base, offset, scale), image, atol=1e-5)
    constant, _, unit = normalise.normalise_input(jnp.full((1, 8, 8, 1), 3.0))
    assert float(jnp.abs(constant).max()) == 0.0 and float(unit[0, 0, 0, 0]) == 1.0


def test_nonnegative_output_clamps_only_below_zero_in_input_units():
    """A model output mapped back below zero becomes exactly zero (a clean background); the rest is untouched."""
    y = jnp.asarray([[-0.3, 0.0, 0.5, 1.2]]).reshape(1, 2, 2, 1)
    offset, scale = jnp.full((1, 1, 1, 1), -0.1), jnp.full((1, 1, 1, 1), 2.0)
    plain = normalise.denormalise(y, offset, scale)
    clamped = normalise.denormalise(y, offset, scale, nonnegative=True)
    np.testing.assert_allclose(np.asarray(plain).ravel(), [-0.7, -0.1, 0.9, 2.3], atol=1e-6)
    np.testing.assert_allclose(np.asarray(clamped).ravel(), [0.0, 0.0, 0.9, 2.3], atol=1e-6)


# --- subjects -----------------------------------------------------------------------------------------


def test_split_subjects():
    ids = [f"S{i:02d}" for i in range(20)] + ["S03", "S07"]  # duplicates count once
    train, val = dataset.split_subjects(ids, 0.25, seed=0)
    assert len(val) == 5 and len(train) == 15
    assert not set(train) & set(val) and set(train) | set(val) == set(ids)
    assert (train, val) == dataset.split_subjects(list(reversed(ids)), 0.25, seed=0)
    assert dataset.split_subjects(ids, 0.25, seed=1)[1] != val
    small_train, small_val = dataset.split_subjects(ids, 0.25, seed=0, max_subjects=8)
    assert len(small_train) == 6 and len(small_val) == 2 and not set(small_train) & set(small_val)
    assert dataset.split_subjects(["a", "b"], 0.9, seed=0) in ((["a"], ["b"]), (["b"], ["a"]))


@pytest.mark.parametrize("ids", [["only"], ["a", "a"]])
def test_split_subjects_needs_two_subjects(ids):
    with pytest.raises(UserError, match="at least 2 subjects"):
        dataset.split_subjects(ids, 0.2, seed=0)


# --- load_dataset on synthetic files ------------------------------------------------------------------


def test_load_dataset_keeps_a_subjects_files_together(tmp_path):
    names = ["IXI001-HH-1_T1.nii.gz", "IXI001-HH-2-T1.nii.gz"] + [f"IXI{i:03d}-HH-1_T1.nii.gz" for i in range(2, 8)]
    root = synthetic_data_dir(tmp_path / "vols", names)
    for seed in range(4):
        ds = dataset.load_dataset(small_config(root, tmp_path / "cache", seed=seed, val_fraction=0.3))
        assert set(ds.train_subjects).isdisjoint(ds.val_subjects)
        assert len(ds.train_subjects) + len(ds.val_subjects) == 7 and len(ds.val_subjects) == 2
        side, owner = ((ds.train_subjects, ds.train_slice_subject) if "IXI001" in ds.train_subjects
                       else (ds.val_subjects, ds.val_slice_subject))
        assert np.sum(owner == side.index("IXI001")) == 8  # two files x 4 slices, all on one side


def test_load_dataset_cache_invalidation_and_errors(tmp_path):
    root = synthetic_data_dir(tmp_path / "vols", [f"s{i}.nii.gz" for i in range(4)])
    cache = tmp_path / "cache"
    cfg = small_config(root, cache)
    first = dataset.load_dataset(cfg)
    assert not first.cache_hit and Path(first.cache_path).parent == cache
    assert dataset.load_dataset(cfg).cache_hit
    assert not dataset.load_dataset(cfg.replace(image_size=24)).cache_hit
    assert not dataset.load_dataset(cfg.replace(seed=5)).cache_hit
    os.utime(root / "s2.nii.gz", ns=(1, 1))  # an input file changed
    changed = dataset.load_dataset(cfg)
    assert not changed.cache_hit and changed.cache_path != first.cache_path
    Path(changed.cache_path).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = dataset.load_dataset(cfg)
    assert not rebuilt.cache_hit and dataset.load_dataset(cfg).cache_hit
    with pytest.raises(UserError, match="plane"):
        dataset.load_dataset(cfg.replace(plane="oblique"))
    slab = dataset.load_dataset(cfg.replace(slices=None, slab_mm=8.0))  # 8 mm at 2 mm voxels: 4 slices
    assert len(slab.train) + len(slab.val) == 4 * 4


def test_validation_slab_shapes_only_the_validation_slices(tmp_path):
    """--val_slab_mm: training slices of the training slab, validation slices of the central validation slab (the
    same as a run trained on that slab), cached apart from the run without one; unseen subjects as validation."""
    root = synthetic_data_dir(tmp_path / "vols", [f"s{i}.nii.gz" for i in range(5)])
    cfg = small_config(root, tmp_path / "cache")
    wide = dataset.load_dataset(cfg.replace(val_slab_mm=4.0))  # 4 mm at 2 mm voxels: 2 slices
    plain = dataset.load_dataset(cfg)
    narrow = dataset.load_dataset(cfg.replace(slices=2))
    assert not wide.cache_hit and wide.cache_path != plain.cache_path
    assert (len(wide.train), len(wide.val)) == (4 * 4, 1 * 2)
    np.testing.assert_array_equal(wide.train, plain.train)
    np.testing.assert_array_equal(wide.val, narrow.val)
    unseen = dataset.load_unseen_subjects(cfg.replace(val_slab_mm=4.0), root)
    assert len(unseen.val) == 5 * 2


def test_load_dataset_without_a_writable_cache(tmp_path):
    root = synthetic_data_dir(tmp_path / "vols", [f"s{i}.nii.gz" for i in range(3)])
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.warns(UserWarning, match="without it"):
        ds = dataset.load_dataset(small_config(root, not_a_dir))
    assert ds.cache_path is None and not ds.cache_hit and len(ds.train) == 2 * 4
    before = sorted(p.name for p in root.iterdir())
    with pytest.warns(UserWarning, match="inside the data directory"):
        inside = dataset.load_dataset(small_config(root, root / "cache"))
    assert inside.cache_path is None and sorted(p.name for p in root.iterdir()) == before


# --- real data ----------------------------------------------------------------------------------------


@needs_ixi
def test_load_dataset_real_subset_and_cache(tmp_path):
    subset = symlink_subset(IXI_DIR, tmp_path / "ixi-subset", 8)
    before = sorted((p.name, p.lstat().st_mtime_ns) for p in subset.iterdir())
    cfg = small_config(subset, tmp_path / "cache", image_size=32, slices=6)
    cold = dataset.load_dataset(cfg)
    assert not cold.cache_hit and Path(cold.cache_path).is_file()
    assert Path(cold.cache_path).parent == tmp_path / "cache"
    assert len(cold.train_subjects) == 6 and len(cold.val_subjects) == 2
    assert set(cold.train_subjects).isdisjoint(cold.val_subjects)
    assert all(s.startswith("IXI") for s in cold.train_subjects + cold.val_subjects)
    assert cold.train.shape == (36, 32, 32, 1) and cold.val.shape == (12, 32, 32, 1)
    assert cold.train.dtype == np.float32 and cold.val.dtype == np.float32
    assert cold.train.min() == 0.0 and cold.train.max() == 1.0
    np.testing.assert_array_equal(np.bincount(cold.train_slice_subject), [6] * 6)
    np.testing.assert_array_equal(np.bincount(cold.val_slice_subject), [6] * 2)
    assert str(subset) in cold.source
    # Real anatomy: every slice of the central axial slab shows a head (background around it is dark).
    assert np.all(cold.train[:, 8:24, 8:24].mean(axis=(1, 2, 3)) > 0.1)

    warm = dataset.load_dataset(cfg)
    assert warm.cache_hit and warm.cache_path == cold.cache_path and warm.source == cold.source
    assert (warm.train_subjects, warm.val_subjects) == (cold.train_subjects, cold.val_subjects)
    for name in ["train", "val", "train_slice_subject", "val_slice_subject"]:
        np.testing.assert_array_equal(getattr(warm, name), getattr(cold, name))
    assert sorted((p.name, p.lstat().st_mtime_ns) for p in subset.iterdir()) == before

    resized = dataset.load_dataset(cfg.replace(image_size=24))
    assert not resized.cache_hit and resized.train.shape == (36, 24, 24, 1)


# --- demo source --------------------------------------------------------------------------------------


def test_demo_volumes_are_distinct_pseudo_subjects():
    subjects, description = demo.demo_volumes(n_subjects=3, seed=0)
    assert description.startswith("DEMO") and "not real subjects" in description
    ids = [s for s, _, _ in subjects]
    assert len(set(ids)) == 3 and all(s.startswith("DEMO-") for s in ids)
    arrays = [v for _, v, _ in subjects]
    assert all(v.ndim == 3 and v.dtype == np.float32 and np.isfinite(v).all() and v.max() > 0 for v in arrays)
    assert not np.allclose(arrays[0], arrays[1])
    again, _ = demo.demo_volumes(n_subjects=3, seed=0)
    np.testing.assert_array_equal(again[2][1], arrays[2])


def test_demo_phantom_fallback(monkeypatch):
    monkeypatch.setattr(demo, "mni_template_path", lambda: None)
    subjects, description = demo.demo_volumes(n_subjects=2)
    assert description.startswith("DEMO: synthetic ellipsoid phantom (nilearn not installed)")
    assert [s for s, _, _ in subjects] == ["DEMO-PHANTOM-00", "DEMO-PHANTOM-01"]
    assert all(np.isfinite(v).all() and v.max() > 0 and zooms == (2.0, 2.0, 2.0) for _, v, zooms in subjects)


def test_load_dataset_demo(tmp_path):
    ds = dataset.load_dataset(small_config(None, tmp_path, image_size=32))
    assert ds.source.startswith("DEMO")
    assert len(ds.train_subjects) >= 1 and len(ds.val_subjects) >= 1
    assert len(ds.train_subjects) + len(ds.val_subjects) >= 2
    assert set(ds.train_subjects).isdisjoint(ds.val_subjects)
    assert ds.train.shape[1:] == (32, 32, 1) and len(ds.train) == 4 * len(ds.train_subjects)
    assert np.isfinite(ds.train).all() and ds.train.max() == 1.0
    assert ds.train.mean() > 0.05  # anatomy, not empty slices
    assert dataset.load_dataset(small_config(None, tmp_path, image_size=32)).cache_hit


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    root = synthetic_data_dir(tmp_path / "vols", ["a.nii.gz", "b.nii.gz"])
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "env-cache"))
    ds = dataset.load_dataset(small_config(root, tmp_path).replace(cache_dir=None))
    assert Path(ds.cache_path).parent == tmp_path / "env-cache"

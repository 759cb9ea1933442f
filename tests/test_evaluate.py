"""The evaluate job: thesis-compatible metrics, classical baselines, unseen data, determinism, figures."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from conftest import IXI_DIR, TINY_RUN, clean_slices, needs_ixi, symlink_subset
from mrirecon_jax import baselines, corruptions, evaluate, metrics, train
from mrirecon_jax.config import Config, UserError
from mrirecon_jax.data import dataset, volumes
from mrirecon_jax.data.prepare import prepare_volume
from mrirecon_jax.workdir import RUN_POLICY, TOLD_MASK


def listing_4_3(test_original, pred, img_size):
    """The thesis's listing 4.3, transcribed (cv2.PSNR(a, b, 1) is the standard PSNR with peak 1)."""
    psn, mse, ssi = [], [], []
    for i in range(len(pred)):
        i1 = test_original[i, ..., 0].reshape(img_size * img_size)
        i2 = pred[i, ..., 0].reshape(img_size * img_size)
        psn.append(peak_signal_noise_ratio(np.float32(i1), np.float32(i2), data_range=1))
        mse.append(np.square(np.subtract(i1, i2).mean()))
        ssi.append(structural_similarity(i1, i2, data_range=i2.max() - i2.min()))
    return psn, mse, ssi


def _smooth_slices(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    images = ndimage.gaussian_filter(rng.random((n, size, size)), sigma=(0, 2.5, 2.5))
    images -= images.min(axis=(1, 2), keepdims=True)
    images /= images.max(axis=(1, 2), keepdims=True)
    return images[..., None].astype(np.float32)


def _real_slices(n=4, size=64):
    volume, zooms = volumes.load_volume(sorted(IXI_DIR.glob("*.nii.gz"))[0])
    return clean_slices(volume, zooms, "axial", size, n)[..., None]


def _assert_matches_listing(pred, target):
    out = metrics.thesis_metrics(pred, target, np.zeros_like(target))
    psn, mse, ssi = listing_4_3(target, pred, target.shape[1])
    np.testing.assert_allclose(out["ssim_slice"], ssi, rtol=1e-6)
    np.testing.assert_allclose(out["psnr_slice"], psn, rtol=1e-6)
    np.testing.assert_allclose(out["mse_slice"], mse, rtol=1e-6)
    assert np.isnan(out["ssim_patch"]).all()  # no patch, no patch value
    return out


def test_thesis_variants_match_listing_4_3_on_random_slices():
    target = _smooth_slices(3)
    pred = np.clip(target + 0.1 * np.random.default_rng(1).standard_normal(target.shape), 0, 1.2).astype(np.float32)
    out = _assert_matches_listing(pred, target)
    standard = metrics.slice_metrics(jnp.asarray(pred), jnp.asarray(target), jnp.zeros_like(target))
    # Their "MSE" is the squared mean error: never above the mean squared error (Jensen), here far below.
    assert np.all(out["mse_slice"] < 0.5 * np.asarray(standard["mse_slice"]))


@needs_ixi
def test_thesis_variants_match_listing_4_3_on_real_slices():
    target = _real_slices()
    pred = np.clip(ndimage.gaussian_filter(target, sigma=(0, 1, 1, 0)), 0, 1).astype(np.float32)
    out = _assert_matches_listing(pred, target)
    assert 0.5 < out["ssim_slice"].min() < 1.0


def test_thesis_ssim_is_raised_by_one_bright_pixel_and_standard_ssim_is_not():
    target = _smooth_slices(1, seed=3)
    pred = np.clip(target + 0.1 * np.random.default_rng(6).standard_normal(target.shape), 0, 1).astype(np.float32)
    gamed = pred.copy()
    gamed[0, 0, 0] = 4.0  # one bright outlier widens the prediction's "data range"
    mask = np.zeros_like(target)
    thesis = [metrics.thesis_metrics(p, target, mask)["ssim_slice"][0] for p in (pred, gamed)]
    standard = [float(metrics.ssim(jnp.clip(jnp.asarray(p), 0, 1), jnp.asarray(target))[0]) for p in (pred, gamed)]
    assert thesis[1] > thesis[0] + 0.05
    assert standard[1] == pytest.approx(standard[0], abs=3e-3)


def test_thesis_patch_variants_use_the_flattened_rectangle_only():
    target = _smooth_slices(1, size=48, seed=4)
    pred = np.clip(target + 0.1 * np.random.default_rng(5).standard_normal(target.shape), 0, 1).astype(np.float32)
    mask = np.zeros_like(target)
    mask[0, 20, 10] = mask[0, 27, 30] = 1  # the rectangle spans rows 20..27, columns 10..30
    out = metrics.thesis_metrics(pred, target, mask)
    i1, i2 = target[0, 20:28, 10:31, 0].reshape(-1), pred[0, 20:28, 10:31, 0].reshape(-1)  # the flattened crop
    assert out["ssim_patch"][0] == pytest.approx(structural_similarity(i1, i2, data_range=i2.max() - i2.min()),
                                                 rel=1e-6)
    assert out["psnr_patch"][0] == pytest.approx(peak_signal_noise_ratio(i1, i2, data_range=1), rel=1e-6)
    assert out["mse_patch"][0] == pytest.approx(np.square(np.subtract(i1, i2).mean()), rel=1e-6)
    changed = pred.copy()
    changed[0, :10] = 1 - changed[0, :10]  # outside the rectangle
    moved = metrics.thesis_metrics(changed, target, mask)
    for name in ("ssim_patch", "psnr_patch", "mse_patch"):
        assert moved[name][0] == out[name][0]
    assert moved["psnr_slice"][0] < out["psnr_slice"][0]


def _corrupt(kind_fn, clean, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(clean))
    return np.asarray(jax.vmap(kind_fn)(keys, jnp.asarray(clean)))


def _patch(clean, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(clean))
    patched, masks = jax.vmap(corruptions.line_patch)(keys, jnp.asarray(clean))
    return np.asarray(patched), np.asarray(masks)


def _mean_ssim(images, clean):
    return float(jnp.mean(metrics.ssim(jnp.asarray(images), jnp.asarray(clean))))


@needs_ixi
def test_biharmonic_baseline_fills_the_patch_and_leaves_the_rest():
    clean = _real_slices(n=3)
    patched, masks = _patch(clean)
    out = baselines.baseline_outputs(patched, masks, [None] * len(clean))
    outside, inside = masks == 0, masks > 0
    np.testing.assert_allclose(out["biharmonic"][outside], patched[outside], atol=1e-6)
    np.testing.assert_array_equal(out["classical"], out["biharmonic"])  # no kind: nothing else to undo
    np.testing.assert_array_equal(out["input"], patched)
    assert np.abs(out["biharmonic"] - clean)[inside].mean() < 0.5 * np.abs(patched - clean)[inside].mean()


def _restore(kind, images):
    return baselines.baseline_outputs(images, np.zeros_like(images), [kind] * len(images))["classical"]


@needs_ixi
def test_bicubic_from_the_reduced_grid_beats_the_downsampled_input():
    clean = _real_slices(n=3)
    corrupted = _corrupt(corruptions.CORRUPTIONS["downsample"], clean)
    assert _mean_ssim(_restore("downsample", corrupted), clean) > _mean_ssim(corrupted, clean) + 0.02


@needs_ixi
def test_gibbs_unringing_damps_ringing_and_keeps_a_smooth_slice():
    clean = _real_slices(n=3)
    ringing = _corrupt(corruptions.CORRUPTIONS["gibbs"], clean)

    def total_variation(x):
        return np.abs(np.diff(x, axis=1)).sum() + np.abs(np.diff(x, axis=2)).sum()

    assert total_variation(_restore("gibbs", ringing)) < 0.95 * total_variation(ringing)
    smooth = ndimage.gaussian_filter(clean, sigma=(0, 1.5, 1.5, 0))
    assert _mean_ssim(_restore("gibbs", smooth), smooth) > 0.99


# ---------------------------------------------------------------------------------------------- the job


FIXTURE_KINDS = ("downsample", "gibbs")  # every kind costs a compilation of the eval step: keep tests short


def test_every_catalogue_kind_is_evaluated_by_default():
    policies = evaluate.evaluation_policies("patch+oneof(downsample,ghost)")
    assert policies == {RUN_POLICY: "patch+oneof(downsample,ghost)",
                        **{kind: f"patch+{kind}" for kind in corruptions.CORRUPTIONS}}
    for spec in policies.values():
        train.parse_policy(spec)  # each is a valid policy
    with pytest.raises(UserError, match="catalogue"):
        evaluate.evaluation_policies("original", ["blur"])


def test_the_model_told_the_mask_is_scored_beside_the_model_and_is_no_baseline():
    rng = np.random.default_rng(0)
    clean = rng.random((3, 16, 16, 1)).astype(np.float32)
    masks = np.zeros_like(clean)
    masks[:, 4:8, 4:10] = 1
    outputs = {"model": clean + 0.2, TOLD_MASK: clean, "input": clean + 0.1}
    summary = evaluate.summarise({m: evaluate.score_slices(o, clean, masks) for m, o in outputs.items()}, 1)
    assert set(summary["baselines"]) == {"input"} and summary["best_baseline"] == "input"
    assert summary[TOLD_MASK]["ssim_slice"] == pytest.approx(1.0) and summary["ssim_slice"] < 0.99
    assert summary[TOLD_MASK]["thesis_compat"]["ssim_patch"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def evaluated(tiny_run):
    """The session's tiny run, evaluated twice at its best checkpoint."""
    first = evaluate.evaluate_run(tiny_run, "best", kinds=FIXTURE_KINDS)
    first_text = (tiny_run / "eval" / "metrics.json").read_text()
    second = evaluate.evaluate_run(tiny_run, "best", kinds=FIXTURE_KINDS)
    return tiny_run, first, first_text, second


def test_evaluation_is_deterministic_with_every_metric_for_model_and_baselines(evaluated):
    run, first, first_text, second = evaluated
    assert first == second
    assert (run / "eval" / "metrics.json").read_text() == first_text
    kinds = first["kinds"]
    assert list(kinds) == [RUN_POLICY, *FIXTURE_KINDS, "overall"]
    for name in FIXTURE_KINDS:
        assert kinds[name]["policy"] == f"patch+{name}"
    for entry in kinds.values():
        for group in (entry, entry["thesis_compat"], *entry["baselines"].values()):
            assert all(group[m] is not None and np.isfinite(group[m]) for m in metrics.SLICE_METRICS)
        assert set(entry["baselines"]) == {"input", "biharmonic", "classical"}
        assert entry["best_baseline"] == max(entry["baselines"], key=lambda b: entry["baselines"][b]["ssim_slice"])
        assert entry["n_subjects"] == first["n_subjects"] and entry["checkpoint_step"] == first["checkpoint_step"]
    overall, per_kind = kinds["overall"], [kinds[k] for k in FIXTURE_KINDS]
    assert overall["n_slices"] == len(per_kind) * first["n_slices"]
    assert overall["ssim_slice"] == pytest.approx(np.mean([k["ssim_slice"] for k in per_kind]), rel=1e-6)


def test_model_and_input_baseline_see_the_training_validation_inputs(evaluated):
    """The run's own policy at the best step reproduces what training logged for it: same keys, same slices."""
    run, first, _, _ = evaluated
    records = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    logged = records[first["checkpoint_step"]]
    own = first["kinds"][RUN_POLICY]
    assert own["n_slices"] == logged["n_val_slices"] == first["n_slices"]
    for name in metrics.SLICE_METRICS:
        assert own[name] == pytest.approx(logged[name], rel=1e-5)
        assert own["baselines"]["input"][name] == pytest.approx(logged[f"input_{name}"], rel=1e-5)


def test_figures_are_written(evaluated):
    run, first, _, _ = evaluated
    names = ["ssim_per_epoch", "ssim_change", "ssim_vs_time", f"samples_{RUN_POLICY}",
             *[f"samples_{k}" for k in FIXTURE_KINDS]]
    for name in names:
        assert (run / "eval" / f"{name}.png").stat().st_size > 10_000, name


@needs_ixi
def test_unseen_data_is_every_subject_prepared_like_the_run(evaluated, tmp_path):
    run, _, _, _ = evaluated
    unseen = symlink_subset(IXI_DIR, tmp_path / "unseen", 2)
    result = evaluate.evaluate_run(run, "last", data_dir=str(unseen), cache_dir=str(tmp_path / "cache"), kinds=())
    assert result["n_subjects"] == 2 and result["n_slices"] == 2 * TINY_RUN["slices"]
    assert result["checkpoint"] == "last" and "unseen" in result["subjects"] and list(result["kinds"]) == [RUN_POLICY]
    cfg = Config(**TINY_RUN, cache_dir=str(tmp_path / "cache"))
    unseen_data = dataset.load_unseen_subjects(cfg, str(unseen))
    assert unseen_data.cache_hit and len(unseen_data.train) == 0
    paths = sorted(unseen.iterdir())
    assert unseen_data.val_subjects == tuple(volumes.subject_id(p) for p in paths)
    expected = np.concatenate([clean_slices(*volumes.load_volume(p), "axial", 32, 4) for p in paths])
    np.testing.assert_array_equal(unseen_data.val[..., 0], expected)


@needs_ixi
def test_an_aligned_run_evaluates_on_aligned_slices(tmp_path):
    """Evaluation on unseen subjects prepares them as the run was trained: --preprocess=brain included."""
    folder = symlink_subset(IXI_DIR, tmp_path / "ixi", 2)
    cfg = Config(**{**TINY_RUN, "max_steps": 1}, data_dir=str(folder), cache_dir=str(tmp_path / "cache"),
                 preprocess="brain", val_fraction=0.5)
    train.train_and_evaluate(cfg, tmp_path / "run")
    unseen = symlink_subset(IXI_DIR, tmp_path / "unseen", 1, start=2)
    evaluated_data, _ = evaluate.evaluation_data(Config.from_json((tmp_path / "run" / "config.json").read_text()),
                                                 str(unseen))
    path = next(unseen.iterdir())
    aligned = prepare_volume(*volumes.load_volume(path), cfg, with_brain=True)
    np.testing.assert_array_equal(evaluated_data.val, aligned.clean())
    # Skull stripped by the template: nothing bright beyond the brain mask's border pixels (which resizing blurs).
    beyond = ~ndimage.binary_dilation(aligned.brain, structure=np.ones((1, 3, 3), bool), iterations=2)
    assert (evaluated_data.val[..., 0][beyond] > 0.05).mean() < 0.01
    result = evaluate.evaluate_run(tmp_path / "run", data_dir=str(unseen), kinds=())
    assert result["n_slices"] == len(aligned.slices) and result["kinds"][RUN_POLICY]["n_subjects"] == 1


def test_evaluating_a_folder_without_a_run_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="holds no run"):
        evaluate.evaluate_run(tmp_path)

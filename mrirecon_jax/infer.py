"""Whole volumes in, whole volumes out: reconstruct a NIfTI with a trained run, map anomalies, score them.

A volume is read in canonical RAS (``data.load_volume``), skull-stripped first if the run was trained that way,
sliced along the run's plane and prepared exactly as training prepared its slices (``data.volume_slices``:
display orientation, square field of view, resized to ``image_size``, per-slice min-max), reconstructed in
batches, and put back into a volume on the model's grid whose affine (``data.model_grid_affine``) places it in
scanner space. With ``resample_to_input`` the result is resampled (trilinear) onto the input file's own grid,
array order and affine.

Units: reconstructions (and corrupted inputs) are written in the input's intensity units, each slice's min-max
normalisation undone; anomaly maps are in the model's normalised units (0.1 = a tenth of the slice's range).

The anomaly map is the residual between the prepared input and its reconstruction (absolute, or its positive or
negative part), median-filtered in-plane and set to 0 outside the brain mask. Detection scores (pixel-level
AUROC, AUPRC as average precision, best Dice and its threshold) are pooled over the brain-mask pixels of the
model's grid (Baur et al. 2021; Kascenas et al. 2022).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import nibabel as nib
import nibabel.processing
import numpy as np
import scipy.ndimage

from mrirecon_jax import corruptions, data, metrics, plots, train
from mrirecon_jax.config import Config, UserError

RESIDUALS = ("abs", "pos", "neg")
MEDIAN_FILTER_PX = 3  # in-plane median filter of the residual, in model pixels
MASK_LEVEL = 0.5  # masks are resampled to the model grid as fractions and kept where at least this
ANOMALY_KINDS = ("patch", "blob")  # detect_eval: the thesis's line patch, and corruptions.lesion_blob
FIGURE_CASES_PER_KIND = 2
DETECT_DIR = "detect"


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A run's configuration and its model as a function of (N, S, S, 1) float32 slices in [0, 1]."""

    cfg: Config
    apply: Callable
    source: str = ""  # where the model came from (workdir and step), recorded in the outputs
    workdir: Optional[Path] = None  # the run's workdir, when loaded from one


def load_predictor(run: Union[Predictor, str, os.PathLike], checkpoint: str = "best") -> Predictor:
    """The model of the run in workdir `run` at `checkpoint` (best, last or a step); a Predictor is returned as is."""
    if isinstance(run, Predictor):
        return run
    trained = train.restore_run(run, checkpoint)
    steps = train.make_steps(trained.cfg, trained.graphdef, train.make_optimizer(trained.cfg))
    return Predictor(cfg=trained.cfg, apply=functools.partial(steps.reconstruct, trained.params),
                     source=f"{Path(run)} step {trained.step}", workdir=Path(run))


def predict(predictor: Predictor, slices: np.ndarray) -> np.ndarray:
    """Reconstruct (n, S, S) slices in batches of the run's eval_batch_size (the last one padded); clipped to [0, 1]."""
    size = min(predictor.cfg.eval_batch_size, len(slices))
    out = []
    for start in range(0, len(slices), size):
        chunk = slices[start:start + size]
        padded = np.zeros((size,) + slices.shape[1:] + (1,), np.float32)
        padded[:len(chunk), ..., 0] = chunk
        out.append(np.asarray(predictor.apply(jnp.asarray(padded)), np.float32)[:len(chunk), ..., 0])
    return np.clip(np.concatenate(out), 0.0, 1.0)


def _check_residual(residual: str) -> None:
    if residual not in RESIDUALS:
        raise UserError(f"--residual={residual} is not one of {', '.join(RESIDUALS)}.")


def anomaly_map(inputs: np.ndarray, reconstructions: np.ndarray, brain: np.ndarray, residual: str = "abs"):
    """(n, H, W) anomaly map: the residual input - reconstruction (abs, or its pos / neg part), median-filtered
    in-plane over MEDIAN_FILTER_PX pixels, 0 outside the brain mask."""
    _check_residual(residual)
    difference = np.asarray(inputs, np.float32) - np.asarray(reconstructions, np.float32)
    value = {"abs": np.abs(difference), "pos": np.maximum(difference, 0.0), "neg": np.maximum(-difference, 0.0)}
    filtered = scipy.ndimage.median_filter(value[residual], size=(1, MEDIAN_FILTER_PX, MEDIAN_FILTER_PX))
    return np.where(brain, filtered, 0.0).astype(np.float32)


# ------------------------------------------------------------------------------------------- volumes and files

@dataclasses.dataclass(frozen=True, eq=False)
class PreparedVolume:
    """An input volume's slices on the model grid, with what is needed to write results back."""

    slices: np.ndarray  # (n, S, S) float32 in [0, 1], prepared as in training
    geometry: data.SliceGeometry
    affine: np.ndarray  # voxel-to-world affine of the model-grid volume
    brain: Optional[np.ndarray]  # (n, S, S) bool brain mask on the model grid (None when not asked for)
    canonical_shape: tuple[int, int, int]
    zooms: tuple[float, float, float]


def _same_file(a, b) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.absolute().resolve() == b.absolute().resolve()


def _check_outputs(outputs, inputs) -> None:
    """Refuse a first output that is not a .nii / .nii.gz name, outputs whose folder does not exist, and outputs
    that would overwrite an input (the others are files named after the first)."""
    if not Path(outputs[0]).name.endswith((".nii", ".nii.gz")):
        raise UserError(f"Output {outputs[0]} must be a .nii or .nii.gz file.")
    for output in map(Path, outputs):
        if not output.parent.is_dir():
            raise UserError(f"The folder of output {output} does not exist.")
        for given in inputs:
            if given is not None and _same_file(output, given):
                raise UserError(f"Output {output} would overwrite the input {given}; choose another --output.")


def _beside(output, suffix: str, extension: Optional[str] = None) -> Path:
    """OUT.nii.gz -> OUT<suffix>.nii.gz (or OUT<suffix><extension>)."""
    output = Path(output)
    stem, ext = (output.name[:-7], ".nii.gz") if output.name.endswith(".nii.gz") else (output.stem, output.suffix)
    return output.with_name(stem + suffix + (ext if extension is None else extension))


def _read_mask(path, what: str, input_path, shape) -> np.ndarray:
    """A mask NIfTI that must lie on the input's grid, as a canonical bool volume."""
    mask, _ = data.load_volume(path)
    if mask.shape != tuple(shape) or not np.allclose(data.canonical_affine(path), data.canonical_affine(input_path),
                                                     atol=1e-3):
        raise UserError(f"The {what} {path} (shape {mask.shape}) is not on the grid of the input {input_path} "
                        f"(shape {tuple(shape)}); give a mask with the input's shape and affine.")
    return mask > 0


def _slice_mask(mask: np.ndarray, zooms, geometry: data.SliceGeometry) -> np.ndarray:
    """A canonical bool volume sliced like the input: (n, S, S) bool, a pixel in when most of it is."""
    sliced, _ = data.volume_slices(mask.astype(np.float32), zooms, geometry.plane, geometry.image_size,
                                   geometry.indices, normalise=False)
    return sliced >= MASK_LEVEL


def prepare_volume(path, cfg: Config, brain_mask_path=None, with_brain: bool = True) -> PreparedVolume:
    """Read a NIfTI volume and prepare every slice along the run's plane as the run's training did.

    The brain mask is the NIfTI `brain_mask_path` (on the input's grid) or computed by data.brain_mask; it is
    only made when `with_brain` or the run was trained skull-stripped (else `brain` is None).
    """
    volume, zooms = data.load_volume(path)
    mask = None
    if brain_mask_path is not None:
        mask = _read_mask(brain_mask_path, "brain mask", path, volume.shape)
    elif with_brain or cfg.skull_strip:
        mask = data.brain_mask(volume, zooms)
    if cfg.skull_strip:
        volume = data.skull_strip(volume, mask)
    slices, geometry = data.volume_slices(volume, zooms, cfg.plane, cfg.image_size)
    brain = None if mask is None else _slice_mask(mask, zooms, geometry)
    return PreparedVolume(slices=slices, geometry=geometry, brain=brain,
                          canonical_shape=volume.shape, zooms=zooms,
                          affine=data.model_grid_affine(geometry, data.canonical_affine(path)))


def _write(slices: np.ndarray, prepared: PreparedVolume, output, input_path, resample_to_input: bool) -> None:
    """Write (n, S, S) slices as a float32 NIfTI on the model grid, or resampled onto the input file's grid."""
    volume = data.slices_to_volume(slices, prepared.geometry).astype(np.float32)
    image = nib.Nifti1Image(volume, prepared.affine)
    image.header.set_xyzt_units("mm")
    if resample_to_input:
        original = nib.load(str(input_path))
        image = nibabel.processing.resample_from_to(image, (original.shape[:3], original.affine), order=1,
                                                    mode="nearest")
    image.to_filename(str(output))


def _corrupt(slices: np.ndarray, spec: str, seed: int) -> np.ndarray:
    """Each slice corrupted by the policy `spec` with its own key (seed, slice index)."""
    policy = train.parse_policy(spec, "--corrupt")
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), jnp.arange(len(slices)))
    corrupt = jax.jit(jax.vmap(lambda k, x: corruptions.corrupt_image(k, x, policy)[0]))
    return np.asarray(corrupt(keys, jnp.asarray(slices[..., None])))[..., 0]


# ------------------------------------------------------------------------------------------- the three jobs

def reconstruct(run, input_path, output_path, *, checkpoint: str = "best", resample_to_input: bool = False,
                corrupt: Optional[str] = None, seed: Optional[int] = None) -> dict:
    """Reconstruct every slice of a NIfTI volume with a run (a workdir or a Predictor) and write it.

    With `corrupt` (a corruption policy such as "gibbs" or "patch+ghost") each prepared slice is corrupted first
    (key: seed, default the run's, and the slice index) and the corrupted input is written beside the output as
    OUT_corrupted.nii.gz. Returns a summary of what was written.
    """
    outputs = [output_path] + ([_beside(output_path, "_corrupted")] if corrupt else [])
    _check_outputs(outputs, [input_path])
    predictor = load_predictor(run, checkpoint)
    prepared = prepare_volume(input_path, predictor.cfg, with_brain=False)
    inputs = prepared.slices
    if corrupt:
        inputs = _corrupt(inputs, corrupt, predictor.cfg.seed if seed is None else seed)
        _write(data.to_input_units(inputs, prepared.geometry), prepared, outputs[1], input_path, resample_to_input)
    reconstructed = predict(predictor, inputs)
    _write(data.to_input_units(reconstructed, prepared.geometry), prepared, output_path, input_path,
           resample_to_input)
    return {"outputs": [str(p) for p in outputs], "model": predictor.source, "slices": len(inputs),
            "grid": "input" if resample_to_input else f"model ({predictor.cfg.image_size} px in-plane)",
            "units": "input intensity units (per-slice min-max undone)"}


def detect(run, input_path, output_path, *, checkpoint: str = "best", brain_mask_path=None, lesion_mask_path=None,
           residual: str = "abs", resample_to_input: bool = False) -> dict:
    """Write the anomaly map of a NIfTI volume; with a lesion mask also score it (written to OUT.json).

    The brain mask is `brain_mask_path` (a NIfTI on the input's grid) or computed (data.brain_mask). Scores are
    pooled over the brain-mask pixels of the model's grid. Returns the summary that is written as JSON.
    """
    json_path = _beside(output_path, "", ".json")
    _check_outputs([output_path] + ([json_path] if lesion_mask_path else []),
                   [input_path, brain_mask_path, lesion_mask_path])
    _check_residual(residual)
    predictor = load_predictor(run, checkpoint)
    prepared = prepare_volume(input_path, predictor.cfg, brain_mask_path)
    amap = anomaly_map(prepared.slices, predict(predictor, prepared.slices), prepared.brain, residual)
    _write(amap, prepared, output_path, input_path, resample_to_input)
    summary = {"output": str(output_path), "input": str(input_path), "model": predictor.source,
               "residual": residual, "brain_mask": str(brain_mask_path) if brain_mask_path else "computed",
               "brain_pixels": int(prepared.brain.sum()), "units": "normalised residual (slice range = 1)"}
    if lesion_mask_path is not None:
        lesion = _read_mask(lesion_mask_path, "lesion mask", input_path, prepared.canonical_shape)
        truth = _slice_mask(lesion, prepared.zooms, prepared.geometry)
        summary["lesion_mask"] = str(lesion_mask_path)
        summary["scores_over"] = "brain-mask pixels of the model grid"
        summary.update(metrics.detection_scores(amap[prepared.brain], truth[prepared.brain]))
        threshold = _validation_threshold(predictor, residual)
        if threshold is not None:
            summary["val_threshold"] = threshold
            summary["dice_at_val_threshold"] = metrics.dice_at(amap[prepared.brain], truth[prepared.brain], threshold)
        json_path.write_text(json.dumps(_finite(summary), indent=2))
    return summary


def _validation_threshold(predictor: Predictor, residual: str) -> Optional[float]:
    """The best-Dice threshold for synthetic lesions (blobs) that detect_eval chose on the run's validation
    subjects with the same residual, or None when detect_eval has not been run."""
    path = None if predictor.workdir is None else predictor.workdir / DETECT_DIR / "metrics.json"
    if path is None or not path.is_file():
        return None
    results = json.loads(path.read_text())
    if results.get("residual") != residual or results.get("model") != predictor.source:
        return None
    return results["kinds"]["blob"]["best_threshold"]


def _finite(tree):
    """NaN and inf -> None, so the JSON is valid."""
    if isinstance(tree, dict):
        return {k: _finite(v) for k, v in tree.items()}
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def _anomaly_generator(kind: str):
    """(key, image, brain) -> (anomalous image, true mask), batched and jitted."""
    if kind == "patch":
        def one(key, image, brain):
            del brain
            return corruptions.line_patch(key, image)
    else:
        one = corruptions.lesion_blob
    return jax.jit(jax.vmap(one))


def _evaluation_subjects(workdir: Path, readers, max_subjects: Optional[int]):
    """The run's validation subjects found among the readers (else every subject it did not train on)."""
    split_path = workdir / "split.json"
    if not split_path.is_file():
        raise UserError(f"{workdir} holds no split.json; train the run there first.")
    split = json.loads(split_path.read_text())
    chosen = [(s, r) for s, r in readers if s in set(split["val_subjects"])]
    if not chosen:
        chosen = [(s, r) for s, r in readers if s not in set(split["train_subjects"])]
    if not chosen:
        raise UserError(f"Every subject of the data was used to train the run in {workdir}; nothing to evaluate.")
    if max_subjects is not None and max_subjects < 1:
        raise UserError(f"--max_subjects must be at least 1, got {max_subjects}.")
    return chosen[:max_subjects]


def detect_eval(workdir, data_dir: Optional[str] = None, *, checkpoint: str = "best",
                max_subjects: Optional[int] = None, residual: str = "abs", seed: Optional[int] = None) -> dict:
    """Insert synthetic anomalies into held-out subjects, detect them, and write WORKDIR/detect/metrics.json.

    Subjects: the run's validation subjects in `data_dir` (default: the run's data), else every subject the run
    did not train on; at most `max_subjects`. Each is prepared as the run was trained (its plane, slab, size,
    skull stripping), with a computed brain mask. Every slice gets one anomaly of each kind (ANOMALY_KINDS,
    separately). Per kind and overall: AUROC, AUPRC and the best Dice with its threshold, chosen on these
    validation subjects, pooled over all their brain pixels; per subject the same and the Dice at that threshold.
    Also writes WORKDIR/detect/cases.png. Returns the metrics.
    """
    workdir = Path(workdir)
    _check_residual(residual)
    predictor = load_predictor(workdir, checkpoint)
    cfg = predictor.cfg
    seed = cfg.seed if seed is None else seed
    subjects = _evaluation_subjects(workdir, data.volume_readers(data_dir or cfg.data_dir), max_subjects)
    axis = data.PLANE_AXES[cfg.plane]
    clean, brain, owner = [], [], []
    for index, (_, read) in enumerate(subjects):
        volume, zooms = read()
        mask = data.brain_mask(volume, zooms)
        if cfg.skull_strip:
            volume = data.skull_strip(volume, mask)
        indices = data.slab_indices(volume.shape[axis], zooms[axis], cfg.slices, cfg.slab_mm)
        slices, geometry = data.volume_slices(volume, zooms, cfg.plane, cfg.image_size, indices)
        clean.append(slices)
        brain.append(_slice_mask(mask, zooms, geometry))
        owner.append(np.full(len(slices), index))
    clean, brain, owner = np.concatenate(clean), np.concatenate(brain), np.concatenate(owner)

    base_key = jax.random.key(seed)
    cases, pooled = {}, {"maps": [], "truths": []}
    for kind_index, kind in enumerate(ANOMALY_KINDS):
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.fold_in(base_key, kind_index),
                                                                 jnp.arange(len(clean)))
        anomalous, truth = _anomaly_generator(kind)(keys, jnp.asarray(clean[..., None]),
                                                    jnp.asarray(brain[..., None]))
        anomalous, truth = np.asarray(anomalous)[..., 0], (np.asarray(truth)[..., 0] > 0) & brain
        reconstructed = predict(predictor, anomalous)
        amap = anomaly_map(anomalous, reconstructed, brain, residual)
        cases[kind] = (anomalous, reconstructed, amap, truth)
        pooled["maps"].append(amap[brain])
        pooled["truths"].append(truth[brain])

    def scores_of(maps, truths, threshold=None):
        out = metrics.detection_scores(maps, truths)
        if threshold is not None:
            out["dice_at_val_threshold"] = metrics.dice_at(maps, truths, threshold)
        return out

    results = {"model": predictor.source, "residual": residual, "subjects": [s for s, _ in subjects],
               "slices_per_kind": int(len(clean)), "seed": seed, "image_size": cfg.image_size, "plane": cfg.plane,
               "slab": {"slices": cfg.slices, "slab_mm": cfg.slab_mm}, "skull_strip": cfg.skull_strip,
               "brain_mask": "computed (data.brain_mask)", "scores_over": "brain-mask pixels, pooled",
               "kinds": {}, "per_subject": {}}
    for kind in ANOMALY_KINDS:
        _, _, amap, truth = cases[kind]
        results["kinds"][kind] = scores_of(amap[brain], truth[brain])
    results["overall"] = scores_of(np.concatenate(pooled["maps"]), np.concatenate(pooled["truths"]))
    for index, (subject, _) in enumerate(subjects):
        here = brain & (owner == index)[:, None, None]
        results["per_subject"][subject] = {
            kind: scores_of(cases[kind][2][here], cases[kind][3][here], results["kinds"][kind]["best_threshold"])
            for kind in ANOMALY_KINDS}

    out_dir = workdir / DETECT_DIR
    out_dir.mkdir(exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(_finite(results), indent=2))
    _save_cases(out_dir / "cases.png", cases, owner, [s for s, _ in subjects])
    return results


def _save_cases(path, cases, owner, subjects) -> None:
    """The central slice of the first subjects, one row per (kind, subject)."""
    rows, labels = [], []
    for kind, (anomalous, reconstructed, amap, truth) in cases.items():
        for index in range(min(FIGURE_CASES_PER_KIND, len(subjects))):
            slices = np.flatnonzero(owner == index)
            i = slices[len(slices) // 2]
            rows.append((anomalous[i], reconstructed[i], amap[i], truth[i]))
            labels.append(f"{kind}: {subjects[index]}")
    plots.save_detection_grid(path, *(np.stack(column) for column in zip(*rows)), row_labels=labels)

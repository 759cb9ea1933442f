"""Whole volumes in, whole volumes out: reconstruct a NIfTI with a trained run, map anomalies, score them.

A volume is read in canonical RAS and prepared by ``data.prepare.prepare_volume``, exactly as the run's training
prepared its slices (skull stripping, plane, square field of view, model grid) but along every slice. Each slice
is normalised by ``data.normalise.normalise_input`` (as training normalises its corrupted slices), reconstructed
in batches, mapped back by the same affine into the input's intensity units, and put back into a volume on the
model's grid whose affine (``geometry.model_grid_affine``) places it in scanner space. With
``resample_to_input`` the result is resampled (trilinear) onto the input file's own grid, array order and affine.

An anomaly map is a score of the run's (Config.scores): the residual between the normalised input and its
reconstruction, or the inpainting error of each pixel when it was hidden (absolute, or the positive or negative
part: Config.residual), median-filtered in-plane (Config.median_px) and set to 0 outside the brain mask eroded by a
pixel, in the model's normalised units.
Detection scores (pixel-level AUROC, AUPRC as average precision, best Dice and its threshold) are pooled over the
brain-mask pixels of the model's grid (Baur et al. 2021; Kascenas et al. 2022); for a run with --preprocess=brain,
a volume's maps go back to its own canonical grid through the inverse registration and are scored over its brain
voxels there (:class:`ScoringGrid`), against its lesion mask as given.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import nibabel as nib
import nibabel.processing
import numpy as np
import scipy.ndimage
from absl import logging

from mrirecon_jax import corruptions, metrics, plots, train
from mrirecon_jax.config import RESIDUALS, Config, UserError
from mrirecon_jax.data import dataset as dataset_lib
from mrirecon_jax.data import geometry, normalise, volumes
from mrirecon_jax.data.prepare import PreparedVolume, prepare_volume
from mrirecon_jax.workdir import DETECT_DIR, Workdir, write_atomically, write_json

MEDIAN_FILTER_PX = Config().median_px  # in-plane median filter of the maps, in model pixels: the run's default
ANOMALY_KINDS = ("patch", "blob")  # detect_eval: the thesis's line patch, and corruptions.lesion_blob
FIGURE_CASES_PER_KIND = 2
HIDDEN_LEVEL = 0.25  # reconstruct's --mask: a model pixel is hidden when at least this much of it is


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A run's configuration and its model as a function of normalised (N, S, S, 1) slices."""

    cfg: Config
    apply: Callable  # normalised input batch (, hidden-pixel masks: a model with cfg.mask_input) -> output, same frame
    source: str = ""  # where the model came from (workdir and step), recorded in the outputs
    workdir: Optional[Path] = None  # the run's workdir, when loaded from one


@dataclasses.dataclass(frozen=True)
class DetectionSettings:
    """How anomaly maps are made (Config.scores, residual, median_px): each None takes the run's own value."""

    scores: Optional[str] = None  # comma-separated names of SCORES and COMBINED
    residual: Optional[str] = None  # a name of RESIDUALS
    median_px: Optional[int] = None
    normative: Optional[bool] = None  # maps as z-scores against healthy subjects at the same template pixel

    def of_run(self, cfg: Config) -> "DetectionSettings":
        """These settings with the run's own values where none was given; checked."""
        settings = DetectionSettings(*(cfg_value if value is None else value for value, cfg_value in
                                       ((self.scores, cfg.scores), (self.residual, cfg.residual),
                                        (self.median_px, cfg.median_px), (self.normative, cfg.normative))))
        check_scores(settings.scores.split(","))
        _check_residual(settings.residual)
        if settings.median_px < 1:
            raise UserError(f"--median_px must be at least 1, got {settings.median_px}.")
        if settings.normative and cfg.preprocess != "brain":
            raise UserError("--normative compares each template pixel with healthy subjects; it needs a run trained "
                            "with --preprocess=brain.")
        return settings

    @property
    def names(self) -> tuple[str, ...]:
        """The scores, combined last."""
        return check_scores(self.scores.split(","))

    def record(self) -> dict:
        return {"scores": list(self.names), "residual": self.residual, "median_px": self.median_px,
                "normative": bool(self.normative)}


def load_predictor(run: Union[Predictor, str, os.PathLike], checkpoint: str = "best") -> Predictor:
    """The model of the run in workdir `run` at `checkpoint` (best, last or a step); a Predictor is returned as is."""
    if isinstance(run, Predictor):
        return run
    trained = train.restore_model(run, checkpoint)
    return Predictor(cfg=trained.cfg, apply=trained.apply, source=trained.source, workdir=Path(run))


_normalise_input = jax.jit(normalise.normalise_input)


@dataclasses.dataclass(frozen=True, eq=False)
class Prediction:
    """A model's reconstruction of (n, S, S) slices: in their own units, and both sides in the model's frame."""

    reconstruction: np.ndarray  # in the input's intensity units
    inputs: np.ndarray  # the normalised inputs
    outputs: np.ndarray  # the model's outputs, in the normalised frame


def _padded_batch(chunk: np.ndarray, size: int) -> jax.Array:
    """(size, S, S, 1) float32: the chunk's slices, its last slice repeated to fill the batch."""
    padded = np.repeat(chunk[-1:], size, axis=0)
    padded[:len(chunk)] = chunk
    return jnp.asarray(padded[..., None], jnp.float32)


def predict(predictor: Predictor, slices: np.ndarray, masks: Optional[np.ndarray] = None) -> Prediction:
    """Reconstruct (n, S, S) slices in batches of the run's eval_batch_size (the last one padded); a model with a
    mask channel is told the (n, S, S) `masks` of the hidden pixels (nothing hidden when None; other models
    ignore them)."""
    size = min(predictor.cfg.eval_batch_size, len(slices))
    told = masks is not None and bool(predictor.cfg.mask_input)
    parts = {"reconstruction": [], "inputs": [], "outputs": []}
    for start in range(0, len(slices), size):
        chunk = slices[start:start + size]
        x, offset, scale = _normalise_input(_padded_batch(chunk, size))
        if told:
            y = predictor.apply(x, _padded_batch(masks[start:start + size], size))
        else:
            y = predictor.apply(x)
        reconstruction = normalise.denormalise(y, offset, scale, predictor.cfg.nonnegative)
        for name, array in (("reconstruction", reconstruction), ("inputs", x), ("outputs", y)):
            parts[name].append(np.asarray(array, np.float32)[:len(chunk), ..., 0])
    return Prediction(**{name: np.concatenate(arrays) for name, arrays in parts.items()})


def _check_residual(residual: str) -> None:
    if residual not in RESIDUALS:
        raise UserError(f"--residual={residual} is not one of {', '.join(RESIDUALS)}.")


def signed_residual(difference: np.ndarray, residual: str) -> np.ndarray:
    """input - reconstruction as the residual asks: abs, or its pos (brighter than expected) or neg part."""
    _check_residual(residual)
    return {"abs": np.abs, "pos": lambda d: np.maximum(d, 0.0), "neg": lambda d: np.maximum(-d, 0.0)}[residual](
        difference)


def postprocess(value: np.ndarray, brain: np.ndarray, erode_px: int = 0, median_px: int = MEDIAN_FILTER_PX
                ) -> np.ndarray:
    """(n, H, W) map median-filtered in-plane over `median_px` pixels, 0 outside the brain mask eroded in-plane by
    `erode_px` pixels (the brain's rim, where every model errs, is not called anomalous)."""
    if median_px < 1:
        raise UserError(f"--median_px must be at least 1, got {median_px}.")
    filtered = scipy.ndimage.median_filter(value, size=(1, median_px, median_px))
    return np.where(eroded(brain, erode_px), filtered, 0.0).astype(np.float32)


def eroded(brain: np.ndarray, erode_px: int) -> np.ndarray:
    """(n, H, W) brain masks eroded in-plane by `erode_px` pixels."""
    if not erode_px:
        return brain
    return scipy.ndimage.binary_erosion(brain, np.ones((1, 2 * erode_px + 1, 2 * erode_px + 1), bool))


# ------------------------------------------------------------------------------------------- volumes and files

def _same_file(a, b) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.absolute().resolve() == b.absolute().resolve()


def _check_outputs(outputs, inputs) -> None:
    """Refuse a first output that is not a .nii / .nii.gz name, outputs whose folder does not exist, and outputs
    that would overwrite an input (the others are files named after the first)."""
    if not Path(outputs[0]).name.endswith(volumes.NIFTI_SUFFIXES):
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
    mask, _ = volumes.load_volume(path, mask=True)
    if mask.shape != tuple(shape) or not np.allclose(volumes.canonical_affine(path),
                                                     volumes.canonical_affine(input_path), atol=1e-3):
        raise UserError(f"The {what} {path} (shape {mask.shape}) is not on the grid of the input {input_path} "
                        f"(shape {tuple(shape)}); give a mask with the input's shape and affine.")
    return mask > 0


def _write(slices: np.ndarray, prepared: PreparedVolume, output, input_path, resample_to_input: bool) -> None:
    """Write (n, S, S) slices as a float32 NIfTI on the model grid (in MNI152 template space when aligned), or
    resampled onto the input file's grid (when aligned, through the inverse registration onto its canonical grid,
    then reoriented as the file is); atomically, so a failure leaves no partial file."""
    if prepared.aligned is not None and resample_to_input:
        image = nib.Nifti1Image(prepared.to_input(slices), volumes.canonical_affine(input_path))
    else:
        affine = geometry.model_grid_affine(prepared.geometry, volumes.canonical_affine(input_path)
                                            if prepared.aligned is None else prepared.aligned.affine)
        image = nib.Nifti1Image(geometry.slices_to_volume(slices, prepared.geometry).astype(np.float32), affine)
    image.header.set_xyzt_units("mm")
    if resample_to_input:
        original = nib.load(str(input_path))
        image = nibabel.processing.resample_from_to(image, (original.shape[:3], original.affine), order=1,
                                                    mode="nearest")
    write_atomically(output, image.to_filename)


@dataclasses.dataclass(frozen=True, eq=False)
class ScoringGrid:
    """Where a volume's lesion scores are pooled: with --preprocess=brain the volume's own canonical grid (model-grid
    maps brought back through the inverse registration, the lesion mask as given), else the model grid."""

    prepared: PreparedVolume
    brain: np.ndarray  # bool, on this grid
    voxel_mm3: float
    min_component_voxels: int  # segment()'s minimum: MIN_COMPONENT_VOXELS model-grid voxels, in mm^3

    @property
    def on_input(self) -> bool:
        return self.prepared.aligned is not None

    def map(self, amap: np.ndarray) -> np.ndarray:
        """A model-grid (n, S, S) map on this grid."""
        return self.prepared.to_input(amap) if self.on_input else amap

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """A bool mask on the input's canonical grid, on this grid."""
        return np.asarray(mask, bool) if self.on_input else self.prepared.on_grid(mask)

    def scores(self, amap: np.ndarray, lesion: np.ndarray, threshold: float) -> dict:
        """AUROC, AUPRC and best Dice of a model-grid map over this grid's brain, against a lesion mask on the
        input's grid; and the Dice of its segmentation at `threshold` (small components dropped)."""
        values, truth = self.map(amap), self.mask(lesion)
        scores = metrics.detection_scores(values[self.brain], truth[self.brain])
        segmented = segment(values, threshold, self.min_component_voxels)
        scores["dice_at_healthy_threshold"] = metrics.dice_at(segmented[self.brain], truth[self.brain], 0.5)
        return scores

    def describe(self) -> dict:
        """What lesions.json records of the grid."""
        return {"grid": "input (canonical orientation)" if self.on_input else "model", "shape": list(self.brain.shape),
                "voxel_mm3": self.voxel_mm3, "brain_voxels": int(self.brain.sum()),
                "min_component_voxels": self.min_component_voxels}


def scoring_grid(prepared: PreparedVolume, volume: np.ndarray, brain_mask: Optional[np.ndarray] = None
                 ) -> ScoringGrid:
    """The grid a prepared `volume` (canonical, as read) is scored on. Aligned: its brain is the template's brought
    back, for a skull-stripped input only its non-background voxels (Aligned.input_brain), within `brain_mask` when
    one is given; otherwise the model grid and the prepared brain mask."""
    model_mm3 = float(abs(np.linalg.det(geometry.model_grid_affine(prepared.geometry,
                                                                   np.diag([*prepared.zooms, 1.0]))[:3, :3])))
    if prepared.aligned is None:
        brain, voxel_mm3 = prepared.brain, model_mm3
    else:
        brain = prepared.aligned.input_brain(volume)
        if brain_mask is not None:
            brain &= brain_mask
        voxel_mm3 = float(np.prod(prepared.aligned.input_zooms))
    return ScoringGrid(prepared=prepared, brain=brain, voxel_mm3=voxel_mm3,
                       min_component_voxels=max(1, round(MIN_COMPONENT_VOXELS * model_mm3 / voxel_mm3)))


def _corrupt(slices: np.ndarray, spec: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each slice corrupted by the policy `spec` with its own key (seed, slice index), in the slices' own units
    (corrupted in the per-slice min-max frame that training corrupts in, then mapped back), and the (n, S, S)
    masks of the pixels its patch hid."""
    policy = train.parse_policy(spec, "--corrupt")
    low, span = normalise.minmax_affine(slices)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), jnp.arange(len(slices)))
    corrupt = jax.jit(jax.vmap(lambda k, x: corruptions.corrupt_image(k, x, policy)[:2]))
    corrupted, masks = (np.asarray(a)[..., 0] for a in corrupt(keys, jnp.asarray(((slices - low) / span)[..., None])))
    return corrupted * span + low, masks > 0


# ------------------------------------------------------------------------------------------- the three jobs

def reconstruct(run, input_path, output_path, *, checkpoint: str = "best", resample_to_input: bool = False,
                corrupt: Optional[str] = None, seed: Optional[int] = None, mask_path=None) -> dict:
    """Reconstruct every slice of a NIfTI volume with a run (a workdir or a Predictor) and write it.

    With `corrupt` (a corruption policy such as "gibbs" or "patch+ghost") each prepared slice is corrupted first
    (key: seed, default the run's, and the slice index) and the corrupted input is written beside the output as
    OUT_corrupted.nii.gz. A run trained with --mask_input is told which pixels are hidden: those of `mask_path` (a
    NIfTI on the input's grid, non-zero where the image was blanked or painted over) and those `corrupt` patched.
    Returns a summary of what was written.
    """
    outputs = [output_path] + ([_beside(output_path, "_corrupted")] if corrupt else [])
    _check_outputs(outputs, [input_path, mask_path])
    if corrupt:
        train.parse_policy(corrupt, "--corrupt")
    predictor = load_predictor(run, checkpoint)
    if mask_path is not None and not predictor.cfg.mask_input:
        raise UserError(f"--mask tells a model which pixels are hidden, but {predictor.source or 'this model'} was "
                        "trained without a mask channel; train with --mask_input to use one.")
    volume, zooms = volumes.load_volume(input_path)
    prepared = prepare_volume(volume, zooms, predictor.cfg, whole_volume=True, name=f"NIfTI file {input_path}")
    inputs = prepared.slices
    hidden = None if mask_path is None else prepared.on_grid(
        _read_mask(mask_path, "mask", input_path, volume.shape), HIDDEN_LEVEL)
    if corrupt:
        inputs, patched = _corrupt(inputs, corrupt, predictor.cfg.seed if seed is None else seed)
        hidden = patched if hidden is None else hidden | patched
    if hidden is None and train.always_told_mask(predictor.cfg):
        raise UserError(f"{predictor.source or 'This model'} was trained always told the hidden pixels "
                        "(--mask_input=1); give them with --mask.")
    reconstruction = predict(predictor, inputs, hidden).reconstruction  # before any write: a failure leaves none
    if corrupt:
        _write(inputs, prepared, outputs[1], input_path, resample_to_input)
    _write(reconstruction, prepared, output_path, input_path, resample_to_input)
    return {"outputs": [str(p) for p in outputs], "model": predictor.source, "slices": len(inputs),
            "told_mask": hidden is not None and bool(predictor.cfg.mask_input),
            "grid": "input" if resample_to_input else f"model ({predictor.cfg.image_size} px in-plane)",
            "units": "input intensity units"}


def detect(run, input_path, output_path, *, checkpoint: str = "best", brain_mask_path=None, lesion_mask_path=None,
           settings: Optional[DetectionSettings] = None, resample_to_input: bool = False) -> dict:
    """Write the anomaly map of a NIfTI volume; with a lesion mask also score it (written to OUT.json).

    The map is the first of the run's scores (`settings` override them; combined is refused here: it needs the
    healthy thresholds of detect_eval), post-processed as detect_eval's; with normative calibration the healthy
    reference is computed from the run's validation subjects first. The brain mask is `brain_mask_path` (a NIfTI
    on the input's grid) or computed (data.brain.brain_mask). Scores are pooled over the brain-mask pixels of the model's grid, or, for an aligned run, over the brain voxels of the
    input's own grid (:func:`scoring_grid`). Returns the summary that is written as JSON.
    """
    json_path = _beside(output_path, "", ".json")
    _check_outputs([output_path] + ([json_path] if lesion_mask_path else []),
                   [input_path, brain_mask_path, lesion_mask_path])
    predictor = load_predictor(run, checkpoint)
    settings = (settings or DetectionSettings()).of_run(predictor.cfg)
    score = settings.names[0]
    if score == COMBINED:
        raise UserError("--scores=combined needs the healthy thresholds of detect_eval; detect writes one score's "
                        "map (residual or inpaint).")
    volume, zooms = volumes.load_volume(input_path)
    mask = None if brain_mask_path is None else _read_mask(brain_mask_path, "brain mask", input_path, volume.shape)
    prepared = prepare_volume(volume, zooms, predictor.cfg, whole_volume=True, brain=mask, with_brain=True,
                              name=f"NIfTI file {input_path}")
    reference = healthy_reference(predictor, settings, (score,)) if settings.normative else None
    amap = score_maps(predictor, prepared.slices, prepared.brain, (score,), settings.residual, reference,
                      settings.median_px)[score][0]
    _write(amap, prepared, output_path, input_path, resample_to_input)
    summary = {"output": str(output_path), "input": str(input_path), "model": predictor.source, "score": score,
               "residual": settings.residual, "median_px": settings.median_px, "normative": bool(settings.normative),
               "brain_mask": str(brain_mask_path) if brain_mask_path else "computed",
               "brain_pixels": int(prepared.brain.sum()),
               "units": "healthy spreads above the healthy mean" if settings.normative else "normalised residual"}
    if lesion_mask_path is not None:
        grid = scoring_grid(prepared, volume, mask)
        brain = grid.brain
        values = grid.map(amap)
        truth = grid.mask(_read_mask(lesion_mask_path, "lesion mask", input_path, volume.shape))
        summary["lesion_mask"] = str(lesion_mask_path)
        summary["scores_over"] = _scores_over(grid.on_input, "the input")
        summary["grid"] = grid.describe()
        summary.update(metrics.detection_scores(values[brain], truth[brain]))
        threshold = (reference.thresholds[score] if reference is not None
                     else _validation_threshold(predictor, score, settings))
        if threshold is not None:
            summary["val_threshold"] = threshold
            summary["dice_at_val_threshold"] = metrics.dice_at(values[brain], truth[brain], threshold)
        write_json(json_path, summary)
    return summary


def _validation_threshold(predictor: Predictor, score: str, settings: DetectionSettings) -> Optional[float]:
    """The best-Dice threshold for synthetic lesions (blobs) that detect_eval chose for `score` on the run's
    validation subjects with the same residual and filter, or None when detect_eval has not been run so."""
    results = None if predictor.workdir is None else Workdir(predictor.workdir).read_detection()
    if (results is None or results.get("model") != predictor.source or score not in results.get("scores", {})
            or results.get("residual") != settings.residual or results.get("median_px") != settings.median_px):
        return None
    return results["scores"][score]["kinds"]["blob"]["best_threshold"]


def _anomaly_generator(kind: str):
    """(key, image, brain) -> (anomalous image, true mask), batched and jitted."""
    if kind == "patch":
        def one(key, image, brain):
            del brain
            return corruptions.line_patch(key, image)
    else:
        one = corruptions.lesion_blob
    return jax.jit(jax.vmap(one))


def _evaluation_subjects(work: Workdir, readers, max_subjects: Optional[int]):
    """The run's validation subjects found among the readers (else every subject it did not train on)."""
    split = work.read_split()
    chosen = [(s, r) for s, r in readers if s in set(split["val_subjects"])]
    if not chosen:
        chosen = [(s, r) for s, r in readers if s not in set(split["train_subjects"])]
    if not chosen:
        raise UserError(f"Every subject of the data was used to train the run in {work}; nothing to evaluate.")
    if max_subjects is not None and max_subjects < 1:
        raise UserError(f"--max_subjects must be at least 1, got {max_subjects}.")
    return chosen[:max_subjects]


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticCases:
    """Held-out slices, each given one synthetic anomaly of every kind in turn (ANOMALY_KINDS)."""

    subjects: list[str]
    clean: np.ndarray  # (n, S, S) clean slices in [0, 1]
    brain: np.ndarray  # (n, S, S) bool brain masks
    owner: np.ndarray  # (n,) index into subjects
    anomalous: dict  # kind -> (n, S, S) slices with the anomaly
    truth: dict  # kind -> (n, S, S) bool, the anomaly's extent inside the brain


def synthetic_cases(cfg: Config, subjects, seed: int) -> SyntheticCases:
    """Prepare each (subject, reader) as `cfg` validates (with a computed brain mask; an unusable file is skipped
    with a warning) and insert the anomalies, each slice with its own key (seed, kind, slice index)."""
    clean, brain, owner, kept = [], [], [], []
    for subject, read in subjects:
        try:
            prepared = prepare_volume(*read(), cfg.for_validation(), with_brain=True, name=read.name)
        except volumes.BadVolume as bad:
            logging.warning("Skipping a file: %s", bad)
            continue
        clean.append(prepared.clean()[..., 0])
        brain.append(prepared.brain)
        owner.append(np.full(len(prepared.slices), len(kept)))
        kept.append(subject)
    if not kept:
        raise UserError(f"None of the {len(subjects)} files to evaluate is usable; the warnings above say why.")
    clean, brain, owner = np.concatenate(clean), np.concatenate(brain), np.concatenate(owner)
    anomalous, truth = {}, {}
    for kind_index, kind in enumerate(ANOMALY_KINDS):
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.fold_in(jax.random.key(seed), kind_index),
                                                                 jnp.arange(len(clean)))
        images, masks = _anomaly_generator(kind)(keys, jnp.asarray(clean[..., None]), jnp.asarray(brain[..., None]))
        anomalous[kind], truth[kind] = np.asarray(images)[..., 0], (np.asarray(masks)[..., 0] > 0) & brain
    return SyntheticCases(subjects=kept, clean=clean, brain=brain, owner=owner,
                          anomalous=anomalous, truth=truth)


def score_cases(predictor: Predictor, cases: SyntheticCases, score: str = "residual", residual: str = "abs",
                median_px: int = MEDIAN_FILTER_PX) -> tuple[dict, dict]:
    """(scores, maps) of one anomaly score (residual or inpaint, see :func:`score_maps`): per kind and overall
    AUROC, AUPRC and the best Dice with its threshold, pooled over the brain pixels of every case that the
    post-processing keeps (the brain eroded by ERODE_PX: an anomaly inserted on the rim is not counted); per subject
    the same and the Dice at the pooled threshold. `maps` holds each kind's (anomalous, model output, map, truth)."""
    maps, results = {}, {"kinds": {}, "per_subject": {}}
    brain = eroded(cases.brain, ERODE_PX)
    for kind in ANOMALY_KINDS:
        amap, made = score_maps(predictor, cases.anomalous[kind], cases.brain, (score,), residual,
                                median_px=median_px)[score]
        maps[kind] = (cases.anomalous[kind], made, amap, cases.truth[kind])
        results["kinds"][kind] = metrics.detection_scores(amap[brain], cases.truth[kind][brain])
    results["overall"] = metrics.detection_scores(np.concatenate([maps[k][2][brain] for k in ANOMALY_KINDS]),
                                                  np.concatenate([maps[k][3][brain] for k in ANOMALY_KINDS]))
    for index, subject in enumerate(cases.subjects):
        here = brain & (cases.owner == index)[:, None, None]
        results["per_subject"][subject] = {}
        for kind in ANOMALY_KINDS:
            amap, truth = maps[kind][2][here], maps[kind][3][here]
            scores = metrics.detection_scores(amap, truth)
            scores["dice_at_val_threshold"] = metrics.dice_at(amap, truth, results["kinds"][kind]["best_threshold"])
            results["per_subject"][subject][kind] = scores
    return results, maps


def detect_eval(workdir, data_dir: Optional[str] = None, *, checkpoint: str = "best",
                max_subjects: Optional[int] = None, settings: Optional[DetectionSettings] = None,
                seed: Optional[int] = None) -> dict:
    """Insert synthetic anomalies into held-out subjects, detect them, and write WORKDIR/detect/metrics.json.

    Subjects: the run's validation subjects in `data_dir` (default: the run's data), else every subject the run
    did not train on; at most `max_subjects`. Scores: every one of the run's scores but combined (`settings`
    override them), each as :func:`score_cases` gives it under "scores"; the thresholds are chosen on these
    validation subjects. Also writes WORKDIR/detect/cases.png (the first score's maps).
    """
    work = Workdir(workdir)
    predictor = load_predictor(workdir, checkpoint)
    cfg = predictor.cfg
    settings = (settings or DetectionSettings()).of_run(cfg)
    seed = cfg.seed if seed is None else seed
    readers, _, _ = dataset_lib.volume_readers(data_dir or cfg.data_dir)
    cases = synthetic_cases(cfg, _evaluation_subjects(work, readers, max_subjects), seed)
    measured = cfg.for_validation()
    scores, figure_maps = {}, None
    for score in (s for s in settings.names if s != COMBINED):
        scores[score], maps = score_cases(predictor, cases, score, settings.residual, settings.median_px)
        figure_maps = figure_maps or maps
    results = {"model": predictor.source, **settings.record(), "subjects": cases.subjects,
               "slices_per_kind": int(len(cases.clean)), "seed": seed, "image_size": cfg.image_size,
               "plane": cfg.plane, "slab": {"slices": measured.slices, "slab_mm": measured.slab_mm},
               "preprocess": cfg.preprocess, "brain_mask": "computed (data.brain.brain_mask)",
               "scores_over": "brain-mask pixels, pooled", "scores": scores}
    work.write_detection(results)
    _save_cases(work.figure(DETECT_DIR, "cases"), figure_maps, cases.owner, cases.subjects)
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


# ------------------------------------------------------------------------------------------- real lesions (issue 15)
# Anomaly scores of a run, thresholds calibrated on healthy validation subjects, and the benchmark on a folder of
# real lesion cases. Maps are computed on the model grid (template space with --preprocess=brain); they are scored,
# and the healthy thresholds calibrated, on the ScoringGrid: for aligned runs each volume's own grid, reached through
# the inverse of its registration, with the case's lesion mask as given.

SCORES = ("residual", "inpaint")  # residual: what the model changes in the unchanged input; inpaint: see below
COMBINED = "combined"  # the mean of the chosen scores, each divided by its healthy threshold
HEALTHY_FRACTION = 0.01  # the healthy threshold flags this fraction of healthy brain pixels
ERODE_PX = 1  # post-processing: the brain mask eroded by this many pixels in-plane
MIN_COMPONENT_VOXELS = 10  # post-processing: connected components (3-D) smaller than this are dropped
NORMATIVE_SMOOTH_PX = 1.5  # normative calibration: the healthy mean and spread are smoothed in-plane (Gaussian sigma)
NORMATIVE_FLOOR_PERCENTILE = 10  # ... and the spread raised by this percentile of its brain values
T1_NAMES = ("t1.nii.gz", "t1.nii")
MASK_NAMES = ("lesion_mask.nii.gz", "lesion_mask.nii")
_NOT_T1 = ("t1ce", "t1gd", "t1c_", "t1c.", "t1post")  # contrast-enhanced T1 of BraTS-like folders
_MASK_WORDS = ("seg", "mask", "label", "lesion")


def check_scores(scores) -> tuple[str, ...]:
    scores = tuple(scores or ("residual",))
    unknown = [s for s in scores if s not in SCORES + (COMBINED,)]
    if unknown or not scores:
        raise UserError(f"--scores={','.join(scores)} is not a list of {', '.join(SCORES + (COMBINED,))}.")
    return tuple(s for s in scores if s != COMBINED) + ((COMBINED,) if COMBINED in scores else ())


def _inpainted(predictor: Predictor, slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(difference, inpainting): every phase of the inpaint grid hidden in turn and inpainted; a pixel's difference
    is input - inpainting when it was hidden, in the frame normalise_input gives the whole slice."""
    height, width = slices.shape[1:]
    inpainting = np.zeros_like(slices, dtype=np.float32)
    for phase in range(corruptions.INPAINT_PHASES):
        hidden = np.asarray(corruptions.grid_mask(height, width, phase=phase))
        told = np.broadcast_to(hidden, slices.shape)
        inpainting[:, hidden] = predict(predictor, np.where(hidden, 0.0, slices), told).reconstruction[:, hidden]
    _, _, scale = _normalise_input(jnp.asarray(slices[..., None], jnp.float32))
    return (slices - inpainting) / np.asarray(scale)[..., 0], inpainting


def score_maps(predictor: Predictor, slices: np.ndarray, brain: np.ndarray, scores, residual: str = "abs",
               reference: Optional["HealthyReference"] = None, median_px: int = MEDIAN_FILTER_PX) -> dict:
    """score -> ((n, H, W) post-processed anomaly map, what the model made of the slices); with a `reference` that
    holds healthy pixel ranges the maps are calibrated against them; the combined map needs its parts' healthy
    thresholds (from `reference`)."""
    maps = {}
    for score in scores:
        if score == "residual":
            prediction = predict(predictor, slices)
            value = signed_residual(prediction.inputs - prediction.outputs, residual)
            maps[score] = (postprocess(value, brain, ERODE_PX, median_px), prediction.reconstruction)
        elif score == "inpaint":
            difference, inpainting = _inpainted(predictor, slices)
            maps[score] = (postprocess(signed_residual(difference, residual), brain, ERODE_PX, median_px), inpainting)
    if reference is not None:
        maps = {score: (reference.calibrated(score, amap), made) for score, (amap, made) in maps.items()}
    if COMBINED in scores:
        parts = [s for s in scores if s != COMBINED]
        maps[COMBINED] = (_combined(maps, reference.thresholds, parts), maps[parts[0]][1])
    return maps


def _combined(maps: dict, thresholds: dict, parts) -> np.ndarray:
    """The combined map: the mean of the parts' maps, each divided by its healthy threshold."""
    return np.mean([maps[s][0] / max(thresholds[s], 1e-12) for s in parts], axis=0)


def healthy_volumes(cfg: Config, max_subjects: Optional[int] = None):
    """(volume, prepared) for each file of the run's healthy validation subjects (at most `max_subjects` files),
    prepared as validation prepared them (with --preprocess=brain, registered in parallel when not yet cached)."""
    val_subjects = set(dataset_lib.load_dataset(cfg).val_subjects)
    readers, _, _ = dataset_lib.volume_readers(cfg.data_dir)
    reads = [read for subject, read in readers if subject in val_subjects][:max_subjects]
    dataset_lib.align_in_parallel(cfg, reads)
    for read in reads:
        volume, zooms = read()
        yield volume, prepare_volume(volume, zooms, cfg.for_validation(), with_brain=True, name=read.name)


@dataclasses.dataclass(frozen=True, eq=False)
class HealthyReference:
    """What a run's healthy validation subjects give its anomaly scores: per score the threshold that flags
    HEALTHY_FRACTION of their brain voxels and, with normative calibration, each model-grid pixel's mean and spread
    of the score over them (template space, the same pixels for every aligned volume)."""

    thresholds: dict  # score -> threshold on the scoring grid
    normal: dict  # score -> (mean, spread), each (n, S, S) on the model grid; empty without calibration

    def calibrated(self, score: str, amap: np.ndarray) -> np.ndarray:
        """A model-grid map as its excess over the healthy mean in units of the healthy spread, 0 where below the
        mean; unchanged without calibration."""
        if score not in self.normal:
            return amap
        mean, spread = self.normal[score]
        return np.maximum((amap - mean) / spread, 0.0).astype(np.float32)


def normal_range(maps: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, spread) per pixel of healthy subjects' model-grid maps (m, n, S, S): both smoothed in-plane by
    NORMATIVE_SMOOTH_PX, the spread raised by its NORMATIVE_FLOOR_PERCENTILE-th percentile over `brain` (a pixel
    that is always 0 in healthy subjects is not infinitely surprising)."""
    smooth = functools.partial(scipy.ndimage.gaussian_filter, sigma=(0, NORMATIVE_SMOOTH_PX, NORMATIVE_SMOOTH_PX))
    mean, spread = smooth(maps.mean(axis=0)), smooth(maps.std(axis=0))
    floor = max(float(np.percentile(spread[brain], NORMATIVE_FLOOR_PERCENTILE)), 1e-3 * float(spread.max()), 1e-12)
    return mean.astype(np.float32), (spread + floor).astype(np.float32)


def healthy_reference(predictor: Predictor, settings: DetectionSettings, scores=None,
                      max_subjects: Optional[int] = None) -> HealthyReference:
    """The HealthyReference of `settings` (of `scores`, default theirs) over at most `max_subjects` healthy
    validation subjects, on the grid that lesion cases are scored on (:func:`scoring_grid`: each subject's own grid
    for an aligned run). With normative calibration each subject's thresholds are taken on maps calibrated
    against the other subjects only (leave one out), as an unseen scan is."""
    scores = settings.names if scores is None else tuple(scores)
    parts = [s for s in scores if s != COMBINED]
    healthy = []
    for volume, prepared in healthy_volumes(predictor.cfg, max_subjects):
        maps = score_maps(predictor, prepared.clean()[..., 0], prepared.brain, parts, settings.residual,
                          median_px=settings.median_px)
        healthy.append((scoring_grid(prepared, volume), {s: maps[s][0] for s in parts}))
    brain = healthy[0][0].prepared.brain
    normal = {}
    if settings.normative:
        if len(healthy) < 3:
            raise UserError(f"--normative needs at least 3 healthy validation subjects, found {len(healthy)}.")
        stacks = {s: np.stack([maps[s] for _, maps in healthy]) for s in parts}
        normal = {s: normal_range(stack, brain) for s, stack in stacks.items()}
    values = {s: [] for s in parts}
    for index, (grid, maps) in enumerate(healthy):
        others = HealthyReference({}, {s: normal_range(np.delete(stacks[s], index, axis=0), brain)
                                       for s in parts} if normal else {})
        for s in parts:
            values[s].append(grid.map(others.calibrated(s, maps[s]))[grid.brain])
    pooled = {s: (np.concatenate(arrays), None) for s, arrays in values.items()}
    thresholds = {s: metrics.healthy_threshold(pooled[s][0], HEALTHY_FRACTION) for s in parts}
    if COMBINED in scores:  # the combined map is linear in its parts, so it is the same on either grid
        thresholds[COMBINED] = metrics.healthy_threshold(_combined(pooled, thresholds, parts), HEALTHY_FRACTION)
    return HealthyReference(thresholds, normal)


def _scores_over(on_input: bool, whose: str) -> str:
    """What the scores of `whose` volumes are pooled over, for the JSON outputs."""
    if on_input:
        return (f"brain voxels of {whose}'s own grid (canonical orientation): the maps brought back through the "
                "inverse registration, the template brain too (within the non-background voxels of a skull-stripped "
                "input)")
    return f"brain-mask pixels of the model grid of {whose}"


def segment(amap: np.ndarray, threshold: float, min_voxels: int = MIN_COMPONENT_VOXELS) -> np.ndarray:
    """The lesion segmentation of a map: (map >= threshold), 3-D components under `min_voxels` dropped."""
    binary = amap >= threshold
    labels, count = scipy.ndimage.label(binary, np.ones((3, 3, 3), bool))
    if count == 0:
        return binary
    sizes = np.bincount(labels.ravel())
    return (sizes >= min_voxels)[labels] & binary


def _pick(files, exact, accept, what: str, folder) -> Optional[Path]:
    named = [f for f in files if f.name.lower() in exact]
    if named:
        return named[0]
    chosen = [f for f in files if accept(f.name.lower())]
    if len(chosen) > 1:
        raise UserError(f"Case folder {folder} has {len(chosen)} files that could be its {what} "
                        f"({', '.join(f.name for f in chosen)}); name the one to use {exact[0]}.")
    return chosen[0] if chosen else None


def lesion_cases(folder) -> list[tuple[str, Path, Path]]:
    """(case name, T1, lesion mask) of every case in `folder`: the folder itself and each subfolder (not deeper).
    The T1 is t1.nii[.gz], else the one NIfTI whose name holds 't1' (not a contrast-enhanced t1ce/t1gd) and no
    mask word; the mask is lesion_mask.nii[.gz], else the one NIfTI whose name holds seg, mask, label or lesion.
    Other files (FLAIR, T2, ...) are ignored; a folder without both is not a case."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"--lesion_dir {folder} is not a folder.")
    cases = []
    for case in [folder] + sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in case.iterdir() if p.is_file() and p.name.lower().endswith(volumes.NIFTI_SUFFIXES))
        mask = _pick(files, MASK_NAMES, lambda n: any(w in n for w in _MASK_WORDS), "lesion mask", case)
        t1 = _pick(files, T1_NAMES, lambda n: "t1" in n and not any(w in n for w in _NOT_T1 + _MASK_WORDS),
                   "T1 volume", case)
        if t1 is not None and mask is not None:
            cases.append((case.name, t1, mask))
    if not cases:
        raise UserError(f"No lesion case in {folder}: a case is a folder holding a T1 (t1.nii.gz or *t1*.nii.gz) "
                        f"and a lesion mask (lesion_mask.nii.gz or *seg* / *mask*.nii.gz).")
    return cases


def lesion_eval(workdir, lesion_dir, *, checkpoint: str = "best", settings: Optional[DetectionSettings] = None,
                max_subjects: Optional[int] = None) -> dict:
    """Score a run's anomaly maps on real lesion cases; writes WORKDIR/detect/lesions.json and a figure per case.

    Per case and score: AUROC, AUPRC (average precision) and the best Dice (an oracle: its threshold is chosen on
    the case's own truth) over the case's brain voxels of its scoring grid (:func:`scoring_grid`: its own grid for
    an aligned run, the model grid otherwise), and the Dice at the threshold that flags HEALTHY_FRACTION of the
    run's healthy validation brain voxels (what a user gets), after dropping small components; and their means over
    the cases. The scores are the run's own (Config.scores, residual, median_px) unless `settings` override them;
    the healthy thresholds come from at most `max_subjects` validation subjects. The figures stay on the model grid.
    """
    work = Workdir(workdir)
    cases = lesion_cases(lesion_dir)
    predictor = load_predictor(workdir, checkpoint)
    settings = (settings or DetectionSettings()).of_run(predictor.cfg)
    scores, residual, median_px = settings.names, settings.residual, settings.median_px
    reference = healthy_reference(predictor, settings, max_subjects=max_subjects)
    thresholds = reference.thresholds
    aligned = predictor.cfg.preprocess == "brain"
    results = {"model": predictor.source, **settings.record(), "preprocess": predictor.cfg.preprocess,
               "healthy_thresholds": thresholds,
               "healthy_fraction": HEALTHY_FRACTION,
               "scores_over": _scores_over(aligned, "each case"),
               "healthy_thresholds_over": _scores_over(aligned, "each healthy validation subject"),
               "best_dice": "oracle: its threshold is chosen on each case's own lesion mask",
               "cases": {}, "mean": {}}
    for name, t1_path, mask_path in cases:
        volume, zooms = volumes.load_volume(t1_path)
        lesion = _read_mask(mask_path, "lesion mask", t1_path, volume.shape)
        prepared = prepare_volume(volume, zooms, predictor.cfg, whole_volume=True, with_brain=True,
                                  name=f"NIfTI file {t1_path}")
        maps = score_maps(predictor, prepared.slices, prepared.brain, scores, residual, reference, median_px)
        grid = scoring_grid(prepared, volume)
        entry = {"t1": str(t1_path), "lesion_mask": str(mask_path),
                 "skull_stripped_input": bool(prepared.aligned.stripped) if prepared.aligned else None,
                 "grid": grid.describe()}
        for score, (amap, _) in maps.items():
            entry[score] = grid.scores(amap, lesion, thresholds[score])
        results["cases"][name] = entry
        _save_lesion_case(work.figure(DETECT_DIR, f"lesion_{name}"), prepared.slices, maps,
                          prepared.on_grid(lesion) & prepared.brain)
    for score in scores:
        results["mean"][score] = {key: float(np.mean([c[score][key] for c in results["cases"].values()]))
                                  for key in ("auroc", "auprc", "best_dice", "dice_at_healthy_threshold")}
    work.write_lesion_detection(results)
    return results


def _save_lesion_case(path, slices, maps, truth) -> None:
    """The slice with the most lesion: one row per score (T1 with the lesion outlined, model output, map, mask)."""
    i = int(np.argmax(truth.sum(axis=(1, 2))))
    rows = [(slices[i], made[i], amap[i], truth[i]) for amap, made in maps.values()]
    plots.save_detection_grid(path, *(np.stack(column) for column in zip(*rows)), row_labels=list(maps))

"""The evaluate job: a trained run, per corruption kind, beside classical baselines, with figures.

Evaluated on the run's own validation subjects, or on every subject of an unseen folder prepared exactly as the
run's data. Each corruption kind of the catalogue is evaluated as the policy ``patch+KIND``, the run's own
policy as ``run_policy``, and ``overall`` pools every catalogue kind (each slice once per kind). Corruptions use
the fixed per-slice keys of ``train.evaluate_slices``, so two evaluations of a checkpoint agree to the last digit,
and the baselines see the very inputs the model saw; a run trained with --mask_input (below 1) is also scored told
the patch's mask (``model_told_mask``, as reconstruct's --mask tells it). Results land in ``WORKDIR/eval/``:
``metrics.json`` and the figures (training curves from ``metrics.jsonl``; input / output / truth / difference
grids per kind).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np
from absl import logging

from mrirecon_jax import baselines, corruptions, distributed, metrics, plots, train
from mrirecon_jax.config import UserError
from mrirecon_jax.data import dataset as dataset_lib
from mrirecon_jax.workdir import EVAL_DIR, RUN_POLICY, TOLD_MASK, Workdir
OVERALL = "overall"
SHOWN_SLICES = 5


def evaluation_policies(run_policy: str, kinds: Optional[Sequence[str]] = None) -> dict[str, str]:
    """Evaluation name -> corruption policy: the run's own policy, then ``patch+KIND`` for every catalogue kind
    (or only for `kinds`)."""
    kinds = list(corruptions.CORRUPTIONS) if kinds is None else list(kinds)
    unknown = [kind for kind in kinds if kind not in corruptions.CORRUPTIONS]
    if unknown:
        raise UserError(f"Unknown corruption kind {unknown[0]!r}; the catalogue has "
                        f"{', '.join(corruptions.CORRUPTIONS)}.")
    return {RUN_POLICY: run_policy, **{kind: f"patch+{kind}" for kind in kinds}}


def _mean(values: np.ndarray) -> Optional[float]:
    """Mean over the slices that have a value (NaN: no patch); None when none has."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else None


def score_slices(output: np.ndarray, clean: np.ndarray, masks: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Per-slice metrics of one reconstruction: {"standard": ..., "thesis_compat": ...}, keys SLICE_METRICS."""
    standard = metrics.slice_metrics(jnp.asarray(output), jnp.asarray(clean), jnp.asarray(masks))
    return {"standard": {name: np.asarray(v, np.float64) for name, v in standard.items()},
            "thesis_compat": metrics.thesis_metrics(output, clean, masks)}


def summarise(scores: dict[str, dict], n_subjects: int) -> dict:
    """Means of the per-slice scores of the model (and of the model told the mask, if scored) and of every
    baseline, and the best baseline by slice SSIM."""

    def means(score):
        return {**{name: _mean(score["standard"][name]) for name in metrics.SLICE_METRICS},
                "thesis_compat": {name: _mean(score["thesis_compat"][name]) for name in metrics.SLICE_METRICS}}

    model = scores["model"]
    told = {TOLD_MASK: means(scores[TOLD_MASK])} if TOLD_MASK in scores else {}
    found = {name: means(score) for name, score in scores.items() if name not in ("model", TOLD_MASK)}
    return {**means(model), **told, "n_subjects": n_subjects, "n_slices": len(model["standard"]["ssim_slice"]),
            "baselines": found, "best_baseline": max(found, key=lambda name: found[name]["ssim_slice"])}


def _pool(per_kind: list[dict]) -> dict:
    """Per-slice scores of several evaluations concatenated (same methods and metrics in each)."""
    return {method: {group: {name: np.concatenate([s[method][group][name] for s in per_kind])
                             for name in metrics.SLICE_METRICS}
                     for group in ("standard", "thesis_compat")}
            for method in per_kind[0]}


@functools.lru_cache(maxsize=32)
def _eval_step(graphdef, policy: corruptions.Policy, cfg, give_mask: bool):
    """The jitted eval step for one policy, kept so that evaluating a run again does not compile again."""
    return train.make_eval_step(graphdef, policy, cfg.seed, cfg.nonnegative, cfg.flip_average, bool(cfg.mask_input),
                                give_mask)


def evaluation_data(cfg, data_dir: Optional[str]) -> tuple[dataset_lib.Dataset, str]:
    """(the slices an evaluation scores, which subjects they are): the run's validation subjects, or every
    subject of `data_dir`, prepared as the run's data."""
    if data_dir is None:
        return dataset_lib.load_dataset(cfg), "the run's validation subjects"
    return dataset_lib.load_unseen_subjects(cfg, data_dir), f"every subject of {data_dir} (unseen)"


def evaluate_run(workdir, checkpoint: str = "best", data_dir: Optional[str] = None,
                 cache_dir: Optional[str] = None, kinds: Optional[Sequence[str]] = None) -> dict:
    """Evaluate the run in `workdir` at `checkpoint` on every catalogue kind (or only `kinds`); write and return
    ``WORKDIR/eval/metrics.json``, write the figures."""
    work = Workdir(workdir)
    run = train.restore_model(workdir, checkpoint)
    cfg = run.cfg if cache_dir is None else run.cfg.replace(cache_dir=cache_dir)
    dataset, subjects = evaluation_data(cfg, data_dir)
    images = dataset.val
    if len(images) == 0:
        raise UserError(f"There are no slices to evaluate in {subjects}.")
    mesh = train.make_mesh()
    n_subjects = len(dataset.val_subjects)
    shown = np.unique(np.linspace(0, len(images) - 1, SHOWN_SLICES).astype(int))
    results, catalogue_scores = {}, []
    for name, spec in evaluation_policies(cfg.eval_policy, kinds).items():
        logging.info("Evaluating %s (%s) on %d slices.", name, spec, len(images))
        policy = train.parse_policy(spec)
        eval_step = _eval_step(run.graphdef, policy, cfg, train.always_told_mask(cfg))
        _, slices = train.evaluate_slices(eval_step, run.params, images, cfg.eval_batch_size, mesh, keep_all=True)
        slice_kinds = [policy.kinds[i] if policy.kinds else None for i in slices["per_slice"]["kind"]]
        outputs = {"model": slices["reconstructed"],
                   **baselines.baseline_outputs(slices["corrupted"], slices["masks"], slice_kinds)}
        if cfg.mask_input and not train.always_told_mask(cfg):  # the same inputs, the model told the mask
            _, told = train.evaluate_slices(_eval_step(run.graphdef, policy, cfg, True), run.params, images,
                                            cfg.eval_batch_size, mesh, keep_all=True)
            outputs[TOLD_MASK] = told["reconstructed"]
        scores = {method: score_slices(out, slices["clean"], slices["masks"]) for method, out in outputs.items()}
        results[name] = {"policy": policy.spec, **summarise(scores, n_subjects)}
        if name != RUN_POLICY:
            catalogue_scores.append(scores)
        if distributed.is_writer():
            plots.save_sample_grid(work.figure(EVAL_DIR, f"samples_{name}"), slices["corrupted"][shown],
                                   slices["reconstructed"][shown], slices["clean"][shown], slices["masks"][shown],
                                   row_labels=[f"{name}, slice {i}" for i in shown])
    if catalogue_scores:
        results[OVERALL] = {"policy": "every catalogue kind above, each slice once per kind",
                            **summarise(_pool(catalogue_scores), n_subjects)}
    for entry in results.values():
        entry["checkpoint_step"] = run.step
    report = {
        "workdir": str(workdir), "checkpoint": checkpoint, "checkpoint_step": run.step,
        "data": dataset.source, "subjects": subjects, "n_subjects": n_subjects, "n_slices": int(len(images)),
        "baseline_definitions": baselines.DESCRIPTIONS, "kinds": results,
    }
    if distributed.is_writer():  # every process evaluated every slice; process 0 writes
        work.write_evaluation(report)
        save_training_figures(work)
    return report


TRAINING_FIGURES = {"ssim_per_epoch": plots.save_ssim_per_epoch, "ssim_change": plots.save_ssim_change,
                    "ssim_vs_time": plots.save_ssim_vs_time}


def save_training_figures(work: Workdir) -> list[Path]:
    """SSIM per epoch, SSIM change epoch over epoch-1, and SSIM against wall-clock time, from metrics.jsonl."""
    records = work.read_metrics()
    paths = []
    for name, draw in TRAINING_FIGURES.items():
        paths.append(work.figure(EVAL_DIR, name))
        draw(paths[-1], records)
    return paths


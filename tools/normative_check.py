"""Does normative calibration (``--normative``) help a run's anomaly maps? Measured on synthetic lesions only, so
that the choice never sees a real lesion case.

    python -m tools.normative_check --workdir=runs/detect_t1 [--reference_subjects=20] [--output=FILE.json]

The run's healthy validation subjects are split: the first `reference_subjects` give each template pixel's healthy
mean and spread (``infer.normal_range``); every slice of the others gets one hypo-intense lesion blob
(``corruptions.lesion_blob``, as T1 lesions mostly are), and its score map (the run's detection settings) is scored
raw and calibrated: pixel AUROC and AUPRC over the brain the maps keep.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mrirecon_jax import corruptions, infer, metrics


def check(workdir, reference_subjects: int = 20, seed: int = 0) -> dict:
    predictor = infer.load_predictor(workdir)
    settings = dataclasses.replace(infer.DetectionSettings().of_run(predictor.cfg), normative=False)
    score = next(s for s in settings.names if s != infer.COMBINED)
    healthy = [prepared for _, prepared in infer.healthy_volumes(predictor.cfg)]
    if len(healthy) < reference_subjects + 1:
        raise SystemExit(f"The run has {len(healthy)} validation subjects; --reference_subjects must be fewer.")

    def score_map(slices, brain):
        return infer.score_maps(predictor, slices, brain, (score,), settings.residual,
                                median_px=settings.median_px)[score][0]

    maps = np.stack([score_map(p.clean()[..., 0], p.brain) for p in healthy[:reference_subjects]])
    brain = healthy[0].brain
    reference = infer.HealthyReference({}, {score: infer.normal_range(maps, brain)})
    blob = jax.jit(jax.vmap(lambda k, x, b: corruptions.lesion_blob(k, x, b, hyper_probability=0.0)))
    raw, calibrated, truth = [], [], []
    for index, prepared in enumerate(healthy[reference_subjects:]):
        clean = prepared.clean()
        keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), index), len(clean))
        images, masks = blob(keys, jnp.asarray(clean), jnp.asarray(prepared.brain[..., None]))
        kept = infer.eroded(prepared.brain, infer.ERODE_PX)
        amap = score_map(np.asarray(images)[..., 0], prepared.brain)
        raw.append(amap[kept])
        calibrated.append(reference.calibrated(score, amap)[kept])
        truth.append((np.asarray(masks)[..., 0] > 0)[kept])
    truth = np.concatenate(truth)
    result = {"workdir": str(workdir), "score": score, "residual": settings.residual, "median_px": settings.median_px,
              "reference_subjects": reference_subjects, "scored_subjects": len(healthy) - reference_subjects}
    for name, values in (("raw", raw), ("calibrated", calibrated)):
        values = np.concatenate(values)
        result[name] = {"auroc": metrics.auroc(values, truth), "auprc": metrics.average_precision(values, truth)}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--reference_subjects", type=int, default=20)
    parser.add_argument("--output")
    args = parser.parse_args()
    result = check(args.workdir, args.reference_subjects)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

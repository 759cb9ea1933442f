"""Data consistency, measured on a trained run: its repair of k-space corruptions with and without the k-space lines
the scanner measured exactly put back (hard data consistency, ``|ifft(M * K_measured + (1 - M) * fft(repair))|``,
the repair's zero background kept), scored on the run's validation slices (standard SSIM and PSNR).

    python -m tools.data_consistency_check --workdir=runs/fast_64_augmented [--slices=720]

Cases: Gibbs ringing with a centred square of k-space kept (fractions 0.4, 0.5, 0.6 of each axis; the kept band is
measured exactly), and ghosting with every 2nd or 3rd line scaled by 0.4 (the other lines and the centre line are
exact). No patch: a patch painted over the image after the scan is not in the scanner's k-space. ``reconstruct``
gets magnitude images without k-space, so this measures what data consistency could add where raw data exists.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from mrirecon_jax import corruptions, metrics, train
from mrirecon_jax.data import dataset as dataset_lib

GIBBS_KEPT = (0.4, 0.5, 0.6)
GHOST_EVERY = (2, 3)
GHOST_STRENGTH = 0.6


def cases(size: int) -> dict[str, tuple[jnp.ndarray, jnp.ndarray]]:
    """name -> ((H, W, 1) k-space weights of the corruption, (H, W, 1) 1 where a line is measured exactly)."""
    found = {}
    for kept in GIBBS_KEPT:
        band = corruptions._centred_band(size, kept)
        keep = (band[:, None] & band[None, :]).astype(jnp.float32)[..., None]
        found[f"gibbs, {kept:g} of k-space kept"] = (keep, keep)
    index = jnp.arange(size)
    for every in GHOST_EVERY:
        rows = ((index % every != 0) | (index == size // 2)).astype(jnp.float32)
        exact = rows[:, None, None] * jnp.ones((1, size, 1))
        found[f"ghost, 1 line in {every} x {1 - GHOST_STRENGTH:g}"] = (exact + (1 - exact) * (1 - GHOST_STRENGTH),
                                                                          exact)
    return found


def check(workdir, n_slices: int = 720) -> dict:
    """Mean SSIM / PSNR of the input, the run's repair, and the repair made consistent, per case."""
    run = train.restore_model(workdir)
    cfg = run.cfg
    clean = jnp.asarray(dataset_lib.load_dataset(cfg).val[:n_slices])
    apply = train.model_apply(run.graphdef, cfg.flip_average, bool(cfg.mask_input))
    fft, ifft = jax.vmap(corruptions.fft2c), jax.vmap(corruptions.ifft2c)
    results = {}
    for name, (weights, exact) in cases(clean.shape[1]).items():
        @jax.jit
        def scored(params, x, weights=weights, exact=exact):
            measured = fft(x) * weights
            corrupted = jnp.abs(ifft(measured))
            repair = train.reconstruct_corrupted(apply, params, corrupted, cfg.nonnegative)
            consistent = jnp.abs(ifft(exact * measured + (1 - exact) * fft(repair)))
            consistent = jnp.where(repair > 0, consistent, 0.0)
            return {label: metrics.slice_metrics(image, x, jnp.zeros_like(x)) for label, image in
                    (("input", corrupted), ("model", repair), ("model + data consistency", consistent))}
        parts = [scored(run.params, clean[start:start + cfg.eval_batch_size])
                 for start in range(0, len(clean), cfg.eval_batch_size)]
        results[name] = {label: {metric: float(np.mean(np.concatenate([np.asarray(p[label][metric])
                                                                       for p in parts])))
                                 for metric in ("ssim_slice", "psnr_slice")} for label in parts[0]}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--slices", type=int, default=720)
    args = parser.parse_args()
    for name, entry in check(args.workdir, args.slices).items():
        print(name, "; ".join(f"{label} {v['ssim_slice']:.4f} / {v['psnr_slice']:.2f} dB"
                              for label, v in entry.items()))


if __name__ == "__main__":
    main()

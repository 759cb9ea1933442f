"""Off-site check of a trained run through the user's command: corrupted NIfTI files made by an independent
implementation of the corruptions (numpy / scikit-image, not ``mrirecon_jax.corruptions``), optionally after a
simulated change of site (contrast, bias field, noise, small rotation), repaired with ``--mode=reconstruct`` and
scored against the clean slices with scikit-image's SSIM (standard, data range 1) and the thesis's own metric.

    python -m tools.offsite_check --workdir=runs/fast_64_augmented --data_dir=../shared/data/ixi-t1-2mm \
        --output=runs/offsite.json [--shift=site] [--grid=square|thesis] [--line=antialiased|hard] [--subjects=8] \
        [--tell_mask [--mask_growth=N]]

Each held-out subject (the run's validation subjects) gives one file per kind: ``original`` (patch + 2x
resolution loss), ``gibbs``, ``ghost`` (each patched) and ``patch`` alone (``augmented`` pools the first three,
the thesis's augmented policy), 24 slices of the central axial slab at
64 px, each slice in [0, 1] before corruption (the corruption may leave that range, as ringing does). ``--grid``
picks the pixels: ``square`` pads to a square field of view first (3.75 mm pixels for the 2 mm IXI copy, the
project's own grid), ``thesis`` resizes the slice straight to 64 x 64 (anisotropic pixels, the thesis's way).
``--line`` picks how the patch line is drawn: ``antialiased`` (an anti-aliased line dilated with a square footprint,
soft-edged) or ``hard`` (a hard-edged round pen, as the thesis's and this project's ``patch``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.ndimage
import skimage.draw
import skimage.transform
from skimage.metrics import structural_similarity

from mrirecon_jax import infer, metrics, train
from mrirecon_jax.config import Config
from mrirecon_jax.data import dataset, volumes
from mrirecon_jax.workdir import Workdir

KINDS = ("original", "gibbs", "ghost", "patch")
SLAB_SLICES_2MM = 24


def square_slices(volume: np.ndarray, zooms, size: int, grid: str) -> np.ndarray:
    """Central axial slab of a canonical volume as (n, size, size) display slices, each min-max to [0, 1]."""
    n = max(1, round(48.0 / zooms[2]))
    start = (volume.shape[2] - n) // 2
    out = []
    for k in range(start, start + n):
        image = volume[:, :, k][::-1, ::-1].T  # radiological display: anterior up, right on the left
        if grid == "square":
            rows_mm, cols_mm = image.shape[0] * zooms[1], image.shape[1] * zooms[0]
            side = max(rows_mm, cols_mm)
            pad_r = int(round((side - rows_mm) / zooms[1]))
            pad_c = int(round((side - cols_mm) / zooms[0]))
            image = np.pad(image, ((pad_r // 2, pad_r - pad_r // 2), (pad_c // 2, pad_c - pad_c // 2)),
                           constant_values=image.min())
        image = skimage.transform.resize(image, (size, size), order=1, anti_aliasing=True)
        low, high = image.min(), image.max()
        out.append((image - low) / (high - low) if high > low else np.zeros_like(image))
    return np.stack(out).astype(np.float32)


def line_geometry(shape, rng) -> tuple[int, int, int, int, int]:
    """Random ends (r0, c0, r1, c1) in the central half of each side and a thickness of 1 to 1/8 of the height."""
    h, w = shape
    r0, r1 = rng.integers(h // 4, 3 * h // 4, size=2)
    c0, c1 = rng.integers(w // 4, 3 * w // 4, size=2)
    return int(r0), int(c0), int(r1), int(c1), int(rng.integers(1, max(2, h // 8) + 1))


def line_patch(image: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """A bright anti-aliased line of random ends, thickness and opacity; returns (image, the line's profile)."""
    r0, c0, r1, c1, thickness = line_geometry(image.shape, rng)
    mask = np.zeros_like(image)
    rr, cc, val = skimage.draw.line_aa(r0, c0, r1, c1)
    mask[rr, cc] = val
    mask = scipy.ndimage.grey_dilation(mask, size=(thickness, thickness))
    opacity = rng.uniform(0.3, 1.0)
    return np.minimum(image + opacity * mask, 1.0), mask.astype(np.float32)


def hard_line_patch(image: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """The same line drawn with a hard-edged round pen (pixels within thickness / 2 of the segment), as the thesis's
    OpenCV lines and ``mrirecon_jax``'s ``patch`` are; returns (image, the line's profile: 0 or 1)."""
    r0, c0, r1, c1, thickness = line_geometry(image.shape, rng)
    rows, cols = np.mgrid[0:image.shape[0], 0:image.shape[1]].astype(float)
    along = np.array([r1 - r0, c1 - c0], float)
    t = np.clip(((rows - r0) * along[0] + (cols - c0) * along[1]) / max(along @ along, 1e-12), 0, 1)
    mask = ((rows - r0 - t * along[0]) ** 2 + (cols - c0 - t * along[1]) ** 2 <= (thickness / 2) ** 2)
    opacity = rng.uniform(0.3, 1.0)
    return np.minimum(image + opacity * mask, 1.0), mask.astype(np.float32)


LINES = {"antialiased": line_patch, "hard": hard_line_patch}


def resolution_loss(image: np.ndarray, rng) -> np.ndarray:
    """Downsampling by 2 with a Gaussian anti-aliasing filter, then bicubic upsampling."""
    small = skimage.transform.rescale(image, 0.5, order=1, anti_aliasing=True, anti_aliasing_sigma=rng.uniform(0.6, 1))
    return skimage.transform.resize(small, image.shape, order=3)


def gibbs(image: np.ndarray, rng) -> np.ndarray:
    """k-space cropped to a centred box keeping 40-60 % of each axis, real part (so ringing can go below 0)."""
    k = np.fft.fftshift(np.fft.fft2(image))
    f = rng.uniform(0.4, 0.6)
    h, w = image.shape
    keep = np.zeros_like(k, bool)
    kh, kw = int(h * f / 2), int(w * f / 2)
    keep[h // 2 - kh:h // 2 + kh, w // 2 - kw:w // 2 + kw] = True
    return np.real(np.fft.ifft2(np.fft.ifftshift(np.where(keep, k, 0))))


def ghost(image: np.ndarray, rng) -> np.ndarray:
    """Every 2nd or 3rd phase-encode line scaled by 1 - s, s in [0.4, 0.9], the centre line kept; magnitude."""
    k = np.fft.fftshift(np.fft.fft2(image))
    step, strength = int(rng.integers(2, 4)), rng.uniform(0.4, 0.9)
    scale = np.ones(image.shape[0])
    scale[::step] = 1 - strength
    scale[image.shape[0] // 2] = 1.0
    return np.abs(np.fft.ifft2(np.fft.ifftshift(k * scale[:, None])))


def site_shift(image: np.ndarray, rng) -> np.ndarray:
    """Another scanner: gamma contrast, a smooth multiplicative bias, a small rotation, Rician-like noise."""
    x = image ** rng.uniform(0.75, 1.35)
    yy, xx = np.mgrid[-1:1:complex(image.shape[0]), -1:1:complex(image.shape[1])]
    x = x * np.exp(rng.uniform(-0.25, 0.25) * yy + rng.uniform(-0.25, 0.25) * xx + rng.uniform(-0.2, 0.2) * xx * yy)
    x = scipy.ndimage.rotate(x, rng.uniform(-6, 6), reshape=False, order=1)
    sigma = rng.uniform(0.005, 0.03) * x.max()
    x = np.hypot(x + sigma * rng.standard_normal(x.shape), sigma * rng.standard_normal(x.shape))
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


SCORED_LEVEL = 0.25  # the patch that is scored: where the line's profile reaches this


def corrupt(clean: np.ndarray, kind: str, rng, line: str = "antialiased") -> tuple[np.ndarray, np.ndarray]:
    """(corrupted slice, the line's profile: where and how strongly the line was drawn)."""
    image = {"original": resolution_loss, "gibbs": gibbs, "ghost": ghost, "patch": lambda x, r: x}[kind](clean, rng)
    return LINES[line](image, rng)


def to_volume(slices: np.ndarray) -> np.ndarray:
    """(n, S, S) display slices -> canonical RAS volume (S, S, n): the inverse of the display transform."""
    return np.stack([s[::-1, ::-1].T for s in slices], axis=2)


def from_volume(volume: np.ndarray) -> np.ndarray:
    """Canonical RAS volume (S, S, n) -> its (n, S, S) axial display slices."""
    return np.stack([volume[:, :, k][::-1, ::-1].T for k in range(volume.shape[2])])


def read_slices(path) -> np.ndarray:
    """The (n, S, S) display slices of a NIfTI file that reconstruct wrote."""
    return from_volume(nib.as_closest_canonical(nib.load(str(path))).get_fdata(dtype=np.float32))


def scores(pred: np.ndarray, clean: np.ndarray, masks: np.ndarray) -> dict:
    """Mean slice and patch SSIM, standard (scikit-image, data range 1, pred clipped to [0, 1]) and thesis's."""
    standard_slice, standard_patch = [], []
    for p, c, m in zip(np.clip(pred, 0, 1), clean, masks):
        value, full = structural_similarity(c, p, data_range=1.0, full=True)
        standard_slice.append(value)
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        if rows.size:
            standard_patch.append(full[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].mean())
    thesis = metrics.thesis_metrics(pred[..., None], clean[..., None], masks[..., None])
    return {"ssim_slice": float(np.mean(standard_slice)), "ssim_patch": float(np.mean(standard_patch)),
            "thesis_ssim_slice": float(np.nanmean(thesis["ssim_slice"])),
            "thesis_ssim_patch": float(np.nanmean(thesis["ssim_patch"]))}


def check(workdir, data_dir, subjects: int = 8, shift: str = "none", grid: str = "square", seed: int = 0,
          resample_to_input: bool = False, line: str = "antialiased", tell_mask: bool = False, mask_growth: int = 0
          ) -> dict:
    """Score reconstruct on the subjects' corrupted files, by kind; with `tell_mask` also told the pixels each line
    changed (``--mask``; a run trained with --mask_input), grown by `mask_growth` px, as ``model_told_mask`` (a run
    trained always told, --mask_input=1, only so)."""
    work = Workdir(workdir)
    cfg: Config = work.read_config()
    val = set(work.read_split()["val_subjects"])
    readers = [(s, r) for s, r in dataset.volume_readers(str(data_dir))[0] if s in val][:subjects]
    rng = np.random.default_rng(seed)
    predictor = infer.load_predictor(workdir)
    blind = not train.always_told_mask(cfg)
    if not (blind or tell_mask):
        raise SystemExit(f"{workdir} was trained always told the mask (--mask_input=1); add --tell_mask.")
    methods = (("model",) if blind else ()) + ("input",) + (("model_told_mask",) if tell_mask else ())
    results = {kind: {method: [] for method in methods} for kind in KINDS}
    with tempfile.TemporaryDirectory() as folder:
        for subject, read in readers:
            volume, zooms = read()
            clean = square_slices(volume, zooms, cfg.image_size, grid)
            if shift == "site":
                clean = np.stack([site_shift(c, rng) for c in clean])
            pixel = 240.0 / cfg.image_size if grid == "square" else 3.0
            affine = np.diag([pixel, 240.0 / cfg.image_size, zooms[2], 1.0])
            for kind in KINDS:
                pairs = [corrupt(c, kind, rng, line) for c in clean]
                corrupted, profiles = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
                masks = (profiles > SCORED_LEVEL).astype(np.float32)
                source, output = Path(folder) / f"{subject}_{kind}.nii.gz", Path(folder) / f"{subject}_{kind}_r.nii.gz"
                nib.Nifti1Image(to_volume(corrupted).astype(np.float32), affine).to_filename(str(source))
                if blind:
                    infer.reconstruct(predictor, source, output, resample_to_input=resample_to_input)
                    results[kind]["model"].append((read_slices(output), clean, masks))
                results[kind]["input"].append((corrupted, clean, masks))
                if tell_mask:
                    mask_file, told = Path(folder) / "mask.nii.gz", Path(folder) / "told.nii.gz"
                    growth = np.ones((1, 2 * mask_growth + 1, 2 * mask_growth + 1), bool)  # 0: the changed pixels
                    painted = scipy.ndimage.binary_dilation(profiles > 0, growth).astype(np.uint8)
                    nib.Nifti1Image(to_volume(painted), affine).to_filename(str(mask_file))
                    infer.reconstruct(predictor, source, told, resample_to_input=resample_to_input,
                                      mask_path=mask_file)
                    results[kind]["model_told_mask"].append((read_slices(told), clean, masks))
    table = {}
    for kind, methods in results.items():
        table[kind] = {method: scores(*(np.concatenate(part) for part in zip(*triples)))
                       for method, triples in methods.items()}
    policy_kinds = ("original", "gibbs", "ghost")  # the thesis's augmented policy, each patched
    everything = {m: [t for kind in policy_kinds for t in results[kind][m]] for m in methods}
    table["augmented"] = {m: scores(*(np.concatenate(part) for part in zip(*triples)))
                          for m, triples in everything.items()}
    return {"workdir": str(workdir), "subjects": [s for s, _ in readers], "shift": shift, "grid": grid,
            "line": line, "resample_to_input": resample_to_input,
            "told_mask_growth": mask_growth if tell_mask else None, "kinds": table}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--shift", choices=["none", "site"], default="none")
    parser.add_argument("--grid", choices=["square", "thesis"], default="square")
    parser.add_argument("--line", choices=list(LINES), default="antialiased")
    parser.add_argument("--resample_to_input", action="store_true")
    parser.add_argument("--tell_mask", action="store_true", help="also tell a --mask_input run each line's mask")
    parser.add_argument("--mask_growth", type=int, default=0, help="--tell_mask: grow the told mask by N px")
    args = parser.parse_args()
    result = check(args.workdir, args.data_dir, args.subjects, args.shift, args.grid,
                   resample_to_input=args.resample_to_input, line=args.line, tell_mask=args.tell_mask,
                   mask_growth=args.mask_growth)
    Path(args.output).write_text(json.dumps(result, indent=2))
    for kind, entry in result["kinds"].items():
        print(kind, " ".join(f"{m}: " + " / ".join(f"{v:.3f}" for v in e.values()) for m, e in entry.items()))


if __name__ == "__main__":
    main()

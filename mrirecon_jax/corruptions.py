"""Corruptions of one MRI slice, as pure JAX functions, and the policy that picks them.

Every per-image corruption has the signature ``f(key, image, **params) -> image`` where ``image`` is an
``(H, W, C)`` float array in [0, 1] (float32 or bfloat16, any even H and W), ``key`` a ``jax.random`` key and
``params`` static Python values. Outputs keep the input's shape and dtype and are real, finite and clipped to
[0, 1]. Internally everything is computed in float32 / complex64; k-space edits share the centred orthonormal
FFT helpers :func:`fft2c` / :func:`ifft2c` and return the magnitude image. Axis 0 (rows) is the phase-encode
axis. Batches (NHWC) are handled with ``jax.vmap``; see :func:`corrupt_batch`.

The catalogue (:data:`CORRUPTIONS` names each with the parameters policies use):

* ``line_patch`` (thesis 4.4.7): a white line of random position, thickness and opacity, clipped to the slice
  maximum; returns its mask (``patch_box`` gives its rectangle);
* ``downsample`` (thesis 4.4.8): resolution reduction by 2 or 4, by area resizing or by k-space cropping;
* ``gibbs`` (thesis 4.4.9): rectangular k-space truncation along the phase-encode axis or both;
* ``ghost`` (thesis 4.4.10, TorchIO ``Ghosting``): every n-th phase-encode line scaled, centre restored;
* ``rician_noise``: magnitude of complex Gaussian noise at a given SNR (Gudbjartsson & Patz 1995);
* ``spike``: k-space spikes, the herringbone artifact (TorchIO ``Spike``);
* ``motion``: rigid in-plane motion, k-space segments from moved copies (Shaw et al. 2019, TorchIO ``Motion``);
* ``bias_field``: smooth multiplicative polynomial bias (Van Leemput et al. 1999, TorchIO ``BiasField``);
* ``undersample``: fastMRI Cartesian masks with a fully sampled centre, zero-filled (Zbontar et al. 2018);
* ``coarse_noise``: low-resolution Gaussian noise upsampled and added (Kascenas et al. 2022), for denoising
  anomaly detection; and, beside the line patch, ``inpaint_grid``: one phase of a square grid hidden.

A :class:`Policy` (parsed once, in Python, by :func:`parse_policy`) says which of them each slice gets. The
thesis patches every slice; here the resolution / k-space corruptions are applied FIRST and the patch LAST, so
the returned mask is exactly the set of pixels the patch changed (the thesis's order is not stated).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
import jax.scipy.ndimage

__all__ = [
    "fft2c",
    "ifft2c",
    "line_patch",
    "patch_box",
    "downsample",
    "gibbs",
    "ghost",
    "rician_noise",
    "spike_draw",
    "spike",
    "motion",
    "bias_field",
    "undersampling_mask",
    "undersample",
    "coarse_noise",
    "grid_mask",
    "inpaint_grid",
    "corrupt_image",
    "corrupt_batch",
    "Policy",
    "parse_policy",
    "CORRUPTIONS",
    "NAMED_POLICIES",
]


# --------------------------------------------------------------------------------------------- k-space


def fft2c(image):
    """Centred orthonormal 2-D FFT over axes (0, 1): ``fftshift(fft2(ifftshift(x), norm="ortho"))``.

    The DC term lands at index ``(H // 2, W // 2)``; ``||x|| == ||fft2c(x)||`` (Parseval). Returns complex64.
    """
    x = jnp.asarray(image)
    x = x.astype(jnp.complex64) if jnp.iscomplexobj(x) else x.astype(jnp.float32).astype(jnp.complex64)
    x = jnp.fft.ifftshift(x, axes=(0, 1))
    x = jnp.fft.fft2(x, axes=(0, 1), norm="ortho")
    return jnp.fft.fftshift(x, axes=(0, 1))


def ifft2c(kspace):
    """Inverse of :func:`fft2c`: ``fftshift(ifft2(ifftshift(k), norm="ortho"))``. Returns complex64."""
    k = jnp.asarray(kspace).astype(jnp.complex64)
    k = jnp.fft.ifftshift(k, axes=(0, 1))
    k = jnp.fft.ifft2(k, axes=(0, 1), norm="ortho")
    return jnp.fft.fftshift(k, axes=(0, 1))


def _magnitude(z):
    """``|z|`` with a finite gradient at z == 0 (the plain complex ``abs`` gives NaN there)."""
    power = jnp.real(z) ** 2 + jnp.imag(z) ** 2
    positive = power > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, power, 1.0)), 0.0)


def _finish(x, like):
    """Cast a float32 result to the dtype of ``like``. Not clipped: ringing overshoots, a bias field brightens,
    and the model, which normalises every input (``data.normalise.normalise_input``), sees that as scanners make it."""
    return x.astype(like.dtype)


def _image_of(kspace, key, real_probability: float):
    """The image of edited k-space: its magnitude, or with probability ``real_probability`` its real part (what a
    reconstruction that keeps the sign does: ringing then dips below the background)."""
    z = ifft2c(kspace)
    if real_probability == 0:
        return _magnitude(z)
    return jnp.where(jax.random.bernoulli(key, real_probability), jnp.real(z), _magnitude(z))


def _centred_band(n, fraction):
    """Boolean (n,) mask of the k-space lines within ``fraction * n / 2`` of the centre index ``n // 2``.

    Symmetric about DC, so the kept spectrum stays (nearly) Hermitian; ``fraction >= 1`` keeps every line.
    """
    offset = jnp.abs(jnp.arange(n) - n // 2).astype(jnp.float32)
    return offset <= fraction * n / 2.0


# --------------------------------------------------------------------------------------------- patch


def _line_geometry(key, height, width, max_thickness_frac=1 / 8, centre_frac=0.5, min_opacity=0.3,
                   max_opacity=1.0):
    """Draw the patch line: integer end points ``(2, 2)`` as [[r0, c0], [r1, c1]], thickness, opacity.

    End points are uniform on the pixel grid of the central box (``centre_frac`` of each side, centred);
    the thickness is an integer uniform in [1, max(1, floor(max_thickness_frac * height))] (thesis 4.4.7:
    "up to 1/8 of the picture height"; OpenCV lines, as the thesis drew, have integer ends and thickness);
    the opacity is uniform in [min_opacity, max_opacity].
    """
    k_pts, k_thick, k_op = jax.random.split(key, 3)
    lo = jnp.array([int(round(height * (1 - centre_frac) / 2)), int(round(width * (1 - centre_frac) / 2))])
    hi = jnp.array([height, width]) - lo
    hi = jnp.maximum(hi, lo + 1)
    points = jax.random.randint(k_pts, (2, 2), lo, hi).astype(jnp.float32)
    max_thick = max(1, int(max_thickness_frac * height))
    thickness = jax.random.randint(k_thick, (), 1, max_thick + 1).astype(jnp.float32)
    opacity = jax.random.uniform(k_op, (), jnp.float32, min_opacity, max_opacity)
    return points, thickness, opacity


def _pixel_centres(height, width):
    """(H, W, 2) float32 (row, col) of each pixel centre."""
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                              indexing="ij")
    return jnp.stack([rows, cols], axis=-1)


def _round_distance(height, width, points):
    """(H, W) float32 Euclidean distance of each pixel centre to the segment ``points`` (a round pen)."""
    p, a, ab = _pixel_centres(height, width), points[0], points[1] - points[0]
    t = jnp.clip(jnp.sum((p - a) * ab, axis=-1) / jnp.maximum(jnp.sum(ab * ab), 1e-12), 0.0, 1.0)
    return jnp.sqrt(jnp.sum((p - (a + t[..., None] * ab)) ** 2, axis=-1))


def _square_distance(height, width, points):
    """(H, W) float32 Chebyshev distance of each pixel centre to the segment ``points`` (a square pen, as a line
    dilated with a square footprint is).

    max(|u_r - t ab_r|, |u_c - t ab_c|) is convex and piecewise linear in t: its minimum over [0, 1] lies at an end,
    at a zero of either term or where the two terms cross, so the six candidates give it exactly."""
    u, ab = _pixel_centres(height, width) - points[0], points[1] - points[0]
    u_r, u_c = u[..., 0], u[..., 1]

    def ratio(num, den):
        return jnp.where(jnp.abs(den) > 1e-6, num / jnp.where(jnp.abs(den) > 1e-6, den, 1.0), 0.0)

    candidates = [jnp.zeros_like(u_r), jnp.ones_like(u_r), ratio(u_r, ab[0]), ratio(u_c, ab[1]),
                  ratio(u_r - u_c, ab[0] - ab[1]), ratio(u_r + u_c, ab[0] + ab[1])]
    return jnp.min(jnp.stack([jnp.maximum(jnp.abs(u_r - t * ab[0]), jnp.abs(u_c - t * ab[1]))
                              for t in (jnp.clip(c, 0.0, 1.0) for c in candidates)]), axis=0)


def line_patch(key, image, max_thickness_frac=1 / 8, centre_frac=0.5, min_opacity=0.3, max_opacity=1.0,
               clip_probability=1.0, edge_px_range=(0.0, 0.0), square_pen_probability=0.0):
    """Thesis section 4.4.7: add a white line of random ends, thickness and opacity; return (image, mask).

    Ends are drawn uniformly in the central box (``centre_frac`` of each side, "to avoid creating patches in
    blank areas"), thickness in [1, ``max_thickness_frac`` * H] px, opacity in [min_opacity, max_opacity].
    A pixel belongs to the line when its distance to the segment is <= thickness / 2. The result is
    ``minimum(image + opacity * mask, max(image))``: the patch is clipped to the slice maximum so the dynamic
    range does not grow (with probability ``clip_probability``; otherwise the line is simply added). ``mask`` is
    (H, W, 1) float32 in {0, 1}; pixels already at the maximum are in the mask but unchanged.

    Other drawing programs' lines, for training: with ``edge_px_range`` the line's edge is a linear ramp of a
    width e ~ U(edge_px_range) px centred on the hard edge (anti-aliased or blurred lines; the added intensity is
    ``opacity * profile`` and ``mask`` marks every pixel the line changed), and with probability
    ``square_pen_probability`` the pen is square (Chebyshev distance) instead of round.
    """
    height, width = image.shape[0], image.shape[1]
    points, thickness, opacity = _line_geometry(key, height, width, max_thickness_frac, centre_frac,
                                                min_opacity, max_opacity)
    k_edge, k_pen = jax.random.split(jax.random.fold_in(key, 2))
    distance = _round_distance(height, width, points)
    if square_pen_probability:
        square = jax.random.bernoulli(k_pen, square_pen_probability)
        distance = jnp.where(square, _square_distance(height, width, points), distance)
    if not any(edge_px_range):  # hard edges
        profile = (distance <= thickness / 2.0).astype(jnp.float32)
    else:
        edge = jax.random.uniform(k_edge, (), jnp.float32, *edge_px_range)
        profile = jnp.clip((thickness / 2.0 - distance) / jnp.maximum(edge, 1e-3) + 0.5, 0.0, 1.0)
    profile = profile[..., None]
    x = image.astype(jnp.float32)
    patched = x + opacity * profile
    clipped = jnp.minimum(patched, jnp.max(x))
    if clip_probability < 1:
        clipped = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 1), clip_probability), clipped, patched)
    return _finish(clipped, image), (profile > 0).astype(jnp.float32)


def patch_box(mask):
    """int32 ``[row0, row1, col0, col1]`` (inclusive start, exclusive end) bounding the non-zero pixels.

    ``mask`` is (H, W) or (H, W, C); all zeros for an empty mask. Jittable (use ``jax.vmap`` for a batch).
    """
    m = jnp.asarray(mask) > 0
    m = m.reshape(m.shape[0], m.shape[1], -1).any(axis=-1)
    rows, cols = m.any(axis=1), m.any(axis=0)

    def span(v):
        n = v.shape[0]
        return jnp.argmax(v).astype(jnp.int32), (n - jnp.argmax(v[::-1])).astype(jnp.int32)

    r0, r1 = span(rows)
    c0, c1 = span(cols)
    box = jnp.stack([r0, r1, c0, c1])
    return jnp.where(m.any(), box, jnp.zeros_like(box))


# --------------------------------------------------------------------------------------------- resolution / k-space


def _area_weights(size, reduced):
    """(reduced, size) float32 matrix averaging ``size`` samples into ``reduced`` equal bins (area resizing).

    Each bin covers ``size / reduced`` input pixels, fractional overlaps weighted by length (OpenCV's
    ``INTER_AREA``); for a whole factor this is plain average pooling.
    """
    width = size / reduced
    lo = jnp.arange(reduced, dtype=jnp.float32)[:, None] * width
    pixel = jnp.arange(size, dtype=jnp.float32)[None, :]
    overlap = jnp.minimum(lo + width, pixel + 1.0) - jnp.maximum(lo, pixel)
    return jnp.clip(overlap, 0.0, None) / width


def _crop_band(size, kept):
    """Boolean (size,) mask of the ``kept`` central k-space lines: the spectrum of a ``kept``-line image."""
    start = size // 2 - kept // 2
    index = jnp.arange(size)
    return (index >= start) & (index < start + kept)


DOWNSAMPLE_METHODS = ("area", "kspace", "any")


def _resampled(x, factor, down: str, up: str):
    """Down to round(size / factor) with `down` (``area``: area averaging; else jax.image's antialiased kernel of
    that name), back up with jax.image's `up` interpolation."""
    height, width, channels = x.shape
    reduced_h, reduced_w = max(1, round(height / factor)), max(1, round(width / factor))
    if down == "area":
        small = jnp.einsum("ih,hwc,jw->ijc", _area_weights(height, reduced_h), x, _area_weights(width, reduced_w))
    else:
        small = jax.image.resize(x, (reduced_h, reduced_w, channels), method=down, antialias=True)
    return jax.image.resize(small, (height, width, channels), method=up)


def _lowpassed(key, x, factor):
    """k-space low-pass around 1 / factor of each axis: a sharp crop of random width (ringing) or a Gaussian
    roll-off (smooth), drawn per slice."""
    height, width = x.shape[0], x.shape[1]
    k_width, k_shape = jax.random.split(key)
    fraction = jax.random.uniform(k_width, (), jnp.float32, 0.8, 1.2) / factor
    ky = jnp.abs(jnp.arange(height) - height // 2) / (height / 2.0)
    kx = jnp.abs(jnp.arange(width) - width // 2) / (width / 2.0)
    sharp = ((ky <= fraction)[:, None] & (kx <= fraction)[None, :]).astype(jnp.float32)
    smooth = jnp.exp(-0.5 * (ky[:, None] ** 2 + kx[None, :] ** 2) / (0.6 * fraction) ** 2)
    window = jnp.where(jax.random.bernoulli(k_shape), sharp, smooth)
    return _magnitude(ifft2c(fft2c(x) * window[..., None]))


def downsample(key, image, factor=2, method="area"):
    """Thesis section 4.4.8 (resolution reduction) by ``factor``, back at the input size.

    ``method="area"``: area-resize to round(H / factor) x round(W / factor) (average pooling for a whole
    factor), then ``jax.image.resize(method="linear")`` back (the thesis resized down and up). ``method="kspace"``:
    keep only the central round(H / factor) x round(W / factor) k-space samples (what a scanner acquiring the
    lower resolution measures), zero-fill, ``ifft2c``, magnitude. ``method="any"`` draws one of several
    implementations per slice (area, antialiased linear or Lanczos down, linear / cubic / Lanczos up, a sharp or
    Gaussian k-space low-pass of random width), so a model does not learn one filter's fingerprint. Any size
    works; ``factor == 1`` is the identity. ``key`` is only used by ``any``.
    """
    if method not in DOWNSAMPLE_METHODS:
        raise ValueError(f"downsample method must be one of {DOWNSAMPLE_METHODS}, not {method!r}.")
    height, width, channels = image.shape
    if factor == 1:
        return image
    reduced_h, reduced_w = max(1, round(height / factor)), max(1, round(width / factor))
    x = image.astype(jnp.float32)
    if method == "kspace":
        keep = _crop_band(height, reduced_h)[:, None] & _crop_band(width, reduced_w)[None, :]
        return _finish(_magnitude(ifft2c(fft2c(x) * keep[..., None])), image)
    if method == "area":
        return _finish(_resampled(x, factor, "area", "linear"), image)
    k_branch, k_low = jax.random.split(key)
    branches = [lambda: _resampled(x, factor, "area", "linear"), lambda: _resampled(x, factor, "area", "cubic"),
                lambda: _resampled(x, factor, "linear", "cubic"), lambda: _resampled(x, factor, "lanczos3", "lanczos3"),
                lambda: _resampled(x, factor, "cubic", "linear"), lambda: _lowpassed(k_low, x, factor)]
    return _finish(jax.lax.switch(jax.random.randint(k_branch, (), 0, len(branches)), branches), image)


GIBBS_AXES = ("pe", "both", "any")


def gibbs(key, image, keep_fraction_range=(0.35, 0.65), axes="both", real_probability=0.0):
    """Thesis section 4.4.9 (after its ref. 31): Gibbs ringing by truncating k-space.

    ``fft2c``, zero every line outside a centred band that keeps a fraction f ~ U(keep_fraction_range) of the
    lines along the phase-encode axis 0 (``axes="pe"``), along both axes (``"both"``), or along the phase-encode
    axis, the readout axis or both, drawn per slice (``"any"``); ``ifft2c``; the magnitude, or with probability
    ``real_probability`` the real part. f = 1 is the identity (up to float error).
    """
    if axes not in GIBBS_AXES:
        raise ValueError(f"gibbs axes must be one of {GIBBS_AXES}, not {axes!r}.")
    height, width = image.shape[0], image.shape[1]
    lo, hi = keep_fraction_range
    fraction = jax.random.uniform(key, (), jnp.float32, lo, hi)
    rows, cols = _centred_band(height, fraction)[:, None], _centred_band(width, fraction)[None, :]
    if axes == "pe":
        keep = rows & jnp.ones_like(cols)
    elif axes == "both":
        keep = rows & cols
    else:
        which = jax.random.randint(jax.random.fold_in(key, 1), (), 0, 3)  # 0: pe, 1: readout, 2: both
        keep = (rows | (which == 1)) & (cols | (which == 0))
    kspace = fft2c(image) * keep[..., None]
    return _finish(_image_of(kspace, jax.random.fold_in(key, 2), real_probability), image)


def _ghost_scale(size, num, strength, restore_centre):
    """(size,) k-space line weights: every num-th line scaled by 1 - strength, the centre line kept if asked."""
    idx = jnp.arange(size)
    scaled = (idx % num == 0) & ~(restore_centre & (idx == size // 2))
    return jnp.where(scaled, 1.0 - strength, 1.0)


def ghost(key, image, num_ghosts_range=(2, 4), intensity_range=(0.3, 0.8), axis=0, restore_centre=True,
          real_probability=0.0):
    """Thesis section 4.4.10 / TorchIO ``RandomGhosting``: periodic scaling of k-space lines.

    n ~ U{num_ghosts_range} (inclusive), s ~ U(intensity_range); every n-th line (indices 0, n, 2n, ... of the
    centred k-space) along ``axis`` (0, 1, or ``"any"``: drawn per slice) is multiplied by (1 - s); with
    ``restore_centre`` (True, False, or ``"any"``) the centre line (index size // 2) keeps its original value, as
    TorchIO does with ``restore=None``. Then ``ifft2c``, the magnitude, or with probability ``real_probability``
    the real part (as TorchIO takes). Ghost copies of amplitude ~s/n appear shifted by size / n pixels along the
    axis. s = 0 is the identity.
    """
    if axis not in (0, 1, "any"):
        raise ValueError(f"ghost axis must be 0, 1 or 'any', not {axis!r}.")
    n_lo, n_hi = num_ghosts_range
    if n_lo < 1 or n_hi < n_lo:
        raise ValueError(f"ghost num_ghosts_range must be 1 <= low <= high, not {num_ghosts_range!r}.")
    k_n, k_s = jax.random.split(key)
    num = jax.random.randint(k_n, (), n_lo, n_hi + 1)
    strength = jax.random.uniform(k_s, (), jnp.float32, *intensity_range)
    if restore_centre == "any":
        restore_centre = jax.random.bernoulli(jax.random.fold_in(key, 1))
    rows = _ghost_scale(image.shape[0], num, strength, restore_centre)[:, None, None]
    cols = _ghost_scale(image.shape[1], num, strength, restore_centre)[None, :, None]
    if axis == "any":
        along_rows = jax.random.bernoulli(jax.random.fold_in(key, 2))
        scale = jnp.where(along_rows, rows * jnp.ones_like(cols), cols * jnp.ones_like(rows))
    else:
        scale = rows if axis == 0 else cols
    return _finish(_image_of(fft2c(image) * scale, jax.random.fold_in(key, 3), real_probability), image)


# --------------------------------------------------------------------------------------------- beyond the thesis


def rician_noise(key, image, snr_range=(10.0, 40.0), foreground=0.1):
    """Rician noise: the magnitude of the image plus complex Gaussian noise (Gudbjartsson & Patz, MRM 1995).

    The noise level 1/SNR is uniform between 1/snr_range[1] and 1/snr_range[0] (``inf`` allowed: no noise);
    sigma = mean signal of the foreground (pixels above ``foreground`` * max) / SNR; the result is
    ``|x + sigma * (n1 + i n2)|`` with n1, n2 ~ N(0, 1), so the background gets the Rayleigh noise floor.
    """
    lo, hi = snr_range
    if not 0 < lo <= hi:
        raise ValueError(f"rician_noise snr_range must be 0 < low <= high, not {snr_range!r}.")
    k_level, k_noise = jax.random.split(key)
    inverse_snr = jax.random.uniform(k_level, (), jnp.float32, 1.0 / hi, 1.0 / lo)
    x = image.astype(jnp.float32)
    inside = x > foreground * jnp.max(x)
    signal = jnp.sum(jnp.where(inside, x, 0.0)) / jnp.maximum(jnp.sum(inside), 1)
    noise = signal * inverse_snr * jax.random.normal(k_noise, (2,) + x.shape, jnp.float32)
    return _finish(_magnitude(jax.lax.complex(x + noise[0], noise[1])), image)


def spike_draw(key, height, width, num_spikes_range=(1, 3), intensity_range=(0.1, 0.4)):
    """The random part of :func:`spike`: ``(positions, active, strength)``.

    ``positions`` is (max_spikes, 2) int32 k-space (row, column) indices drawn uniformly, ``active`` (max_spikes,)
    bool marks the first n ~ U{num_spikes_range} (inclusive) of them, ``strength`` r ~ U(intensity_range).
    """
    n_lo, n_hi = num_spikes_range
    if n_lo < 0 or n_hi < max(n_lo, 1):
        raise ValueError(f"spike num_spikes_range must be 0 <= low <= high, 1 <= high, not {num_spikes_range!r}.")
    k_n, k_row, k_col, k_r = jax.random.split(key, 4)
    count = jax.random.randint(k_n, (), n_lo, n_hi + 1)
    positions = jnp.stack([jax.random.randint(k_row, (n_hi,), 0, height),
                           jax.random.randint(k_col, (n_hi,), 0, width)], axis=-1).astype(jnp.int32)
    strength = jax.random.uniform(k_r, (), jnp.float32, *intensity_range)
    return positions, jnp.arange(n_hi) < count, strength


def spike(key, image, num_spikes_range=(1, 3), intensity_range=(0.1, 0.4)):
    """k-space spikes, the herringbone / corduroy artifact (TorchIO ``Spike``).

    Adds r * max|k| at each active position of :func:`spike_draw` (one side of k-space only, as TorchIO: a
    single bad sample, not a pure cosine), ``ifft2c``, magnitude: stripes whose frequency is the spike's
    offset from the k-space centre. r = 0 is the identity.
    """
    height, width = image.shape[0], image.shape[1]
    positions, active, strength = spike_draw(key, height, width, num_spikes_range, intensity_range)
    kspace = fft2c(image)
    amplitude = strength * jnp.max(_magnitude(kspace)) * active
    spikes = jnp.zeros((height, width), jnp.complex64).at[positions[:, 0], positions[:, 1]].add(amplitude)
    return _finish(_magnitude(ifft2c(kspace + spikes[..., None])), image)


def _rotate(x, angle):
    """(H, W, C) float32 image rotated by ``angle`` radians about its centre (bilinear, zero outside)."""
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return _warp(x, jnp.array([[cos, -sin], [sin, cos]]), jnp.zeros(2))


def _shift_ramp(height, width, shift):
    """(H, W, 1) complex64 k-space phase ramp that translates an image by ``shift`` = (rows, columns) pixels."""
    ky = (jnp.arange(height) - height // 2).astype(jnp.float32)[:, None] / height
    kx = (jnp.arange(width) - width // 2).astype(jnp.float32)[None, :] / width
    phase = -2.0 * jnp.pi * (ky * shift[0] + kx * shift[1])
    return jax.lax.complex(jnp.cos(phase), jnp.sin(phase))[..., None]


def motion(key, image, num_moves=2, max_degrees=5.0, max_shift=0.03):
    """Rigid in-plane motion during the acquisition (Shaw et al., MIDL 2019; TorchIO ``Motion``).

    The phase-encode lines (axis 0) are acquired in ``num_moves + 1`` segments split at sorted times
    t ~ U(0, 1); each segment's lines come from the k-space of a copy of the slice rotated by
    theta ~ U(-max_degrees, max_degrees) about its centre (bilinear, ``jax.scipy.ndimage.map_coordinates``, zero
    outside) and translated by (dy, dx) ~ U(-max_shift, max_shift) * (H, W) pixels (a k-space phase ramp:
    sub-pixel and lossless). The segment holding the k-space centre keeps the unmoved pose (TorchIO swaps the
    original spectrum there), so the result stays registered to the input. ``ifft2c``, magnitude. Zero
    rotation and translation is the identity.
    """
    if num_moves < 1:
        raise ValueError(f"motion num_moves must be at least 1, not {num_moves!r}.")
    height, width = image.shape[0], image.shape[1]
    poses = num_moves + 1
    k_t, k_a, k_s = jax.random.split(key, 3)
    starts = (jnp.sort(jax.random.uniform(k_t, (num_moves,))) * height).astype(jnp.int32)
    segment = jnp.sum(jnp.arange(height)[:, None] >= starts[None, :], axis=1)  # (H,) pose of each line
    still = jnp.arange(poses) == segment[height // 2]
    angles = jax.random.uniform(k_a, (poses,), jnp.float32, -max_degrees, max_degrees) * (jnp.pi / 180.0)
    shifts = jax.random.uniform(k_s, (poses, 2), jnp.float32, -max_shift, max_shift) * jnp.array([height, width])
    angles = jnp.where(still, 0.0, angles)
    shifts = jnp.where(still[:, None], 0.0, shifts)
    x = image.astype(jnp.float32)

    def pose_kspace(angle, shift):
        return fft2c(_rotate(x, angle)) * _shift_ramp(height, width, shift)

    spectra = jax.vmap(pose_kspace)(angles, shifts)  # (poses, H, W, C)
    chosen = (segment[None, :] == jnp.arange(poses)[:, None])[:, :, None, None]
    kspace = jnp.sum(jnp.where(chosen, spectra, 0.0), axis=0)
    return _finish(_magnitude(ifft2c(kspace)), image)


def bias_field(key, image, order=3, max_coefficient=0.3):
    """Smooth multiplicative bias field (Van Leemput et al., IEEE TMI 1999; TorchIO ``BiasField``).

    field = exp(sum c_ij y^i x^j) over 1 <= i + j <= ``order``, c_ij ~ U(-max_coefficient, max_coefficient),
    y and x the pixel centres scaled to [-1, 1]; the result is image * field, clipped. Unlike TorchIO there is
    no constant term (it would only rescale the slice, which per-slice normalisation undoes).
    ``max_coefficient == 0`` is the identity.
    """
    height, width = image.shape[0], image.shape[1]
    powers = [(i, j) for i in range(order + 1) for j in range(order + 1 - i) if i + j > 0]
    coefficients = jax.random.uniform(key, (len(powers),), jnp.float32, -max_coefficient, max_coefficient)
    y = (jnp.arange(height, dtype=jnp.float32) - (height - 1) / 2.0) / max((height - 1) / 2.0, 1.0)
    x = (jnp.arange(width, dtype=jnp.float32) - (width - 1) / 2.0) / max((width - 1) / 2.0, 1.0)
    log_field = sum(c * y[:, None] ** i * x[None, :] ** j for c, (i, j) in zip(coefficients, powers))
    return _finish(image.astype(jnp.float32) * jnp.exp(log_field)[..., None], image)


def undersampling_mask(key, size, acceleration=4, center_fraction=0.08, pattern="random"):
    """(size,) bool mask of the acquired phase-encode lines, as fastMRI defines it (``fastmri.data.subsample``).

    The round(size * center_fraction) central lines are always acquired (fastMRI's placement:
    ``pad = (size - n_low + 1) // 2``). ``pattern="random"`` (``RandomMaskFunc``) adds each other line with
    probability (size / acceleration - n_low) / (size - n_low), so size / acceleration lines are acquired on
    average; ``pattern="equispaced"`` (``EquispacedMaskFractionFunc``) adds the lines round(offset + j * a) below
    size - 1, a = acceleration (n_low - size) / (n_low acceleration - size), offset ~ U{0 .. round(a) - 1}.
    fastMRI's pairs are 4x with center_fraction 0.08 and 8x with 0.04. ``center_fraction=1`` samples every line.
    """
    if pattern not in ("random", "equispaced"):
        raise ValueError(f'undersampling pattern must be "random" or "equispaced", not {pattern!r}.')
    if acceleration < 1 or not 0 <= center_fraction <= 1:
        raise ValueError(f"undersampling needs acceleration >= 1 and 0 <= center_fraction <= 1, "
                         f"not {acceleration!r} and {center_fraction!r}.")
    n_low = round(size * center_fraction)
    index = jnp.arange(size)
    pad = (size - n_low + 1) // 2
    acquired = (index >= pad) & (index < pad + n_low)
    if n_low * acceleration >= size:  # the centre alone reaches the target number of lines
        return acquired
    if pattern == "random":
        probability = (size / acceleration - n_low) / (size - n_low)
        return acquired | (jax.random.uniform(key, (size,)) < probability)
    spacing = acceleration * (n_low - size) / (n_low * acceleration - size)
    offset = jax.random.randint(key, (), 0, max(round(spacing), 1))
    positions = offset + jnp.arange(math.ceil(size / spacing) + 1) * spacing
    rounded = jnp.round(positions).astype(jnp.int32)
    hits = (rounded[:, None] == index[None, :]) & (positions < size - 1)[:, None]
    return acquired | hits.any(axis=0)


def undersample(key, image, acceleration=4, center_fraction=0.08, pattern="random"):
    """Cartesian undersampling of the phase-encode axis with :func:`undersampling_mask`, zero-filled.

    ``fft2c``, keep the acquired lines (zeros elsewhere), ``ifft2c``, magnitude: the zero-filled reconstruction
    fastMRI models start from (Zbontar et al., arXiv:1811.08839). ``center_fraction=1`` is the identity.
    """
    mask = undersampling_mask(key, image.shape[0], acceleration, center_fraction, pattern)
    return _finish(_magnitude(ifft2c(fft2c(image) * mask[:, None, None])), image)


def coarse_noise(key, image, resolution=16, std=0.2, foreground_only=True):
    """Coarse, low-frequency noise (Kascenas et al., MIDL 2022): Gaussian noise N(0, std^2) drawn on a
    ``resolution`` x ``resolution`` grid, upsampled (bilinear) to the image size and added; with
    ``foreground_only`` only where the image is above 0 (a skull-stripped background stays exactly 0). A denoiser
    trained on it learns to remove blob-like intensity changes of any sign: what it removes from a real scan is an
    anomaly map. ``std == 0`` is the identity."""
    height, width, channels = image.shape
    noise = jax.random.normal(key, (resolution, resolution, channels), jnp.float32)
    noise = jax.image.resize(noise, (height, width, channels), method="linear")
    x = image.astype(jnp.float32)
    added = std * noise * ((x > 0) if foreground_only else 1.0)
    return _finish(x + added, image)


# --------------------------------------------------------------------------------------------- policy

# name -> per-image function with the parameters (sampling ranges) that policies use.
CORRUPTIONS: dict[str, Callable] = {
    "downsample": functools.partial(downsample, factor=2, method="area"),
    "downsample_x4": functools.partial(downsample, factor=4, method="area"),
    "kspace_crop": functools.partial(downsample, factor=2, method="kspace"),
    "kspace_crop_x4": functools.partial(downsample, factor=4, method="kspace"),
    "gibbs": functools.partial(gibbs, keep_fraction_range=(0.35, 0.65), axes="both"),
    "gibbs_pe": functools.partial(gibbs, keep_fraction_range=(0.35, 0.65), axes="pe"),
    "ghost": functools.partial(ghost, num_ghosts_range=(2, 4), intensity_range=(0.3, 0.8), axis=0,
                               restore_centre=True),
    "noise": functools.partial(rician_noise, snr_range=(10.0, 40.0)),
    "spike": functools.partial(spike, num_spikes_range=(1, 3), intensity_range=(0.1, 0.4)),
    "motion": functools.partial(motion, num_moves=2, max_degrees=5.0, max_shift=0.03),
    "bias": functools.partial(bias_field, order=3, max_coefficient=0.3),
    "undersample_random_x4": functools.partial(undersample, acceleration=4, center_fraction=0.08, pattern="random"),
    "undersample_random_x8": functools.partial(undersample, acceleration=8, center_fraction=0.04, pattern="random"),
    "undersample_equispaced_x4": functools.partial(undersample, acceleration=4, center_fraction=0.08,
                                                   pattern="equispaced"),
    "undersample_equispaced_x8": functools.partial(undersample, acceleration=8, center_fraction=0.04,
                                                   pattern="equispaced"),
    # Training variants of the thesis's kinds, randomised well beyond one implementation's choices (filters,
    # strengths, axes, magnitude or real part), so that what a model learns holds on other scanners' artifacts.
    "downsample_wide": functools.partial(downsample, factor=2, method="any"),
    "gibbs_wide": functools.partial(gibbs, keep_fraction_range=(0.3, 0.75), axes="any", real_probability=0.5),
    # Coarse noise for a denoising anomaly detector (Kascenas et al. 2022): 16x16 noise, std 0.2 of the range.
    "coarse_noise": functools.partial(coarse_noise, resolution=16, std=0.2),
    "ghost_wide": functools.partial(ghost, num_ghosts_range=(2, 5), intensity_range=(0.2, 0.95), axis=0,
                                    restore_centre="any", real_probability=0.5),
}

INPAINT_CELLS = 8  # squares per side of the inpainting grid
INPAINT_PHASES = 4  # complementary phases that together hide every pixel once


def grid_mask(height, width, cells=INPAINT_CELLS, phase=0, phases=INPAINT_PHASES, offset=(0, 0)):
    """(H, W) bool mask of one phase of a square grid: squares of side H // cells (W // cells), the grid shifted by
    ``offset`` (rows, columns) pixels; square (i, j) belongs to phase (i mod 2) * 2 + (j mod 2) for 4 phases, to
    (i + j) mod 2 for 2. The ``phases`` masks of one offset are disjoint and cover the image exactly once, and each
    hidden square has visible neighbours on every side. Jittable (``phase`` and ``offset`` may be traced)."""
    if phases not in (2, 4):
        raise ValueError(f"grid_mask phases must be 2 or 4, not {phases!r}.")
    size_r, size_c = max(1, height // cells), max(1, width // cells)
    rows = (jnp.arange(height) + offset[0]) // size_r
    cols = (jnp.arange(width) + offset[1]) // size_c
    if phases == 4:
        square = (rows[:, None] % 2) * 2 + (cols[None, :] % 2)
    else:
        square = (rows[:, None] + cols[None, :]) % 2
    return square == phase


def inpaint_grid(key, image, cells=INPAINT_CELLS, phases=INPAINT_PHASES):
    """Masked inpainting (issue 15): one phase of :func:`grid_mask`, drawn with a random grid offset, hidden (set
    to 0); returns ``(image, mask)`` like the line patch, so ``--patch_weight`` weights the hidden pixels. At
    detection every phase at offset 0 is hidden in turn, and a pixel's score is the error when it was hidden."""
    height, width = image.shape[0], image.shape[1]
    k_phase, k_row, k_col = jax.random.split(key, 3)
    offset = (jax.random.randint(k_row, (), 0, 2 * max(1, height // cells)),
              jax.random.randint(k_col, (), 0, 2 * max(1, width // cells)))
    mask = grid_mask(height, width, cells, jax.random.randint(k_phase, (), 0, phases), phases, offset)
    mask = mask[..., None].astype(jnp.float32)
    return _finish(image.astype(jnp.float32) * (1.0 - mask), image), mask


# name -> the line patch with the parameters policies use; "patch_wide" is the training variant; "inpaint_grid"
# hides one phase of a square grid instead (masked inpainting for detection).
PATCHES: dict[str, Callable] = {
    "patch": line_patch,
    "patch_wide": functools.partial(line_patch, edge_px_range=(0.0, 1.5), square_pen_probability=0.5),
    "inpaint_grid": inpaint_grid,
}

NAMED_POLICIES: dict[str, str] = {
    "original": "patch+downsample",
    "augmented": "patch+oneof(downsample,gibbs,ghost)",
    "realistic": "patch+oneof(kspace_crop,gibbs_pe,ghost,motion,spike,bias,undersample_random_x4,"
                 "undersample_equispaced_x8)+noise",
    "augmented_wide": "patch_wide+oneof(downsample_wide,gibbs_wide,ghost_wide)",
    "none": "",
}


@dataclasses.dataclass(frozen=True)
class Policy:
    """One corruption recipe per slice: ``before`` in order, one of ``kinds`` drawn uniformly, ``after`` in
    order, then the patch if ``patch``.

    Frozen and made of tuples/strings, so hashable and usable as a static ``jit`` argument.
    """

    patch: bool
    kinds: tuple[str, ...]
    spec: str
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    patch_kind: str = "patch"  # a name in PATCHES

    def __post_init__(self):
        unknown = [k for k in self.before + self.kinds + self.after if k not in CORRUPTIONS]
        if unknown:
            raise ValueError(f"Unknown corruption {unknown[0]!r}; valid names are {', '.join(CORRUPTIONS)}.")
        if self.patch_kind not in PATCHES:
            raise ValueError(f"Unknown patch {self.patch_kind!r}; valid names are {', '.join(PATCHES)}.")


def _canonical(patch, before, kinds, after):
    drawn = [kinds[0]] if len(kinds) == 1 else [f"oneof({','.join(kinds)})"] if kinds else []
    return "+".join(([patch] if patch else []) + list(before) + drawn + list(after)) or "none"


def parse_policy(spec: str) -> Policy:
    """Parse a policy name or spec (in Python, once; never inside ``jit``).

    Names: ``original`` = ``patch+downsample``, ``augmented`` = ``patch+oneof(downsample,gibbs,ghost)``,
    ``realistic``, ``augmented_wide`` (see ``NAMED_POLICIES``), ``none`` = no corruption. Specs are ``+``-joined
    terms: a patch (``patch`` or its training variant ``patch_wide``), corruption names (always applied, in the
    written order) and at most one ``oneof(a,b,...)`` (one of them drawn per slice, at its place in that order);
    the patch is always applied last. Without a ``oneof`` of several names the first corruption is ``kinds`` and
    the others ``after``. Each corruption appears at most once; whitespace and case are ignored.
    """
    valid = (f"valid policies are {', '.join(NAMED_POLICIES)} or '+'-joined terms among "
             f"{', '.join(PATCHES)}, {', '.join(CORRUPTIONS)} and one oneof(...) of those corruptions")
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"Corruption policy must be a string, not {type(spec).__name__}; {valid}.")
    text = re.sub(r"\s+", "", spec).lower()
    text = NAMED_POLICIES.get(text, text)
    patch, before, kinds, after = False, [], None, []
    for term in text.split("+") if text else []:
        match = re.fullmatch(r"oneof\((.*)\)", term)
        names = tuple(match.group(1).split(",")) if match else (term,)
        if term in PATCHES and not patch:
            patch = term
        elif not all(n in CORRUPTIONS for n in names):
            raise ValueError(f"Invalid corruption policy {spec!r} (bad term {term!r}); {valid}.")
        elif match and kinds is not None:
            raise ValueError(f"Invalid corruption policy {spec!r}: at most one oneof(...) term is allowed; {valid}.")
        elif match:
            kinds = names
        else:
            (before if kinds is None else after).append(term)
    sequence = before + list(kinds or ()) + after
    if len(set(sequence)) < len(sequence):
        raise ValueError(f"Invalid corruption policy {spec!r}: each corruption may appear once; {valid}.")
    if kinds is None or len(kinds) == 1:  # a plain sequence: its first corruption is the (only) kind
        before, kinds, after = [], tuple(sequence[:1]), sequence[1:]
    return Policy(patch=bool(patch), kinds=kinds, spec=_canonical(patch, before, kinds, after),
                  before=tuple(before), after=tuple(after), patch_kind=patch or "patch")


def _apply_in_order(key, image, names):
    """Apply the named corruptions one after the other, each with its own key folded from ``key``."""
    for index, name in enumerate(names):
        image = CORRUPTIONS[name](jax.random.fold_in(key, index), image)
    return image


def corrupt_image(key, image, policy):
    """Apply one :class:`Policy` to one (H, W, C) image: ``(corrupted, mask, kind)``.

    Applies ``policy.before``, then a kind drawn uniformly from ``policy.kinds`` (``jax.lax.switch``), then
    ``policy.after``, then the line patch if ``policy.patch``. ``mask`` is (H, W, 1) float32 (zeros without a
    patch); ``kind`` is an int32 index into ``policy.kinds`` (0 when there is no choice). ``policy`` may also
    be a spec string (parsed in Python).
    """
    if isinstance(policy, str):
        policy = parse_policy(policy)
    k_kind, k_corrupt, k_patch = jax.random.split(key, 3)
    out = _apply_in_order(jax.random.fold_in(k_kind, 1), image, policy.before)
    kind = jnp.zeros((), jnp.int32)
    if len(policy.kinds) == 1:
        out = CORRUPTIONS[policy.kinds[0]](k_corrupt, out)
    elif policy.kinds:
        kind = jax.random.randint(k_kind, (), 0, len(policy.kinds)).astype(jnp.int32)
        branches = [CORRUPTIONS[name] for name in policy.kinds]
        out = jax.lax.switch(kind, branches, k_corrupt, out)
    out = _apply_in_order(jax.random.fold_in(k_kind, 2), out, policy.after)
    if policy.patch:
        out, mask = PATCHES[policy.patch_kind](k_patch, out)
    else:
        mask = jnp.zeros(image.shape[:2] + (1,), jnp.float32)
    return out, mask, kind


def corrupt_batch(key, images, policy):
    """``jax.vmap`` of :func:`corrupt_image` over an NHWC batch with ``jax.random.split(key, N)``.

    For ``jax.jit``, mark ``policy`` static: ``jax.jit(corrupt_batch, static_argnames="policy")``.
    """
    if isinstance(policy, str):
        policy = parse_policy(policy)
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, x: corrupt_image(k, x, policy))(keys, images)


# --------------------------------------------------------------------------------------------- augmentation
# Train-time changes of the clean slice itself (target and input alike, before any corruption): the
# differences between scanners, sites and populations that a model must not mistake for artifacts.

__all__ += ["geometry_jitter", "gamma_contrast", "AUGMENTATIONS", "parse_augmentation", "augment_batch"]


def _warp(x, matrix, offset):
    """(H, W, C) float32 image resampled at ``matrix @ (r, c) + offset`` for every output pixel (r, c) about the
    image centre (bilinear, zero outside)."""
    height, width = x.shape[0], x.shape[1]
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                              indexing="ij")
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    source = [cy + matrix[0, 0] * (rows - cy) + matrix[0, 1] * (cols - cx) + offset[0],
              cx + matrix[1, 0] * (rows - cy) + matrix[1, 1] * (cols - cx) + offset[1]]

    def one_channel(channel):
        return jax.scipy.ndimage.map_coordinates(channel, source, order=1, mode="constant", cval=0.0)

    return jax.vmap(one_channel, in_axes=2, out_axes=2)(x)


def geometry_jitter(key, image, max_degrees=8.0, scale_range=(0.9, 1.1), aspect_range=(0.8, 1.25),
                    max_shift=0.04, flip_probability=0.5):
    """A small random affine change of pose and shape: rotation theta ~ U(-max_degrees, max_degrees), isotropic
    scale ~ U(scale_range), a column/row aspect ~ U(aspect_range) (slices resized with anisotropic pixels, as the
    thesis did), a shift ~ U(-max_shift, max_shift) of each side, and a left-right flip with probability
    ``flip_probability``; bilinear, the slice minimum outside. No change at all (theta 0, scales 1, no shift, no
    flip) is the identity."""
    k_angle, k_scale, k_aspect, k_shift, k_flip = jax.random.split(key, 5)
    theta = jax.random.uniform(k_angle, (), jnp.float32, -max_degrees, max_degrees) * (jnp.pi / 180.0)
    scale = jax.random.uniform(k_scale, (), jnp.float32, *scale_range)
    aspect = jnp.exp(jax.random.uniform(k_aspect, (), jnp.float32, *jnp.log(jnp.asarray(aspect_range))))
    flip = jnp.where(jax.random.bernoulli(k_flip, flip_probability), -1.0, 1.0)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    # Output -> input: undo the scales (rows by scale, columns by scale * aspect, flipped), then the rotation.
    matrix = jnp.array([[cos, -sin], [sin, cos]]) @ jnp.diag(jnp.stack([1.0 / scale, flip / (scale * aspect)]))
    shift = jax.random.uniform(k_shift, (2,), jnp.float32, -max_shift, max_shift) * jnp.array(image.shape[:2])
    x = image.astype(jnp.float32)
    low = jnp.min(x)
    return (_warp(x - low, matrix, shift) + low).astype(image.dtype)


def gamma_contrast(key, image, gamma_range=(0.7, 1.4)):
    """Another scanner's contrast curve: the slice (taken in its own [0, 1] range) to the power gamma, log-uniform
    in ``gamma_range``. gamma = 1 is the identity (up to the range mapping)."""
    gamma = jnp.exp(jax.random.uniform(key, (), jnp.float32, *jnp.log(jnp.asarray(gamma_range))))
    x = image.astype(jnp.float32)
    low, high = jnp.min(x), jnp.max(x)
    unit = (x - low) / jnp.maximum(high - low, 1e-6)
    return (unit ** gamma * (high - low) + low).astype(image.dtype)


AUGMENTATIONS: dict[str, Callable] = {
    "geometry": geometry_jitter,
    "contrast": gamma_contrast,
    "bias": functools.partial(bias_field, order=3, max_coefficient=0.3),
    "noise": functools.partial(rician_noise, snr_range=(100.0, 400.0)),
    # From SNR 15 to none at all, uniform in 1 / SNR: noisier scanners; half the slices above SNR 30.
    "noise_wide": functools.partial(rician_noise, snr_range=(15.0, float("inf"))),
    # From SNR 30 to none: the noise of 1 mm scans left after resampling to a coarse grid, with a margin.
    "noise_moderate": functools.partial(rician_noise, snr_range=(30.0, float("inf"))),
}
NAMED_AUGMENTATIONS = {"site": "geometry+contrast+bias+noise", "none": ""}


def parse_augmentation(spec: str) -> tuple[str, ...]:
    """The augmentations of a spec: a name in NAMED_AUGMENTATIONS or '+'-joined names of AUGMENTATIONS (in Python,
    once); ValueError for anything else."""
    text = NAMED_AUGMENTATIONS.get(re.sub(r"\s+", "", spec or "").lower(), spec or "")
    names = tuple(term for term in text.split("+") if term)
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown or len(set(names)) < len(names):
        raise ValueError(f"Invalid augmentation {spec!r}; use {', '.join(NAMED_AUGMENTATIONS)} or '+'-joined "
                         f"names among {', '.join(AUGMENTATIONS)}, each once.")
    return names


def augment_batch(key, images, names: tuple[str, ...]):
    """Each slice of an NHWC batch changed by the named augmentations in order (its own key each), then min-max
    normalised again per slice to [0, 1], the frame of clean slices."""
    def one(k, image):
        for index, name in enumerate(names):
            image = AUGMENTATIONS[name](jax.random.fold_in(k, index), image)
        x = image.astype(jnp.float32)
        low, high = jnp.min(x), jnp.max(x)
        return ((x - low) / jnp.where(high > low, high - low, 1.0)).astype(images.dtype)

    return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


__all__ += ["random_window"]


def random_window(key, images, size: int):
    """A size x size window of each slice of an NHWC batch, at a position uniform over those inside the slice and
    drawn from `key` alone: the same key crops a corrupted batch, its target and its weights alike."""
    n, height, width, channels = images.shape
    row_key, col_key = jax.random.split(key)
    rows = jax.random.randint(row_key, (n,), 0, height - size + 1)
    cols = jax.random.randint(col_key, (n,), 0, width - size + 1)
    return jax.vmap(lambda image, r, c: jax.lax.dynamic_slice(image, (r, c, 0), (size, size, channels)))(
        images, rows, cols)


__all__ += ["grown_masks"]


def grown_masks(key, masks, max_px: int):
    """Each (H, W, C) mask of an NHWC batch grown by r ~ U{0, ..., max_px} pixels (a (2r + 1)-square maximum
    filter), r drawn per slice: masks that cover more than the pixels a patch changed, as a user draws them."""
    grown = [masks] + [jax.lax.reduce_window(masks, 0.0, jax.lax.max, (1, 2 * r + 1, 2 * r + 1, 1), (1, 1, 1, 1),
                                             "SAME") for r in range(1, max_px + 1)]
    radius = jax.random.randint(key, (masks.shape[0],), 0, max_px + 1)
    return jnp.take_along_axis(jnp.stack(grown, axis=1), radius[:, None, None, None, None], axis=1)[:, 0]


# ---- synthetic anomalies (lesion generator; issue 6) ----

__all__ += ["lesion_blob"]

LESION_HARMONICS = (2, 3, 4)  # angular harmonics that make the outline irregular
LESION_EDGE = 0.3  # the profile falls from 1 to 0 over the outer 30 % of the blob's radius


def lesion_blob(key, image, brain_mask=None, radius_range=(0.04, 0.12), contrast_range=(0.25, 0.6),
                hyper_probability=0.5, max_roughness=0.15):
    """A lesion-like blob of random size, shape and contrast inside the brain; returns ``(image, mask)``.

    The centre is uniform over the brain pixels (``brain_mask`` (H, W) or (H, W, 1); default: ``image > 0``;
    anywhere if the mask is empty). The outline is an ellipse with semi-axes ``r`` and ``r * a``,
    r ~ U(radius_range) * H, a ~ U(0.6, 1), at a random angle, its radius modulated by random harmonics 2-4 of
    the polar angle (relative amplitudes up to ``max_roughness``). The intensity profile is 1 inside and falls
    linearly to 0 over the outer ``LESION_EDGE`` of the radius; inside the brain only, the slice gets
    ``+c * profile`` (hyper-intense, with probability ``hyper_probability``) or ``-c * profile`` (hypo-intense),
    c ~ U(contrast_range), clipped to [0, 1]. ``mask`` (H, W, 1) float32 marks the brain pixels where the
    profile is at least 0.5 (the blob's half-contrast extent).
    """
    height, width = image.shape[0], image.shape[1]
    keys = jax.random.split(key, 8)
    x = image.astype(jnp.float32)
    region = (x[..., 0] > 0) if brain_mask is None else (jnp.reshape(brain_mask, (height, width)) > 0)
    logits = jnp.where(region.any(), jnp.where(region.ravel(), 0.0, -jnp.inf), 0.0)
    centre = jax.random.categorical(keys[0], logits)
    centre_row, centre_col = (centre // width).astype(jnp.float32), (centre % width).astype(jnp.float32)
    radius = jax.random.uniform(keys[1], (), jnp.float32, *radius_range) * height
    aspect = jax.random.uniform(keys[2], (), jnp.float32, 0.6, 1.0)
    angle = jax.random.uniform(keys[3], (), jnp.float32, 0.0, jnp.pi)
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                              indexing="ij")
    dy, dx = rows - centre_row, cols - centre_col
    along = dx * jnp.cos(angle) + dy * jnp.sin(angle)
    across = -dx * jnp.sin(angle) + dy * jnp.cos(angle)
    polar = jnp.arctan2(across, along)
    harmonics = jnp.asarray(LESION_HARMONICS, jnp.float32)
    amplitudes = jax.random.uniform(keys[4], harmonics.shape, jnp.float32, 0.0, max_roughness)
    phases = jax.random.uniform(keys[5], harmonics.shape, jnp.float32, 0.0, 2 * jnp.pi)
    outline = 1.0 + jnp.sum(amplitudes * jnp.cos(harmonics * polar[..., None] + phases), axis=-1)
    distance = jnp.sqrt((along / radius) ** 2 + (across / (radius * aspect)) ** 2) / outline
    profile = jnp.clip((1.0 - distance) / LESION_EDGE, 0.0, 1.0) * region
    sign = jnp.where(jax.random.bernoulli(keys[6], hyper_probability), 1.0, -1.0)
    contrast = jax.random.uniform(keys[7], (), jnp.float32, *contrast_range)
    out = x + (sign * contrast * profile)[..., None]
    mask = (profile >= 0.5).astype(jnp.float32)[..., None]
    return _finish(out, image), mask

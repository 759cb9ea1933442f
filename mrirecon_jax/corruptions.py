"""Corruptions of one MRI slice, as pure JAX functions, and the policy that picks them.

Every per-image corruption has the signature ``f(key, image, **params) -> image`` where ``image`` is an
``(H, W, C)`` float array in [0, 1] (float32 or bfloat16), ``key`` a ``jax.random`` key and ``params`` static
Python values. Outputs keep the input's shape and dtype and are real, finite and clipped to [0, 1]. Internally
everything is computed in float32 / complex64. Batches (NHWC) are handled with ``jax.vmap``; see
:func:`corrupt_batch`.

The corruptions follow the reference thesis (Lorente Banegas 2021, sections 4.4.7-4.4.11, see
``REFERENCE.md``):

* ``line_patch`` (4.4.7): a white line of random position, thickness and opacity, clipped to the slice maximum;
* ``downsample`` (4.4.8): resolution reduction by 2 and back;
* ``gibbs`` (4.4.9): drop the high frequencies of k-space;
* ``ghost`` (4.4.10): scale every n-th line of k-space (as TorchIO ``RandomGhosting``).

A :class:`Policy` (parsed once, in Python, by :func:`parse_policy`) says which of them each slice gets. The
thesis patches every slice; here the resolution / k-space corruption is applied FIRST and the patch LAST, so
the returned mask is exactly the set of pixels the patch changed (the thesis's order is not stated).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable

import jax
import jax.numpy as jnp

__all__ = [
    "fft2c",
    "ifft2c",
    "line_patch",
    "patch_box",
    "downsample",
    "gibbs",
    "ghost",
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
    """Clip a float32 result to [0, 1] and cast it to the dtype of ``like``."""
    return jnp.clip(x, 0.0, 1.0).astype(like.dtype)


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


def _segment_mask(height, width, points, thickness):
    """(H, W) float32 mask of the pixel centres whose distance to the segment is <= thickness / 2."""
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                              indexing="ij")
    p = jnp.stack([rows, cols], axis=-1)  # (H, W, 2)
    a, b = points[0], points[1]
    ab = b - a
    denom = jnp.maximum(jnp.sum(ab * ab), 1e-12)
    t = jnp.clip(jnp.sum((p - a) * ab, axis=-1) / denom, 0.0, 1.0)
    closest = a + t[..., None] * ab
    dist2 = jnp.sum((p - closest) ** 2, axis=-1)
    return (dist2 <= (thickness / 2.0) ** 2).astype(jnp.float32)


def line_patch(key, image, max_thickness_frac=1 / 8, centre_frac=0.5, min_opacity=0.3, max_opacity=1.0):
    """Thesis section 4.4.7: add a white line of random ends, thickness and opacity; return (image, mask).

    Ends are drawn uniformly in the central box (``centre_frac`` of each side, "to avoid creating patches in
    blank areas"), thickness in [1, ``max_thickness_frac`` * H] px, opacity in [min_opacity, max_opacity].
    A pixel belongs to the line when its distance to the segment is <= thickness / 2. The result is
    ``minimum(image + opacity * mask, max(image))``: the patch is clipped to the slice maximum so the dynamic
    range does not grow. ``mask`` is (H, W, 1) float32 in {0, 1}; pixels already at the maximum are in the
    mask but unchanged.
    """
    height, width = image.shape[0], image.shape[1]
    points, thickness, opacity = _line_geometry(key, height, width, max_thickness_frac, centre_frac,
                                                min_opacity, max_opacity)
    mask = _segment_mask(height, width, points, thickness)[..., None]
    x = image.astype(jnp.float32)
    patched = jnp.minimum(x + opacity * mask, jnp.max(x))
    return _finish(patched, image), mask


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


def downsample(key, image, factor=2):
    """Thesis section 4.4.8 (resolution reduction): average-pool by ``factor``, resize back linearly.

    ``jax.image.resize(method="linear")`` back to (H, W); H and W must be divisible by ``factor``;
    ``factor == 1`` is the identity. ``key`` is unused (kept for the uniform signature).
    """
    del key
    height, width, channels = image.shape
    if factor == 1:
        return image
    if height % factor or width % factor:
        raise ValueError(f"downsample factor {factor} must divide the image size {height}x{width}.")
    x = image.astype(jnp.float32)
    small = x.reshape(height // factor, factor, width // factor, factor, channels).mean(axis=(1, 3))
    return _finish(jax.image.resize(small, (height, width, channels), method="linear"), image)


def gibbs(key, image, keep_fraction_range=(0.35, 0.65), axes="both"):
    """Thesis section 4.4.9 (after its ref. 31): Gibbs ringing by truncating k-space.

    ``fft2c``, zero every line outside a centred band that keeps a fraction f ~ U(keep_fraction_range) of the
    lines along the phase-encode axis 0 (``axes="pe"``) or along both axes (``axes="both"``), ``ifft2c``,
    magnitude, clip to [0, 1]. f = 1 is the identity (up to float error).
    """
    if axes not in ("pe", "both"):
        raise ValueError(f'gibbs axes must be "pe" or "both", not {axes!r}.')
    height, width = image.shape[0], image.shape[1]
    lo, hi = keep_fraction_range
    fraction = jax.random.uniform(key, (), jnp.float32, lo, hi)
    keep = _centred_band(height, fraction)[:, None]
    if axes == "both":
        keep = keep & _centred_band(width, fraction)[None, :]
    kspace = fft2c(image) * keep[..., None]
    return _finish(_magnitude(ifft2c(kspace)), image)


def ghost(key, image, num_ghosts_range=(2, 4), intensity_range=(0.3, 0.8), axis=0, restore_centre=True):
    """Thesis section 4.4.10 / TorchIO ``RandomGhosting``: periodic scaling of k-space lines.

    n ~ U{num_ghosts_range} (inclusive), s ~ U(intensity_range); every n-th line (indices 0, n, 2n, ... of the
    centred k-space) along ``axis`` is multiplied by (1 - s); with ``restore_centre`` the centre line
    (index size // 2) keeps its original value, as TorchIO does with ``restore=None``. Then ``ifft2c``,
    magnitude (TorchIO takes the real part), clip. Ghost copies of amplitude ~s/n appear shifted by
    size / n pixels along ``axis``. s = 0 is the identity.
    """
    if axis not in (0, 1):
        raise ValueError(f"ghost axis must be 0 or 1, not {axis!r}.")
    n_lo, n_hi = num_ghosts_range
    if n_lo < 1 or n_hi < n_lo:
        raise ValueError(f"ghost num_ghosts_range must be 1 <= low <= high, not {num_ghosts_range!r}.")
    k_n, k_s = jax.random.split(key)
    num = jax.random.randint(k_n, (), n_lo, n_hi + 1)
    strength = jax.random.uniform(k_s, (), jnp.float32, *intensity_range)
    size = image.shape[axis]
    idx = jnp.arange(size)
    scaled = idx % num == 0
    if restore_centre:
        scaled = scaled & (idx != size // 2)
    scale = jnp.where(scaled, 1.0 - strength, 1.0)
    scale = scale[:, None, None] if axis == 0 else scale[None, :, None]
    return _finish(_magnitude(ifft2c(fft2c(image) * scale)), image)


# --------------------------------------------------------------------------------------------- policy

# name -> per-image function with its default (policy) parameters.
CORRUPTIONS: dict[str, Callable] = {
    "downsample": functools.partial(downsample, factor=2),
    "gibbs": functools.partial(gibbs, keep_fraction_range=(0.35, 0.65), axes="both"),
    "ghost": functools.partial(ghost, num_ghosts_range=(2, 4), intensity_range=(0.3, 0.8), axis=0,
                               restore_centre=True),
}

NAMED_POLICIES: dict[str, str] = {
    "original": "patch+downsample",
    "augmented": "patch+oneof(downsample,gibbs,ghost)",
    "none": "",
}


@dataclasses.dataclass(frozen=True)
class Policy:
    """One corruption recipe per slice: one of ``kinds`` drawn uniformly, then the patch if ``patch``.

    Frozen and made of tuples/strings, so hashable and usable as a static ``jit`` argument.
    """

    patch: bool
    kinds: tuple[str, ...]
    spec: str

    def __post_init__(self):
        unknown = [k for k in self.kinds if k not in CORRUPTIONS]
        if unknown:
            raise ValueError(f"Unknown corruption {unknown[0]!r}; valid names are {', '.join(CORRUPTIONS)}.")


def _canonical(patch, kinds):
    terms = ["patch"] if patch else []
    if len(kinds) == 1:
        terms.append(kinds[0])
    elif kinds:
        terms.append(f"oneof({','.join(kinds)})")
    return "+".join(terms) or "none"


def parse_policy(spec: str) -> Policy:
    """Parse a policy name or spec (in Python, once; never inside ``jit``).

    Names: ``original`` = ``patch+downsample``, ``augmented`` = ``patch+oneof(downsample,gibbs,ghost)``,
    ``none`` = no corruption. Specs are ``+``-joined terms: ``patch``, a corruption name, or
    ``oneof(a,b,...)``; at most one non-patch term. Whitespace and case are ignored.
    """
    valid = (f"valid policies are {', '.join(NAMED_POLICIES)} or '+'-joined terms among 'patch', "
             f"{', '.join(CORRUPTIONS)} and oneof(...) of those corruptions")
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"Corruption policy must be a string, not {type(spec).__name__}; {valid}.")
    text = re.sub(r"\s+", "", spec).lower()
    text = NAMED_POLICIES.get(text, text)
    patch, kinds_terms = False, []
    for term in text.split("+") if text else []:
        match = re.fullmatch(r"oneof\((.*)\)", term)
        names = tuple(match.group(1).split(",")) if match else (term,)
        if term == "patch" and not patch:
            patch = True
        elif names and all(n in CORRUPTIONS for n in names) and len(set(names)) == len(names):
            kinds_terms.append(names)
        else:
            raise ValueError(f"Invalid corruption policy {spec!r} (bad term {term!r}); {valid}.")
    if len(kinds_terms) > 1:
        raise ValueError(f"Invalid corruption policy {spec!r}: at most one non-patch term is allowed; {valid}.")
    kinds = kinds_terms[0] if kinds_terms else ()
    return Policy(patch=patch, kinds=kinds, spec=_canonical(patch, kinds))


def corrupt_image(key, image, policy):
    """Apply one :class:`Policy` to one (H, W, C) image: ``(corrupted, mask, kind)``.

    Draws the kind uniformly from ``policy.kinds`` (``jax.lax.switch``), applies it, then the line patch if
    ``policy.patch``. ``mask`` is (H, W, 1) float32 (zeros without a patch); ``kind`` is an int32 index into
    ``policy.kinds`` (0 when there is no choice). ``policy`` may also be a spec string (parsed in Python).
    """
    if isinstance(policy, str):
        policy = parse_policy(policy)
    k_kind, k_corrupt, k_patch = jax.random.split(key, 3)
    out = image
    kind = jnp.zeros((), jnp.int32)
    if len(policy.kinds) == 1:
        out = CORRUPTIONS[policy.kinds[0]](k_corrupt, image)
    elif policy.kinds:
        kind = jax.random.randint(k_kind, (), 0, len(policy.kinds)).astype(jnp.int32)
        branches = [CORRUPTIONS[name] for name in policy.kinds]
        out = jax.lax.switch(kind, branches, k_corrupt, image)
    if policy.patch:
        out, mask = line_patch(k_patch, out)
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

# ---- synthetic anomalies (lesion generator; issue 6) ----

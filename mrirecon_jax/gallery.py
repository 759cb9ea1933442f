"""The corruption gallery (``--mode=gallery``): one real slice under every corruption, with its k-space.

The thesis's Figure 4.5 showed one slice patched, reduced in resolution, with Gibbs ringing and with ghosting;
this draws the clean slice, the patch and every kind in :data:`corruptions.CORRUPTIONS`, each above the log
magnitude of its centred k-space (``log(1 + |fft2c|)``, one grey scale shared by all panels and saturating the
clean spectrum's brightest 1 %, so removed k-space samples show dark and added ones bright).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from mrirecon_jax import corruptions, plots
from mrirecon_jax.config import Config, UserError
from mrirecon_jax.data import demo, volumes
from mrirecon_jax.data.prepare import prepare_volume

COLUMNS = 6


def gallery_slice(cfg: Config) -> tuple[np.ndarray, str]:
    """The central ``cfg.plane`` slice, (image_size, image_size, 1) in [0, 1], of the first volume of
    ``cfg.data_dir`` (sorted by path) or of the first demo subject, and a line saying which it is."""
    if cfg.data_dir is None:
        (subject, volume, zooms), = demo.demo_volumes(n_subjects=1)[0]
        what = f"{subject} (demo source, not a real subject)"
    else:
        path = volumes.find_volumes(cfg.data_dir)[0]
        volume, zooms = volumes.load_volume(path)
        what = path.name
    image = prepare_volume(volume, zooms, cfg.replace(slices=1, slab_mm=None)).clean()[0]
    return image, f"{what}: central {cfg.plane} slice, {cfg.image_size} px"


def corruption_panels(image: np.ndarray, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (image, log(1 + |fft2c(image)|)) for ``clean``, ``patch`` and every kind in ``CORRUPTIONS``.

    ``image`` is (H, W, 1) in [0, 1]; each corruption gets its own key folded from ``seed``.
    """
    images, spectra = _all_panels(jax.random.key(seed), jnp.asarray(image, jnp.float32))
    names = ["clean", "patch", *corruptions.CORRUPTIONS]
    return {name: (np.asarray(x)[..., 0], np.asarray(k)[..., 0]) for name, x, k in zip(names, images, spectra)}


@jax.jit
def _all_panels(key, image):
    """Stacked images and log k-space magnitudes of corruption_panels (one compile: faster than op by op)."""
    images = [image, corruptions.line_patch(jax.random.fold_in(key, 0), image)[0]]
    for index, corrupt in enumerate(corruptions.CORRUPTIONS.values(), start=1):
        images.append(corrupt(jax.random.fold_in(key, index), image))
    images = jnp.stack(images)
    return images, jnp.log1p(jnp.abs(jax.vmap(corruptions.fft2c)(images)))


def _draw(path: Path, panels: dict, title: str) -> None:
    """Grid of panels, COLUMNS per row: each image above its k-space magnitude."""
    rows = -(-len(panels) // COLUMNS)
    fig, axes = plt.subplots(2 * rows, COLUMNS, figsize=(1.9 * COLUMNS, 3.9 * rows), squeeze=False)
    # The DC peak would make the rest of k-space black: saturate the brightest 1 % of the clean spectrum.
    kspace_max = float(np.percentile(panels["clean"][1], 99))
    for ax in axes.ravel():
        ax.set_axis_off()
    for index, (name, (image, kspace)) in enumerate(panels.items()):
        row, col = 2 * (index // COLUMNS), index % COLUMNS
        axes[row, col].imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
        axes[row, col].set_title(name.replace("_", " "), fontsize=8)
        axes[row + 1, col].imshow(kspace, cmap="gray", vmin=0.0, vmax=kspace_max)
    fig.suptitle(f"{title}; below each image: log(1 + |k-space|)", fontsize=9)
    fig.tight_layout()
    plots.save_figure(fig, path)


def save_gallery(cfg: Config, output) -> Path:
    """Draw the gallery of ``cfg``'s slice (see :func:`gallery_slice`) into the PNG ``output``; return its path.

    Refuses (UserError) an output that is not a .png or lies inside ``cfg.data_dir``, where the inputs are.
    """
    output = Path(output).expanduser()
    if output.suffix.lower() != ".png":
        raise UserError(f"--output={output} must name a .png file.")
    if cfg.data_dir is not None and output.resolve().is_relative_to(Path(cfg.data_dir).expanduser().resolve()):
        raise UserError(f"--output={output} is inside --data_dir={cfg.data_dir}; write the gallery elsewhere so "
                        "the data stays untouched.")
    image, title = gallery_slice(cfg)
    output.parent.mkdir(parents=True, exist_ok=True)
    _draw(output, corruption_panels(image, cfg.seed), title)
    return output

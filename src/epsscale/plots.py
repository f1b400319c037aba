"""Every figure epsscale draws, each written atomically (a reader never sees half a PNG).

Matplotlib is used through its object API (``matplotlib.figure.Figure``), never pyplot's global
state, so drawing is safe in any thread and needs no display.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from ._atomic import atomic_write

__all__ = ["save_figure", "save_image_grid", "scatter_points", "panel_grid", "plot_calibration"]


def save_figure(fig: Any, path: str | os.PathLike, *, dpi: int = 110) -> None:
    """Write a matplotlib figure as PNG, atomically."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def save_image_grid(images: np.ndarray, path: str | os.PathLike, *, ncol: int | None = None) -> None:
    """uint8 NHWC -> one PNG grid with 2 px white gutters, doubled in size (nearest neighbour)."""
    from PIL import Image

    n = len(images)
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    h, w, c = images.shape[1:]
    canvas = np.full((nrow * (h + 2) + 2, ncol * (w + 2) + 2, c), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, ncol)
        canvas[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + q * (w + 2) : 2 + q * (w + 2) + w] = im
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    img = img.resize((img.width * 2, img.height * 2), Image.NEAREST)
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def scatter_points(panels: Sequence[tuple[str, np.ndarray]], path: str | os.PathLike, reference: np.ndarray | None = None) -> None:
    """2-D point clouds side by side (the toy), optionally over grey reference points."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels):
        if reference is not None:
            ax.scatter(reference[:, 0], reference[:, 1], s=2, c="lightgray", label="data")
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c="C0")
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-3.2, 3.2)
        ax.set_ylim(-3.2, 3.2)
        ax.set_aspect("equal")
    fig.tight_layout()
    save_figure(fig, path)


def panel_grid(panels: Sequence[tuple[str, np.ndarray]], path: str | os.PathLike) -> None:
    """One titled square grid of grey-scale images per panel, side by side (the demo)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.2 * len(panels), 2.6))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, ims) in zip(axes[0], panels):
        n = int(math.ceil(math.sqrt(len(ims))))
        h, w = ims.shape[1:3]
        canvas = np.full((n * (h + 1), n * (w + 1)), 255, dtype=np.uint8)
        for i, im in enumerate(ims):
            r, c = divmod(i, n)
            canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = im[..., 0]
        ax.imshow(canvas, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def plot_calibration(info: Any, path: str | os.PathLike) -> None:
    """Norm matching: training vs sampling ε-norm (λ = 1 and calibrated ES), and the chosen λ per σ."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    a, b = fig.subplots(1, 2)
    s = info.sigma.numpy()
    a.plot(s, info.training.numpy(), label="training")
    a.plot(s, info.baseline.numpy(), label="sampling, lambda = 1")
    a.plot(s, (info.sampling_raw / info.lam).numpy(), label="sampling, calibrated ES")
    a.set_xscale("log")
    a.set_xlabel("sigma")
    a.set_ylabel("||eps||")
    a.legend(fontsize=7)
    b.plot(s, info.lam.numpy(), marker=".")
    b.set_xscale("log")
    b.set_xlabel("sigma")
    b.set_ylabel("lambda")
    fig.tight_layout()
    save_figure(fig, path)

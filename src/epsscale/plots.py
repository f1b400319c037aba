"""Figures: the one home for the plots epsscale writes.

Every figure is a :class:`matplotlib.figure.Figure` built with the object API (no pyplot, no
global state, safe in threads and servers) and written with :func:`save_figure`, which goes
through :func:`epsscale._atomic.atomic_write`: a reader never sees a half-written image and a
failed or interrupted write leaves neither the file nor a temporary behind.

matplotlib is imported only when a figure is made, so importing this module is cheap.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ._atomic import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The exposure records drawn here (DeltaResult, EpsNormResult, FidSearchResult) are duck-typed:
# this module sits below epsscale.exposure and does not import it.
DeltaResult = EpsNormResult = FidSearchResult = Any

__all__ = ["new_figure", "save_figure", "plot_loss", "plot_delta", "plot_eps_norms", "plot_fid_vs_b", "plot_calibration", "save_image_grid", "scatter_points", "panel_grid"]

_DPI = 120


def new_figure(width: float = 5.0, height: float = 3.5, dpi: float = _DPI) -> Figure:
    """A new Agg-backed figure of ``width`` × ``height`` inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: float | None = None, *, format: str | None = None) -> Path:
    """Write ``fig`` to ``path`` atomically; returns the path.

    ``format`` defaults to the file's suffix (``.png``, ``.pdf``, ``.svg``, ...; PNG when there
    is none). ``dpi`` defaults to the figure's own, so a PNG is figsize × dpi pixels whatever
    matplotlib's ``savefig.dpi`` setting. The image is rendered into a temporary file next to
    ``path`` and moved over it only once complete; if rendering fails, neither is left.
    """
    fmt = format if format is not None else (Path(path).suffix.lstrip(".").lower() or "png")
    resolution = fig.dpi if dpi is None else dpi
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=resolution))


def _save(fig: Figure, path: str | os.PathLike) -> None:
    """Lay out and write one of this module's report figures: always PNG, whatever the suffix."""
    fig.tight_layout()
    save_figure(fig, path, format="png")


def plot_delta(result_base: DeltaResult, result_es: DeltaResult | None, path: str | os.PathLike) -> None:
    """δ_t against sampling step (1..T'−1), baseline and ES, log scale; writes a PNG."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    steps = list(range(1, len(result_base.delta) + 1))
    ax.plot(steps, result_base.delta.clamp_min(1e-12).tolist(), "o-", label="baseline", markersize=3)
    if result_es is not None:
        lam = result_es.lam
        label = f"ES (λ {float(lam.min()):.4g}…{float(lam.max()):.4g})" if float(lam.max() - lam.min()) > 0 else f"ES (λ = {float(lam[0]):.4g})"
        ax.plot(steps, result_es.delta.clamp_min(1e-12).tolist(), "s-", label=label, markersize=3)
    ax.set_yscale("log")
    ax.set_xlabel("sampling step (state reached)")
    ax.set_ylabel(f"δ_t ({result_base.units.upper()} units)")
    ax.set_title(f"Exposure bias, {result_base.sampler}, T' = {result_base.steps}, N = {result_base.n}")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_eps_norms(result: EpsNormResult, path: str | os.PathLike) -> None:
    """‖ε‖ curves against sampling step: training, sampling, sampling with ES; writes a PNG."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    steps = list(range(len(result.sigma)))
    ax.plot(steps, result.training.tolist(), "k-", label="training")
    ax.plot(steps, result.sampling.tolist(), "o-", label="sampling", markersize=3)
    if result.sampling_es is not None:
        ax.plot(steps, result.sampling_es.tolist(), "s-", label="sampling, ES (ε/λ)", markersize=3)
    ax.axhline(result.sqrt_d, color="grey", linestyle=":", label="√d")
    ax.set_xlabel("sampling step")
    ax.set_ylabel("‖ε‖ per image")
    ax.set_title(f"ε-norm, {result.sampler}, T' = {result.steps}, N = {result.n}")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_fid_vs_b(points: FidSearchResult | Sequence[tuple[float, float]] | Mapping[float, float], path: str | os.PathLike) -> None:
    """Score (FID) against uniform b, best point marked; writes a PNG."""
    from .exposure.search import (
        FidSearchResult,  # here: epsscale.exposure imports this module
    )

    if isinstance(points, FidSearchResult):
        pts = list(points.points)
    elif isinstance(points, Mapping):
        pts = [(float(b), float(s)) for b, s in points.items()]
    else:
        pts = [(float(b), float(s)) for b, s in points]
    if not pts:
        raise ValueError("no points to plot")
    pts.sort()
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", markersize=4)
    bb, bs = min(pts, key=lambda p: p[1])
    ax.plot([bb], [bs], "r*", markersize=12, label=f"best b = {bb:.5g} ({bs:.4g})")
    ax.set_xlabel("uniform λ = b")
    ax.set_ylabel("score (FID)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_calibration(info: Any, path: str | os.PathLike) -> None:
    """Norm matching: training vs sampling ε-norm (λ = 1 and calibrated ES), and the chosen λ per σ."""
    fig = new_figure(9, 3.6, dpi=110)
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
    _save(fig, path)


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
    fig = new_figure(4 * len(panels), 4, dpi=110)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels):
        if reference is not None:
            ax.scatter(reference[:, 0], reference[:, 1], s=2, c="lightgray", label="data")
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c="C0")
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-3.2, 3.2)
        ax.set_ylim(-3.2, 3.2)
        ax.set_aspect("equal")
    _save(fig, path)


def panel_grid(panels: Sequence[tuple[str, np.ndarray]], path: str | os.PathLike) -> None:
    """One titled square grid of grey-scale images per panel, side by side (the demo)."""
    fig = new_figure(2.2 * len(panels), 2.6, dpi=120)
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
    _save(fig, path)


def plot_loss(log: Sequence[Mapping[str, float]], path: str | os.PathLike) -> None:
    """A training run's loss log (``loss.json`` of ``epsscale train``): the ε MSE and the VLB term
    per block of steps, and the learning rate where the log has it."""
    fig = new_figure(6.5, 3.4, dpi=110)
    ax = fig.subplots()
    steps = [r["step"] for r in log]
    ax.plot(steps, [r["mse"] for r in log], label="L_simple (eps MSE)")
    ax.plot(steps, [r["vb"] for r in log], label="L_vlb term (bits/dim)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all("lr" in r for r in log):
        lr = ax.twinx()
        lr.plot(steps, [r["lr"] for r in log], color="grey", lw=0.8, ls="--", label="learning rate")
        lr.set_ylabel("learning rate", color="grey")
    ax.legend(fontsize=8)
    _save(fig, path)

"""Figures: the one home for the plots epsscale writes.

Every figure is a :class:`matplotlib.figure.Figure` built with the object API (no pyplot, no
global state, safe in threads and servers) and written with :func:`save_figure`, which goes
through :func:`epsscale._atomic.atomic_write`: a reader never sees a half-written image and a
failed or interrupted write leaves neither the file nor a temporary behind.

matplotlib is imported only when a figure is made, so importing this module is cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from ._atomic import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .exposure import DeltaResult, EpsNormResult, FidSearchResult

__all__ = ["save_figure", "plot_delta", "plot_eps_norms", "plot_fid_vs_b"]

_DPI = 120


def _figure(width: float = 5.0, height: float = 3.5, dpi: float = _DPI) -> Figure:
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
    fig = _figure()
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
    fig = _figure()
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
    from .exposure.search import FidSearchResult  # here: epsscale.exposure imports this module

    if isinstance(points, FidSearchResult):
        pts = list(points.points)
    elif isinstance(points, Mapping):
        pts = [(float(b), float(s)) for b, s in points.items()]
    else:
        pts = [(float(b), float(s)) for b, s in points]
    if not pts:
        raise ValueError("no points to plot")
    pts.sort()
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", markersize=4)
    bb, bs = min(pts, key=lambda p: p[1])
    ax.plot([bb], [bs], "r*", markersize=12, label=f"best b = {bb:.5g} ({bs:.4g})")
    ax.set_xlabel("uniform λ = b")
    ax.set_ylabel("score (FID)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)

"""DCW: differential correction in the wavelet domain (arXiv 2604.16044, CVPR 2026; official code
``AMAP-ML/DCW``, ``generate.py``: ``ablation_sampler`` and ``dcw_low``).

A peer of Epsilon Scaling that acts on the *state after a step*: the sampler's new state is
pushed away from the step's x0 prediction in its low-frequency band.

The correction
--------------
After step i (from sigma_i to sigma_{i+1}) with x0 prediction ``x0_hat``::

    x_next <- x_next + w_i * U(P(x_next - x0_hat)),      w_i = c * sigma_i / sigma_max

``P`` is 2x2 average pooling and ``U`` nearest 2x upsampling, so ``U(P(.))`` is the orthogonal
projection onto the single-level Haar LL band: in wavelet terms (the paper's eqs. 18-21, low
band only, as the official ``dcw_low``) ``LL(x_next) <- LL(x_next) + w_i (LL(x_next) -
LL(x0_hat))`` with the high bands of x_next untouched. The sign is *plus* (away from x0_hat,
towards more noise), as in the official code. ``sigma_i`` is the step's starting level on the
grid (``t_steps[i]``: not sigma_hat under churn, not a Time-Shift sigma), ``sigma_max`` the grid's
first sigma, so w_0 = c. ``x0_hat`` is the last network output of the step, after Epsilon Scaling
and clipping (Heun: the corrector's). The correction is made in VE units for every sampler:
DDPM and DDIM convert their VP state to VE and back. It is also applied after the last step
(where Euler's x_next is x0_hat and the correction vanishes).

:func:`haar_ll` is the orthonormal LL band, ``(a + b + c + d) / 2`` over each 2x2 block (pywt's
``haar``); :func:`haar_dwt` / :func:`haar_idwt` the whole single-level transform. Images need an
even height and width.

Where the official code departs from the paper (and what we do)
---------------------------------------------------------------
* The paper also has a high-band term (weight ~ (1 - sigma_t) lambda_h) and a pixel-space form
  (eq. 17); the official EDM sampler's active line is the low band only (``dcw_low``), with the
  others commented out; so is this module. Its DWT is ``pytorch_wavelets`` ``DWTForward(J=1,
  mode='zero', wave='haar')``.
* The weight uses ``t_steps[i] / sigma_max``: that is sigma_i / sigma_max only on EDM's default
  ``schedule='linear'`` path; with ``schedule='vp'`` it mixes units.
* Its default ``scaling='none'`` keeps the state in VE units, consistent with x0_hat; with
  ``scaling='vp'`` x_next is in scaled (VP-like) units and x0_hat is not, which is inconsistent.
  We always correct in VE units.
* The official FLUX scheduler's active line is the pixel-space correction with a constant weight
  (``FlowMatchEulerDiscreteScheduler.py``), not the wavelet form.
* Defaults: the CLI's ``--corr_scaler`` is 1.0, ``sample.sh`` uses c = 0.005 (Euler, 13 steps,
  EDM CIFAR-10). ``DCW`` has no default c here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .schedules import check_grid

__all__ = ["haar_ll", "haar_ll_inverse", "haar_ll_project", "haar_dwt", "haar_idwt", "DCW", "BoundDCW"]


def _check_even(x: torch.Tensor) -> None:
    if x.ndim < 2 or x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"DCW needs images with an even height and width (its Haar transform pairs pixels), got shape {tuple(x.shape)}")


def _blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four pixels of every 2x2 block: a (top left), b (top right), c (bottom left), d."""
    _check_even(x)
    return x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]


def haar_ll(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal single-level Haar LL band of ``x`` [..., H, W]: ``(a + b + c + d) / 2``."""
    a, b, c, d = _blocks(x)
    return (a + b + c + d) / 2


def haar_ll_inverse(ll: torch.Tensor) -> torch.Tensor:
    """The inverse Haar transform of an LL band with zero high bands: each pixel of a block gets ``ll / 2``."""
    up = (ll / 2).unsqueeze(-1).unsqueeze(-3)  # [..., h, 1, w, 1]
    *lead, h, _, w, _ = up.shape
    return up.expand(*lead, h, 2, w, 2).reshape(*lead, 2 * h, 2 * w)


def haar_ll_project(x: torch.Tensor) -> torch.Tensor:
    """``U(P(x))``: 2x2 average pooling then nearest upsampling, the projection onto the LL band."""
    return haar_ll_inverse(haar_ll(x))


def haar_dwt(x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The orthonormal single-level 2-D Haar transform: ``(ll, (lh, hl, hh))``, each [..., H/2, W/2].

    ``ll = (a+b+c+d)/2``, ``lh = (a+b-c-d)/2`` (rows differ), ``hl = (a-b+c-d)/2`` (columns
    differ), ``hh = (a-b-c+d)/2``, with a, b the top and c, d the bottom pixels of a block.
    """
    a, b, c, d = _blocks(x)
    return (a + b + c + d) / 2, ((a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2)


def haar_idwt(ll: torch.Tensor, high: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`haar_dwt`."""
    lh, hl, hh = high
    a = (ll + lh + hl + hh) / 2
    b = (ll + lh - hl - hh) / 2
    c = (ll - lh + hl - hh) / 2
    d = (ll - lh - hl + hh) / 2
    top = torch.stack([a, b], dim=-1).flatten(-2)  # [..., h, 2w]
    bottom = torch.stack([c, d], dim=-1).flatten(-2)
    return torch.stack([top, bottom], dim=-2).flatten(-3, -2)


@dataclass(frozen=True)
class DCW:
    """DCW's low-band correction with strength ``c`` >= 0 (0: off, bit for bit).

    Pass it to any sampler as ``dcw=``. :meth:`correct` is the closed form; samplers call a
    :class:`BoundDCW` (:meth:`bind`) after each step.
    """

    c: float

    def __post_init__(self) -> None:
        v = self.c
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
            raise ValueError(f"DCW: c must be a finite number >= 0, got {self.c!r}")
        object.__setattr__(self, "c", float(v))

    def weights(self, sigmas: torch.Tensor) -> list[float]:
        """w_i = c sigma_i / sigma_max for every step of a grid (sigma_max = its first sigma)."""
        grid = check_grid(sigmas).tolist()
        return [self.c * s / grid[0] for s in grid[:-1]]

    @staticmethod
    def correct(x: torch.Tensor, x0: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
        """``x + weight * U(P(x - x0))`` (VE units)."""
        return x + weight * haar_ll_project(x - x0.to(x.dtype))

    def bind(self, sigmas: torch.Tensor, x: torch.Tensor) -> "BoundDCW | None":
        """The correction on one grid for states shaped like ``x``; None when c = 0."""
        if self.c == 0:
            return None
        if x.ndim < 3:
            raise ValueError(f"DCW needs images [N, C, H, W] with an even height and width, got shape {tuple(x.shape)}")
        _check_even(x)
        return BoundDCW(self, torch.as_tensor(sigmas, dtype=torch.float64))


class BoundDCW:
    """:class:`DCW` on one grid: the weights and the VE/VP conversions."""

    def __init__(self, dcw: DCW, sigmas: torch.Tensor) -> None:
        self.weights = dcw.weights(sigmas)
        self.next_scale = [math.sqrt(1 + s * s) for s in sigmas.tolist()[1:]]  # x_ve = x_vp * sqrt(1 + sigma^2)

    def ve(self, x_next: torch.Tensor, x0: torch.Tensor, i: int) -> torch.Tensor:
        """Step i's correction of a VE state."""
        return DCW.correct(x_next, x0, self.weights[i])

    def vp(self, x_next: torch.Tensor, x0: torch.Tensor, i: int) -> torch.Tensor:
        """Step i's correction of a VP state at the grid's next level: to VE (float64), correct, back."""
        k = self.next_scale[i]
        x_ve = x_next.to(torch.float64) * k
        return (DCW.correct(x_ve, x0.to(torch.float64), self.weights[i]) / k).to(x_next.dtype)

"""PFGM++ (Xu et al., ICML 2023): the prior with D augmentation dimensions, keyed by seed.

PFGM++ treats N-dimensional data as the charges of an electric field in N + D dimensions. Its
perturbation kernel at augmentation radius r is

    p_r(x | y)  ∝  1 / (‖x − y‖² + r²)^((N + D) / 2),

so the displacement x − y points in a uniform direction and its length R = ‖x − y‖ has density
``∝ R^(N−1) / (R² + r²)^((N+D)/2)``. Substituting ``u = R²/r²`` gives
``∝ u^(N/2 − 1) (1 + u)^(−(N+D)/2)``: **R²/r² ~ BetaPrime(N/2, D/2)**, i.e. ``B / (1 − B)`` with
``B ~ Beta(N/2, D/2)``. With ``r = σ √D`` the training objective and the probability-flow ODE are
EDM's in σ (Xu et al. 2023, Sec. 4), and D → ∞ recovers EDM's Gaussian kernel
(R² → σ² χ²_N). Sampling is therefore: draw x_T from :func:`pfgmpp_prior`, then run
:func:`epsscale.samplers.heun` or :func:`~epsscale.samplers.euler` on an EDM-style net
(:class:`epsscale.adapters.EDMDenoiser`) with Epsilon Scaling applied exactly as for EDM
(docs/paper.md, "Epsilon Scaling per framework", PFGM++)::

    sigmas = sigmas_karras(18, 0.002, 80.0)
    noise = StackedGenerator(seeds)
    x = pfgmpp_prior((len(seeds), 3, 32, 32), sigmas[0], D=128, generator=noise)
    x = heun(eps_scaling(EDMDenoiser(net), lam), x, sigmas, noise=noise)

**Draw order (per sample, from that sample's own generator).** First the direction: a standard
normal tensor of the sample's shape in float32 (the same draw EDM's Gaussian prior takes first,
so ``x_T / ‖x_T‖`` equals ``z / ‖z‖`` of :func:`epsscale.samplers.prior` for the same seed); then
one float64 uniform ``u = torch.rand((), dtype=float64)``. The radius comes from ``u`` by the
inverse CDF (scipy's regularised incomplete beta inverse, in float64), not from a gamma sampler,
so it is the same on every device and torch version that keeps ``torch.rand``. A sample's prior
depends only on its seed; the sampler's later draws continue the same generator.

The reference implementation (Newbeeer/pfgmpp ``generate.py``) draws the radius from torch's
global generator with ``torch.distributions.Beta`` and the direction afterwards; its numbers are
not reproduced, only its distribution.
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import Sequence

import numpy as np
import torch
from scipy import special

from .samplers import StackedGenerator

__all__ = [
    "betaprime_ppf",
    "check_aug_dim",
    "pfgmpp_noise",
    "pfgmpp_prior",
    "pfgmpp_prior_from_normal",
    "r_to_sigma",
    "sigma_to_r",
]


def check_aug_dim(D: object) -> int:
    """Validate the augmentation dimension: a positive integer (bools and floats are refused)."""
    if isinstance(D, bool) or not isinstance(D, Integral) or int(D) < 1:
        hint = " (D -> infinity is EDM's Gaussian prior: use epsscale.samplers.prior)" if isinstance(D, float) else ""
        raise ValueError(f"augmentation dimension D must be a positive integer, got {D!r}{hint}")
    return int(D)


def sigma_to_r(sigma: torch.Tensor | float, D: int) -> torch.Tensor:
    """PFGM++ radius of an EDM noise level: ``r = sigma * sqrt(D)``."""
    return torch.as_tensor(sigma, dtype=torch.float64) * math.sqrt(check_aug_dim(D))


def r_to_sigma(r: torch.Tensor | float, D: int) -> torch.Tensor:
    """Inverse of :func:`sigma_to_r`: ``sigma = r / sqrt(D)``."""
    return torch.as_tensor(r, dtype=torch.float64) / math.sqrt(check_aug_dim(D))


def betaprime_ppf(u: np.ndarray | float, a: float, b: float) -> np.ndarray:
    """Quantile of BetaPrime(a, b) at probabilities ``u`` in (0, 1), in float64.

    ``X = B / (1 − B)`` with ``B = I⁻¹(u; a, b)`` (regularised incomplete beta inverse). In the upper
    half ``1 − B`` is computed directly as ``I⁻¹(1 − u; b, a)`` (``1 − u`` is exact there), so the
    heavy right tail keeps its relative precision when B is close to 1.
    """
    u = np.asarray(u, dtype=np.float64)
    upper = u >= 0.5
    b_lo = special.betaincinv(a, b, np.where(upper, 0.5, u))  # B, lower half
    c_hi = special.betaincinv(b, a, np.where(upper, 1.0 - u, 0.5))  # 1 − B, upper half
    B = np.where(upper, 1.0 - c_hi, b_lo)
    C = np.where(upper, c_hi, 1.0 - b_lo)
    return B / C


def _draws(shape: tuple[int, ...], generator: StackedGenerator | torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: a float32 normal of ``shape[1:]``, then one float64 uniform. Returns (z, u)."""
    n, rest = shape[0], shape[1:]
    if isinstance(generator, StackedGenerator):
        if len(generator) != n:
            raise ValueError(f"first dimension of {shape} must equal the number of seeds ({len(generator)})")
        gens: Sequence[torch.Generator | None] = generator.generators
        device = generator.device
    elif isinstance(generator, torch.Generator) or generator is None:
        gens = [generator] * n  # one stream, consumed sample by sample in the same order
        device = generator.device if generator is not None else torch.device("cpu")
    else:
        raise ValueError(f"generator must be a StackedGenerator, a torch.Generator or None, got {type(generator).__name__}")
    zs, us = [], []
    for g in gens:
        zs.append(torch.randn(rest, generator=g, dtype=torch.float32, device=device))
        us.append(torch.rand((), generator=g, dtype=torch.float64, device=device))
    return torch.stack(zs), torch.stack(us)


def pfgmpp_noise(
    shape: Sequence[int],
    sigma: torch.Tensor | float,
    D: int,
    *,
    generator: StackedGenerator | torch.Generator | None = None,
) -> torch.Tensor:
    """A draw of the PFGM++ perturbation ``x − y`` at noise level ``sigma`` (r = sigma √D), float64.

    ``shape`` is the batch shape ``[n, ...]``; N is the product of ``shape[1:]``. ``sigma`` is a
    number or a per-sample tensor ``[n]``. Each sample's direction and radius come from its own
    generator in the order documented in the module docstring.
    """
    D = check_aug_dim(D)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be a batch shape [n, ...] of positive sizes, got {shape}")
    s = _per_sample(sigma, shape[0], "sigma")
    z, u = _draws(shape, generator)
    return _from_draws(z, u, s, D)


def _per_sample(sigma: torch.Tensor | float, n: int, name: str) -> torch.Tensor:
    """``sigma`` (a number or a tensor [n]) as a float64 vector [n], each finite and > 0."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise ValueError(f"{name} must be finite and > 0, got {sigma!r}")
    return s.expand(n) if s.ndim == 0 else s.reshape(n)


def _from_draws(z: torch.Tensor, u: torch.Tensor, s: torch.Tensor, D: int) -> torch.Tensor:
    """``x − y`` from each sample's normal ``z`` (its direction) and uniform ``u`` (its radius)."""
    N = math.prod(z.shape[1:])
    z = z.to(torch.float64)
    direction = z / z.flatten(1).norm(dim=1).reshape(-1, *[1] * (z.ndim - 1))

    # Radius: R² / r² ~ BetaPrime(N/2, D/2) by the inverse CDF.
    ratio = torch.from_numpy(betaprime_ppf(u.cpu().numpy(), N / 2, D / 2)).to(direction.device)
    radius = s.to(direction.device) * math.sqrt(D) * ratio.sqrt()  # R = r sqrt(R²/r²), [n]
    return direction * radius.reshape(-1, *[1] * (z.ndim - 1))


def pfgmpp_prior_from_normal(z: torch.Tensor, sigma_max: float | torch.Tensor, D: int, generator: StackedGenerator) -> torch.Tensor:
    """:func:`pfgmpp_prior` for a normal draw ``z`` already taken from ``generator``.

    Each sample takes its float64 uniform as the next draw of its own generator. Right after z,
    the result equals ``pfgmpp_prior(z.shape, sigma_max, D, generator=...)`` on fresh generators
    with the same seeds. :func:`epsscale.distributed.sample_seeds` calls it after a conditional
    net's class labels, so a seed's label is the one EDM's Gaussian prior gives it.
    """
    D = check_aug_dim(D)
    if not isinstance(generator, StackedGenerator) or len(generator) != z.shape[0]:
        raise ValueError("pfgmpp_prior_from_normal needs the StackedGenerator that drew z (one seed per row)")
    s = _per_sample(sigma_max, z.shape[0], "sigma_max")
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64, device=generator.device) for g in generator.generators])
    return _from_draws(z, u, s, D)


def pfgmpp_prior(
    shape: Sequence[int],
    sigma_max: float | torch.Tensor,
    D: int,
    *,
    generator: StackedGenerator | torch.Generator | None = None,
) -> torch.Tensor:
    """The PFGM++ starting state x_T in VE units (float64): :func:`pfgmpp_noise` at ``sigma_max``.

    Pass the same :class:`~epsscale.samplers.StackedGenerator` to the sampler afterwards, so each
    sample's whole trajectory depends only on its seed.
    """
    return pfgmpp_noise(shape, sigma_max, D, generator=generator)

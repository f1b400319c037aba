"""2-D Gaussian mixtures with exact denoisers: the ground truth for samplers and the demo.

For data ``x0 ~ sum_k pi_k N(mu_k, s_k^2 I)`` and ``x = x0 + sigma eps`` the exact denoiser is
the posterior mean

    D(x, sigma) = sum_k w_k(x) [mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)],
    w_k(x) ∝ pi_k N(x; mu_k, (s_k^2 + sigma^2) I).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["GaussianMixture", "ImperfectDenoiser", "default_mixture", "build_plan"]


@dataclass(frozen=True)
class GaussianMixture:
    means: torch.Tensor  # [K, d]
    stds: torch.Tensor  # [K]
    weights: torch.Tensor  # [K], sums to 1

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * z

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        """Exact E[x0 | x] at noise level sigma (per-sample tensor [N]); float64 inside."""
        xd = x.to(torch.float64)
        s2 = sigma.to(torch.float64).reshape(-1, 1) ** 2  # [N, 1]
        v = self.stds[None, :] ** 2 + s2  # [N, K]
        d2 = ((xd[:, None, :] - self.means[None]) ** 2).sum(-1)  # [N, K]
        logw = self.weights.log()[None] - 0.5 * d2 / v - 0.5 * self.dim * v.log()
        w = torch.softmax(logw, dim=1)  # [N, K]
        shrink = self.stds[None, :] ** 2 / v  # [N, K]
        comp = self.means[None] + shrink[..., None] * (xd[:, None, :] - self.means[None])  # [N, K, d]
        return (w[..., None] * comp).sum(1).to(x.dtype)

    __call__ = denoise


def default_mixture() -> GaussianMixture:
    """Eight tight Gaussians on a ring of radius 2 (a classic 2-D diffusion test)."""
    ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = 2.0 * torch.stack([ang.cos(), ang.sin()], 1)
    return GaussianMixture(means, torch.full((8,), 0.15, dtype=torch.float64), torch.full((8,), 1 / 8, dtype=torch.float64))


class ImperfectDenoiser:
    """The exact denoiser plus a smooth, input-dependent x0 error of scale ``gamma * sigma/(1+sigma)``.

    A stand-in for a trained network: its x0 errors look like noise to the sampler, so sampled
    points land with too much spread, the exposure-bias symptom that Epsilon Scaling corrects.
    The error field is a fixed random Fourier feature map, so it is deterministic in (x, sigma).
    """

    def __init__(self, mixture: GaussianMixture, gamma: float = 0.5, features: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        d = mixture.dim
        self.mixture = mixture
        self.gamma = float(gamma)
        self.W = torch.randn(features, d + 1, generator=g, dtype=torch.float64) * 2.0
        self.b = torch.rand(features, generator=g, dtype=torch.float64) * 2 * math.pi
        self.A = torch.randn(d, features, generator=g, dtype=torch.float64) * math.sqrt(2.0 / features)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        exact = self.mixture.denoise(x, sigma).to(torch.float64)
        s = sigma.to(torch.float64).reshape(-1, 1)
        inp = torch.cat([x.to(torch.float64) / (1 + s), s.log1p()], 1)  # [N, d+1]
        err = torch.cos(inp @ self.W.T + self.b) @ self.A.T  # [N, d], ~unit variance
        return (exact + self.gamma * (s / (1 + s)) * err).to(x.dtype)


def build_plan(*, sampler: str = "ddpm", steps: int = 20, disc: str = "respaced", sampler_opts: dict | None = None, lam: Any = 1.0) -> Any:
    """The sampling plan of the 2-D toy: the imperfect denoiser of :func:`default_mixture`.

    The grid is the cosine VP schedule respaced to ``steps`` (``disc="respaced"``) or EDM's Karras
    grid from sigma 80 (``"karras"``). x_T is drawn in float64 and the points are kept as float64.
    """
    from ..plan import SamplingPlan
    from ..schedules import VPSchedule, sigmas_karras

    if disc not in ("respaced", "karras"):
        raise ValueError("--model toy runs on --disc respaced or karras (from sigma 80); it takes no --disc ddim or --sigma-max")
    sigmas = VPSchedule("cosine").grid(str(steps)) if disc == "respaced" else sigmas_karras(steps, sigma_min=0.002, sigma_max=80.0)
    return SamplingPlan(
        denoiser=ImperfectDenoiser(default_mixture()), sigmas=sigmas, sampler=sampler, shape=(2,), quantize=lambda x: x.double().cpu().numpy(),
        lam=lam, sampler_opts=sampler_opts or {}, prior="vp", prior_dtype=torch.float64, name="toy", fingerprint="toy", meta={"source": "toy"},
    )

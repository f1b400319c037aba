"""The analytic model: the sampling variance under x0-prediction error (Ning et al. 2024, §3).

:func:`analytic_variance` predicts the excess variance Δ_t that an x0-prediction error of
variance γ² builds up along a DDPM, DDIM or Euler chain (docs/paper.md, "Sampling distribution
with prediction error"), for comparison with the measured δ_t of
:func:`epsscale.exposure.delta_t`. No network is involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch

from ..checks import check_number
from ..schedules import check_grid
from ._common import _Record


@dataclass(frozen=True)
class AnalyticResult(_Record):
    """Predicted variance of x̂_t − √ᾱ_t x0 (VP units) at the reported states 1..T'−1.

    ``var`` = 1 − ᾱ_t + Δ_t; ``excess`` = Δ_t; ``target`` = √(1−ᾱ_t); ``delta`` = (√var − target)².
    ``var_ve`` = var / ᾱ_t is the same in VE units (variance of x̂ − x0) and ``delta_ve`` its δ.
    ``final_var`` is Var(x̂_0 − x0) of the returned sample (σ = 0, where both units agree).
    """

    sigma: torch.Tensor
    var: torch.Tensor
    excess: torch.Tensor
    target: torch.Tensor
    delta: torch.Tensor
    var_ve: torch.Tensor
    delta_ve: torch.Tensor
    final_var: float


def _per_step(values: float | Sequence[float] | torch.Tensor | Callable[[torch.Tensor], Any], sig: torch.Tensor, what: str) -> torch.Tensor:
    if callable(values):
        out = torch.as_tensor(values(sig), dtype=torch.float64).reshape(-1)
        out = out.expand(len(sig)).clone() if out.numel() == 1 else out
    else:
        out = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        out = out.expand(len(sig)).clone() if out.numel() == 1 else out
    if out.numel() != len(sig):
        raise ValueError(f"{what}: need one value per step ({len(sig)}), got {out.numel()}")
    if not bool(torch.isfinite(out).all()) or bool((out < 0).any()):
        raise ValueError(f"{what}: values must be finite and >= 0")
    return out


def analytic_variance(
    sigmas: torch.Tensor,
    gamma2: float | Sequence[float] | torch.Tensor | Callable[[torch.Tensor], Any],
    *,
    sampler: Literal["ddpm", "ddim", "euler"] = "ddpm",
    eta: float = 0.0,
    variance: Literal["fixed_small", "fixed_large"] = "fixed_small",
) -> AnalyticResult:
    """The sampling distribution under x0-prediction error (docs/paper.md, Ning et al. 2024 §3).

    Model the x0-prediction at step i (σ_i) as x0 + e_i with e_i ~ N(0, γ_i² I), independent of
    everything else, and start from q(x_T | x0) (Δ_T = 0). A step maps x_t to
    x_{t−1} = c_0 x̂0 + c_t x_t + s z, so x̂_{t−1} ~ N(√ᾱ_{t−1} x0, (1 − ᾱ_{t−1} + Δ_{t−1}) I) with

        Δ_{t−1} = c_t² Δ_t + c_0² γ_t².

    "t−1" is the next kept step of the (respaced) chain given by ``sigmas`` and
    β_t = 1 − ᾱ_t/ᾱ_{t−1}.

    * DDPM ancestral (Ho et al. eq. 7): c_0 = √ᾱ_{t−1} β_t/(1−ᾱ_t), c_t = √α_t (1−ᾱ_{t−1})/(1−ᾱ_t);
      s² = β̃_t (``"fixed_small"``) or β_t (``"fixed_large"``, which adds β_t − β̃_t per step).
    * DDIM (Song et al. eq. 12): c_t = √(1−ᾱ_{t−1}−s²)/√(1−ᾱ_t), c_0 = √ᾱ_{t−1} − c_t √ᾱ_t,
      s = η √((1−ᾱ_{t−1})/(1−ᾱ_t)) √β_t. ``"euler"`` is DDIM with η = 0 (the same map in VE units).

    ``gamma2`` is γ_i² per model call (one per step, sampling order): a number, a sequence of
    T' values, or a function of the σ's. Returns the reported states 1..T'−1 and the final one.
    """
    grid = check_grid(sigmas)
    steps = len(grid) - 1
    if sampler not in ("ddpm", "ddim", "euler"):
        raise ValueError(f"analytic_variance models 'ddpm', 'ddim' or 'euler', got {sampler!r}")
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance must be 'fixed_small' or 'fixed_large', got {variance!r}")
    check_number(eta, "eta", low=0)
    eta = 0.0 if sampler == "euler" else float(eta)
    g2 = _per_step(gamma2, grid[:-1], "gamma2")
    abar = 1 / (1 + grid**2)

    var = 1 - abar[0]  # x̂_T ~ q(x_T | x0): Δ_T = 0
    out = []
    for i in range(steps):
        a_t, a_p = abar[i], abar[i + 1]
        beta = 1 - a_t / a_p
        last = bool(grid[i + 1] == 0)

        # Coefficients on x̂0 and x_t, and the injected variance.
        if sampler == "ddpm":
            c0 = a_p.sqrt() * beta / (1 - a_t)
            ct = (1 - beta).sqrt() * (1 - a_p) / (1 - a_t)
            injected = 0.0 if last else (beta * (1 - a_p) / (1 - a_t) if variance == "fixed_small" else beta)
        else:
            s_eta2 = eta**2 * (1 - a_p) / (1 - a_t) * beta
            ct = (1 - a_p - s_eta2).clamp_min(0).sqrt() / (1 - a_t).sqrt()
            c0 = a_p.sqrt() - ct * a_t.sqrt()
            injected = 0.0 if last else s_eta2

        # Variance recursion: Var' = ct² Var + c0² γ² + s².
        var = ct**2 * var + c0**2 * g2[i] + injected
        out.append(var)

    var_all = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in out])
    sig, var_r, a_r = grid[1:-1], var_all[:-1], abar[1:-1]
    target = (1 - a_r).sqrt()
    var_ve = var_r / a_r
    return AnalyticResult(
        sigma=sig.clone(),
        var=var_r,
        excess=var_r - (1 - a_r),
        target=target,
        delta=(var_r.sqrt() - target) ** 2,
        var_ve=var_ve,
        delta_ve=(var_ve.sqrt() - sig) ** 2,
        final_var=float(var_all[-1]),
    )


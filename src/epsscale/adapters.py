"""Adapters: every network type becomes one *denoiser* in VE form.

The contract (docs/design.md, "Denoiser contract")::

    D(x, sigma, **cond) -> x0            # or a Prediction(x0, var_interp)

``x`` is in VE units (``x = x0 + sigma * eps``), ``sigma`` is a per-sample tensor of shape [N].
This module is the only place that knows about eps-, v-, x0-, flow- or EDM-parameterised
networks. Samplers never branch on the prediction type.

A VP network at timestep t is the VE denoiser at ``sigma_t = sqrt(1 - abar_t) / sqrt(abar_t)``
with ``x_VE = x_VP / sqrt(abar_t)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from .schedules import VPSchedule, sigma_to_alpha_bar

__all__ = [
    "Denoiser",
    "Prediction",
    "as_prediction",
    "append_dims",
    "sigma_vector",
    "forward_attrs",
    "VPDenoiser",
    "EDMDenoiser",
    "FlowDenoiser",
]

PredictionType = Literal["eps", "v", "x0"]


@dataclass(frozen=True)
class Prediction:
    """A denoiser output that carries more than x0.

    ``var_interp`` is ADM's learned-range output ``v`` in [-1, 1] (Nichol & Dhariwal 2021, eq. 15):
    the DDPM sampler interpolates ``log var = frac * log beta_t + (1 - frac) * log beta~_t`` with
    ``frac = (v + 1) / 2``. Epsilon Scaling never touches it.
    """

    x0: torch.Tensor
    var_interp: torch.Tensor | None = None

    def replace_x0(self, x0: torch.Tensor) -> "Prediction":
        return Prediction(x0, self.var_interp)


@runtime_checkable
class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor | Prediction: ...


def as_prediction(out: torch.Tensor | Prediction) -> Prediction:
    """Normalise a denoiser output to a :class:`Prediction`."""
    return out if isinstance(out, Prediction) else Prediction(out)


def sigma_vector(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast sigma to a per-sample float64 vector [N]."""
    s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    if s.numel() != x.shape[0]:
        raise ValueError(f"sigma must be a scalar or one value per sample: got {s.numel()} values for a batch of {x.shape[0]}")
    return s.reshape(x.shape[0])


# What a wrapper of a denoiser passes through: its sigma range and its rounding of sigma (EDM).
FORWARDED = ("sigma_min", "sigma_max", "round_sigma")


def forward_attrs(wrapper: Any, inner: Any) -> None:
    """Give a denoiser wrapper the inner denoiser's ``sigma_min``, ``sigma_max`` and ``round_sigma``
    (where it has them), so that samplers see the wrapped model's range and rounding."""
    for attr in FORWARDED:
        if hasattr(inner, attr):
            setattr(wrapper, attr, getattr(inner, attr))


def append_dims(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample vector [N] as [N, 1, 1, ...], broadcastable against x."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def _net_dtype(net: Callable, default: torch.dtype) -> torch.dtype:
    if isinstance(net, nn.Module):
        for p in net.parameters():
            return p.dtype
    return default


class VPDenoiser:
    """A discrete-time VP network (DDPM / ADM / DiT-style) as a VE denoiser.

    ``net(x_vp, t, **cond)`` is called with the *original* integer timestep t of the 1000-step
    chain, as guided-diffusion's respacing wrapper does (so respaced chains need nothing
    special). t is the timestep nearest to sigma in log sigma (exact on the schedule's own
    grid); the VP/VE conversions use sigma itself.

    ``prediction``: what the first ``channels`` output channels are: ``"eps"``, ``"v"``
    (Salimans & Ho 2022: v = sqrt(abar) eps - sqrt(1 - abar) x0) or ``"x0"``. With
    ``learn_sigma`` the network returns twice the channels and the second half is ADM's
    variance interpolation, returned as :attr:`Prediction.var_interp`.
    """

    def __init__(
        self,
        net: Callable[..., torch.Tensor],
        schedule: VPSchedule,
        *,
        prediction: PredictionType = "eps",
        learn_sigma: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"unknown prediction type {prediction!r}: expected 'eps', 'v' or 'x0'")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.learn_sigma = learn_sigma
        self.dtype = dtype or _net_dtype(net, torch.float32)
        self.sigmas = schedule.sigmas
        self.sigma_min = schedule.sigma_min
        self.sigma_max = schedule.sigma_max

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor | Prediction:
        sigma = sigma_vector(sigma, x)
        t = self.schedule.timestep(sigma).to(x.device)
        # The conversions use sigma itself; only the timestep fed to the net is snapped, so
        # off-table grids (e.g. Karras) stay consistent (k-diffusion's quantised discrete models).
        abar = sigma_to_alpha_bar(sigma)
        sigma_t = append_dims(sigma, x)
        sqrt_abar = append_dims(abar.sqrt(), x)

        # Network call in VP units at the original timestep.
        x_vp = (x * sqrt_abar).to(self.dtype)
        out = self.net(x_vp, t, **cond)
        c = x.shape[1]
        if self.learn_sigma:
            if out.shape[1] != 2 * c:
                raise ValueError(f"learn_sigma expects {2 * c} output channels, the network returned {out.shape[1]}")
            out, var_interp = out[:, :c], out[:, c:]
        else:
            if out.shape[1] != c:
                hint = "; a learned-variance net (ADM) needs learn_sigma=True" if out.shape[1] == 2 * c else ""
                raise ValueError(f"the network returned {out.shape[1]} channels for {c}-channel input{hint}")
            var_interp = None

        # Convert the output to x0 (VE and VP x0 are the same thing).
        out = out.to(x.dtype)
        if self.prediction == "eps":
            x0 = x - sigma_t.to(x.dtype) * out
        elif self.prediction == "v":
            sqrt_1m = append_dims((1 - abar).sqrt(), x)
            x0 = (sqrt_abar * (x * sqrt_abar) - sqrt_1m * out).to(x.dtype)
        else:
            x0 = out
        return Prediction(x0, var_interp) if var_interp is not None else x0


class EDMDenoiser:
    """An EDM-preconditioned net (NVlabs ``EDMPrecond``/``VPPrecond``...) as a denoiser.

    Duck-typed: ``net(x, sigma, class_labels)`` returns D(x; sigma) directly, and the net
    exposes ``sigma_min``, ``sigma_max`` and ``round_sigma``. ``cond`` may carry one-hot
    ``class_labels``, or integer labels ``y`` (turned into one-hot rows of ``net.label_dim``).
    """

    def __init__(self, net: Callable[..., torch.Tensor]) -> None:
        for attr in ("sigma_min", "sigma_max", "round_sigma"):
            if not hasattr(net, attr):
                raise ValueError(f"EDM net must expose {attr!r} (like NVlabs EDM's *Precond classes)")
        self.net = net
        self.sigma_min = float(net.sigma_min)
        self.sigma_max = float(net.sigma_max)

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(self.net.round_sigma(sigma))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        sigma = sigma_vector(sigma, x)
        labels = cond.get("class_labels")
        if labels is None and cond.get("y") is not None and getattr(self.net, "label_dim", 0):
            labels = torch.nn.functional.one_hot(cond["y"].long(), int(self.net.label_dim)).to(x.device, torch.float32)
        return self.net(x, sigma, labels).to(x.dtype)


class FlowDenoiser:
    """A rectified-flow / flow-matching velocity net as a denoiser.

    Convention: ``x_t = (1 - t) x0 + t eps`` and the net predicts ``u = eps - x0`` at time
    ``t * time_scale`` (diffusers' SD3/Flux pass ``1000 t``). In VE form ``sigma = t / (1 - t)``
    and ``x_VE = x_t / (1 - t)``, so ``x0 = x_t - t u``.
    """

    def __init__(self, net: Callable[..., torch.Tensor], *, time_scale: float = 1.0, dtype: torch.dtype | None = None) -> None:
        self.net = net
        self.time_scale = float(time_scale)
        self.dtype = dtype or _net_dtype(net, torch.float32)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        sigma = sigma_vector(sigma, x)
        t = sigma / (1 + sigma)
        x_t = (x / append_dims(1 + sigma, x)).to(self.dtype)
        u = self.net(x_t, (t * self.time_scale).to(self.dtype), **cond).to(x.dtype)
        return x_t.to(x.dtype) - append_dims(t, x).to(x.dtype) * u


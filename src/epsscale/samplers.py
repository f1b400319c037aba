"""Samplers: plain functions ``(denoiser, x, sigmas, *, noise=None, callback=None, ...) -> x``.

* ``x`` is the starting state in VE units at ``sigmas[0]`` (see :func:`prior`).
* ``sigmas`` is a descending float64 grid ending in 0 (see :mod:`epsscale.schedules`).
* ``noise`` is any object with ``randn_like(x)``, usually a :class:`StackedGenerator`; None uses
  torch's global generator. A stochastic sampler draws **exactly one** noise tensor of x's shape
  per step, also where a step does not use it (DDPM's last step; EDM churn outside
  [s_tmin, s_tmax]), as guided-diffusion's ``p_sample`` and EDM's ``edm_sampler`` do, so its
  draws line up with theirs. A run that is deterministic throughout (DDIM with eta = 0, Euler and
  Heun without churn, DPM-Solver++) draws nothing: the noise could not change its output, and on
  a GPU a :class:`StackedGenerator` draw is one kernel launch per sample.
  Either way a sample depends only on its seed.
* ``callback`` receives a frozen :class:`StepInfo` after each step's (first) model call.

Samplers never branch on the prediction type and never apply Epsilon Scaling themselves: pass
a denoiser wrapped by :func:`epsscale.eps_scaling`.

Two peer methods plug in as keyword options, each where it acts:

* ``time_shift=`` (:class:`epsscale.timeshift.TimeShift`; ddpm, ddim, euler, heun): the
  time at which the network is called, chosen per sample from the state's variance. The step
  then starts from that (per-sample) sigma, so its coefficients broadcast per sample.
* ``dcw=`` (:class:`epsscale.dcw.DCW`; every sampler): a correction of the state after each step.

With None (or window 0, c = 0) a sampler runs exactly the code it runs without them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Protocol, Sequence

import torch

from .adapters import Denoiser, Prediction, append_dims, as_prediction
from .checks import check_number
from .dcw import DCW
from .schedules import check_grid, sigma_to_alpha_bar
from .timeshift import TimeShift

__all__ = [
    "StackedGenerator",
    "StepInfo",
    "prior",
    "ddpm",
    "ddim",
    "euler",
    "heun",
    "dpmpp_2m",
    "SAMPLERS",
    "VP_SAMPLERS",
    "TIME_SHIFT_SAMPLERS",
    "nfe",
]


# ---------------------------------------------------------------------------------------------
# Randomness
# ---------------------------------------------------------------------------------------------


class NoiseSource(Protocol):
    def randn_like(self, x: torch.Tensor) -> torch.Tensor: ...


class _GlobalNoise:
    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn_like(x)


class StackedGenerator:
    """One ``torch.Generator`` per sample, seeded with that sample's seed (mod 2**32).

    The convention of NVlabs EDM's ``StackedRandomGenerator``: ``randn(shape)`` takes the full
    batch shape (``shape[0] == len(seeds)``) and stacks one draw per generator, so the numbers a
    sample gets never depend on the batch it was in.
    """

    def __init__(self, seeds: Iterable[int], device: torch.device | str = "cpu") -> None:
        self.seeds = [int(s) for s in seeds]
        if not self.seeds:
            raise ValueError("StackedGenerator needs at least one seed")
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(s % (1 << 32)) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def _check(self, size: Sequence[int]) -> None:
        if len(size) == 0 or size[0] != len(self.generators):
            raise ValueError(f"first dimension of {tuple(size)} must equal the number of seeds ({len(self.generators)})")

    def randn(self, size: Sequence[int], *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        self._check(size)
        out = torch.stack([torch.randn(tuple(size[1:]), generator=g, dtype=dtype, device=self.device) for g in self.generators])
        return out.to(device) if device is not None else out

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype, device=x.device)

    def randint(self, high: int, size: Sequence[int], *, device: torch.device | str | None = None) -> torch.Tensor:
        """Integers in [0, high), one draw of ``size[1:]`` per generator (EDM's class labels)."""
        self._check(size)
        out = torch.stack([torch.randint(high, tuple(size[1:]), generator=g, device=self.device) for g in self.generators])
        return out.to(device) if device is not None else out


# ---------------------------------------------------------------------------------------------
# Observation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepInfo:
    """What a sampler shows after a step's first model call.

    ``sigma`` is where the model was evaluated (``sigma_hat`` when churn is on; a per-sample
    tensor [N] on a step that Time-Shift moved) and ``x`` the input there; ``denoised`` is the
    (scaled, clipped) x0 and ``eps = (x - denoised) / sigma`` the effective noise prediction.
    ``x_next`` is the state after the step (after DCW's correction). Tensors are not copied:
    clone them if you keep them past the callback.
    """

    index: int
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    x: torch.Tensor
    denoised: torch.Tensor
    eps: torch.Tensor
    x_next: torch.Tensor


Callback = Callable[[StepInfo], None]


def _report(callback: Callback | None, i: int, sigma: torch.Tensor, sigma_next: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor, x_next: torch.Tensor) -> None:
    if callback is None:
        return
    eps = (x - denoised) / append_dims(sigma, x).to(x.dtype)
    callback(StepInfo(i, sigma, sigma_next, x, denoised, eps, x_next))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _sig(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar (or per-sample, broadcastable) sigma as the vector [N] that denoisers take."""
    s = s.to(x.device)
    return s.expand(x.shape[0]) if s.ndim == 0 else s.reshape(x.shape[0])


def _call(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None) -> Prediction:
    return as_prediction(denoiser(x, _sig(sigma, x), **(cond or {})))


def prior(z: torch.Tensor, sigma_max: float | torch.Tensor, *, kind: Literal["ve", "vp"] = "ve") -> torch.Tensor:
    """The starting state in VE units (float64) from a unit Gaussian draw ``z``.

    ``"ve"`` gives ``sigma_max * z`` (EDM). ``"vp"`` gives ``z / sqrt(abar_T)`` =
    ``z * sqrt(1 + sigma_max^2)``: the DDPM prior ``x_T ~ N(0, I)`` seen in VE units.
    """
    s = torch.as_tensor(sigma_max, dtype=torch.float64)
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError(f"prior: sigma_max must be finite and > 0, got {sigma_max!r}")
    if kind == "ve":
        return z.to(torch.float64) * s
    if kind == "vp":
        return z.to(torch.float64) * (1 + s**2).sqrt()
    raise ValueError(f"unknown prior kind {kind!r}: expected 've' or 'vp'")


def _check_clip(clip: float | None) -> None:
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip < math.inf):
        raise ValueError(f"clip must be None (off) or a finite number > 0, got {clip!r}")


def _clip(x0: torch.Tensor, clip: float | None) -> torch.Tensor:
    return x0 if clip is None else x0.clamp(-clip, clip)


# ---------------------------------------------------------------------------------------------
# DDPM ancestral (Ho et al. 2020; learned range: Nichol & Dhariwal 2021)
# ---------------------------------------------------------------------------------------------

Variance = Literal["auto", "fixed_small", "fixed_large", "learned_range"]
ClassifierGrad = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class DDPMStep:
    """Posterior of one ancestral step in VP units (tensors broadcast against x)."""

    mean: torch.Tensor  # VP mean of x_{t-1}
    log_variance: torch.Tensor
    variance: torch.Tensor
    pred_x0: torch.Tensor


def _posterior_variance(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t), with beta_t = 1 - abar_t / abar_{t-1}."""
    a_t, a_p = sigma_to_alpha_bar(sigma), sigma_to_alpha_bar(sigma_next)
    return (1 - a_t / a_p) * (1 - a_p) / (1 - a_t)


def ddpm_posterior(
    pred: Prediction,
    x_vp: torch.Tensor,
    sigmas: torch.Tensor,
    i: int,
    *,
    variance: Variance = "auto",
    sigma: torch.Tensor | None = None,
    ends: bool | None = None,
) -> DDPMStep:
    """q(x_{t-1} | x_t, x0 = pred.x0) on the chain given by ``sigmas`` at step i (Ho et al. eq. 7).

    ``x_vp`` is x_t in VP units. With a respaced chain, t-1 is the next kept step and
    ``beta_t = 1 - abar_t / abar_{t-1}`` (guided-diffusion's respacing). At the last step the
    posterior variance is 0, so, as guided-diffusion does, its log is clipped to that of the
    step before ("posterior_log_variance_clipped"). ``sigma`` replaces the starting level
    ``sigmas[i]`` (Time-Shift: per sample, broadcastable against x); the target stays
    ``sigmas[i + 1]``. ``ends``: whether the step ends the chain (``sigmas[i + 1] == 0``), when the
    caller knows it on the host (no device sync per step); None reads it from ``sigmas``.
    """
    s, s_next = (sigmas[i] if sigma is None else sigma), sigmas[i + 1]
    if ends is None:
        ends = not bool(s_next > 0)
    a_t, a_p = sigma_to_alpha_bar(s), sigma_to_alpha_bar(s_next)
    beta = 1 - a_t / a_p
    post_var = _posterior_variance(s, s_next)
    if not ends:
        clip_var = post_var
    elif i > 0:
        clip_var = _posterior_variance(sigmas[i - 1], s)
    else:  # single-step chain: no earlier step to borrow from
        clip_var = beta

    # Mean: c0 x0 + ct x_t, eq. 7.
    c0 = a_p.sqrt() * beta / (1 - a_t)
    ct = (1 - beta).sqrt() * (1 - a_p) / (1 - a_t)
    dt = x_vp.dtype
    x0 = pred.x0.to(dt)
    mean = c0.to(dt) * x0 + ct.to(dt) * x_vp

    # Variance.
    if variance == "auto":
        variance = "learned_range" if pred.var_interp is not None else "fixed_small"
    if variance == "fixed_small":
        var = post_var.to(dt).expand_as(mean)
        log_var = clip_var.log().to(dt).expand_as(mean)
    elif variance == "fixed_large":
        large = beta if not ends else clip_var
        var = large.to(dt).expand_as(mean)
        log_var = large.log().to(dt).expand_as(mean)
    elif variance == "learned_range":
        if pred.var_interp is None:
            raise ValueError("variance='learned_range' needs a denoiser that returns var_interp (learn_sigma)")
        frac = (pred.var_interp.to(dt) + 1) / 2
        log_var = frac * beta.log().to(dt) + (1 - frac) * clip_var.log().to(dt)
        var = log_var.exp()
    else:
        raise ValueError(f"unknown variance {variance!r}: expected fixed_small, fixed_large or learned_range")
    return DDPMStep(mean, log_var, var, x0)


def _vp_call(denoiser: Denoiser, x_vp: torch.Tensor, sigma: torch.Tensor, cond: dict | None) -> tuple[torch.Tensor, Prediction]:
    """Call the VE denoiser from a VP state; the VE input is formed in float64 (exact round trip)."""
    x_ve = x_vp.to(torch.float64) * (1 + sigma**2).sqrt()
    return x_ve, _call(denoiser, x_ve, sigma, cond)


def _vp_to_ve(x_vp: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """VP state to VE; at sigma = 0 the two coincide and x_vp is returned as it is."""
    return x_vp if sigma == 0 else x_vp.to(torch.float64) * (1 + sigma**2).sqrt()


def ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    variance: Variance = "auto",
    clip: float | None = None,
    classifier_grad: ClassifierGrad | None = None,
    dtype: torch.dtype = torch.float32,
    time_shift: TimeShift | None = None,
    dcw: DCW | None = None,
) -> torch.Tensor:
    """DDPM ancestral sampling (guided-diffusion's ``p_sample_loop``) on any VP-compatible grid.

    The chain steps in VP units in ``dtype`` (float32, as guided-diffusion does), and each
    step's noise is drawn in that dtype. ``variance`` is ``"fixed_small"``, ``"fixed_large"``,
    ``"learned_range"`` or ``"auto"`` (learned when the denoiser returns ``var_interp``).
    ``clip`` clamps x0 to [-clip, clip] (ADM's ``clip_denoised``: 1.0), after Epsilon Scaling.
    ``classifier_grad(x_vp, sigma, **cond)`` returns the guidance gradient in VP units (already
    times the guidance scale); the mean shifts by variance * gradient (ADM-G, Dhariwal & Nichol
    2021, Algorithm 1). Epsilon Scaling acts on the model's eps only, never on this gradient.
    ``time_shift`` and ``dcw``: see the module doc.
    """
    _check_clip(clip)
    sigmas = check_grid(sigmas).to(x.device)
    grid = sigmas.tolist()  # control flow on host floats: no device sync per step
    noise = noise or _GlobalNoise()
    shift = time_shift.bind(sigmas, x) if time_shift is not None else None
    fix = dcw.bind(sigmas, x) if dcw is not None else None
    x_vp = (x.to(torch.float64) * sigma_to_alpha_bar(sigmas[0]).sqrt()).to(dtype)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        shifted = shift(x_vp, i, s) if shift is not None else None
        if shifted is not None:
            s = append_dims(shifted, x_vp)  # this step starts at sigma_tau, per sample

        # Model call and posterior.
        x_ve, pred = _vp_call(denoiser, x_vp, s, cond)
        pred = pred.replace_x0(_clip(pred.x0, clip))
        post = ddpm_posterior(pred, x_vp, sigmas, i, variance=variance, sigma=None if shifted is None else s, ends=grid[i + 1] == 0)
        mean = post.mean
        if classifier_grad is not None:
            grad = classifier_grad(x_vp, _sig(s, x_vp), **(cond or {}))
            mean = mean + post.variance * grad.to(dtype)

        # Ancestral step: noise drawn every step, masked on the last.
        z = noise.randn_like(x_vp)
        x_vp = mean + (post.log_variance / 2).exp() * z if grid[i + 1] > 0 else mean
        if fix is not None:
            x_vp = fix.vp(x_vp, pred.x0, i)
        if callback is not None:  # the VE state is formed only for a callback
            _report(callback, i, s if shifted is None else shifted, s_next, x_ve, pred.x0, _vp_to_ve(x_vp, s_next))
    return _vp_to_ve(x_vp, sigmas[-1])


# ---------------------------------------------------------------------------------------------
# DDIM (Song et al. 2021, eq. 12)
# ---------------------------------------------------------------------------------------------


def ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    eta: float = 0.0,
    clip: float | None = None,
    dtype: torch.dtype = torch.float32,
    time_shift: TimeShift | None = None,
    dcw: DCW | None = None,
) -> torch.Tensor:
    """DDIM with stochasticity ``eta`` (guided-diffusion's ``ddim_sample``), VP state in ``dtype``.

    eps is re-derived from the (scaled, clipped) x0, as guided-diffusion does, so Epsilon Scaling
    reaches both the x0 term and the direction term. With eta = 0 this is Euler on the same grid.
    ``time_shift`` and ``dcw``: see the module doc.
    """
    check_number(eta, "eta", low=0)
    _check_clip(clip)
    sigmas = check_grid(sigmas).to(x.device)
    grid = sigmas.tolist()  # control flow on host floats: no device sync per step
    noise = noise or _GlobalNoise()
    shift = time_shift.bind(sigmas, x) if time_shift is not None else None
    fix = dcw.bind(sigmas, x) if dcw is not None else None
    x_vp = (x.to(torch.float64) * sigma_to_alpha_bar(sigmas[0]).sqrt()).to(dtype)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        shifted = shift(x_vp, i, s) if shift is not None else None
        if shifted is not None:
            s = append_dims(shifted, x_vp)  # this step starts at sigma_tau, per sample
        a_t, a_p = sigma_to_alpha_bar(s), sigma_to_alpha_bar(s_next)

        # Model call; eps re-derived from the final x0: eps = (x_t / sqrt(abar) - x0) / sigma.
        x_ve, pred = _vp_call(denoiser, x_vp, s, cond)
        x0 = _clip(pred.x0, clip).to(dtype)
        eps = ((x_vp * (1 / a_t.sqrt()).to(dtype) - x0) / s.to(dtype))

        # eq. 12: x_{t-1} = sqrt(abar') x0 + sqrt(1 - abar' - s_eta^2) eps + s_eta z.
        s_eta = eta * ((1 - a_p) / (1 - a_t)).sqrt() * (1 - a_t / a_p).sqrt()
        mean = a_p.sqrt().to(dtype) * x0 + (1 - a_p - s_eta**2).clamp_min(0).sqrt().to(dtype) * eps
        if eta > 0:
            z = noise.randn_like(x_vp)
            x_vp = mean + s_eta.to(dtype) * z if grid[i + 1] > 0 else mean
        else:
            x_vp = mean
        if fix is not None:
            x_vp = fix.vp(x_vp, x0, i)
        if callback is not None:  # the VE state is formed only for a callback
            _report(callback, i, s if shifted is None else shifted, s_next, x_ve, x0, _vp_to_ve(x_vp, s_next))
    return _vp_to_ve(x_vp, sigmas[-1])


# ---------------------------------------------------------------------------------------------
# EDM Algorithm 2 (Karras et al. 2022): Euler and Heun with churn, float64 stepping
# ---------------------------------------------------------------------------------------------


def _edm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    second_order: bool,
    noise: NoiseSource | None,
    callback: Callback | None,
    cond: dict | None,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    time_shift: TimeShift | None = None,
    dcw: DCW | None = None,
) -> torch.Tensor:
    for name, v in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
        check_number(v, name, low=0)
    if isinstance(s_tmax, bool) or not isinstance(s_tmax, (int, float)) or not s_tmax >= s_tmin:
        raise ValueError(f"s_tmax must be a number >= s_tmin (inf: no upper limit), got {s_tmax!r}")
    sigmas = check_grid(sigmas).to(x.device)
    grid = sigmas.tolist()  # control flow on host floats: no device sync per step
    noise = noise or _GlobalNoise()
    round_sigma = getattr(denoiser, "round_sigma", None)
    steps = len(sigmas) - 1
    # Without churn (or with s_noise = 0) the noise is multiplied by 0 at every step: no draws.
    stochastic = s_churn > 0 and s_noise > 0
    shift = time_shift.bind(sigmas, x) if time_shift is not None else None
    fix = dcw.bind(sigmas, x) if dcw is not None else None
    x = x.to(torch.float64)
    for i in range(steps):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        shifted = None
        if shift is not None:
            # Time-Shift works on the VP state x / sqrt(1 + sigma^2); the step starts at sigma_tau.
            x_vp = x / (1 + t_cur**2).sqrt()
            shifted = shift(x_vp, i, t_cur)
            if shifted is not None:
                s_tau = append_dims(shifted, x)
                x = torch.where(s_tau == t_cur, x, x_vp * (1 + s_tau**2).sqrt())
                t_cur = s_tau

        # Increase noise temporarily (churn).
        gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= grid[i] <= s_tmax else 0.0
        t_hat = t_cur + gamma * t_cur
        if round_sigma is not None and gamma > 0:
            t_hat = torch.as_tensor(round_sigma(t_hat), dtype=torch.float64, device=x.device)
        x_hat = x + (t_hat**2 - t_cur**2).sqrt() * s_noise * noise.randn_like(x) if stochastic else x

        # Euler step.
        denoised = _call(denoiser, x_hat, t_hat, cond).x0.to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Apply 2nd order correction, except on a step to sigma = 0 (EDM: the last step). A grid
        # that stops above 0 (part of a chain) is Heun throughout.
        if second_order and grid[i + 1] > 0:
            denoised_next = _call(denoiser, x_next, t_next, cond).x0.to(torch.float64)
            d_prime = (x_next - denoised_next) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
            if fix is not None:
                x_next = fix.ve(x_next, denoised_next, i)  # x0 of the step's last call
        elif fix is not None:
            x_next = fix.ve(x_next, denoised, i)

        _report(callback, i, t_hat if shifted is None else _sig(t_hat, x), t_next, x_hat, denoised, x_next)
        x = x_next
    return x


def euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    time_shift: TimeShift | None = None,
    dcw: DCW | None = None,
) -> torch.Tensor:
    """Euler (first order) with EDM's churn, float64 stepping. NFE = steps.

    ``time_shift`` and ``dcw``: see the module doc (Time-Shift through the sigma <-> t map).
    """
    return _edm(denoiser, x, sigmas, second_order=False, noise=noise, callback=callback, cond=cond, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, time_shift=time_shift, dcw=dcw)


def heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    time_shift: TimeShift | None = None,
    dcw: DCW | None = None,
) -> torch.Tensor:
    """EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2). NFE = 2 steps - 1.

    gamma = min(s_churn / steps, sqrt(2) - 1) for sigma in [s_tmin, s_tmax]; float64 stepping;
    no correction on the last step. Epsilon Scaling (in ``denoiser``) reaches both evaluations.
    ``time_shift`` and ``dcw``: see the module doc (a shifted step starts at sigma_tau and its
    corrector stays at the planned next sigma).
    """
    return _edm(denoiser, x, sigmas, second_order=True, noise=noise, callback=callback, cond=cond, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, time_shift=time_shift, dcw=dcw)


# ---------------------------------------------------------------------------------------------
# DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data prediction, lambda = -log sigma
# ---------------------------------------------------------------------------------------------


def dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    dcw: DCW | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), multistep second order in log-SNR, float64 stepping. NFE = steps.

    Deterministic: ``noise`` is accepted like every sampler's and never drawn from. ``dcw``:
    see the module doc (Time-Shift is not offered for this multistep solver).
    """
    sigmas = check_grid(sigmas).to(x.device)
    grid = sigmas.tolist()  # control flow on host floats: no device sync per step
    fix = dcw.bind(sigmas, x) if dcw is not None else None
    x = x.to(torch.float64)
    prev_x0: torch.Tensor | None = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = _call(denoiser, x, s, cond).x0.to(torch.float64)

        if grid[i + 1] == 0:
            x_next = x0  # limit of the update as sigma_next -> 0
        else:
            h = s.log() - s_next.log()
            if prev_x0 is None:
                d = x0  # first step: DPM-Solver++(1) = DDIM
            else:
                r = (sigmas[i - 1].log() - s.log()) / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
            x_next = (s_next / s) * x - torch.expm1(-h) * d
        if fix is not None:
            x_next = fix.ve(x_next, x0, i)
        _report(callback, i, s, s_next, x, x0, x_next)
        prev_x0 = x0
        x = x_next
    return x


# The samplers that step in VP units (and take clip=), and those that take time_shift=.
VP_SAMPLERS = ("ddpm", "ddim")
TIME_SHIFT_SAMPLERS = ("ddpm", "ddim", "euler", "heun")

SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
}


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations a sampler spends on ``steps`` steps."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    return 2 * steps - 1 if sampler == "heun" else steps

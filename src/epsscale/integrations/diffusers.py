"""Epsilon Scaling for diffusers pipelines (Ning et al., ICLR 2024, arXiv 2308.15321).

::

    from epsscale.integrations.diffusers import apply_epsilon_scaling

    handle = apply_epsilon_scaling(pipe, 1.005)      # or Uniform / Linear / PerSigma / TSR / Calibrated
    images = pipe(...).images                        # every later call of pipe uses ES
    handle.remove()                                  # or remove_epsilon_scaling(pipe)

This module never imports diffusers. It duck-types the pipeline (``pipe.scheduler`` plus a
denoiser ``pipe.unet`` / ``pipe.transformer``) and the scheduler (``config.prediction_type``,
``alphas_cumprod``, ``timesteps``, ``sigmas``, ``step_index``).

Where the hook sits
-------------------
ES must act on the *guided* prediction (after classifier-free guidance), before
``guidance_rescale`` (``rescale_noise_cfg`` in SD/SDXL) and before the scheduler's clipping or
thresholding, and it must never touch learned-variance channels. Two single hook points exist:

* ``scheduler.step(model_output, t, sample)`` sees the guided output, but *after*
  guidance_rescale, and its ``sample`` is in scheduler-specific units (VE for Euler/Heun/LMS, VP
  for DDIM/DPM-Solver), so the v- and x0-conversions would need code per scheduler.
* The denoiser's forward sees each CFG branch *before* the guidance mix, before guidance_rescale
  and before the scheduler's clipping/thresholding, and its input is the network's own x_t.

We hook the denoiser's forward (a forward pre-hook that looks up lambda and a forward hook that
rewrites the output), and this is *exactly* "after CFG". For one network evaluation, ES is an
affine map of the output whose coefficients depend only on the evaluation's (x_t, t)::

    out' = out - (1 - 1/lambda) * (out + beta * x_t)                          (1)

and all CFG branches of one step share x_t and t (pipelines batch ``cat([x_t] * 2)``, or call the
net twice on the same x_t). An affine map g commutes with any mix whose weights sum to one,
``g(u) + w (g(c) - g(u)) = g(u + w (c - u))``, so scaling every branch equals scaling the guided
prediction, for every prediction type and for per-step or per-sigma lambda alike (also for
3-branch InstructPix2Pix guidance and PAG). guidance_rescale then sees the ES-corrected
prediction (ES *before* guidance_rescale), and the scheduler's clipping and thresholding come
later still. guidance_rescale also takes its target std from the text branch, which is corrected
too. That matters: rescale is positively homogeneous, so for eps-prediction with uniform lambda it
keeps the ES factor, whereas correcting only the guided prediction would let a rescale factor of 1
restore the uncorrected norm exactly. Not covered exactly: guidance that is not an affine mix of evaluations at one x_t
(SAG's re-evaluation on a blurred x_t with v- or x0-prediction; nonlinear guiders such as APG).
There ES acts on each branch before the mix.

CFG batch doubling, and any number of network calls per step, need no bookkeeping: lambda is
looked up per call from the noise level of that call, never by counting calls.

Conventions (derivation of (1))
-------------------------------
ES keeps x_t fixed and replaces the network's implied eps by eps / lambda; in VE units
``D'(x, sigma) = x - (x - D) / lambda``. The output changes by ``d out / d eps`` at fixed x_t
times ``-(1 - 1/lambda) eps``; ``out + beta x_t`` is exactly that derivative times eps:

* VP, ``x_t = a x0 + s eps`` with ``a = sqrt(abar_t)``, ``s = sqrt(1 - abar_t)``,
  ``sigma = s / a = sqrt((1 - abar_t) / abar_t)``:

  - ``epsilon``: ``eps' = eps / lambda`` (beta = 0).
  - ``v_prediction`` (``v = a eps - s x0 = eps / a - sigma x_t``):
    ``v' = v - (1 - 1/lambda) eps / a = v - (1 - 1/lambda)(v + sigma x_t)`` (beta = sigma).
  - ``sample`` (x0-prediction, ``x0 = x_t / a - sigma eps``):
    ``x0' = x0 + (1 - 1/lambda)(x_t / a - x0)``, the core's ``D' = D + (1 - 1/lambda)(x - D)``
    with ``x = x_t / a`` (beta = -1/a = -sqrt(1 + sigma^2)).

* Flow matching (``FlowMatch*`` schedulers, or ``prediction_type="flow_prediction"``):
  ``x_t = (1 - t) x0 + t eps``, the net predicts ``u = eps - x0``, ``sigma = t / (1 - t)``
  (``t`` is ``scheduler.sigmas``), so ``x0 = x_t - t u`` and ``eps = x_t + (1 - t) u``.

  - ``flow_mode="eps"`` (default, ES proper): ``eps' = eps / lambda``, x_t fixed,
    ``x0' = (x_t - t eps') / (1 - t)``, ``u' = eps' - x0' = (eps' - x_t) / (1 - t)``
    ``= u - (1 - 1/lambda)(u + x_t / (1 - t))`` (beta = 1 / (1 - t) = 1 + sigma).
  - ``flow_mode="velocity"``: ``u' = u / lambda`` (beta = 0). This is what ComfyUI's
    EpsilonScaling node does for flow models (it scales ``x - denoised = t u``); it is not ES of
    the implied eps.

  At t = 1 (sigma = inf, the first step of every SD3/Flux schedule) x_t *is* eps: there is no
  x0 information to keep, and eps-mode (1) is singular (beta = inf). That evaluation is left
  unscaled (lambda_eff = 1); every other step is scaled. The same rule applies to any VP
  evaluation with abar_t = 0. Near sigma = inf (zero-terminal-SNR VP, flow steps just below
  t = 1) eps-mode ES is strongly amplified by beta; a PerSigma schedule that is 1 at high sigma,
  or ``flow_mode="velocity"``, avoids that.

Noise level of an evaluation
----------------------------
* Schedulers with a ``sigmas`` table (Euler, Heun, LMS, KDPM2, DPM-Solver, UniPC, DEIS,
  SA-Solver, FlowMatch*): ``sigmas[i]`` for the current step index ``i`` (``step_index``, else
  ``begin_index``, else the position of the call's timestep in ``timesteps``, else 0). That is
  the sigma the scheduler itself uses to interpret the output, so the conversions match it.
* Others (DDPM, DDIM, PNDM, LCM, TCD): ``sigma = sqrt((1 - abar_t) / abar_t)`` at the call's
  integer timestep, per sample.

Epsscale ``PerSigma`` and ``TSR`` schedules are looked up at that sigma (VE units, as everywhere in
epsscale). For TSR (lambda = 1 / r) this reproduces the official ``TSR_DDIMScheduler``, which
multiplies eps by r at ``alphas_cumprod[timestep]`` of the step, and its flow Euler scheduler,
which rescales the eps implied by the velocity with snr = ((1 - t) / t)^2 (flow_mode="eps"). A step-indexed ``Linear`` schedule is bound lazily: at the first denoiser call after
each ``set_timesteps`` (detected by the identity of ``scheduler.timesteps``) it is turned into a
``PerSigma`` over the distinct sigmas at which the scheduler evaluates the network, i = 0 being
the last (cleanest). A multistage step (Heun) counts once; PNDM's Runge-Kutta warm-up levels and
KDPM2's interpolated levels get interpolated lambdas. Binding happens in the pre-hook, so a
lambda that is not finite and > 0 raises ValueError before the network runs.

Learned variance
----------------
Only the prediction channels are rewritten. When the output has twice the channels of the
input (DiT, ADM-style UNets) or the scheduler has ``variance_type`` "learned"/"learned_range"
(DeepFloyd IF), the first half is the prediction and the second half is returned untouched.
Extra conditioning input channels (inpainting, upscalers, InstructPix2Pix) are ignored: x_t is
the leading channels of the input. ``eps_channels=`` overrides the inference.

Not supported (ValueError at apply time): schedulers without ``alphas_cumprod`` that are not
flow matching (EDM*, ScoreSdeVe, consistency models, IPNDM), flow schedulers with
``invert_sigmas`` (Mochi). Per-token timesteps (LTX) are not handled.
"""

from __future__ import annotations

import inspect
import math
import numbers
import weakref
from typing import Any, Literal, Sequence, Union

import torch
from torch import nn

from ..checks import check_int
from ..scaling import TSR, Calibrated, Linear, PerSigma, Uniform, resolve_schedule

__all__ = ["apply_epsilon_scaling", "remove_epsilon_scaling", "EpsilonScalingHandle"]

FlowMode = Literal["eps", "velocity"]
LamLike = Union[float, int, Uniform, Linear, PerSigma, TSR, Calibrated]
Lookup = Union[Uniform, PerSigma, TSR]

# Attribute names under which diffusers pipelines keep their denoiser(s). Wan 2.2 keeps a second
# (low-noise) expert in ``transformer_2``.
DENOISER_NAMES = ("unet", "transformer", "transformer_2")
_TIMESTEP_NAMES = ("timestep", "timesteps", "t")
_LEARNED_VARIANCE = ("learned", "learned_range")

# Live handles, so that applying twice replaces instead of stacking. Values hold only weak
# references to pipelines and modules.
_BY_PIPE: "weakref.WeakKeyDictionary[Any, EpsilonScalingHandle]" = weakref.WeakKeyDictionary()
_BY_MODULE: "weakref.WeakKeyDictionary[nn.Module, EpsilonScalingHandle]" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------------
# Schedulers: parameterisation, noise level, sigma grid
# ---------------------------------------------------------------------------------------------


def _config_get(scheduler: Any, key: str, default: Any = None) -> Any:
    config = getattr(scheduler, "config", None)
    if config is None:
        return default
    try:
        return config.get(key, default)
    except AttributeError:
        return getattr(config, key, default)


def _parameterisation(scheduler: Any) -> str:
    """What the denoiser's output is: 'epsilon', 'v_prediction', 'sample' or 'flow'."""
    name = type(scheduler).__name__
    prediction = _config_get(scheduler, "prediction_type")
    if "FlowMatch" in name or prediction == "flow_prediction" or _config_get(scheduler, "use_flow_sigmas"):
        if _config_get(scheduler, "invert_sigmas"):
            raise ValueError(f"{name} with invert_sigmas=True is not supported by Epsilon Scaling")
        if not hasattr(scheduler, "sigmas"):
            raise ValueError(f"{name}: a flow-matching scheduler needs a 'sigmas' table")
        return "flow"
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise ValueError(
            f"{name} is not supported by Epsilon Scaling: expected a discrete VP scheduler "
            "(with alphas_cumprod) or a flow-matching scheduler"
        )
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(
            f"{name}: prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction!r}"
        )
    return prediction


def _has_sigma_table(scheduler: Any) -> bool:
    return getattr(scheduler, "sigmas", None) is not None and getattr(scheduler, "timesteps", None) is not None


def _first_value(t: Any) -> float:
    return float(torch.as_tensor(t).flatten()[0])


def _current_index(scheduler: Any, t_model: Any) -> int:
    """Index into ``scheduler.sigmas`` of the step being evaluated (diffusers' own rule)."""
    i = getattr(scheduler, "step_index", None)
    if i is None:
        i = getattr(scheduler, "begin_index", None)
    if i is None:
        i = 0
        if t_model is not None:
            ts = torch.as_tensor(scheduler.timesteps).detach().to("cpu", torch.float64)
            hits = (ts == _first_value(t_model)).nonzero()
            if len(hits):
                i = int(hits[0])
    return int(i)


def _table_sigma(scheduler: Any, t_model: Any) -> float:
    """The sigma (VE for VP schedulers, flow t for flow ones) at which this call is evaluated."""
    i = _current_index(scheduler, t_model)
    interpol = getattr(scheduler, "sigmas_interpol", None)
    if interpol is not None and not getattr(scheduler, "state_in_first_order", True):
        # KDPM2: the second evaluation of a step sits at the interpolated sigma.
        j = i - 1 if "Ancestral" in type(scheduler).__name__ else i
        return float(interpol[j])
    sigmas = scheduler.sigmas
    if not 0 <= i < len(sigmas):
        raise ValueError(f"{type(scheduler).__name__}: step index {i} is outside its sigma table")
    return float(sigmas[i])


def _flow_t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """VE sigma of flow time t (inf at t = 1)."""
    return torch.where(t < 1, t / (1 - t), torch.full_like(t, math.inf))


def _vp_sigma_at(scheduler: Any, t_model: Any, batch: int) -> torch.Tensor:
    """sigma = sqrt((1 - abar_t) / abar_t) at the call's integer timestep(s), float64 [batch]."""
    if t_model is None:
        raise ValueError("Epsilon Scaling could not find the timestep argument of the denoiser call")
    abar = torch.as_tensor(scheduler.alphas_cumprod).detach().to("cpu", torch.float64)
    t = torch.as_tensor(t_model).detach().to("cpu", torch.float64).flatten()
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"the denoiser got {t.numel()} timesteps for a batch of {batch}")
    idx = t.round().long()
    if bool((idx < 0).any()) or bool((idx >= len(abar)).any()):
        raise ValueError(f"timestep {t.tolist()} is outside the scheduler's {len(abar)} training steps")
    a = abar[idx]
    return ((1 - a) / a).sqrt()


def _sigma_now(scheduler: Any, kind: str, t_model: Any, batch: int) -> torch.Tensor:
    """VE sigma of this evaluation, float64 [batch] (inf where the level is pure noise)."""
    if kind == "flow":
        t = torch.tensor(_table_sigma(scheduler, t_model), dtype=torch.float64)
        return _flow_t_to_sigma(t).expand(batch).clone()
    if _has_sigma_table(scheduler):
        return torch.full((batch,), _table_sigma(scheduler, t_model), dtype=torch.float64)
    return _vp_sigma_at(scheduler, t_model, batch)


def _sigma_grid(scheduler: Any, kind: str) -> torch.Tensor:
    """The sampling grid as the core samplers see it: the distinct finite VE sigmas at which the
    scheduler evaluates the network, descending, then a final 0 (where sampling ends)."""
    ts = getattr(scheduler, "timesteps", None)
    if ts is None:
        raise ValueError(
            f"{type(scheduler).__name__} has no timesteps yet: a step-indexed schedule (Linear) is "
            "bound to the sampling grid, so call set_timesteps first (pipelines do)"
        )
    ts = torch.as_tensor(ts).detach().to("cpu")
    if kind == "flow":
        g = _flow_t_to_sigma(torch.as_tensor(scheduler.sigmas).detach().to("cpu", torch.float64)[: len(ts)])
    elif _has_sigma_table(scheduler):
        g = torch.as_tensor(scheduler.sigmas).detach().to("cpu", torch.float64)[: len(ts)]
    else:
        abar = torch.as_tensor(scheduler.alphas_cumprod).detach().to("cpu", torch.float64)
        a = abar[ts.to(torch.float64).round().long()]
        g = ((1 - a) / a).sqrt()
    g = g[torch.isfinite(g) & (g > 0)]
    if g.numel() == 0:
        raise ValueError(f"{type(scheduler).__name__}: no finite positive sigma on the sampling grid")
    return torch.cat([torch.unique(g).flip(0), g.new_zeros(1)])


# ---------------------------------------------------------------------------------------------
# The transform on one network output
# ---------------------------------------------------------------------------------------------


def _beta(kind: str, flow_mode: str, sigma: torch.Tensor | None) -> torch.Tensor | None:
    """beta of eq. (1) per sample (float64), or None where beta = 0."""
    if kind == "epsilon" or (kind == "flow" and flow_mode == "velocity"):
        return None
    assert sigma is not None
    if kind == "v_prediction":
        return sigma.clone()
    if kind == "sample":
        return -(1 + sigma**2).sqrt()
    return 1 + sigma  # flow, eps mode: 1 / (1 - t)


def _prediction_slice(x: torch.Tensor, out: torch.Tensor, learned_variance: bool, eps_channels: int | None) -> tuple[int, int] | None:
    """(dim, count) of the prediction inside ``out``; None when the whole output is the prediction."""
    if eps_channels is not None:
        if out.ndim < 2 or out.shape[1] < eps_channels or x.shape[1] < eps_channels:
            raise ValueError(f"eps_channels={eps_channels} does not fit output {tuple(out.shape)} / input {tuple(x.shape)}")
        return 1, eps_channels
    if x.shape == out.shape and not learned_variance:
        return None
    if x.ndim != out.ndim or x.shape[0] != out.shape[0]:
        raise ValueError(
            f"cannot match denoiser output {tuple(out.shape)} to its input {tuple(x.shape)}; pass eps_channels="
        )
    diff = [d for d in range(out.ndim) if x.shape[d] != out.shape[d]]
    if len(diff) > 1:
        raise ValueError(
            f"cannot match denoiser output {tuple(out.shape)} to its input {tuple(x.shape)}; pass eps_channels="
        )
    d = diff[0] if diff else 1
    n_in, n_out = x.shape[d], out.shape[d]
    if n_out == 2 * n_in:  # learned sigma: DiT, ADM
        c = n_in
    elif learned_variance and n_out % 2 == 0:  # learned sigma with extra inputs: DeepFloyd IF II
        c = n_out // 2
    elif n_out <= n_in:  # extra conditioning inputs: inpainting, upscalers, InstructPix2Pix
        c = n_out
    else:
        raise ValueError(
            f"cannot tell which of the {n_out} output channels are the prediction (input has {n_in}); pass eps_channels="
        )
    return d, c


def _rescale(out: torch.Tensor, x: torch.Tensor, shrink: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
    """Eq. (1): out - shrink * (out + beta * x_t), in float32 at least, per sample."""
    dtype = torch.promote_types(out.dtype, torch.float32)
    shape = (-1,) + (1,) * (out.ndim - 1)
    k = shrink.to(out.device, dtype).reshape(shape)
    o = out.to(dtype)
    if beta is None:
        return (o - k * o).to(out.dtype)
    b = beta.to(out.device, dtype).reshape(shape)
    return (o - k * (o + b * x.to(out.device, dtype))).to(out.dtype)


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    if hasattr(output, "keys"):  # diffusers BaseOutput (an OrderedDict with attributes)
        return output[next(iter(output.keys()))]
    raise TypeError(f"cannot find the prediction in a denoiser output of type {type(output).__name__}")


def _replace_first(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    output[next(iter(output.keys()))] = new  # BaseOutput.__setitem__ keeps the attribute in sync
    return output


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _is_step_indexed(lam: Any) -> bool:
    return isinstance(lam, Linear) or (isinstance(lam, Calibrated) and isinstance(lam.schedule, Linear))


def _check_schedule(lam: Any) -> tuple[Any, Union[Lookup, None]]:
    """Validate ``lam``; return (schedule, per-sigma lookup or None if it needs the grid)."""
    if isinstance(lam, numbers.Real) and not isinstance(lam, bool):
        lam = float(lam)
    if _is_step_indexed(lam):
        # The last step (i = 0) has lambda = b on every grid; longer grids are checked when bound.
        resolve_schedule(lam, torch.tensor([1.0, 0.0], dtype=torch.float64))
        return lam, None
    return lam, resolve_schedule(lam)


def _find_denoisers(pipe: Any, component: str | Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    names = (component,) if isinstance(component, str) else tuple(component or DENOISER_NAMES)
    found = [(n, getattr(pipe, n, None)) for n in names]
    found = [(n, m) for n, m in found if isinstance(m, nn.Module)]
    if component is not None and len(found) != len(names):
        missing = [n for n in names if not isinstance(getattr(pipe, n, None), nn.Module)]
        raise ValueError(f"{type(pipe).__name__} has no denoiser module named {missing}")
    if not found:
        raise ValueError(
            f"{type(pipe).__name__} has no denoiser among {list(DENOISER_NAMES)}: pass component='name'"
        )
    return found


def _forward_params(module: nn.Module) -> list[str]:
    target = getattr(module, "_orig_mod", module)  # torch.compile wrapper
    try:
        params = list(inspect.signature(type(target).forward).parameters)
    except (TypeError, ValueError):
        return []
    return params[1:]  # drop self


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


class EpsilonScalingHandle:
    """Epsilon Scaling installed on a pipeline's denoiser(s); undo with :meth:`remove`.

    Also a context manager: ``with apply_epsilon_scaling(pipe, 1.005): pipe(...)``.
    ``last_sigma`` / ``last_lam`` hold the VE sigma (None when ES did not need it) and lambda
    (float64, per sample) of the most recent denoiser call.
    """

    def __init__(
        self,
        pipe: Any,
        modules: list[tuple[str, nn.Module]],
        lam: Any,
        lookup: Union[Lookup, None],
        flow_mode: FlowMode,
        eps_channels: int | None,
    ) -> None:
        self.lam = lam
        self.flow_mode = flow_mode
        self.eps_channels = eps_channels
        self.components = tuple(n for n, _ in modules)
        self.last_sigma: torch.Tensor | None = None
        self.last_lam: torch.Tensor | None = None
        self._lookup = lookup
        self._bound: tuple[Any, Any, Lookup] | None = None
        self._plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool] | None = None
        self._active = True

        me = weakref.ref(self)

        def _pipe_gone(_: Any) -> None:
            handle = me()
            if handle is not None:
                handle.remove()

        try:
            self._pipe = weakref.ref(pipe, _pipe_gone)
        except TypeError:  # an object without weak references: hold it
            self._pipe = lambda: pipe
        self._modules = [weakref.ref(m) for _, m in modules]
        self._hooks = []
        for _, m in modules:
            params = _forward_params(m)
            self._hooks.append(m.register_forward_pre_hook(self._make_pre(params), with_kwargs=True))
            self._hooks.append(m.register_forward_hook(self._post, with_kwargs=True))
            _BY_MODULE[m] = self
        try:
            _BY_PIPE[pipe] = self
        except TypeError:
            pass

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self._active

    def remove(self) -> None:
        """Remove the hooks; the pipeline is exactly as before. Safe to call twice."""
        if not self._active:
            return
        self._active = False
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._plan = None
        for ref in self._modules:
            m = ref()
            if m is not None and _BY_MODULE.get(m) is self:
                del _BY_MODULE[m]
        pipe = self._pipe()
        try:
            if pipe is not None and _BY_PIPE.get(pipe) is self:
                del _BY_PIPE[pipe]
        except TypeError:
            pass

    def __enter__(self) -> "EpsilonScalingHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return f"EpsilonScalingHandle(lam={self.lam!r}, flow_mode={self.flow_mode!r}, components={self.components}, {state})"

    # -- lambda lookup --------------------------------------------------------------------------

    def _schedule_for(self, scheduler: Any, kind: str) -> Lookup:
        if self._lookup is not None:
            return self._lookup
        ts = getattr(scheduler, "timesteps", None)
        bound = self._bound
        if bound is not None and bound[0] is scheduler and bound[1] is ts:
            return bound[2]
        lookup = resolve_schedule(self.lam, _sigma_grid(scheduler, kind))  # ValueError if lambda <= 0
        self._bound = (scheduler, ts, lookup)
        return lookup

    # -- hooks ----------------------------------------------------------------------------------

    def _make_pre(self, params: list[str]):
        t_pos = next(((params.index(n), n) for n in _TIMESTEP_NAMES if n in params), None)
        x_name = params[0] if params else None

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._plan = None
            pipe = self._pipe()
            if pipe is None or not self._active:
                return None
            x = args[0] if args else kwargs.get(x_name) if x_name else None
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"Epsilon Scaling: the first argument of {type(module).__name__} is not a tensor")
            t_model = None
            if t_pos is not None:
                pos, name = t_pos
                t_model = args[pos] if len(args) > pos else kwargs.get(name)
            self._plan = self._prepare(pipe.scheduler, x, t_model)
            return None

        return pre

    def _prepare(self, scheduler: Any, x: torch.Tensor, t_model: Any):
        """Look lambda up for this call; None when it is 1 for every sample."""
        kind = _parameterisation(scheduler)
        lookup = self._schedule_for(scheduler, kind)
        batch = x.shape[0]
        beta_needed = not (kind == "epsilon" or (kind == "flow" and self.flow_mode == "velocity"))
        sigma = None
        if beta_needed or not isinstance(lookup, Uniform):
            sigma = _sigma_now(scheduler, kind, t_model, batch)
            lam = lookup.lam(sigma)
        else:
            lam = torch.full((batch,), float(lookup.b), dtype=torch.float64)
        self.last_sigma, self.last_lam = sigma, lam
        beta = _beta(kind, self.flow_mode, sigma)
        shrink = 1 - 1 / lam
        if beta is not None:
            # sigma = inf (flow t = 1, abar = 0): eq. (1) is singular, leave this evaluation alone.
            singular = ~torch.isfinite(beta)
            shrink = torch.where(singular, torch.zeros_like(shrink), shrink)
            beta = torch.where(singular, torch.zeros_like(beta), beta)
        if bool((shrink == 0).all()):
            return None
        learned = _config_get(scheduler, "variance_type") in _LEARNED_VARIANCE
        return x, shrink, beta, learned

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        plan, self._plan = self._plan, None
        if plan is None:
            return None
        x, shrink, beta, learned = plan
        out = _first_tensor(output)
        where = _prediction_slice(x, out, learned, self.eps_channels)
        if where is None:
            new = _rescale(out, x, shrink, beta)
        else:
            d, c = where
            x_t = x.narrow(d, 0, c)  # extra conditioning input channels come after x_t
            if c == out.shape[d]:
                new = _rescale(out, x_t, shrink, beta)
            else:
                head = _rescale(out.narrow(d, 0, c), x_t, shrink, beta)
                new = torch.cat([head, out.narrow(d, c, out.shape[d] - c)], dim=d)  # learned sigma untouched
        return _replace_first(output, new)


def apply_epsilon_scaling(
    pipe: Any,
    lam: LamLike,
    *,
    flow_mode: FlowMode = "eps",
    component: str | Sequence[str] | None = None,
    eps_channels: int | None = None,
) -> EpsilonScalingHandle:
    """Install Epsilon Scaling on a diffusers pipeline, for all its later calls.

    ``lam``: a number (uniform lambda) or an epsscale schedule (``Uniform``, ``Linear``,
    ``PerSigma``, ``TSR``, ``Calibrated``), looked up per call at the VE sigma of the evaluation.
    ``flow_mode``: for flow-matching schedulers, ``"eps"`` (ES of the implied eps, default) or
    ``"velocity"`` (``u / lambda``, ComfyUI's convention); ignored otherwise. ``component``: the
    denoiser attribute(s) to hook; default every one of ``unet``, ``transformer`` and
    ``transformer_2`` the pipeline has. ``eps_channels``: how many leading output channels hold
    the prediction, when it cannot be inferred.

    Applying again replaces the previous installation (also one made through another pipeline
    that shares the module). Raises ValueError, before any network call, for a lambda that is not
    finite and > 0, an unknown ``flow_mode`` or an unsupported scheduler. See the module
    docstring for where the hook sits and the conventions per prediction type.
    """
    if flow_mode not in ("eps", "velocity"):
        raise ValueError(f"flow_mode must be 'eps' or 'velocity', got {flow_mode!r}")
    if eps_channels is not None:
        check_int(eps_channels, "eps_channels")
    lam, lookup = _check_schedule(lam)
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        raise ValueError(f"{type(pipe).__name__} has no scheduler")
    kind = _parameterisation(scheduler)
    modules = _find_denoisers(pipe, component)
    if lookup is None and getattr(scheduler, "num_inference_steps", None) is not None:
        resolve_schedule(lam, _sigma_grid(scheduler, kind))  # early check on the current grid

    remove_epsilon_scaling(pipe)
    for _, m in modules:
        old = _BY_MODULE.get(m)
        if old is not None:
            old.remove()
    return EpsilonScalingHandle(pipe, modules, lam, lookup, flow_mode, eps_channels)


def remove_epsilon_scaling(pipe: Any) -> bool:
    """Remove Epsilon Scaling from ``pipe`` (and from its denoisers); True if any was installed."""
    removed = False
    try:
        handle = _BY_PIPE.get(pipe)
    except TypeError:  # no weak references: only its denoisers can be looked up
        handle = None
    if handle is not None:
        handle.remove()
        removed = True
    for name in DENOISER_NAMES:
        m = getattr(pipe, name, None)
        if isinstance(m, nn.Module):
            h = _BY_MODULE.get(m)
            if h is not None:
                h.remove()
                removed = True
    return removed

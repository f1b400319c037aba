"""Epsilon Scaling (Ning et al., ICLR 2024): the one transform, and its lambda schedules.

ES divides the predicted noise by lambda at sampling time only::

    eps' = eps / lambda(sigma)      <=>      D'(x, sigma) = x - (x - D(x, sigma)) / lambda(sigma)

We compute it as ``D' = D + (1 - 1/lambda) (x - D)`` so that lambda == 1 returns D bit for bit.
ES comes after guidance and before clipping; it never touches learned-variance channels, the
injected noise or a classifier gradient.

Schedules are small frozen objects:

* :class:`Uniform` ``(b)``: lambda = b everywhere (the paper's default).
* :class:`Linear` ``(k, b)``: ``lambda_i = b + k i`` over the respaced step index, ``i = 0`` the
  last (cleanest) step. Step-indexed, so it must be *bound* to the sampler's sigma grid.
* :class:`PerSigma` ``(sigmas, lams)``: a table, linearly interpolated in log sigma and held
  constant outside it.
* :class:`TSR` ``(k, sigma)``: Temporal Score Rescaling, a peer method that is ES with
  ``lambda = 1 / r(sigma)`` (see its docstring).
* :class:`Calibrated`: a schedule loaded from JSON together with the numbers that chose it.

On the command line a schedule is a JSON file or a compact spec, ``tsr:k=0.95,sigma=1``
(:func:`parse_schedule_spec`).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Union

import torch

from ._atomic import atomic_write_text
from .adapters import (
    Denoiser,
    Prediction,
    append_dims,
    as_prediction,
    forward_attrs,
    sigma_vector,
)
from .schedules import check_grid

__all__ = [
    "Uniform",
    "Linear",
    "PerSigma",
    "TSR",
    "Calibrated",
    "Schedule",
    "eps_scaling",
    "EpsScaled",
    "load_schedule",
    "save_schedule",
    "resolve_schedule",
    "parse_schedule_spec",
    "is_schedule_spec",
    "describe_schedule",
]

SCHEDULE_FORMAT = "epsscale.schedule/1"


def _number(v: Any, what: str) -> float:
    """A real number as a float: Python, numpy and 0-d torch scalars are accepted, bools are not."""
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_complex and v.dtype != torch.bool:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{what} must be a number, got {v!r}")
    return float(v)


def _check_lam(values: Any, what: str) -> None:
    t = torch.as_tensor(values, dtype=torch.float64)
    if t.numel() == 0:
        raise ValueError(f"{what}: empty lambda table")
    if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        bad = t[~(torch.isfinite(t) & (t > 0))][0].item()
        raise ValueError(f"{what}: lambda must be finite and > 0 everywhere, got {bad}")


class Schedule(Protocol):
    def bind(self, sigmas: torch.Tensor | None) -> "BoundSchedule": ...


class BoundSchedule(Protocol):
    def lam(self, sigma: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Uniform:
    """lambda(sigma) = b."""

    b: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "b", _number(self.b, "Uniform: lambda"))
        _check_lam(self.b, "Uniform")

    def bind(self, sigmas: torch.Tensor | None = None) -> "Uniform":
        return self

    def lam(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.full_like(torch.as_tensor(sigma, dtype=torch.float64), float(self.b))


@dataclass(frozen=True)
class Linear:
    """The paper's linear schedule ``lambda_i = b + k * i``.

    ``i`` is the respaced step index counted from the end: for a grid of T' steps the first
    (noisiest) step has ``i = T' - 1`` and the last has ``i = 0``.

    Bound to a grid it becomes a per-sigma table, so Heun's correction call at sigma_{i+1} gets
    the lambda of the step that starts there, the next step's. The diffusers integration does the
    same: it looks lambda up from the noise level of each network call, so a Heun scheduler's
    correction call also gets the next step's lambda.
    """

    k: float
    b: float

    def __post_init__(self) -> None:
        for name in ("k", "b"):
            v = _number(getattr(self, name), f"Linear: {name}")
            if not math.isfinite(v):
                raise ValueError(f"Linear: {name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, v)

    def values(self, steps: int) -> torch.Tensor:
        """lambda for each step in sampling order (first step first), float64 [steps]."""
        i = torch.arange(steps - 1, -1, -1, dtype=torch.float64)
        return self.b + self.k * i

    def bind(self, sigmas: torch.Tensor | None) -> "PerSigma":
        if sigmas is None:
            raise ValueError("Linear is indexed by sampling step: pass the sampler's sigma grid (sigmas=...)")
        s = _grid_steps(sigmas)
        lams = self.values(len(s))
        _check_lam(lams, f"Linear(k={self.k}, b={self.b}) on {len(s)} steps")
        return PerSigma(tuple(s.tolist()), tuple(lams.tolist()))


def _grid_steps(sigmas: torch.Tensor) -> torch.Tensor:
    """The sigmas at which a sampler running this grid evaluates the network: all but the last.

    The last entry is where sampling ends (0 for a whole chain, above 0 for part of one). Step
    indices count on this grid, so it must run the way a sampler does: strictly decreasing and
    positive before the end (an ascending table, such as a model's ``sigmas``, would reverse lambda).
    """
    try:
        return check_grid(torch.as_tensor(sigmas, dtype=torch.float64).flatten())[:-1]
    except ValueError as e:
        raise ValueError(f"Linear needs the sampling grid: {e}") from None


@dataclass(frozen=True)
class PerSigma:
    """lambda given at sigma knots; linear in log sigma between them, constant outside."""

    sigmas: tuple[float, ...]
    lams: tuple[float, ...]
    _log_s: torch.Tensor = field(init=False, repr=False, compare=False)
    _lam: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        s = torch.as_tensor(self.sigmas, dtype=torch.float64).flatten()
        lam = torch.as_tensor(self.lams, dtype=torch.float64).flatten()
        # Plain floats, so that a table given as tensors compares, hashes and saves like one given as tuples.
        object.__setattr__(self, "sigmas", tuple(s.tolist()))
        object.__setattr__(self, "lams", tuple(lam.tolist()))
        if s.numel() != lam.numel() or s.numel() == 0:
            raise ValueError(f"PerSigma: need equally many sigmas and lambdas (got {s.numel()} and {lam.numel()})")
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise ValueError("PerSigma: sigmas must be finite and > 0")
        _check_lam(lam, "PerSigma")
        order = torch.argsort(s)
        s, lam = s[order], lam[order]
        # Distinct in log sigma, where it interpolates (0.001 and its next float share a log).
        if bool((s[1:].log() <= s[:-1].log()).any()):
            raise ValueError("PerSigma: sigmas must be distinct (even in log sigma)")
        object.__setattr__(self, "_log_s", s.log())
        object.__setattr__(self, "_lam", lam)

    def bind(self, sigmas: torch.Tensor | None = None) -> "PerSigma":
        return self

    def lam(self, sigma: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64)
        log_s, lam = self._log_s.to(s.device), self._lam.to(s.device)
        if len(log_s) == 1:
            return lam.expand_as(s).clone()
        u = s.clamp_min(1e-300).log().clamp(log_s[0], log_s[-1])
        j = torch.searchsorted(log_s, u).clamp(1, len(log_s) - 1)
        w = (u - log_s[j - 1]) / (log_s[j] - log_s[j - 1])
        return torch.lerp(lam[j - 1], lam[j], w)


@dataclass(frozen=True)
class TSR:
    """Temporal Score Rescaling as an ES schedule.

    Source: arXiv 2510.01184 (eq. 6 of v1, as ComfyUI's node cites it); official code
    ``temporalscorerescaling/TSR``, ``TSR_diffusers/TSR_schedulers.py`` (DDIM, flow Euler) and
    ``TSR_toy/sampler/toy_samplers.py``.

    TSR multiplies the predicted noise (the score up to -1/sigma_t) by::

        r(sigma) = (snr * s^2 + 1) / (snr * s^2 / k + 1),     eps' = r(sigma) * eps

    with ``s`` = ``sigma`` (the std of the Gaussian data model the rescaling is derived from,
    the official ``psr_sigma``) and ``snr`` the signal-to-noise ratio of the evaluation:
    ``1 / sigma^2`` for a VE sigma, which is ``abar / (1 - abar)`` for VP and
    ``((1 - t) / t)^2`` for a rectified-flow time t (VE sigma = t / (1 - t)). So TSR is ES with
    ``lambda(sigma) = 1 / r(sigma)``; multiplying through by sigma^2::

        lambda(sigma) = (s^2 / k + sigma^2) / (s^2 + sigma^2)

    which needs no special case at sigma = 0 (snr = inf, r = k); at sigma = inf (snr = 0) r = 1.
    r moves monotonically from 1 (pure noise) to k (clean); ``k = 1`` is the identity, bit for
    bit. ``k < 1`` shrinks eps like ES with lambda > 1 ("more detail"); a larger ``sigma``
    makes TSR act earlier (at higher noise).

    Defaults ``k = 0.95, sigma = 1`` are those of the official text-to-image demo notebook
    (``t2img_demo.ipynb``, SD2 DDIM and SD3 Euler) and of ComfyUI's ``TemporalScoreRescaling``
    node (``comfy_extras/nodes_eps.py``, PR #10351). Where the official code departs from
    this: its DDIM scheduler (``TSR_DDIMScheduler.step``) handles epsilon prediction only and
    rescales eps once per scheduler step at the step's own timestep; its flow scheduler
    (``TSR_FlowEulerScheduler``) rescales the eps implied by the velocity, skips t = 1 and has
    ``psr_sigma = 0.1`` and ``k = 1`` as constructor defaults. ComfyUI applies r to the
    CFG-combined prediction at every model evaluation with one sigma for the batch. Here r is
    looked up per sample at the sigma of each evaluation (Heun's second call included), like
    every ES schedule.
    """

    k: float = 0.95
    sigma: float = 1.0

    def __post_init__(self) -> None:
        for name in ("k", "sigma"):
            v = _number(getattr(self, name), f"TSR: {name}")
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"TSR: {name} must be finite and > 0, got {v!r}")
            object.__setattr__(self, name, v)

    def bind(self, sigmas: torch.Tensor | None = None) -> "TSR":
        return self

    def r(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The rescaling factor r(sigma) (float64); k at sigma = 0, 1 at sigma = inf."""
        return 1 / self.lam(sigma)

    def lam(self, sigma: torch.Tensor | float) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64)
        p2 = self.sigma**2
        s2 = s**2
        lam = (p2 / self.k + s2) / (p2 + s2)
        return torch.where(torch.isinf(s), torch.ones_like(lam), lam)


@dataclass(frozen=True)
class Calibrated:
    """A schedule read from JSON, with the metadata (model, sampler, steps, scores) that chose it."""

    schedule: Union[Uniform, Linear, PerSigma, TSR]
    meta: dict = field(default_factory=dict, compare=False)

    def bind(self, sigmas: torch.Tensor | None = None) -> Union[Uniform, PerSigma, TSR]:
        return self.schedule.bind(sigmas)


ScheduleLike = Union[float, int, Uniform, Linear, PerSigma, TSR, Calibrated]
Lookup = Union[Uniform, PerSigma, TSR]


def resolve_schedule(lam: ScheduleLike, sigmas: torch.Tensor | None = None) -> Lookup:
    """Turn a float or schedule into a per-sigma lookup, validating it (ValueError if bad)."""
    if isinstance(lam, (Uniform, Linear, PerSigma, TSR, Calibrated)):
        return lam.bind(sigmas)
    if isinstance(lam, (numbers.Real, torch.Tensor)):
        return Uniform(_number(lam, "lambda"))
    raise ValueError(f"lambda must be a number or a schedule (Uniform, Linear, PerSigma, TSR, Calibrated), got {type(lam).__name__}")


class EpsScaled:
    """``D'(x, sigma) = D + (1 - 1/lambda(sigma)) (x - D)``, i.e. eps / lambda. See module doc."""

    def __init__(self, denoiser: Denoiser, schedule: Lookup) -> None:
        self.inner = denoiser
        self.schedule = schedule
        forward_attrs(self, denoiser)  # samplers see the wrapped model's sigma range and rounding

    def lam(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.schedule.lam(sigma)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor | Prediction:
        out = self.inner(x, sigma, **cond)
        pred = as_prediction(out)
        lam = self.schedule.lam(sigma_vector(sigma, x))
        shrink = append_dims(1 - 1 / lam, x).to(pred.x0.dtype)
        x0 = pred.x0 + shrink * (x.to(pred.x0.dtype) - pred.x0)
        return pred.replace_x0(x0) if isinstance(out, Prediction) else x0


def eps_scaling(denoiser: Denoiser, lam: ScheduleLike, *, sigmas: torch.Tensor | None = None) -> EpsScaled:
    """Wrap a denoiser with Epsilon Scaling.

    ``lam`` is a float (uniform) or a schedule. Step-indexed schedules (:class:`Linear`) need
    the sampler's sigma grid ``sigmas``. Raises ValueError for any lambda that is not finite
    and > 0, before the network is ever called.
    """
    return EpsScaled(denoiser, resolve_schedule(lam, sigmas))


# ---------------------------------------------------------------------------------------------
# JSON round-trip
# ---------------------------------------------------------------------------------------------


def describe_schedule(lam: Any) -> str:
    """λ for a summary line or a table: 5 significant digits, a table as its range."""
    if isinstance(lam, Calibrated):
        lam = lam.schedule
    if isinstance(lam, Uniform):
        return f"{lam.b:.5g}"
    if isinstance(lam, Linear):
        return f"linear (k = {lam.k:.5g}, b = {lam.b:.5g})"
    if isinstance(lam, PerSigma):
        lo, hi = min(lam.lams), max(lam.lams)
        return f"per-sigma table ({len(lam.lams)} knots, lambda {lo:.5g} to {hi:.5g})"
    if isinstance(lam, TSR):
        return f"TSR (k = {lam.k:.5g}, sigma = {lam.sigma:.5g})"
    try:
        return f"{float(lam):.5g}"
    except (TypeError, ValueError):
        return str(lam)


def schedule_to_dict(schedule: Union[Uniform, Linear, PerSigma, TSR, Calibrated], meta: dict | None = None) -> dict:
    if isinstance(schedule, Calibrated):
        meta = {**schedule.meta, **(meta or {})}
        schedule = schedule.schedule
    if isinstance(schedule, Uniform):
        body: dict[str, Any] = {"type": "uniform", "b": float(schedule.b)}
    elif isinstance(schedule, Linear):
        body = {"type": "linear", "k": float(schedule.k), "b": float(schedule.b)}
    elif isinstance(schedule, PerSigma):
        body = {"type": "per_sigma", "sigmas": list(schedule.sigmas), "lams": list(schedule.lams)}
    elif isinstance(schedule, TSR):
        body = {"type": "tsr", "k": float(schedule.k), "sigma": float(schedule.sigma)}
    else:
        raise ValueError(f"cannot serialise {type(schedule).__name__}")
    return {"format": SCHEDULE_FORMAT, **body, "meta": meta or {}}


def schedule_from_dict(d: Any, source: str = "schedule") -> Calibrated:
    """Validate a schedule JSON object; every error is a one-line ValueError."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object")
    if d.get("format") != SCHEDULE_FORMAT:
        raise ValueError(f"{source}: 'format' must be {SCHEDULE_FORMAT!r}, got {d.get('format')!r}")
    kind = d.get("type")
    meta = d.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: 'meta' must be an object")

    def num(key: str) -> float:
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{source}: '{key}' must be a number, got {v!r}")
        return _to_float(v, key)

    def _to_float(v: float | int, key: str) -> float:
        try:
            return float(v)
        except OverflowError:
            raise ValueError(f"{source}: '{key}' is out of range") from None

    def nums(key: str) -> tuple[float, ...]:
        v = d.get(key)
        if not isinstance(v, list) or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in v):
            raise ValueError(f"{source}: '{key}' must be a list of numbers")
        return tuple(_to_float(a, key) for a in v)

    try:
        if kind == "uniform":
            sched: Union[Uniform, Linear, PerSigma, TSR] = Uniform(num("b"))
        elif kind == "linear":
            sched = Linear(num("k"), num("b"))
        elif kind == "per_sigma":
            sched = PerSigma(nums("sigmas"), nums("lams"))
        elif kind == "tsr":
            sched = TSR(num("k"), num("sigma"))
        else:
            raise ValueError(f"'type' must be 'uniform', 'linear', 'per_sigma' or 'tsr', got {kind!r}")
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(source) else f"{source}: {msg}") from None
    return Calibrated(sched, meta)


def save_schedule(path: str | os.PathLike, schedule: Union[Uniform, Linear, PerSigma, TSR, Calibrated], meta: dict | None = None) -> None:
    """Write a schedule JSON atomically."""
    atomic_write_text(path, json.dumps(schedule_to_dict(schedule, meta), indent=2) + "\n")


def load_schedule(path: str | os.PathLike) -> Calibrated:
    """Read a schedule JSON written by :func:`save_schedule` or ``epsscale calibrate``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a schedule JSON (epsscale calibrate --out FILE.json writes one)")
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such schedule file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the schedule ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    return schedule_from_dict(d, str(path))


# ---------------------------------------------------------------------------------------------
# Compact specs for the command line
# ---------------------------------------------------------------------------------------------

# kind -> (constructor, the keys it takes)
_SPECS: dict[str, tuple[Any, tuple[str, ...]]] = {"tsr": (TSR, ("k", "sigma"))}


def is_schedule_spec(text: Any) -> bool:
    """Whether ``text`` is a compact spec (``"tsr"`` or ``"tsr:..."``) rather than a file name."""
    return isinstance(text, str) and any(text == kind or text.startswith(kind + ":") for kind in _SPECS)


def parse_schedule_spec(text: str) -> TSR:
    """A schedule from a compact spec: ``tsr`` or ``tsr:k=0.95,sigma=1`` (keys optional, any
    order; defaults k = 0.95, sigma = 1). Every error is a one-line ValueError naming the spec."""
    if not is_schedule_spec(text):
        raise ValueError(f"bad schedule spec {text!r}: expected tsr or tsr:k=K,sigma=S")
    kind, _, rest = text.partition(":")
    make, keys = _SPECS[kind]
    values: dict[str, float] = {}
    for part in rest.split(",") if rest.strip() else []:
        key, eq, value = (p.strip() for p in part.partition("="))
        if not eq or not key:
            raise ValueError(f"bad schedule spec {text!r}: expected key=value pairs like k=0.95, got {part.strip()!r}")
        if key not in keys:
            raise ValueError(f"bad schedule spec {text!r}: unknown key {key!r} (expected {' or '.join(keys)})")
        if key in values:
            raise ValueError(f"bad schedule spec {text!r}: {key} is given twice")
        try:
            values[key] = float(value)
        except ValueError:
            raise ValueError(f"bad schedule spec {text!r}: {key} must be a number, got {value!r}") from None
    try:
        return make(**values)
    except ValueError as e:
        raise ValueError(f"bad schedule spec {text!r}: {e}") from None

"""Exposure bias: the δ_t metric, ε-norm curves, the analytic variance model and λ calibration.

Everything here is a pure function of a denoiser (the VE contract of :mod:`epsscale.adapters`),
real data ``x0`` (model space, ``[N, ...]``) and a sampler with its σ-grid. Samplers report
through their :class:`~epsscale.samplers.StepInfo` callback; this module never prints.

Notation (PAPER.md). ᾱ = 1 / (1 + σ²); a VP state is ``x_vp = √ᾱ · x_VE``. A chain of T' steps
is a descending grid ``σ_0 > … > σ_{T'-1} > σ_{T'} = 0``; step i calls the network at σ_i
(σ̂_i with EDM churn) and reaches the state x̂ at σ_{i+1}.

* :func:`delta_t`: the variance error δ_t = (σ̂_t − √(1−ᾱ_t))² along real trajectories
  (PAPER.md "Exposure-bias metric δ_t"); for σ-space samplers (euler, heun, dpmpp_2m) in VE
  units, δ = (σ̂ − σ)².
* :func:`eps_norms`: ‖ε‖ curves "training", "sampling" and "sampling_es" (PAPER.md "ε-norm
  curves").
* :func:`analytic_variance`: the prediction-error model Δ_{t−1} = c_t² Δ_t + c_0² γ_t² (PAPER.md
  "Sampling distribution with prediction error").
* :func:`calibrate_norm_matching`: λ chosen so the ES sampling ε-norm curve meets the training
  curve; :func:`fid_search`: a cached golden-section, grid or parabola search over uniform b.
  On the shipped Fashion-MNIST model the parabola search on 100-sample FIDs is the one that
  finds the grid's λ cheaply; norm matching points the wrong way there (benchmarks/RESULTS.md,
  "Which calibration works").
* :func:`plot_delta`, :func:`plot_eps_norms`, :func:`plot_fid_vs_b`, :func:`exposure_json`:
  reports.

Randomness follows DESIGN.md §2: sample *s* draws from ``torch.Generator().manual_seed(s)``,
first its starting noise (float32), then one tensor per sampler step. The training curve reuses
that starting ε at every σ (common random numbers, see :class:`_TrainingNorms`): at step 0 the
training and sampling inputs coincide, and the ratio of the two curves is nearly free of Monte
Carlo noise at high σ. Results never depend on ``batch_size``.

JSON schema of :func:`exposure_json` (``"format": "epsscale.exposure/1"``)::

    {
      "format": "epsscale.exposure/1",
      "units": "vp" | "ve",            # VP: residual x̂_vp − √ᾱ x0 vs √(1−ᾱ); VE: x̂ − x0 vs σ
      "t_kind": "timestep" | "sigma",  # what "t" holds (timesteps need a VPSchedule)
      "t": [...],                      # reported steps 1..T'−1 in sampling order (state reached)
      "sigma": [...],                  # VE σ of the same steps
      "target_std": [...],             # √(1−ᾱ_t) (vp) or σ_t (ve)
      "std": {"baseline": [...], "es": [...] | null},       # measured σ̂_t
      "delta_t": {"baseline": [...], "es": [...] | null},   # (σ̂_t − target)²
      "eps_norm": {"training": [...], "sampling": [...], "sampling_es": [...] | null,
                   "sampling_es_raw": [...] | null},        # ‖ε‖ of the call made *at* state t
      "eps_norm_all_steps": {"sigma": [...], "training": [...], ...}  # all T' model calls
                                                                       # (adds step 0), or null
      "lam": [...] | null,             # λ at each reported step (ES run)
      "meta": {"sampler": ..., "steps": T', "n": N, "nfe": ..., "sqrt_d": ..., ...}
    }

Every list under "std", "delta_t" and "eps_norm" is aligned with "t". The ε-norm at a
reported state is the one of the network call made on that state (step i+1 for the state
reached by step i; under EDM churn that call is at σ̂ ≥ σ), so δ_t and ‖ε‖ describe the same
inputs. "sampling_es" is the norm the sampler actually used (raw / λ); "sampling_es_raw" is the
network's own output on the ES trajectory.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence, Union

import torch

from ._atomic import atomic_write_text
from .adapters import Denoiser, Prediction, _bc, _sigma_vector, as_prediction
from .samplers import SAMPLERS, StackedGenerator, StepInfo, prior
from .scaling import Calibrated, EpsScaled, Linear, PerSigma, ScheduleLike, Uniform, resolve_schedule, save_schedule
from .schedules import VPSchedule, check_grid

__all__ = [
    "DeltaResult",
    "EpsNormResult",
    "ExposureReport",
    "AnalyticResult",
    "CalibrationInfo",
    "FidSearchResult",
    "delta_t",
    "eps_norms",
    "measure_exposure",
    "analytic_variance",
    "influence_weights",
    "calibrate_norm_matching",
    "fid_search",
    "write_calibrated_schedule",
    "exposure_json",
    "plot_delta",
    "plot_eps_norms",
    "plot_fid_vs_b",
]

Units = Literal["vp", "ve"]
Start = Literal["data", "prior"]
SamplerLike = Union[str, Callable[..., torch.Tensor]]
EXPOSURE_FORMAT = "epsscale.exposure/1"
FID_CACHE_FORMAT = "epsscale.fid_search/1"
_VP_SAMPLERS = ("ddpm", "ddim")


# ---------------------------------------------------------------------------------------------
# Result records
# ---------------------------------------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    """Tensors, tuples, dataclass records and numbers as plain JSON values."""
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().tolist()
    if hasattr(v, "to_dict"):
        return v.to_dict()
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


@dataclass(frozen=True)
class DeltaResult:
    """δ_t along real trajectories (:func:`delta_t`). Tensors are float64, in sampling order.

    ``sigma`` [T'−1]: VE σ of each reported state (steps 1..T'−1; the final σ = 0 state is left
    out). ``target``: √(1−ᾱ) (``units="vp"``) or σ (``"ve"``). ``std``: σ̂, the standard
    deviation over the N samples of each pixel's residual (unbiased), averaged over pixels.
    ``var``: the per-pixel variance averaged over pixels. ``delta`` = (std − target)².
    ``lam`` [T']: λ used at each step's model call (all ones for the baseline). ``nfe``: network
    evaluations spent, counted in images.
    """

    sigma: torch.Tensor
    target: torch.Tensor
    std: torch.Tensor
    var: torch.Tensor
    delta: torch.Tensor
    units: Units
    sampler: str
    lam: torch.Tensor
    n: int
    steps: int
    nfe: int

    def to_dict(self) -> dict:
        return {k: _jsonable(getattr(self, k)) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class EpsNormResult:
    """‖ε‖ curves (:func:`eps_norms`), one value per model call of the chain, [T'], float64.

    ``sigma``: where the sampler evaluated the network at each step (σ̂ with churn).
    ``training``: ‖ε_θ(q_sample(x0, σ))‖. ``sampling``: ‖ε_θ(x̂)‖ along baseline trajectories.
    ``sampling_es``: the ε the ES sampler used, ‖ε_θ(x̂)‖ / λ(σ), along ES trajectories, and
    ``sampling_es_raw`` the network's own ‖ε_θ(x̂)‖ there. Norms are L2 over a whole image,
    averaged over images. ``sqrt_d`` is √(elements per image), the high-noise limit.
    """

    sigma: torch.Tensor
    training: torch.Tensor
    sampling: torch.Tensor
    sampling_es: torch.Tensor | None
    sampling_es_raw: torch.Tensor | None
    lam: torch.Tensor | None
    sampler: str
    n: int
    steps: int
    sqrt_d: float
    nfe: int

    def to_dict(self) -> dict:
        return {k: _jsonable(getattr(self, k)) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class ExposureReport:
    """What ``epsscale measure`` reports: δ_t with and without ES, and the ε-norm curves.

    The parts share their sampling passes; ``nfe`` is the true total (the parts' own ``nfe``
    each count the passes they were computed from).
    """

    delta_baseline: DeltaResult
    delta_es: DeltaResult | None
    eps: EpsNormResult
    nfe: int

    def to_dict(self) -> dict:
        return {"delta_baseline": self.delta_baseline.to_dict(), "delta_es": None if self.delta_es is None else self.delta_es.to_dict(), "eps": self.eps.to_dict(), "nfe": self.nfe}


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _resolve_sampler(sampler: SamplerLike) -> tuple[str, Callable[..., torch.Tensor]]:
    if isinstance(sampler, str):
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: expected one of {', '.join(SAMPLERS)} or a sampler function")
        return sampler, SAMPLERS[sampler]
    if callable(sampler):
        return getattr(sampler, "__name__", type(sampler).__name__), sampler
    raise ValueError(f"sampler must be a name ({', '.join(SAMPLERS)}) or a function, got {sampler!r}")


def _resolve_units(name: str, units: Units | None) -> Units:
    if units is None:
        return "vp" if name in _VP_SAMPLERS else "ve"
    if units not in ("vp", "ve"):
        raise ValueError(f"units must be 'vp' or 've', got {units!r}")
    return units


def _check_data(x0: Any) -> torch.Tensor:
    if not isinstance(x0, torch.Tensor):
        raise ValueError(f"x0 must be a tensor [N, ...] of real data, got {type(x0).__name__}")
    if x0.ndim < 2 or x0.shape[0] < 2:
        raise ValueError(f"x0 must have shape [N, ...] with N >= 2 samples and at least one data dimension, got {tuple(x0.shape)}")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("x0 contains NaN or inf")
    return x0


def _check_seeds(seeds: Sequence[int] | None, n: int) -> list[int]:
    if seeds is None:
        return list(range(n))
    out = [int(s) for s in seeds]
    if len(out) != n:
        raise ValueError(f"need one seed per sample: got {len(out)} seeds for {n} samples")
    return out


def _check_batch(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _check_opts(sampler_opts: Mapping[str, Any] | None) -> dict:
    opts = dict(sampler_opts or {})
    clash = sorted(set(opts) & {"noise", "callback", "cond"})
    if clash:
        raise ValueError(f"sampler_opts may not set {', '.join(clash)}: the noise and callback are ours; pass cond=... instead")
    return opts


def _check_start(start: str) -> Start:
    if start not in ("data", "prior"):
        raise ValueError(f"start must be 'data' (q_sample of x0 at the first step) or 'prior', got {start!r}")
    return start  # type: ignore[return-value]


def _bind(lam: ScheduleLike | None, grid: torch.Tensor) -> Union[Uniform, PerSigma, None]:
    """A validated per-σ schedule, or None for the baseline (λ ≡ 1 is the unwrapped model)."""
    if lam is None:
        return None
    sched = resolve_schedule(lam, grid)
    if isinstance(sched, Uniform) and float(sched.b) == 1.0:
        return None
    return sched


def _slice_cond(cond: Mapping[str, Any] | None, n: int, lo: int, hi: int) -> dict:
    """Per-sample conditioning (tensors whose first dimension is N) cut to samples lo:hi."""
    if not cond:
        return {}
    return {k: (v[lo:hi] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n else v) for k, v in cond.items()}


def _copy_attrs(dst: Any, src: Any) -> None:
    for attr in ("sigma_min", "sigma_max", "round_sigma"):
        if hasattr(src, attr):
            setattr(dst, attr, getattr(src, attr))


# ---------------------------------------------------------------------------------------------
# Denoiser wrappers (private): raw-ε recording, chunked calls, norm-matching λ
# ---------------------------------------------------------------------------------------------


class _Recorder:
    """A pass-through denoiser that logs the *raw* ε of every call, per image.

    ε = (x − D(x, σ)) / σ in VE units: the network's own ε for ε-prediction nets. Each log
    entry is ``[sigma (float), norms [N] float64, lam (float | None)]``; an ES schedule placed
    around this recorder may fill in ``lam``. Sitting *inside* :class:`~epsscale.scaling.EpsScaled`
    it sees the unscaled, unclipped output, so raw ε is exact even with clipping.
    """

    def __init__(self, inner: Denoiser) -> None:
        self.inner = inner
        self.calls: list[list[Any]] = []
        self.evaluations = 0
        _copy_attrs(self, inner)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor | Prediction:
        out = self.inner(x, sigma, **cond)
        s = _sigma_vector(sigma, x)
        x0 = as_prediction(out).x0
        eps = (x.to(torch.float64) - x0.to(torch.float64)) / _bc(s, x)
        self.calls.append([float(s[0]), eps.flatten(1).norm(dim=1), None])
        self.evaluations += x.shape[0]
        return out

    def take_step(self) -> list[Any]:
        """The first call since the last step boundary (the one a StepInfo reports); clears the log."""
        if not self.calls:
            raise RuntimeError("sampler reported a step without calling the denoiser")
        first = self.calls[0]
        self.calls.clear()
        return first


class _Chunked:
    """Calls ``inner`` on at most ``chunk`` samples at a time (bounded memory in lockstep runs)."""

    def __init__(self, inner: Denoiser, chunk: int) -> None:
        self.inner = inner
        self.chunk = chunk
        _copy_attrs(self, inner)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor | Prediction:
        n = x.shape[0]
        if n <= self.chunk:
            return self.inner(x, sigma, **cond)
        s = _sigma_vector(sigma, x)
        outs = [self.inner(x[lo : lo + self.chunk], s[lo : lo + self.chunk], **_slice_cond(cond, n, lo, lo + self.chunk)) for lo in range(0, n, self.chunk)]
        if not any(isinstance(o, Prediction) for o in outs):
            return torch.cat(outs)
        preds = [as_prediction(o) for o in outs]
        x0 = torch.cat([p.x0 for p in preds])
        var = None if any(p.var_interp is None for p in preds) else torch.cat([p.var_interp for p in preds])  # type: ignore[misc]
        return Prediction(x0, var)


class _MatchLam:
    """An adaptive ES "schedule": λ(σ) = mean raw ‖ε‖ of the call just made / training ‖ε‖ at σ.

    :class:`~epsscale.scaling.EpsScaled` asks for λ right after calling its inner denoiser, which
    is the :class:`_Recorder`; so λ at each call is the ratio measured on the very batch it
    scales. The batch must hold all calibration samples (a lockstep run).
    """

    def __init__(self, recorder: _Recorder, training: Callable[[float], float]) -> None:
        self.recorder = recorder
        self.training = training

    def lam(self, sigma: torch.Tensor) -> torch.Tensor:
        entry = self.recorder.calls[-1]
        value = float(entry[1].mean()) / self.training(entry[0])
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"norm matching produced lambda = {value} at sigma = {entry[0]:.4g}: is the training eps-norm zero there?")
        entry[2] = value
        return torch.full_like(torch.as_tensor(sigma, dtype=torch.float64), value)


class _FixedLam:
    """A bound schedule that also writes λ into the recorder's log."""

    def __init__(self, recorder: _Recorder, schedule: Union[Uniform, PerSigma]) -> None:
        self.recorder = recorder
        self.schedule = schedule

    def lam(self, sigma: torch.Tensor) -> torch.Tensor:
        lam = self.schedule.lam(sigma)
        self.recorder.calls[-1][2] = float(lam.reshape(-1)[0])
        return lam


def _es(recorder: _Recorder, lam: Any) -> Denoiser:
    """Epsilon Scaling, from its one place, around the recorder (the schedule is duck-typed)."""
    return EpsScaled(recorder, lam)


# ---------------------------------------------------------------------------------------------
# One streaming pass of a sampler over the data
# ---------------------------------------------------------------------------------------------


@dataclass
class _Moments:
    """Per-pixel count / mean / M2 over samples, merged batch by batch (Chan et al.), float64."""

    n: int = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    def add(self, r: torch.Tensor) -> None:
        r = r.to(torch.float64)
        nb = r.shape[0]
        mb = r.mean(0)
        m2b = ((r - mb) ** 2).sum(0)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        d = mb - self.mean
        n = self.n + nb
        self.mean = self.mean + d * (nb / n)
        self.m2 = self.m2 + m2b + d**2 * (self.n * nb / n)
        self.n = n


@dataclass
class _Pass:
    """Per-step accumulators of one sampling pass over all samples."""

    steps: int
    sigma_eval: list[float] = field(default_factory=list)
    lam: list[float] = field(default_factory=list)
    norm_sum: torch.Tensor | None = None
    moments: list[_Moments] = field(default_factory=list)
    count: int = 0
    evaluations: int = 0

    @property
    def norms(self) -> torch.Tensor:
        assert self.norm_sum is not None
        return self.norm_sum / self.count


def _start_state(x0b: torch.Tensor, z: torch.Tensor, sigma0: torch.Tensor, start: Start, units: Units) -> torch.Tensor:
    """x at σ_0 in VE float64: q_sample(x0) = x0 + σ_0 ε, or the sampler's prior."""
    if start == "data":
        return x0b.to(torch.float64) + sigma0 * z.to(torch.float64)
    return prior(z, sigma0, kind=units)


def _sample_pass(
    model: Denoiser,
    x0: torch.Tensor,
    grid: torch.Tensor,
    fn: Callable[..., torch.Tensor],
    *,
    make_lam: Callable[[_Recorder], Any] | None,
    seeds: list[int],
    opts: Mapping[str, Any],
    cond: Mapping[str, Any] | None,
    batch_size: int,
    start: Start,
    units: Units,
    residuals: bool,
) -> _Pass:
    """Run the sampler over x0 in batches; accumulate raw ‖ε‖ per step and residual moments."""
    n, steps = x0.shape[0], len(grid) - 1
    acc = _Pass(steps, moments=[_Moments() for _ in range(steps - 1)] if residuals else [])
    acc.norm_sum = torch.zeros(steps, dtype=torch.float64)
    abar_next = 1 / (1 + grid[1:] ** 2)
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        x0b = x0[lo:hi]
        gen = StackedGenerator(seeds[lo:hi], device=x0.device)
        rec = _Recorder(model)
        den = rec if make_lam is None else _es(rec, make_lam(rec))
        first_batch = lo == 0

        # Step boundary: the step's first model call, and the state it reached.
        def callback(info: StepInfo) -> None:
            i = info.index
            s, norms, lam = rec.take_step()
            acc.norm_sum[i] += norms.sum().cpu()  # type: ignore[index]
            if first_batch:
                acc.sigma_eval.append(s)
                acc.lam.append(1.0 if lam is None else lam)
            if residuals and i < steps - 1:
                r = info.x_next.to(torch.float64) - x0b.to(torch.float64)  # VE residual x̂ − x0
                if units == "vp":
                    r = r * float(abar_next[i].sqrt())  # x̂_vp − √ᾱ x0
                acc.moments[i].add(r)

        # Starting state, then the chain (the generator continues with one draw per step).
        z = gen.randn(x0b.shape, dtype=torch.float32)
        x = _start_state(x0b, z, grid[0], start, units)
        cond_b = _slice_cond(cond, n, lo, hi)
        fn(den, x, grid, noise=gen, callback=callback, **({"cond": cond_b} if cond_b else {}), **opts)
        if len(acc.sigma_eval) != steps:
            raise RuntimeError(f"sampler reported {len(acc.sigma_eval)} steps for a grid of {steps}")
        acc.count += hi - lo
        acc.evaluations += rec.evaluations
    return acc


class _TrainingNorms:
    """The training ε-norm curve: ‖ε_θ(x0 + σ ε)‖ averaged over images, on demand per σ (cached).

    Common random numbers: sample s draws *one* ε (float32, from a fresh generator seeded with
    s, so it is the ε that started its trajectory) and reuses it at every σ. Each σ's value is
    still an unbiased estimate of the training norm, but it is strongly correlated with the
    sampling norm at high noise, which cuts the noise of their ratio by orders of magnitude.
    """

    def __init__(self, model: Denoiser, x0: torch.Tensor, seeds: list[int], batch_size: int, cond: Mapping[str, Any] | None) -> None:
        self.model, self.x0, self.cond = model, x0, cond
        n = x0.shape[0]
        self.batches = [(lo, min(lo + batch_size, n), StackedGenerator(seeds[lo : lo + batch_size], device=x0.device)) for lo in range(0, n, batch_size)]
        self.cache: dict[float, float] = {}
        self.evaluations = 0
        self.z: list[torch.Tensor | None] = [None] * len(self.batches)

    def __call__(self, sigma: float) -> float:
        key = float(sigma)
        if key not in self.cache:
            total, n = 0.0, self.x0.shape[0]
            for j, (lo, hi, gen) in enumerate(self.batches):
                x0b = self.x0[lo:hi].to(torch.float64)
                if self.z[j] is None:  # one ε per sample, reused at every σ
                    self.z[j] = gen.randn(x0b.shape, dtype=torch.float32).to(torch.float64)
                z = self.z[j]
                s = torch.full((hi - lo,), key, dtype=torch.float64, device=x0b.device)
                x = x0b + key * z
                pred = as_prediction(self.model(x, s, **_slice_cond(self.cond, n, lo, hi)))
                eps = (x - pred.x0.to(torch.float64)) / key
                total += float(eps.flatten(1).norm(dim=1).sum())
                self.evaluations += hi - lo
            self.cache[key] = total / n
        return self.cache[key]

    def curve(self, sigmas: Sequence[float]) -> torch.Tensor:
        return torch.tensor([self(s) for s in sigmas], dtype=torch.float64)


def _delta_from_pass(acc: _Pass, grid: torch.Tensor, units: Units, name: str) -> DeltaResult:
    sig = grid[1:-1].clone()
    std = torch.stack([(m.m2 / (m.n - 1)).sqrt().mean() for m in acc.moments])  # type: ignore[operator]
    var = torch.stack([(m.m2 / (m.n - 1)).mean() for m in acc.moments])  # type: ignore[operator]
    target = (sig**2 / (1 + sig**2)).sqrt() if units == "vp" else sig
    return DeltaResult(
        sigma=sig,
        target=target,
        std=std.cpu(),
        var=var.cpu(),
        delta=(std.cpu() - target) ** 2,
        units=units,
        sampler=name,
        lam=torch.tensor(acc.lam, dtype=torch.float64),
        n=acc.count,
        steps=acc.steps,
        nfe=acc.evaluations,
    )


# ---------------------------------------------------------------------------------------------
# δ_t and ε-norm curves
# ---------------------------------------------------------------------------------------------


def delta_t(
    denoiser: Denoiser,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    sampler: SamplerLike = "ddpm",
    lam: ScheduleLike | None = 1.0,
    *,
    seeds: Sequence[int] | None = None,
    sampler_opts: Mapping[str, Any] | None = None,
    cond: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    units: Units | None = None,
) -> DeltaResult:
    """The exposure-bias metric δ_t (variance error) of Ning et al. 2024, on real trajectories.

    The authors' protocol (PAPER.md "Exposure-bias metric δ_t"):

    1. take the N real samples ``x0`` (model space, ``[N, ...]``);
    2. diffuse them to the first step of the chain: x̂ = x0 + σ_0 ε (VE; ε from sample s's
       generator, drawn in float32), i.e. ``q_sample(x0, T'−1)`` for a VP chain;
    3. run ``sampler`` (a name in :data:`~epsscale.samplers.SAMPLERS` or a sampler function)
       with ``sampler_opts`` (ADM's protocol: ``variance="learned_range", clip=1.0``), with
       Epsilon Scaling ``lam`` (1 or None: none), continuing the same per-sample generators;
    4. after each step store the residual of the state just reached, x̂_vp − √ᾱ x0 with the ᾱ of
       that state (``units="vp"``), or x̂ − x0 (``"ve"``);
    5. standard deviation over the N samples per pixel (streamed: per-pixel moments merged batch
       by batch in float64), then the mean over pixels: σ̂_t;
    6. δ_t = (σ̂_t − √(1−ᾱ_t))² (vp) or (σ̂_t − σ_t)² (ve), for steps 1..T'−1 (the final σ = 0
       state is left out).

    ``units`` defaults to "vp" for ddpm/ddim and "ve" for the σ-space samplers. The two differ
    only by a factor: δ_vp = ᾱ δ_ve. ``cond`` values that are tensors with first dimension N are
    cut per batch; others are passed as they are. Memory is O(T' × pixels) however large N is.
    """
    x0 = _check_data(x0)
    grid = check_grid(sigmas)
    if len(grid) < 3:
        raise ValueError("delta_t needs a chain of at least 2 steps (a grid of >= 3 sigmas)")
    name, fn = _resolve_sampler(sampler)
    units = _resolve_units(name, units)
    seeds_l = _check_seeds(seeds, x0.shape[0])
    sched = _bind(lam, grid)
    acc = _sample_pass(
        denoiser, x0, grid, fn,
        make_lam=None if sched is None else (lambda rec: _FixedLam(rec, sched)),
        seeds=seeds_l, opts=_check_opts(sampler_opts), cond=cond, batch_size=_check_batch(batch_size),
        start="data", units=units, residuals=True,
    )  # fmt: skip
    return _delta_from_pass(acc, grid, units, name)


def eps_norms(
    denoiser: Denoiser,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    sampler: SamplerLike = "ddpm",
    lam: ScheduleLike | None = None,
    *,
    seeds: Sequence[int] | None = None,
    sampler_opts: Mapping[str, Any] | None = None,
    cond: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    start: Start = "data",
) -> EpsNormResult:
    """ε-norm curves (PAPER.md "ε-norm curves"): ‖ε‖ of one image, averaged over images.

    * ``training``: one network call per step on q_sample(x0, σ_i) = x0 + σ_i ε (VE), with
      ε = (x − D(x, σ))/σ, which is the network's own ε for ε-prediction nets. Each sample
      uses one ε at every σ, the one that started its trajectory (common random numbers).
    * ``sampling``: the raw ε of each step's (first) model call along baseline trajectories.
    * ``sampling_es`` (when ``lam`` is given): along ES trajectories, the ε the sampler used,
      raw / λ(σ); ``sampling_es_raw`` is the raw ε there. The raw ε is recorded by a wrapper
      *inside* the ES transform, so it is exact even when the sampler clips x0.

    Trajectories start at q_sample(x0) (``start="data"``, the δ_t protocol) or from the
    sampler's prior (``"prior"``: VP N(0, I) for ddpm/ddim, N(0, σ_0²) otherwise). The training
    curve is evaluated where the sampler evaluated the network (σ̂ under EDM churn).
    """
    x0 = _check_data(x0)
    grid = check_grid(sigmas)
    name, fn = _resolve_sampler(sampler)
    seeds_l = _check_seeds(seeds, x0.shape[0])
    batch_size = _check_batch(batch_size)
    units = _resolve_units(name, None)
    start = _check_start(start)
    sched = resolve_schedule(lam, grid) if lam is not None else None
    common = dict(seeds=seeds_l, opts=_check_opts(sampler_opts), cond=cond, batch_size=batch_size, start=start, units=units, residuals=False)

    # Baseline and ES trajectories.
    base = _sample_pass(denoiser, x0, grid, fn, make_lam=None, **common)  # type: ignore[arg-type]
    es = None if sched is None else _sample_pass(denoiser, x0, grid, fn, make_lam=lambda rec: _FixedLam(rec, sched), **common)  # type: ignore[arg-type]

    # Training curve where the sampler evaluated the network.
    train = _TrainingNorms(denoiser, x0, seeds_l, batch_size, cond)
    training = train.curve(base.sigma_eval)
    return _eps_result(name, x0, base, es, training, train.evaluations)


def _eps_result(name: str, x0: torch.Tensor, base: _Pass, es: _Pass | None, training: torch.Tensor, train_evals: int) -> EpsNormResult:
    lam = None if es is None else torch.tensor(es.lam, dtype=torch.float64)
    return EpsNormResult(
        sigma=torch.tensor(base.sigma_eval, dtype=torch.float64),
        training=training,
        sampling=base.norms.clone(),
        sampling_es=None if es is None else es.norms / lam,  # type: ignore[operator]
        sampling_es_raw=None if es is None else es.norms.clone(),
        lam=lam,
        sampler=name,
        n=base.count,
        steps=base.steps,
        sqrt_d=math.sqrt(x0[0].numel()),
        nfe=base.evaluations + (0 if es is None else es.evaluations) + train_evals,
    )


def measure_exposure(
    denoiser: Denoiser,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    sampler: SamplerLike = "ddpm",
    lam: ScheduleLike | None = None,
    *,
    seeds: Sequence[int] | None = None,
    sampler_opts: Mapping[str, Any] | None = None,
    cond: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    units: Units | None = None,
) -> ExposureReport:
    """δ_t (baseline and ES) and all three ε-norm curves in one go, with no duplicated work.

    Equivalent to :func:`delta_t` twice and :func:`eps_norms` once (same numbers, same seeds),
    but each trajectory is sampled once: the baseline pass and the ES pass each give δ_t and
    their sampling ε-norms; the training curve adds one network call per step per image.
    """
    x0 = _check_data(x0)
    grid = check_grid(sigmas)
    if len(grid) < 3:
        raise ValueError("measure_exposure needs a chain of at least 2 steps (a grid of >= 3 sigmas)")
    name, fn = _resolve_sampler(sampler)
    units = _resolve_units(name, units)
    seeds_l = _check_seeds(seeds, x0.shape[0])
    batch_size = _check_batch(batch_size)
    sched = resolve_schedule(lam, grid) if lam is not None else None
    common = dict(seeds=seeds_l, opts=_check_opts(sampler_opts), cond=cond, batch_size=batch_size, start="data", units=units, residuals=True)
    base = _sample_pass(denoiser, x0, grid, fn, make_lam=None, **common)  # type: ignore[arg-type]
    es = None if sched is None else _sample_pass(denoiser, x0, grid, fn, make_lam=lambda rec: _FixedLam(rec, sched), **common)  # type: ignore[arg-type]
    train = _TrainingNorms(denoiser, x0, seeds_l, batch_size, cond)
    training = train.curve(base.sigma_eval)
    return ExposureReport(
        delta_baseline=_delta_from_pass(base, grid, units, name),
        delta_es=None if es is None else _delta_from_pass(es, grid, units, name),
        eps=_eps_result(name, x0, base, es, training, train.evaluations),
        nfe=base.evaluations + (0 if es is None else es.evaluations) + train.evaluations,
    )


# ---------------------------------------------------------------------------------------------
# The analytic model: sampling variance under x0-prediction error
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalyticResult:
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

    def to_dict(self) -> dict:
        return {k: _jsonable(getattr(self, k)) for k in self.__dataclass_fields__}


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
    """The sampling distribution under x0-prediction error (PAPER.md, Ning et al. 2024 §3).

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
    if isinstance(eta, bool) or not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
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


# ---------------------------------------------------------------------------------------------
# Calibration by ε-norm matching
# ---------------------------------------------------------------------------------------------


def influence_weights(sigmas: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """How much each step's ε writes into the state, relative to the state's size; sums to 1.

    Step i moves the VE state by (σ_i − σ_{i+1}) ε, and lands where x has standard deviation
    √(σ_data² + σ_{i+1}²). A relative error ρ in ‖ε‖ therefore changes the state by about
    w_i ρ with w_i = (σ_i − σ_{i+1}) / √(σ_data² + σ_{i+1}²): the same number in VP units, the
    log-σ step size at high noise, and Δσ/σ_data near the data. These are the steps where a
    wrong λ moves samples the most.
    """
    grid = check_grid(sigmas)
    if not (math.isfinite(sigma_data) and sigma_data > 0):
        raise ValueError(f"sigma_data must be finite and > 0, got {sigma_data}")
    w = (grid[:-1] - grid[1:]) / (sigma_data**2 + grid[1:] ** 2).sqrt()
    return w / w.sum()


@dataclass(frozen=True)
class CalibrationInfo:
    """The numbers that chose a norm-matching schedule (:func:`calibrate_norm_matching`).

    Per step, sampling order, [T']: ``sigma`` (model-call σ), ``training`` (‖ε‖ on
    q_sample(x0, σ)), ``baseline`` (raw ‖ε‖ along λ ≡ 1 trajectories), ``weights``, ``lam``
    (the chosen λ), ``sampling_raw`` (raw ‖ε‖ along the chosen schedule's trajectories) and
    ``residual`` = sampling_raw / (λ · training), 1 where the curves meet. ``objective`` is the
    weighted mean of log residual (what uniform/linear drive to 0). ``iterations`` records each
    sampling pass. ``nfe`` counts network evaluations in images (training + all passes).
    """

    kind: str
    sampler: str
    steps: int
    n: int
    sigma: torch.Tensor
    training: torch.Tensor
    baseline: torch.Tensor
    weights: torch.Tensor
    lam: torch.Tensor
    sampling_raw: torch.Tensor
    residual: torch.Tensor
    objective: float
    iterations: tuple[dict, ...]
    passes: int
    nfe: int
    converged: bool

    def to_dict(self) -> dict:
        return {k: _jsonable(getattr(self, k)) for k in self.__dataclass_fields__}


def _smooth(values: torch.Tensor, window: int) -> torch.Tensor:
    """Centred moving average of log λ over ``window`` steps (shrinking at the ends)."""
    if window <= 1:
        return values
    h = window // 2
    lv = values.log()
    out = torch.stack([lv[max(0, i - h) : i + h + 1].mean() for i in range(len(lv))])
    return out.exp()


def calibrate_norm_matching(
    denoiser: Denoiser,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    sampler: SamplerLike = "ddpm",
    kind: Literal["uniform", "linear", "per_sigma"] = "uniform",
    *,
    seeds: Sequence[int] | None = None,
    sampler_opts: Mapping[str, Any] | None = None,
    cond: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    start: Start = "data",
    weights: Literal["influence", "equal"] | Sequence[float] | torch.Tensor = "influence",
    reference: Denoiser | None = None,
    smooth: int = 1,
    tol: float = 1e-4,
    max_passes: int = 12,
    verify: bool = True,
) -> tuple[Union[Uniform, Linear, PerSigma], CalibrationInfo]:
    """Choose λ so that the ES sampling ε-norm curve meets the training curve (norm matching).

    The criterion (PAPER.md "ε-norm curves"): along ES trajectories the ε the sampler uses,
    ‖ε_θ(x̂_i)‖ / λ_i, should equal the training norm ‖ε_θ(x_i)‖ on q_sample(x0, σ_i). Write the
    raw ratio r_i(λ) = ‖ε_θ(x̂_i)‖_sampling / ‖ε_θ(x_i)‖_training, measured on the trajectories
    that λ itself produced. Estimators:

    * ``"per_sigma"``: λ_i = r_i(λ). ES changes the trajectory, but causally: r_i depends only
      on λ_0..λ_{i−1}, never on λ_i. So the fixed point is reached *exactly* in one pass by
      running all N samples in lockstep (network calls chunked by ``batch_size``) and setting
      each step's λ from the ratio measured on that step's own batch. Heun's correction call at
      σ_{i+1} uses the ratio it measures itself. Optional ``smooth`` (a window in steps, on
      log λ); with ``verify`` one more pass with the fixed table gives the residual.
    * ``"uniform"``: b solves h(b) = Σ_i w_i log(r_i(b) / b) = 0, the weighted mean of the log
      residuals. Secant steps in b from b_0 = 1 (the baseline pass) and b_1 = b_0·exp(h(b_0))
      (one fixed-point step), at most 10% per pass until the root is bracketed and bisection
      inside the bracket after; each evaluation is one lockstep pass. Stops at |h| < ``tol``.
    * ``"linear"``: λ_i = b + k·i (i = T'−1 … 0, the paper's respaced index, i = 0 the last
      step). Started from the weighted least-squares line through the per-σ fixed point, then
      Broyden's method (Jacobian from two finite-difference passes) on two conditions along
      the schedule's own trajectories: the weighted mean of log residual = 0 and its weighted
      least-squares slope over i = 0.

    Why not iterate λ ← r(λ) over whole passes: ES feeds back. Where ‖ε_θ‖ grows with the
    state's spread (at high noise for every denoiser, at all noise for Gaussian data), λ > 1
    keeps more of the state, which widens it and raises r further: on Gaussian data
    dr_i/dλ reaches ~5 at low σ and plain iteration diverges, and an error made early in a
    per-σ solve is amplified by up to ~σ_max/σ_data by the end. Hence the exact causal solve
    for per_sigma, root finding for the others, and common random numbers in the training
    curve (one ε per sample for every σ, the one that started its trajectory), which makes
    the high-noise ratios nearly free of Monte Carlo noise.

    Weights w (``"influence"``, the default, see :func:`influence_weights` with σ_data =
    x0.std(); ``"equal"``; or one number per step) say which steps the uniform/linear fit
    listens to. The named weightings give the first step weight 0: its network call sees the
    sampler's starting state, which no λ has touched yet, so its residual is 1/λ_0 for every
    schedule. It carries no information, and (with influence weights, largest at σ_max) it
    used to pin the uniform solution to b = 1. ``reference`` is the denoiser whose training curve is the target (default: the
    model itself).

    Measured on the shipped Fashion-MNIST model (benchmarks/RESULTS.md): the sampling norm sits
    *below* the training norm on DDIM and Euler, so norm matching asks for λ < 1 where FID
    wants 1.01; none of its schedules came within 2% of the FID grid there. Use
    ``fid_search(method="parabola")`` to choose λ for quality.

    Caveat: norm matching compares the network with itself. An ε mis-scaled by the same factor
    on training and sampling inputs moves both curves and is invisible to it; what it detects
    is a gap that opens *because* the sampling inputs differ from training inputs.

    Returns the schedule (``Uniform``, ``Linear`` or ``PerSigma`` on the model-call σ's) and a
    :class:`CalibrationInfo` with the curves, every pass and the network evaluations spent.
    """
    x0 = _check_data(x0)
    grid = check_grid(sigmas)
    name, fn = _resolve_sampler(sampler)
    if kind not in ("uniform", "linear", "per_sigma"):
        raise ValueError(f"kind must be 'uniform', 'linear' or 'per_sigma', got {kind!r}")
    seeds_l = _check_seeds(seeds, x0.shape[0])
    batch_size = _check_batch(batch_size)
    start = _check_start(start)
    opts = _check_opts(sampler_opts)
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise ValueError(f"smooth must be a window of >= 1 steps, got {smooth!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 2:
        raise ValueError(f"max_passes must be an integer >= 2, got {max_passes!r}")
    steps = len(grid) - 1
    n = x0.shape[0]
    units = _resolve_units(name, None)
    if isinstance(weights, str):
        if weights == "influence":
            w = influence_weights(grid, max(float(x0.to(torch.float64).std()), 1e-6))
        elif weights == "equal":
            w = torch.full((steps,), 1 / steps, dtype=torch.float64)
        else:
            raise ValueError(f"weights must be 'influence', 'equal' or one number per step, got {weights!r}")
        if steps > 1:  # the first call sees the untouched starting state: no information (docstring)
            w = torch.cat([w.new_zeros(1), w[1:]])
            w = w / w.sum()
    else:
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if w.numel() != steps or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"weights: need {steps} finite values >= 0 with a positive sum")
        w = w / w.sum()

    # Training curve on the grid (lazily elsewhere, e.g. at σ̂ under churn).
    train = _TrainingNorms(reference if reference is not None else denoiser, x0, seeds_l, batch_size, cond)
    train.curve(grid[:-1].tolist())  # in grid order: the first draw is the trajectories' starting ε
    model = _Chunked(denoiser, batch_size)
    passes: list[dict] = []
    spent = [0]
    idx = torch.arange(steps - 1, -1, -1, dtype=torch.float64)  # paper's i: T'-1 ... 0

    def run(make_lam: Callable[[_Recorder], Any] | None, label: dict) -> tuple[_Pass, float]:
        """One lockstep pass of all N samples; returns it and h = Σ w log residual."""
        acc = _sample_pass(model, x0, grid, fn, make_lam=make_lam, seeds=seeds_l, opts=opts, cond=cond, batch_size=n, start=start, units=units, residuals=False)
        spent[0] += acc.evaluations
        lam = torch.tensor(acc.lam, dtype=torch.float64)
        resid = acc.norms / (lam * train.curve(acc.sigma_eval))
        h = float((w * resid.log()).sum())
        passes.append({**label, "lam": lam.tolist(), "sampling_raw": acc.norms.tolist(), "residual": resid.tolist(), "objective": h})
        return acc, h

    def run_offset(k: float, b: float) -> tuple[_Pass, float]:
        if k == 0 and b == 1.0:
            return run(None, {"b": b, "k": k})
        sched = Uniform(b) if k == 0 else Linear(k, b).bind(grid)
        return run(lambda rec: _FixedLam(rec, sched), {"b": b, "k": k})

    def solve_uniform(acc: _Pass, h: float) -> tuple[float, _Pass, bool]:
        """Root of h(b), starting from the baseline pass at b = 1: secant, bisection once bracketed."""
        b, pts = 1.0, [(1.0, h, acc)]
        b_prev = h_prev = None
        while abs(h) >= tol and len(passes) < max_passes:
            if b_prev is None or h == h_prev:
                b_new = b * math.exp(h)  # fixed-point step
            else:
                b_new = b - h * (b - b_prev) / (h - h_prev)  # secant
            neg = [p for p in pts if p[1] < 0]
            pos = [p for p in pts if p[1] > 0]
            if neg and pos:
                lo_b, hi_b = sorted((max(neg, key=lambda p: p[1])[0], min(pos, key=lambda p: p[1])[0]))
                if not lo_b < b_new < hi_b:
                    b_new = 0.5 * (lo_b + hi_b)
            else:
                b_new = min(max(b_new, 0.9 * b), 1.1 * b)  # not bracketed yet: at most 10% a pass
            if abs(b_new - b) < tol * abs(b):
                return b, acc, True  # the root is pinned to within tol
            b_prev, h_prev, b = b, h, b_new
            acc, h = run_offset(0.0, b)
            pts.append((b, h, acc))
        best = min(pts, key=lambda p: abs(p[1]))
        return best[0], best[2], abs(best[1]) < tol

    i_bar = float((w * idx).sum())
    i_var = float((w * (idx - i_bar) ** 2).sum())

    def moments(k: float, b: float) -> tuple[torch.Tensor, _Pass]:
        """F = (Σ w L, weighted slope of L over i) of the log residual L along λ_i = b + k·i."""
        acc, h = run_offset(k, b)
        L = torch.tensor(passes[-1]["residual"], dtype=torch.float64).log()
        slope = float((w * (idx - i_bar) * L).sum()) / i_var if i_var > 0 else 0.0
        passes[-1]["slope"] = slope
        return torch.tensor([h, slope], dtype=torch.float64), acc

    def solve_linear(b: float, k: float) -> tuple[tuple[float, float], _Pass, bool]:
        """Broyden's method on F(b, k) = 0, the Jacobian started by finite differences."""
        span = float(idx.max())

        def size(F: torch.Tensor) -> float:  # in units of log λ
            return max(abs(float(F[0])), abs(float(F[1])) * span / 2)

        p = torch.tensor([b, k], dtype=torch.float64)
        F, acc = moments(k, b)
        pts = [(size(F), p.clone(), acc)]
        if size(F) >= tol and len(passes) + 2 < max_passes:
            db, dk = 0.005 * b, 0.005 * b / max(span, 1.0)
            Fb, acc_b = moments(k, b + db)
            Fk, acc_k = moments(k + dk, b)
            pts += [(size(Fb), p + torch.tensor([db, 0.0], dtype=torch.float64), acc_b), (size(Fk), p + torch.tensor([0.0, dk], dtype=torch.float64), acc_k)]
            J = torch.stack([(Fb - F) / db, (Fk - F) / dk], 1)
            while size(F) >= tol and len(passes) < max_passes:
                try:
                    step = -torch.linalg.solve(J, F)
                except RuntimeError:
                    break
                # At most a 10% change of any λ_i per pass, and every λ_i > 0.
                lam_now = p[0] + p[1] * idx
                change = (step[0] + step[1] * idx).abs() / lam_now
                step = step * min(1.0, 0.1 / max(float(change.max()), 1e-300))
                if float((p[0] + step[0] + (p[1] + step[1]) * idx).min()) <= 0:
                    break
                if float(((step[0] + step[1] * idx).abs() / lam_now).max()) < tol:
                    break
                p_new = p + step
                F_new, acc = moments(float(p_new[1]), float(p_new[0]))
                pts.append((size(F_new), p_new.clone(), acc))
                dF = F_new - F
                J = J + torch.outer(dF - J @ step, step) / float(step @ step)  # Broyden update
                p, F = p_new, F_new
        best = min(pts, key=lambda t: t[0])
        return (float(best[1][0]), float(best[1][1])), best[2], best[0] < tol

    # Baseline pass (λ ≡ 1): the "sampling" curve.
    base, h_base = run(None, {"b": 1.0, "k": 0.0})
    if kind == "uniform":
        b, final, converged = solve_uniform(base, h_base)
        schedule: Union[Uniform, Linear, PerSigma] = Uniform(float(b))
    else:
        # Per-σ fixed point in one lockstep pass (exact: r_i does not depend on λ_i).
        fixed, _ = run(lambda rec: _MatchLam(rec, train), {"adaptive": True})
        lam_fp = _smooth(torch.tensor(fixed.lam, dtype=torch.float64), smooth)
        if kind == "per_sigma":
            schedule = PerSigma(tuple(fixed.sigma_eval), tuple(lam_fp.tolist()))
            final, converged = fixed, smooth == 1
            if verify:
                final, h = run(lambda rec: _FixedLam(rec, schedule), {"verify": True})  # type: ignore[arg-type]
                converged = converged or abs(h) < tol
        else:
            # Start: weighted least squares λ_i ≈ b + k·i on the per-σ fixed point.
            A = torch.stack([torch.ones_like(idx), idx], 1) * w.sqrt()[:, None]
            coef = torch.linalg.lstsq(A, (lam_fp * w.sqrt())[:, None]).solution[:, 0]
            (b, k), final, converged = solve_linear(float(coef[0]), float(coef[1]))
            schedule = Linear(k, b)

    lam_steps = torch.tensor(final.lam, dtype=torch.float64)
    residual = final.norms / (lam_steps * train.curve(final.sigma_eval))
    info = CalibrationInfo(
        kind=kind,
        sampler=name,
        steps=steps,
        n=n,
        sigma=torch.tensor(base.sigma_eval, dtype=torch.float64),
        training=train.curve(base.sigma_eval),
        baseline=base.norms.clone(),
        weights=w,
        lam=lam_steps,
        sampling_raw=final.norms.clone(),
        residual=residual,
        objective=float((w * residual.log()).sum()),
        iterations=tuple(passes),
        passes=len(passes),
        nfe=spent[0] + train.evaluations,
        converged=bool(converged),
    )
    return schedule, info


# ---------------------------------------------------------------------------------------------
# FID search over uniform b (cached, resumable)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FidSearchResult:
    """Best b, its score, every evaluated point (sorted by b), and how many were new.

    For ``"parabola"``, ``best_b`` is the vertex of the parabola through the lowest point and
    its two neighbours, and ``best_score`` the parabola's value there (a prediction, not an
    evaluation); ``bracketed`` says whether the minimum was bracketed (if not, ``best_b`` is
    the lowest evaluated point, at the edge of [lo, hi] or of ``max_evals``).
    """

    best_b: float
    best_score: float
    points: tuple[tuple[float, float], ...]
    new_evaluations: int
    cached: int
    method: str
    bracketed: bool = True

    def to_dict(self) -> dict:
        return {k: _jsonable(getattr(self, k)) for k in self.__dataclass_fields__}


class _PointCache:
    """b -> score, kept in a JSON file rewritten atomically after every new evaluation."""

    def __init__(self, path: str | os.PathLike | None, key: Mapping[str, Any] | None) -> None:
        self.path = None if path is None else Path(path)
        self.key = None if key is None else _jsonable(dict(key))
        self.points: list[tuple[float, float]] = []
        if self.path is not None and self.path.exists():
            try:
                d = json.loads(self.path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: not a valid FID search cache ({e})") from None
            if not isinstance(d, dict) or d.get("format") != FID_CACHE_FORMAT or not isinstance(d.get("points"), list):
                raise ValueError(f"{self.path}: not a FID search cache (expected 'format': {FID_CACHE_FORMAT!r})")
            if d.get("key") != self.key:
                raise ValueError(f"{self.path}: cache was written for {d.get('key')!r}, not {self.key!r}; use another cache file")
            for p in d["points"]:
                if not (isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)):
                    raise ValueError(f"{self.path}: bad point {p!r} (expected [b, score])")
                self.points.append((float(p[0]), float(p[1])))

    def get(self, b: float) -> float | None:
        for bb, score in self.points:
            if abs(bb - b) <= 1e-12 * max(1.0, abs(b)):
                return score
        return None

    def put(self, b: float, score: float) -> None:
        self.points.append((b, score))
        if self.path is None:
            return
        body = {"format": FID_CACHE_FORMAT, "key": self.key, "points": [[bb, s] for bb, s in sorted(self.points)]}
        atomic_write_text(self.path, json.dumps(body, indent=1) + "\n")


def fid_search(
    evaluate: Callable[[float], float],
    lo: float,
    hi: float,
    *,
    method: Literal["golden", "grid", "parabola"] = "golden",
    cache_path: str | os.PathLike | None = None,
    tol: float = 1e-3,
    points: int = 11,
    max_evals: int = 40,
    key: Mapping[str, Any] | None = None,
    start: float = 1.0,
    step: float = 0.01,
) -> FidSearchResult:
    """Minimise ``evaluate(b)`` (e.g. FID of uniform-ES samples) over b in [lo, hi].

    ``"grid"``: ``points`` equally spaced b's including both ends. ``"golden"``: golden-section
    search, which assumes one minimum in [lo, hi] (the paper's U-shape in λ); it narrows the
    bracket by 1/φ per evaluation until it is below ``tol`` (or ``max_evals`` new points).
    The sequence of b's depends only on (lo, hi, tol), so a rerun walks the same points.

    ``"parabola"``, the cheap one: evaluate b = ``start`` − ``step``, ``start``, ``start`` +
    ``step`` (successive parabolic interpolation on the lattice ``start`` + j·``step``). It
    returns the vertex of the parabola through the lowest point and its two neighbours (a
    bracket: the vertex is within ``step``/2 of the lowest point), or through the lowest point
    and the two before it when that convex parabola turns inside those three points. Otherwise
    it walks one step downhill and tries again (inside [lo, hi], at most ``max_evals`` points).
    It is meant for a small ``evaluate`` (e.g. FID of ~100 samples on fixed seeds): the seeds are
    the same at every b, so the small-sample bias of FID is nearly the same at every b and
    cancels in the comparison, while the parabola averages the remaining noise over three
    points. Measured on the shipped model (benchmarks/RESULTS.md), 3 × 100 samples landed
    within 0.002–0.004 of the optimum of a 7 × 500-sample grid.

    Every evaluated (b, score) goes to ``cache_path`` (JSON, rewritten atomically after each
    evaluation): an interrupted search resumes without re-evaluating, and a finished one
    replays with zero evaluations. ``key`` (e.g. model, sampler, steps, N) is stored with the
    cache and must match on reuse. Returns the best evaluated point and all points.
    """
    for name, v in (("lo", lo), ("hi", hi), ("tol", tol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not lo < hi:
        raise ValueError(f"need lo < hi, got {lo} and {hi}")
    if method not in ("golden", "grid", "parabola"):
        raise ValueError(f"method must be 'golden', 'grid' or 'parabola', got {method!r}")
    cache = _PointCache(cache_path, key)
    seen: dict[float, float] = {}
    stats = {"new": 0, "cached": 0}

    def f(b: float) -> float:
        if b in seen:
            return seen[b]
        score = cache.get(b)
        if score is None:
            score = float(evaluate(b))
            if not math.isfinite(score):
                raise ValueError(f"evaluate({b}) returned {score}: scores must be finite")
            cache.put(b, score)
            stats["new"] += 1
        else:
            stats["cached"] += 1
        seen[b] = score
        return score

    if method == "grid":
        if isinstance(points, bool) or not isinstance(points, int) or points < 2:
            raise ValueError(f"points must be an integer >= 2, got {points!r}")
        for j in range(points):
            f(lo + (hi - lo) * j / (points - 1))
    elif method == "golden":
        if tol <= 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        invphi = (math.sqrt(5) - 1) / 2
        a, d_ = float(lo), float(hi)
        c = d_ - invphi * (d_ - a)
        e = a + invphi * (d_ - a)
        fc, fe = f(c), f(e)
        while (d_ - a) > tol and len(seen) < max_evals:
            # Keep the sub-bracket holding the lower point; one new evaluation per iteration.
            if fc <= fe:
                d_, e, fe = e, c, fc
                c = d_ - invphi * (d_ - a)
                fc = f(c)
            else:
                a, c, fc = c, e, fe
                e = a + invphi * (d_ - a)
                fe = f(e)
    else:
        return _parabola_search(f, seen, stats, lo, hi, start, step, max_evals)

    pts = tuple(sorted(seen.items()))
    best_b, best_score = min(pts, key=lambda p: (p[1], p[0]))
    return FidSearchResult(best_b, best_score, pts, stats["new"], stats["cached"], method)


def _parabola_search(f: Callable[[float], float], seen: dict, stats: dict, lo: float, hi: float, start: float, step: float, max_evals: int) -> FidSearchResult:
    """The ``"parabola"`` method of :func:`fid_search` (see there)."""
    for name, v in (("start", start), ("step", step)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if step <= 0:
        raise ValueError(f"step must be > 0, got {step}")
    if not lo <= start <= hi:
        raise ValueError(f"start must lie in [lo, hi] = [{lo}, {hi}], got {start}")
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 3:
        raise ValueError(f"max_evals must be an integer >= 3, got {max_evals!r}")
    inside = lambda j: lo - 1e-12 <= start + j * step <= hi + 1e-12  # noqa: E731
    score: dict[int, float] = {}
    first = (-1, 0, 1) if inside(-1) and inside(1) else ((0, 1, 2) if inside(1) else (-2, -1, 0))
    for j in first:
        if inside(j):
            score[j] = f(start + j * step)

    def vertex(m: int) -> tuple[float, float] | None:
        """(u, value) of the parabola through m-1, m, m+1, if convex with its vertex in [m-1, m+1]."""
        if not all(j in score for j in (m - 1, m, m + 1)):
            return None
        y0, y1, y2 = score[m - 1], score[m], score[m + 1]
        curv = y0 - 2 * y1 + y2
        if curv <= 0:
            return (0.0, y1) if y0 >= y1 <= y2 else None  # flat: keep the middle
        u = 0.5 * (y0 - y2) / curv
        return (u, y1 - 0.25 * (y0 - y2) * u) if abs(u) <= 1 else None

    while True:
        jb = min(score, key=lambda j: (score[j], abs(j)))  # ties: the point nearest start
        missing = [j for j in (jb - 1, jb + 1) if j not in score]
        # Done only when the lowest point has both neighbours (a bracket): then the parabola's
        # vertex lies within half a step of it. A lowest point at the end of a triple is not
        # enough, even when that triple's parabola turns inside it: on an asymmetric curve
        # (FID against b usually is) such a vertex can be worse than the point already measured.
        if not missing:
            v = vertex(jb)
            assert v is not None  # jb is lowest, so y0 >= y1 <= y2: convex or flat
            pts = tuple(sorted(seen.items()))
            return FidSearchResult(start + (jb + v[0]) * step, v[1], pts, stats["new"], stats["cached"], "parabola", bracketed=True)
        # Walk downhill: one step past the lowest point, on the side where it has no neighbour.
        j_new = missing[0]
        if not inside(j_new) or len(score) >= max_evals:
            pts = tuple(sorted(seen.items()))
            return FidSearchResult(start + jb * step, score[jb], pts, stats["new"], stats["cached"], "parabola", bracketed=False)
        score[j_new] = f(start + j_new * step)


def write_calibrated_schedule(path: str | os.PathLike, schedule: Union[Uniform, Linear, PerSigma, Calibrated], meta: Mapping[str, Any]) -> None:
    """Save a calibrated schedule (JSON, atomic; :func:`epsscale.scaling.save_schedule`).

    ``meta`` must name ``model``, ``sampler`` and ``steps``; anything else (a
    :class:`CalibrationInfo`, a :class:`FidSearchResult`, curves as tensors) is stored as plain
    JSON next to them, so :func:`epsscale.load_schedule` returns it as ``Calibrated.meta``.
    """
    missing = [k for k in ("model", "sampler", "steps") if k not in meta]
    if missing:
        raise ValueError(f"meta must name the model, sampler and steps; missing {', '.join(missing)}")
    save_schedule(path, schedule, _jsonable(dict(meta)))


# ---------------------------------------------------------------------------------------------
# Reports: JSON and plots
# ---------------------------------------------------------------------------------------------


def _align(eps: EpsNormResult, steps: int, values: torch.Tensor | None) -> list[float] | None:
    """A per-model-call curve [T'] at the reported states 1..T'−1: the call made on each state."""
    if values is None:
        return None
    if len(values) != steps:
        raise ValueError(f"eps-norm curve has {len(values)} steps, delta_t's chain has {steps}")
    return values[1:].tolist()


def exposure_json(
    delta_baseline: DeltaResult | ExposureReport,
    delta_es: DeltaResult | None = None,
    eps: EpsNormResult | None = None,
    *,
    schedule: VPSchedule | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict:
    """The exposure report as a JSON-ready dict; the schema is in this module's docstring.

    Pass an :class:`ExposureReport` (from :func:`measure_exposure`), or the separate results.
    With a :class:`~epsscale.schedules.VPSchedule`, ``t`` holds the integer timestep of each
    reported state (nearest in log σ, exact on the schedule's grid); otherwise its σ.
    ``meta.nfe`` is the report's total, or the sum over separately computed results.
    """
    if isinstance(delta_baseline, ExposureReport):
        report = delta_baseline
        delta_baseline, delta_es, eps, nfe_total = report.delta_baseline, report.delta_es, report.eps, report.nfe
    else:
        nfe_total = delta_baseline.nfe + (0 if delta_es is None else delta_es.nfe) + (0 if eps is None else eps.nfe)
    sig = delta_baseline.sigma
    if delta_es is not None:
        if delta_es.units != delta_baseline.units or not torch.allclose(delta_es.sigma, sig):
            raise ValueError("baseline and ES delta_t must come from the same grid and units")
    if schedule is not None:
        t: list = schedule.timestep(sig).tolist()
        t_kind = "timestep"
    else:
        t, t_kind = sig.tolist(), "sigma"
    eps_aligned = None
    eps_all = None
    if eps is not None:
        eps_aligned = {k: _align(eps, delta_baseline.steps, getattr(eps, k)) for k in ("training", "sampling", "sampling_es", "sampling_es_raw")}
        eps_all = {k: _jsonable(getattr(eps, k)) for k in ("sigma", "training", "sampling", "sampling_es", "sampling_es_raw", "lam")}
    lam = None  # λ of the call made at each reported state
    if delta_es is not None:
        lam = delta_es.lam[1:].tolist()
    elif eps is not None and eps.lam is not None:
        lam = _align(eps, delta_baseline.steps, eps.lam)
    out_meta = {
        "sampler": delta_baseline.sampler,
        "steps": delta_baseline.steps,
        "n": delta_baseline.n,
        "nfe": nfe_total,
        "sqrt_d": None if eps is None else eps.sqrt_d,
        **_jsonable(dict(meta or {})),
    }
    return {
        "format": EXPOSURE_FORMAT,
        "units": delta_baseline.units,
        "t_kind": t_kind,
        "t": t,
        "sigma": sig.tolist(),
        "target_std": delta_baseline.target.tolist(),
        "std": {"baseline": delta_baseline.std.tolist(), "es": None if delta_es is None else delta_es.std.tolist()},
        "delta_t": {"baseline": delta_baseline.delta.tolist(), "es": None if delta_es is None else delta_es.delta.tolist()},
        "eps_norm": eps_aligned,
        "eps_norm_all_steps": eps_all,
        "lam": lam,
        "meta": out_meta,
    }


def _figure(width: float = 5.0, height: float = 3.5) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> None:
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")


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

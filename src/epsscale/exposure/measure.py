"""δ_t and ε-norm curves along real trajectories, and the JSON exposure report.

The measuring half of :mod:`epsscale.exposure` (whose docstring holds the notation, the
randomness protocol and the JSON schema of :func:`exposure_json`): the result records, the
public :func:`delta_t`, :func:`eps_norms`, :func:`measure_exposure` and :func:`exposure_json`,
and the private machinery they share with :mod:`epsscale.exposure.calibrate`: denoiser wrappers
that record the raw ε of every call (:class:`_Recorder`, :class:`_FixedLam`, :class:`_Chunked`),
one streaming sampling pass over the data (:func:`_sample_pass`) and the training ε-norm curve
(:class:`_TrainingNorms`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

import torch

from ..adapters import (
    Denoiser,
    Prediction,
    append_dims,
    as_prediction,
    forward_attrs,
    sigma_vector,
)
from ..samplers import StackedGenerator, StepInfo, prior
from ..scaling import EpsScaled, PerSigma, ScheduleLike, Uniform, resolve_schedule
from ..schedules import VPSchedule
from ._common import (
    SamplerLike,
    Start,
    Units,
    _bind,
    _check_run,
    _jsonable,
    _Record,
    _Run,
)

EXPOSURE_FORMAT = "epsscale.exposure/1"


# ---------------------------------------------------------------------------------------------
# Result records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeltaResult(_Record):
    """δ_t along real trajectories (:func:`delta_t`). Tensors are float64, in sampling order.

    ``sigma`` [T'−1]: VE σ of each reported state (steps 1..T'−1; the final σ = 0 state is left
    out). ``target``: √(1−ᾱ) (``units="vp"``) or σ (``"ve"``). ``std``: σ̂, the standard
    deviation over the N samples of each pixel's residual (divisor N, as ADM-ES), averaged over pixels.
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


@dataclass(frozen=True)
class EpsNormResult(_Record):
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
# Denoiser wrappers (private): raw-ε recording, chunked calls, fixed λ
# ---------------------------------------------------------------------------------------------


def _slice_cond(cond: Mapping[str, Any] | None, n: int, lo: int, hi: int) -> dict:
    """Per-sample conditioning (tensors whose first dimension is N) cut to samples lo:hi."""
    if not cond:
        return {}
    return {k: (v[lo:hi] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n else v) for k, v in cond.items()}


def _copy_attrs(dst: Any, src: Any) -> None:
    forward_attrs(dst, src)


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
        s = sigma_vector(sigma, x)
        x0 = as_prediction(out).x0
        eps = (x.to(torch.float64) - x0.to(torch.float64)) / append_dims(s, x)
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
        s = sigma_vector(sigma, x)
        outs = [self.inner(x[lo : lo + self.chunk], s[lo : lo + self.chunk], **_slice_cond(cond, n, lo, lo + self.chunk)) for lo in range(0, n, self.chunk)]
        if not any(isinstance(o, Prediction) for o in outs):
            return torch.cat(outs)
        preds = [as_prediction(o) for o in outs]
        x0 = torch.cat([p.x0 for p in preds])
        var = None if any(p.var_interp is None for p in preds) else torch.cat([p.var_interp for p in preds])  # type: ignore[misc]
        return Prediction(x0, var)


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
    run: _Run,
    *,
    make_lam: Callable[[_Recorder], Any] | None,
    cond: Mapping[str, Any] | None,
    residuals: bool,
    batch_size: int | None = None,
) -> _Pass:
    """Run the sampler over x0 in batches; accumulate raw ‖ε‖ per step and residual moments.

    Data, grid, sampler, seeds, options, start and units come from ``run``; ``batch_size``
    (default ``run.batch_size``) overrides the batch, e.g. N for a lockstep pass.
    """
    x0, grid, fn, seeds, opts, start, units = run.x0, run.grid, run.fn, run.seeds, run.opts, run.start, run.units
    batch_size = run.batch_size if batch_size is None else batch_size
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
    # Per-pixel standard deviation over the N samples with divisor N, as ADM-ES computes δ_t
    # (np.std in its x_t_distribution branches' image_sample.py), then the mean over pixels.
    std = torch.stack([(m.m2 / m.n).sqrt().mean() for m in acc.moments])  # type: ignore[operator]
    var = torch.stack([(m.m2 / m.n).mean() for m in acc.moments])  # type: ignore[operator]
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

    The authors' protocol (docs/paper.md, "Exposure-bias metric δ_t"):

    1. take the N real samples ``x0`` (model space, ``[N, ...]``);
    2. diffuse them to the first step of the chain: x̂ = x0 + σ_0 ε (VE; ε from sample s's
       generator, drawn in float32), i.e. ``q_sample(x0, T'−1)`` for a VP chain;
    3. run ``sampler`` (a name in :data:`~epsscale.samplers.SAMPLERS` or a sampler function)
       with ``sampler_opts`` (ADM's protocol: ``variance="learned_range", clip=1.0``), with
       Epsilon Scaling ``lam`` (1 or None: none), continuing the same per-sample generators;
    4. after each step store the residual of the state just reached, x̂_vp − √ᾱ x0 with the ᾱ of
       that state (``units="vp"``), or x̂ − x0 (``"ve"``);
    5. standard deviation over the N samples per pixel, with divisor N as ADM-ES's ``np.std``
       (streamed: per-pixel moments merged batch by batch in float64), then the mean over
       pixels: σ̂_t;
    6. δ_t = (σ̂_t − √(1−ᾱ_t))² (vp) or (σ̂_t − σ_t)² (ve), for steps 1..T'−1 (the final σ = 0
       state is left out).

    ``units`` defaults to "vp" for ddpm/ddim and "ve" for the σ-space samplers. The two differ
    only by a factor: δ_vp = ᾱ δ_ve. ``cond`` values that are tensors with first dimension N are
    cut per batch; others are passed as they are. Memory is O(T' × pixels) however large N is.
    """
    run = _check_run(x0, sigmas, sampler, seeds=seeds, batch_size=batch_size, sampler_opts=sampler_opts, units=units, chain_for="delta_t")
    sched = _bind(lam, run.grid)
    acc = _sample_pass(denoiser, run, make_lam=None if sched is None else (lambda rec: _FixedLam(rec, sched)), cond=cond, residuals=True)
    return _delta_from_pass(acc, run.grid, run.units, run.name)


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
    """ε-norm curves (docs/paper.md, "ε-norm curves"): ‖ε‖ of one image, averaged over images.

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
    run = _check_run(x0, sigmas, sampler, seeds=seeds, batch_size=batch_size, sampler_opts=sampler_opts, start=start)
    sched = resolve_schedule(lam, run.grid) if lam is not None else None

    # Baseline and ES trajectories.
    base, es = _baseline_and_es(denoiser, run, sched, cond, residuals=False)

    # Training curve where the sampler evaluated the network.
    train = _TrainingNorms(denoiser, run.x0, run.seeds, run.batch_size, cond)
    training = train.curve(base.sigma_eval)
    return _eps_result(run.name, run.x0, base, es, training, train.evaluations)


def _baseline_and_es(denoiser: Denoiser, run: _Run, sched: Any, cond: Mapping[str, Any] | None, *, residuals: bool) -> tuple[_Pass, _Pass | None]:
    """The baseline pass (λ ≡ 1) and, given a bound schedule, the ES pass on the same seeds."""
    base = _sample_pass(denoiser, run, make_lam=None, cond=cond, residuals=residuals)
    es = None if sched is None else _sample_pass(denoiser, run, make_lam=lambda rec: _FixedLam(rec, sched), cond=cond, residuals=residuals)
    return base, es


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
    run = _check_run(x0, sigmas, sampler, seeds=seeds, batch_size=batch_size, sampler_opts=sampler_opts, units=units, chain_for="measure_exposure")
    sched = resolve_schedule(lam, run.grid) if lam is not None else None
    base, es = _baseline_and_es(denoiser, run, sched, cond, residuals=True)
    train = _TrainingNorms(denoiser, run.x0, run.seeds, run.batch_size, cond)
    training = train.curve(base.sigma_eval)
    grid, units, name = run.grid, run.units, run.name
    return ExposureReport(
        delta_baseline=_delta_from_pass(base, grid, units, name),
        delta_es=None if es is None else _delta_from_pass(es, grid, units, name),
        eps=_eps_result(name, run.x0, base, es, training, train.evaluations),
        nfe=base.evaluations + (0 if es is None else es.evaluations) + train.evaluations,
    )


# ---------------------------------------------------------------------------------------------
# The JSON report
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
    """The exposure report as a JSON-ready dict; the schema is in the :mod:`epsscale.exposure` docstring.

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


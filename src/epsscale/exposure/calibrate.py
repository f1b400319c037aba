"""Calibration by ε-norm matching: λ such that the ES sampling ε-norm curve meets the training curve.

:func:`calibrate_norm_matching` runs in five steps, each a named function here:

1. check the arguments (:func:`~epsscale.exposure._common._check_run`,
   :func:`_check_solver_options`) and weigh the steps (:func:`_step_weights`);
2. the training ε-norm curve on the grid and a :class:`_Lockstep` runner, which samples all N
   trajectories in lockstep and scores each pass against that curve;
3. the baseline pass (λ ≡ 1);
4. the solver of the requested kind: :func:`_solve_uniform` (secant/bisection on one number,
   stepping with :func:`_uniform_step`), :func:`_per_sigma_fixed_point` with
   :func:`_per_sigma_schedule`, or :func:`_fit_line` then :func:`_solve_linear` (Broyden, with
   :func:`_broyden_step` and :func:`_broyden_update`);
5. :func:`_calibration_info`, the record of every pass.

The solvers talk to the sampler only through the runner's ``count``, ``run``, ``offset`` and
``linear_conditions`` (and ``idx``), so they can be exercised on synthetic objectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence, Union

import torch

from ..adapters import Denoiser
from ..checks import check_int
from ..scaling import Linear, PerSigma, Uniform
from ..schedules import check_grid
from ._common import SamplerLike, Start, _check_run, _Record, _Run
from .measure import _Chunked, _FixedLam, _Pass, _Recorder, _sample_pass, _TrainingNorms


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
class CalibrationInfo(_Record):
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


def _smooth(values: torch.Tensor, window: int) -> torch.Tensor:
    """Centred moving average of log λ over ``window`` steps (shrinking at the ends)."""
    if window <= 1:
        return values
    h = window // 2
    lv = values.log()
    out = torch.stack([lv[max(0, i - h) : i + h + 1].mean() for i in range(len(lv))])
    return out.exp()


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


# ---------------------------------------------------------------------------------------------
# Step 1: argument checks and step weights
# ---------------------------------------------------------------------------------------------


def _check_solver_options(smooth: Any, tol: Any, max_passes: Any) -> None:
    """Validate the solver settings of :func:`calibrate_norm_matching` (ValueError if bad)."""
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise ValueError(f"smooth must be a window of >= 1 steps, got {smooth!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be > 0, got {tol!r}")
    check_int(max_passes, "max_passes", low=2)


def _step_weights(weights: Literal["influence", "equal"] | Sequence[float] | torch.Tensor, grid: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The weights w [T'] (float64, sum 1) that the uniform and linear fits listen to.

    ``"influence"`` (:func:`influence_weights` with σ_data = x0.std()) and ``"equal"`` give the
    first step weight 0 when there is more than one step: its network call sees the sampler's
    untouched starting state, whose residual is 1/λ_0 for every schedule. Explicit weights (one
    finite value >= 0 per step, positive sum) are only normalised.
    """
    steps = len(grid) - 1
    if isinstance(weights, str):
        if weights == "influence":
            w = influence_weights(grid, max(float(x0.to(torch.float64).std()), 1e-6))
        elif weights == "equal":
            w = torch.full((steps,), 1 / steps, dtype=torch.float64)
        else:
            raise ValueError(f"weights must be 'influence', 'equal' or one number per step, got {weights!r}")
        if steps > 1:  # the first call sees the untouched starting state: no information
            w = torch.cat([w.new_zeros(1), w[1:]])
            w = w / w.sum()
        return w
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if w.numel() != steps or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"weights: need {steps} finite values >= 0 with a positive sum")
    return w / w.sum()


# ---------------------------------------------------------------------------------------------
# Step 2: lockstep passes scored against the training curve
# ---------------------------------------------------------------------------------------------


class _Lockstep:
    """Sampling passes of all N samples in lockstep, each scored against the training curve.

    One pass is one batch of all N samples (network calls chunked by ``run.batch_size``), so an
    adaptive λ (:class:`_MatchLam`) sees every sample at each step. For each pass the residual
    r_i / λ_i = raw sampling ‖ε‖ / (λ_i · training ‖ε‖) is formed per step, and its weighted log
    mean h = Σ w_i log residual_i is the objective that uniform and linear λ drive to 0.

    ``passes`` logs every pass (its label, ``lam``, ``sampling_raw``, ``residual``,
    ``objective`` and, for linear fits, ``slope``); ``count`` is its length and
    ``evaluations`` the network evaluations spent, in images. ``idx`` is the paper's step
    index i (T'−1 … 0 in sampling order); ``i_bar`` and ``i_var`` its weighted mean and
    variance under w.
    """

    def __init__(self, denoiser: Denoiser, run: _Run, cond: Mapping[str, Any] | None, train: _TrainingNorms, weights: torch.Tensor) -> None:
        self.args = run
        self.model = _Chunked(denoiser, run.batch_size)
        self.cond = cond
        self.train = train
        self.w = weights
        self.passes: list[dict] = []
        self.evaluations = 0
        self.idx = torch.arange(run.steps - 1, -1, -1, dtype=torch.float64)  # paper's i: T'-1 ... 0
        self.i_bar = float((weights * self.idx).sum())
        self.i_var = float((weights * (self.idx - self.i_bar) ** 2).sum())

    @property
    def count(self) -> int:
        """Passes made so far (all kinds: baseline, adaptive, verification, solver steps)."""
        return len(self.passes)

    def run(self, make_lam: Callable[[_Recorder], Any] | None, label: dict) -> tuple[_Pass, float]:
        """One lockstep pass with ES schedule ``make_lam`` (None: λ ≡ 1); the pass and its h."""
        acc = _sample_pass(self.model, self.args, make_lam=make_lam, cond=self.cond, residuals=False, batch_size=self.args.n)
        self.evaluations += acc.evaluations
        lam = torch.tensor(acc.lam, dtype=torch.float64)
        resid = acc.norms / (lam * self.train.curve(acc.sigma_eval))
        h = float((self.w * resid.log()).sum())
        self.passes.append({**label, "lam": lam.tolist(), "sampling_raw": acc.norms.tolist(), "residual": resid.tolist(), "objective": h})
        return acc, h

    def offset(self, k: float, b: float) -> tuple[_Pass, float]:
        """A pass with λ_i = b + k·i (k = 0: uniform b; b = 1 too: the unwrapped baseline)."""
        if k == 0 and b == 1.0:
            return self.run(None, {"b": b, "k": k})
        sched = Uniform(b) if k == 0 else Linear(k, b).bind(self.args.grid)
        return self.run(lambda rec: _FixedLam(rec, sched), {"b": b, "k": k})

    def linear_conditions(self, k: float, b: float) -> tuple[torch.Tensor, _Pass]:
        """F = (h, weighted least-squares slope over i of log residual) along λ_i = b + k·i."""
        acc, h = self.offset(k, b)
        L = torch.tensor(self.passes[-1]["residual"], dtype=torch.float64).log()
        slope = float((self.w * (self.idx - self.i_bar) * L).sum()) / self.i_var if self.i_var > 0 else 0.0
        self.passes[-1]["slope"] = slope
        return torch.tensor([h, slope], dtype=torch.float64), acc


# ---------------------------------------------------------------------------------------------
# Step 4: the solvers
# ---------------------------------------------------------------------------------------------


def _uniform_step(b: float, h: float, b_prev: float | None, h_prev: float | None, points: Sequence[tuple[Any, ...]]) -> float:
    """The next b of the uniform root search, from the current (b, h) and the points so far.

    A fixed-point step b·exp(h) first (or when the last two h are equal), a secant step after.
    ``points`` holds every (b, h, ...) evaluated: once they bracket the root (some h < 0, some
    h > 0), a step leaving the tightest bracket is replaced by its midpoint (bisection); before
    that, b moves by at most 10% per pass.
    """
    if b_prev is None or h == h_prev:
        b_new = b * math.exp(h)  # fixed-point step
    else:
        b_new = b - h * (b - b_prev) / (h - h_prev)  # secant
    neg = [p for p in points if p[1] < 0]
    pos = [p for p in points if p[1] > 0]
    if neg and pos:
        lo_b, hi_b = sorted((max(neg, key=lambda p: p[1])[0], min(pos, key=lambda p: p[1])[0]))
        if not lo_b < b_new < hi_b:
            b_new = 0.5 * (lo_b + hi_b)
    else:
        b_new = min(max(b_new, 0.9 * b), 1.1 * b)  # not bracketed yet: at most 10% a pass
    return b_new


def _solve_uniform(runner: _Lockstep, acc: _Pass, h: float, *, tol: float, max_passes: int) -> tuple[float, _Pass, bool]:
    """Root b of h(b) = Σ w log residual along uniform λ = b; returns (b, its pass, converged).

    Starts from the baseline pass (``acc`` with objective ``h``, at b = 1) and steps with
    :func:`_uniform_step`, one ``runner.offset(0, b)`` pass per step, until |h| < ``tol``, the
    step is below ``tol``·b (the root is pinned), or ``runner.count`` reaches ``max_passes``;
    then the point with the smallest |h| wins.
    """
    b, pts = 1.0, [(1.0, h, acc)]
    b_prev: float | None = None
    h_prev: float | None = None
    while abs(h) >= tol and runner.count < max_passes:
        b_new = _uniform_step(b, h, b_prev, h_prev, pts)
        if abs(b_new - b) < tol * abs(b):
            return b, acc, True  # the root is pinned to within tol
        b_prev, h_prev, b = b, h, b_new
        acc, h = runner.offset(0.0, b)
        pts.append((b, h, acc))
    best = min(pts, key=lambda p: abs(p[1]))
    return best[0], best[2], abs(best[1]) < tol


def _per_sigma_fixed_point(runner: _Lockstep, train: _TrainingNorms, smooth: int) -> tuple[_Pass, torch.Tensor]:
    """The per-σ fixed point λ_i = r_i(λ) in one adaptive lockstep pass, smoothed on log λ.

    Exact in one pass because r_i depends only on λ_0..λ_{i−1} (see
    :func:`calibrate_norm_matching`). Returns the pass and λ [T'] after :func:`_smooth`.
    """
    fixed, _ = runner.run(lambda rec: _MatchLam(rec, train), {"adaptive": True})
    return fixed, _smooth(torch.tensor(fixed.lam, dtype=torch.float64), smooth)


def _per_sigma_schedule(runner: _Lockstep, fixed: _Pass, lam: torch.Tensor, *, smoothed: bool, verify: bool, tol: float) -> tuple[PerSigma, _Pass, bool]:
    """The per-σ table on the model-call σ's; with ``verify``, one more pass with it fixed.

    Unsmoothed, the adaptive pass already is the schedule's own pass (converged). With
    ``verify`` the reported pass is the verification pass, converged also when its |h| < tol.
    """
    schedule = PerSigma(tuple(fixed.sigma_eval), tuple(lam.tolist()))
    final, converged = fixed, not smoothed
    if verify:
        final, h = runner.run(lambda rec: _FixedLam(rec, schedule), {"verify": True})  # type: ignore[arg-type]
        converged = converged or abs(h) < tol
    return schedule, final, converged


def _fit_line(lam: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> tuple[float, float]:
    """Weighted least squares λ_i ≈ b + k·i; returns (b, k)."""
    A = torch.stack([torch.ones_like(idx), idx], 1) * w.sqrt()[:, None]
    coef = torch.linalg.lstsq(A, (lam * w.sqrt())[:, None]).solution[:, 0]
    return float(coef[0]), float(coef[1])


def _linear_size(F: torch.Tensor, span: float) -> float:
    """How far F = (mean, slope) of log residual is from 0, in units of log λ over the chain."""
    return max(abs(float(F[0])), abs(float(F[1])) * span / 2)


def _broyden_step(J: torch.Tensor, F: torch.Tensor, p: torch.Tensor, idx: torch.Tensor, tol: float) -> torch.Tensor | None:
    """The damped Newton step in p = (b, k) for F = 0 with Jacobian J, or None to stop.

    The step changes no λ_i = b + k·i by more than 10%. None when J is singular, when the
    step would make some λ_i <= 0, or when it changes every λ_i by less than ``tol``.
    """
    try:
        step = -torch.linalg.solve(J, F)
    except RuntimeError:
        return None
    # At most a 10% change of any λ_i per pass, and every λ_i > 0.
    lam_now = p[0] + p[1] * idx
    change = (step[0] + step[1] * idx).abs() / lam_now
    step = step * min(1.0, 0.1 / max(float(change.max()), 1e-300))
    if float((p[0] + step[0] + (p[1] + step[1]) * idx).min()) <= 0:
        return None
    if float(((step[0] + step[1] * idx).abs() / lam_now).max()) < tol:
        return None
    return step


def _broyden_update(J: torch.Tensor, dF: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Broyden's rank-one update of J after ``step`` changed F by ``dF``."""
    return J + torch.outer(dF - J @ step, step) / float(step @ step)


def _solve_linear(runner: _Lockstep, b: float, k: float, *, tol: float, max_passes: int) -> tuple[tuple[float, float], _Pass, bool]:
    """Root (b, k) of F(b, k) = 0 (:meth:`_Lockstep.linear_conditions`) by Broyden's method.

    From the start (b, k), the Jacobian comes from two finite-difference passes (b + 0.5%·b,
    and k + 0.5%·b / span of i), then :func:`_broyden_step` and :func:`_broyden_update` until
    F is below ``tol`` (:func:`_linear_size`), a step is refused, or ``runner.count`` reaches
    ``max_passes``. Returns the best point seen, its pass and whether it met ``tol``.
    """
    idx = runner.idx
    span = float(idx.max())
    p = torch.tensor([b, k], dtype=torch.float64)
    F, acc = runner.linear_conditions(k, b)
    pts = [(_linear_size(F, span), p.clone(), acc)]
    if _linear_size(F, span) >= tol and runner.count + 2 < max_passes:
        db, dk = 0.005 * b, 0.005 * b / max(span, 1.0)
        Fb, acc_b = runner.linear_conditions(k, b + db)
        Fk, acc_k = runner.linear_conditions(k + dk, b)
        pts += [(_linear_size(Fb, span), p + torch.tensor([db, 0.0], dtype=torch.float64), acc_b), (_linear_size(Fk, span), p + torch.tensor([0.0, dk], dtype=torch.float64), acc_k)]
        J = torch.stack([(Fb - F) / db, (Fk - F) / dk], 1)
        while _linear_size(F, span) >= tol and runner.count < max_passes:
            step = _broyden_step(J, F, p, idx, tol)
            if step is None:
                break
            p_new = p + step
            F_new, acc = runner.linear_conditions(float(p_new[1]), float(p_new[0]))
            pts.append((_linear_size(F_new, span), p_new.clone(), acc))
            J = _broyden_update(J, F_new - F, step)
            p, F = p_new, F_new
    best = min(pts, key=lambda t: t[0])
    return (float(best[1][0]), float(best[1][1])), best[2], best[0] < tol


# ---------------------------------------------------------------------------------------------
# Step 5: the record
# ---------------------------------------------------------------------------------------------


def _calibration_info(kind: str, runner: _Lockstep, train: _TrainingNorms, base: _Pass, final: _Pass, converged: bool) -> CalibrationInfo:
    """The :class:`CalibrationInfo` of a finished solve: curves, every pass, evaluations spent."""
    run, w = runner.args, runner.w
    lam_steps = torch.tensor(final.lam, dtype=torch.float64)
    residual = final.norms / (lam_steps * train.curve(final.sigma_eval))
    return CalibrationInfo(
        kind=kind,
        sampler=run.name,
        steps=run.steps,
        n=run.n,
        sigma=torch.tensor(base.sigma_eval, dtype=torch.float64),
        training=train.curve(base.sigma_eval),
        baseline=base.norms.clone(),
        weights=w,
        lam=lam_steps,
        sampling_raw=final.norms.clone(),
        residual=residual,
        objective=float((w * residual.log()).sum()),
        iterations=tuple(runner.passes),
        passes=runner.count,
        nfe=runner.evaluations + train.evaluations,
        converged=bool(converged),
    )


# ---------------------------------------------------------------------------------------------
# The public entry point
# ---------------------------------------------------------------------------------------------


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

    The criterion (docs/paper.md, "ε-norm curves"): along ES trajectories the ε the sampler uses,
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
    used to pin the uniform solution to b = 1. ``reference`` is the denoiser whose training
    curve is the target (default: the model itself).

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
    run = _check_run(x0, sigmas, sampler, seeds=seeds, batch_size=batch_size, sampler_opts=sampler_opts, start=start)
    if kind not in ("uniform", "linear", "per_sigma"):
        raise ValueError(f"kind must be 'uniform', 'linear' or 'per_sigma', got {kind!r}")
    _check_solver_options(smooth, tol, max_passes)
    w = _step_weights(weights, run.grid, run.x0)

    # Training curve on the grid (lazily elsewhere, e.g. at σ̂ under churn), in grid order: the
    # first draw is the trajectories' starting ε.
    train = _TrainingNorms(reference if reference is not None else denoiser, run.x0, run.seeds, run.batch_size, cond)
    train.curve(run.grid[:-1].tolist())
    runner = _Lockstep(denoiser, run, cond, train, w)

    # Baseline pass (λ ≡ 1): the "sampling" curve.
    base, h_base = runner.run(None, {"b": 1.0, "k": 0.0})

    schedule: Union[Uniform, Linear, PerSigma]
    if kind == "uniform":
        b, final, converged = _solve_uniform(runner, base, h_base, tol=tol, max_passes=max_passes)
        schedule = Uniform(float(b))
    else:
        fixed, lam_fp = _per_sigma_fixed_point(runner, train, smooth)
        if kind == "per_sigma":
            schedule, final, converged = _per_sigma_schedule(runner, fixed, lam_fp, smoothed=smooth != 1, verify=verify, tol=tol)
        else:
            b0, k0 = _fit_line(lam_fp, w, runner.idx)  # start from the per-σ fixed point
            (b, k), final, converged = _solve_linear(runner, b0, k0, tol=tol, max_passes=max_passes)
            schedule = Linear(k, b)
    return schedule, _calibration_info(kind, runner, train, base, final, converged)

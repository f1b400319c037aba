"""λ by FID: a cached search over uniform b, and saving a calibrated schedule.

:func:`fid_search` minimises a score (FID of uniform-ES samples, typically) over b by a grid,
golden-section or parabola search (:func:`_grid_search`, :func:`_golden_search`,
:func:`_parabola_search`). Every evaluated point is kept in an on-disk cache
(:class:`_PointCache`), so an interrupted search resumes and a finished one replays for free.
:func:`write_calibrated_schedule` saves whichever schedule was chosen, with its provenance.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Union

from .._atomic import atomic_write_text
from ..checks import check_int, check_number
from ..scaling import Calibrated, Linear, PerSigma, Uniform, save_schedule
from ._common import _jsonable, _Record

# Seeds used for tuning lambda: far from the seeds users and the demo sample from (0..).
TUNING_SEED0 = 1_000_000

FID_CACHE_FORMAT = "epsscale.fid_search/1"


@dataclass(frozen=True)
class FidSearchResult(_Record):
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


class _Scores:
    """``evaluate`` memoised within one search (``seen``) and across runs (the point cache).

    ``new`` counts real evaluations, ``cached`` the points replayed from the cache file; a
    non-finite score is an error.
    """

    def __init__(self, evaluate: Callable[[float], float], cache: _PointCache) -> None:
        self.evaluate = evaluate
        self.cache = cache
        self.seen: dict[float, float] = {}
        self.new = 0
        self.cached = 0

    def __call__(self, b: float) -> float:
        if b in self.seen:
            return self.seen[b]
        score = self.cache.get(b)
        if score is None:
            score = float(self.evaluate(b))
            if not math.isfinite(score):
                raise ValueError(f"evaluate({b}) returned {score}: scores must be finite")
            self.cache.put(b, score)
            self.new += 1
        else:
            self.cached += 1
        self.seen[b] = score
        return score

    def result(self, best_b: float, best_score: float, method: str, bracketed: bool = True) -> FidSearchResult:
        """A :class:`FidSearchResult` with every point seen in this search, sorted by b."""
        return FidSearchResult(best_b, best_score, tuple(sorted(self.seen.items())), self.new, self.cached, method, bracketed)

    def lowest(self, method: str) -> FidSearchResult:
        """The result whose best point is the lowest evaluated one (ties: the smaller b)."""
        best_b, best_score = min(sorted(self.seen.items()), key=lambda p: (p[1], p[0]))
        return self.result(best_b, best_score, method)


def _check_number(name: str, v: Any) -> None:
    check_number(v, name)


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
        _check_number(name, v)
    if not lo < hi:
        raise ValueError(f"need lo < hi, got {lo} and {hi}")
    if method not in ("golden", "grid", "parabola"):
        raise ValueError(f"method must be 'golden', 'grid' or 'parabola', got {method!r}")
    f = _Scores(evaluate, _PointCache(cache_path, key))
    if method == "grid":
        _grid_search(f, lo, hi, points)
    elif method == "golden":
        _golden_search(f, lo, hi, tol, max_evals)
    else:
        return _parabola_search(f, lo, hi, start, step, max_evals)
    return f.lowest(method)


def grid_points(lo: float, hi: float, points: int) -> list[float]:
    """The b's of :func:`fid_search`'s ``"grid"`` method: ``points`` equally spaced, both ends."""
    check_int(points, "points", low=2)
    return [lo + (hi - lo) * j / (points - 1) for j in range(points)]


def _grid_search(f: _Scores, lo: float, hi: float, points: int) -> None:
    """The ``"grid"`` method of :func:`fid_search`."""
    for b in grid_points(lo, hi, points):
        f(b)


def _golden_search(f: _Scores, lo: float, hi: float, tol: float, max_evals: int) -> None:
    """The ``"golden"`` method of :func:`fid_search`: golden-section search for one minimum.

    Narrows [lo, hi] by 1/φ per new evaluation until it is below ``tol`` or ``max_evals``
    points were seen; the b's depend only on (lo, hi, tol) and the comparisons.
    """
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    invphi = (math.sqrt(5) - 1) / 2
    a, d_ = float(lo), float(hi)
    c = d_ - invphi * (d_ - a)
    e = a + invphi * (d_ - a)
    fc, fe = f(c), f(e)
    while (d_ - a) > tol and len(f.seen) < max_evals:
        # Keep the sub-bracket holding the lower point; one new evaluation per iteration.
        if fc <= fe:
            d_, e, fe = e, c, fc
            c = d_ - invphi * (d_ - a)
            fc = f(c)
        else:
            a, c, fc = c, e, fe
            e = a + invphi * (d_ - a)
            fe = f(e)


def _vertex(score: Mapping[int, float], m: int) -> tuple[float, float] | None:
    """(u, value) of the parabola through lattice points m−1, m, m+1, u the vertex offset from m.

    None unless all three are scored and the parabola is convex with its vertex in [m−1, m+1];
    a flat triple whose middle is lowest gives (0, its middle value).
    """
    if not all(j in score for j in (m - 1, m, m + 1)):
        return None
    y0, y1, y2 = score[m - 1], score[m], score[m + 1]
    curv = y0 - 2 * y1 + y2
    if curv <= 0:
        return (0.0, y1) if y0 >= y1 <= y2 else None  # flat: keep the middle
    u = 0.5 * (y0 - y2) / curv
    return (u, y1 - 0.25 * (y0 - y2) * u) if abs(u) <= 1 else None


def _parabola_search(f: _Scores, lo: float, hi: float, start: float, step: float, max_evals: int) -> FidSearchResult:
    """The ``"parabola"`` method of :func:`fid_search` (see there), on the lattice start + j·step."""
    for name, v in (("start", start), ("step", step)):
        _check_number(name, v)
    if step <= 0:
        raise ValueError(f"step must be > 0, got {step}")
    if not lo <= start <= hi:
        raise ValueError(f"start must lie in [lo, hi] = [{lo}, {hi}], got {start}")
    check_int(max_evals, "max_evals", low=3)

    def inside(j: int) -> bool:
        return lo - 1e-12 <= start + j * step <= hi + 1e-12

    score: dict[int, float] = {}
    first = (-1, 0, 1) if inside(-1) and inside(1) else ((0, 1, 2) if inside(1) else (-2, -1, 0))
    for j in first:
        if inside(j):
            score[j] = f(start + j * step)

    while True:
        jb = min(score, key=lambda j: (score[j], abs(j)))  # ties: the point nearest start
        missing = [j for j in (jb - 1, jb + 1) if j not in score]
        # Done only when the lowest point has both neighbours (a bracket): then the parabola's
        # vertex lies within half a step of it. A lowest point at the end of a triple is not
        # enough, even when that triple's parabola turns inside it: on an asymmetric curve
        # (FID against b usually is) such a vertex can be worse than the point already measured.
        if not missing:
            v = _vertex(score, jb)
            assert v is not None  # jb is lowest, so y0 >= y1 <= y2: convex or flat
            return f.result(start + (jb + v[0]) * step, v[1], "parabola", bracketed=True)
        # Walk downhill: one step past the lowest point, on the side where it has no neighbour.
        j_new = missing[0]
        if not inside(j_new) or len(score) >= max_evals:
            return f.result(start + jb * step, score[jb], "parabola", bracketed=False)
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


def fid_objective(plan: Any, num: int, seed0: int, batch: int, extractor: Any, ref_stats: Any, *, work_root: Path | None = None, progress: bool = False) -> Callable[[float], float]:
    """b -> FID of ``num`` samples of ``plan`` at uniform λ = b, seeds ``seed0``... (the same at every b).

    It samples in this process alone, whatever the process group (``calibrate`` searches on rank 0).
    With ``work_root``, each b samples into its own work directory below it (finished batches
    survive a kill and are reused by a rerun), removed once its FID is computed.
    """
    import shutil

    from ..metrics import compute_fid, feature_stats
    from ..sampling import sample_seeds

    def evaluate(b: float) -> float:
        work = None if work_root is None else work_root / f"{plan.sampler}-{plan.steps}-{b!r}-{num}-{seed0}"
        images, _ = sample_seeds(plan.replace(lam=b), range(seed0, seed0 + num), batch_size=batch, work_dir=work, progress=progress, alone=True)
        fid = compute_fid(feature_stats(images, extractor), ref_stats)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        return fid

    return evaluate


# ---------------------------------------------------------------------------------------------
# The paper's linear schedule by FID: uniform b, then the tilt
# ---------------------------------------------------------------------------------------------


def linear_from_tilt(mean: float, tilt: float, steps: int) -> Linear:
    """The paper's ``λ_i = b + k·i`` (i = 0 the last of ``steps`` steps) with mean λ ``mean`` over
    the chain and ``tilt`` = λ(first step) − λ(last step): k = tilt/(T'−1), b = mean − tilt/2."""
    if steps < 2:
        return Linear(k=0.0, b=mean)
    return Linear(k=tilt / (steps - 1), b=mean - tilt / 2)


# The tilt search's default spacing: the size of the paper's tilts (CIFAR-10 at 20 steps: k = 0.0025,
# κ = 19k = 0.0475). On the shipped model a spacing of 0.01 moved FID at 100 samples by less than
# its noise, and the search stayed at κ ≈ 0 (benchmarks/RESULTS.md, "Better than uniform").
TILT_STEP = 0.04


@dataclass(frozen=True)
class LinearSearchResult:
    """The linear schedule two parabola searches chose, with both searches."""

    schedule: Linear
    uniform: FidSearchResult
    tilt: FidSearchResult

    @property
    def new_evaluations(self) -> int:
        return self.uniform.new_evaluations + self.tilt.new_evaluations

    @property
    def points(self) -> int:
        return len(self.uniform.points) + len(self.tilt.points)


def linear_search(
    evaluate: Callable[[Any], float],
    steps: int,
    *,
    center: float = 1.0,
    step: float = 0.01,
    tilt_step: float = TILT_STEP,
    lo: float = 0.5,
    hi: float = 1.5,
    cache_path: str | os.PathLike | None = None,
    key: Mapping[str, Any] | None = None,
) -> LinearSearchResult:
    """The paper's linear schedule (λ_i = b + k·i) chosen by FID in two cheap 1-D searches.

    ``evaluate(schedule)`` scores a schedule (e.g. :func:`fid_objective`, same seeds every
    time). First the parabola search over uniform b (:func:`fid_search`, ``method="parabola"``)
    gives the best mean level; then a parabola search over the tilt κ, the λ difference between
    the first and the last step at that mean (:func:`linear_from_tilt`), starting from κ = 0
    with spacing ``tilt_step`` (default :data:`TILT_STEP`, the paper's tilt size); b stays in [``lo``, ``hi``]. Keeping the mean fixed follows the paper's observation that its
    published 20-step (k, b) pairs keep mean(λ) near the best uniform b. Both searches cache
    their points (``cache_path`` for b, the same name with ``.tilt`` for κ), so a run resumes.
    """
    from ..scaling import Uniform

    tilt_cache = None if cache_path is None else Path(cache_path).with_suffix(".tilt.json")
    uniform = fid_search(lambda b: evaluate(Uniform(b)), lo, hi, method="parabola", start=center, step=step, cache_path=cache_path, key=key)
    mean = float(uniform.best_b)
    tilt = fid_search(lambda kappa: evaluate(linear_from_tilt(mean, kappa, steps)), -0.5, 0.5, method="parabola", start=0.0, step=tilt_step, cache_path=tilt_cache, key={**(key or {}), "mean": round(mean, 9), "steps": steps})
    return LinearSearchResult(linear_from_tilt(mean, float(tilt.best_b), steps), uniform, tilt)

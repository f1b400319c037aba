"""Time-Shift sampling (Li et al., "Alleviating Exposure Bias in Diffusion Models through
Sampling with Shifted Time Steps", ICLR 2024, arXiv 2305.15583; Algorithm 3 and Fig. 1).

A peer of Epsilon Scaling that acts on *time*, not on the prediction: a sampler option that
picks, per sample, the timestep at which the network is called from the variance of the state.

The algorithm, as implemented here
----------------------------------
After each sampler step, for every sample separately:

1. ``v = Var(x_vp)``: the variance over all of the sample's elements (C·H·W), unbiased, with the
   sample's own mean removed, of the state in VP units (``x_vp = x_ve / sqrt(1 + sigma^2)``
   at the planned level sigma of that state).
2. If the planned timestep ``t`` of the *next* network call is above the cutoff (``t > t_c``,
   strict), that call uses the timestep::

       tau = argmin_{tau in W} | v - (1 - abar_tau) |,    W = [t - w//2, t + w//2] ∩ [0, T-1]

   in the original (``T``-step, usually 1000) indexing; ties go to the smaller tau. Otherwise
   (``t <= t_c``) it uses its planned timestep. The first call (on x_T) is never shifted.
3. "Uses tau": the state is treated as being at ``sigma_tau`` for that whole step. The network
   sees ``x_vp * sqrt(1 + sigma_tau^2)`` (VE units) at ``sigma_tau``, and the step's update
   goes from ``sigma_tau`` to the *planned* next level: DDIM
   ``x' = sqrt(abar_next) x0 + sqrt(1 - abar_next) eps`` with x0 and eps from the call at tau,
   DDPM the posterior from tau to the planned next level, Euler/Heun ``dt = sigma_next -
   sigma_tau``. A sample whose tau equals its planned timestep keeps the planned sigma exactly
   (which matters on grids that are not on the schedule's table, e.g. Karras).

The planned timestep of a grid sigma is the nearest timestep in log sigma
(:meth:`VPSchedule.timestep`, exact on the schedule's own grid), so respaced, ``ddimN`` and
Karras grids all work, and Euler/Heun reach the VP state through the sigma <-> t map.

One guard of ours: the window is also cut to timesteps *above* the planned timestep of the next
grid level, so that a step never moves towards more noise (a DDPM posterior would not exist).
With the paper's defaults this never binds (w/2 < the respaced stride); it only matters for
windows wider than twice the stride.

Extra cost: one variance and one argmin per step; no extra network calls.

Where this reads the paper, and where the official code departs from it
-----------------------------------------------------------------------
* Algorithm 3 centres the window on the loop index of the step that *produced* the state; Fig. 1
  centres it on the planned time of the state itself, which is what we do (and what the ADM
  code does). Algorithm 3 does not say which abar the update coefficients use; we read it as
  "the state is at tau" (x0, eps and the update start from tau, the target stays planned).
* ``Mingxiao-Li/TS-DPM`` (``sampler/pnm_solver.py``, DDIM/DDPM/PNDM): the network is always
  called at the *planned* time; tau only replaces the *target* abar of the DDIM/DDPM transfer;
  the variance of the state at t_i is compared with ``1 - abar`` in a window around the next
  planned t_{i+1} (so the argmin sits at the top of the window whenever w/2 < stride); the
  cutoff is compared on the next planned step.
* ``TS-DPM/sampler/deis_sampler.py``: the network time is shifted (as in the paper) but the
  half-width is the full ``w`` (2w+1 candidates), the first call is shifted too, and the DEIS
  coefficients stay planned.
* ``TS-DPM/sampler/dpm_solver_utils.py``: the variance is taken of the previous network output
  (eps), not of the state; the shifted time replaces the next time everywhere.
* ``tingyu215/TS-DPM-ADM`` (``guided_diffusion/gaussian_diffusion.py``, DDIM only): the
  network is called at the planned t and only the target changes, to
  ``abar[tau - 1000 // (S - 1) - 1]``, an offset applied even when the search is disabled; the
  comparison list is ``abar`` reversed (``abar_{999-k}``) instead of ``1 - abar_k``.
* Defaults (``w`` = 40/30/8/2 at 10/20/50/100 steps, ``t_c`` = 300, 200 at 10 steps) are the
  ones this project's issue states for the paper; they were *not* found in the official code,
  whose defaults and examples differ (ADM repo: ``window=2, cutoff=300``, README CIFAR-10
  ``ddim5``: ``--window 80 --cutoff 300``; TS-DPM README: F-PNDM 100 steps ``w=5, c=550``,
  DPM-Solver-2 5 steps ``w=30, c=300``, DEIS 5 steps ``w=10, c=900``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .checks import check_int
from .schedules import VPSchedule, check_grid

__all__ = ["TimeShift", "BoundTimeShift", "PAPER_DEFAULTS", "paper_defaults"]

# steps -> (window w, cutoff t_c): the statement of the paper's settings (see module doc).
PAPER_DEFAULTS: dict[int, tuple[int, int]] = {10: (40, 200), 20: (30, 300), 50: (8, 300), 100: (2, 300)}


def paper_defaults(steps: int) -> tuple[int, int]:
    """``(window, cutoff)`` for ``steps`` sampling steps.

    The table :data:`PAPER_DEFAULTS` gives 10, 20, 50 and 100 steps; any other count takes the
    entry of the nearest count in log steps (ratio), a tie going to the larger count (the
    narrower window): 5 steps -> 10's, 30 -> 20's, 14 -> 10's, 200 or 1000 -> 100's.
    """
    check_int(steps, "steps")
    best = min(PAPER_DEFAULTS, key=lambda n: (abs(math.log(steps / n)), -n))
    return PAPER_DEFAULTS[best]


def _int(v: object, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"TimeShift: {what} must be an integer, got {v!r}")
    return v


@dataclass(frozen=True)
class TimeShift:
    """Time-Shift settings: the model's VP ``schedule``, the full window width ``window`` (w,
    in original timesteps; half-width w//2; 0 turns Time-Shift off, bit for bit) and the
    ``cutoff`` t_c in [0, T-1] (steps whose planned timestep is <= t_c are not shifted).

    Pass it to ``ddpm``, ``ddim``, ``euler`` or ``heun`` as ``time_shift=``. See the module doc.
    """

    schedule: VPSchedule
    window: int
    cutoff: int

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, VPSchedule):
            raise ValueError(f"TimeShift needs a discrete VP schedule (VPSchedule), got {type(self.schedule).__name__}")
        if _int(self.window, "window") < 0:
            raise ValueError(f"TimeShift: window must be >= 0, got {self.window}")
        T = self.schedule.num_timesteps
        if not 0 <= _int(self.cutoff, "cutoff") <= T - 1:
            raise ValueError(f"TimeShift: cutoff must be in [0, {T - 1}], got {self.cutoff}")

    @classmethod
    def for_steps(cls, schedule: VPSchedule, steps: int, *, window: int | None = None, cutoff: int | None = None) -> "TimeShift":
        """The paper's settings for ``steps`` (:func:`paper_defaults`), each overridable."""
        w, c = paper_defaults(steps)
        return cls(schedule, w if window is None else window, c if cutoff is None else cutoff)

    def candidates(self, t: int, t_next: int = -1) -> tuple[int, int]:
        """The inclusive range ``(lo, hi)`` of tau for a call planned at ``t`` whose step ends at
        the planned timestep ``t_next`` (-1: at sigma = 0)."""
        T = self.schedule.num_timesteps
        half = self.window // 2
        return max(0, t - half, min(t, t_next + 1)), min(T - 1, t + half)

    def choose(self, x_vp: torch.Tensor, t: int, t_next: int = -1) -> torch.Tensor:
        """tau per sample (int64 [N]) for a state ``x_vp`` (VP units) whose next call is planned at ``t``."""
        lo, hi = self.candidates(t, t_next)
        v = x_vp.detach().to(torch.float64).flatten(1).var(dim=1)
        target = (1 - self.schedule.alphas_cumprod[lo : hi + 1]).to(v.device)
        return lo + (v[:, None] - target[None, :]).abs().argmin(dim=1)  # first minimum: the smaller tau

    def bind(self, sigmas: torch.Tensor, x: torch.Tensor | None = None) -> "BoundTimeShift | None":
        """The per-step plan on a sampling grid; None when nothing can shift (window 0)."""
        if self.window == 0:
            return None
        if x is not None and x[0].numel() < 2:
            raise ValueError(f"Time-Shift needs at least 2 values per sample for its variance, got sample shape {tuple(x.shape[1:])}")
        return BoundTimeShift(self, check_grid(sigmas))


class BoundTimeShift:
    """:class:`TimeShift` on one grid: which steps may shift, decided once on host numbers."""

    def __init__(self, ts: TimeShift, sigmas: torch.Tensor) -> None:
        self.ts = ts
        grid = sigmas.tolist()
        t = [int(ts.schedule.timestep(s)) if s > 0 else -1 for s in grid]
        self.timesteps = t
        # Step i may shift when it is not the first and its planned timestep is above the cutoff.
        self.plan: list[tuple[int, int] | None] = [
            (t[i], t[i + 1]) if i > 0 and t[i] > ts.cutoff else None for i in range(len(grid) - 1)
        ]
        self._table = ts.schedule.sigmas

    def __call__(self, x_vp: torch.Tensor, i: int, sigma: torch.Tensor) -> torch.Tensor | None:
        """sigma per sample (float64 [N]) for step ``i`` from its VP state, or None when step ``i``
        is not shifted. ``sigma`` is the planned level, kept where tau is the planned timestep."""
        entry = self.plan[i]
        if entry is None:
            return None
        t, t_next = entry
        tau = self.ts.choose(x_vp, t, t_next)
        table = self._table.to(tau.device)
        planned = torch.as_tensor(sigma, dtype=torch.float64, device=tau.device).expand(tau.shape[0])
        return torch.where(tau == t, planned, table[tau])

"""Argument checks and small helpers shared by the modules of :mod:`epsscale.exposure`.

:func:`_check_run` is the one place that validates what every sampling entry point takes
(data, σ-grid, sampler, seeds, batch size, sampler options, units, start), so that all of them
reject bad arguments with the same messages, before any network call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence, Union

import torch

from ..checks import check_int
from ..samplers import SAMPLERS, VP_SAMPLERS
from ..scaling import PerSigma, ScheduleLike, Uniform, resolve_schedule
from ..schedules import check_grid

Units = Literal["vp", "ve"]
Start = Literal["data", "prior"]
SamplerLike = Union[str, Callable[..., torch.Tensor]]


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


class _Record:
    """Mixin for the frozen result dataclasses: ``to_dict`` gives every field as plain JSON."""

    def to_dict(self) -> dict:
        return {k: _jsonable(getattr(self, k)) for k in self.__dataclass_fields__}  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# Single-argument checks
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
        return "vp" if name in VP_SAMPLERS else "ve"
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
    check_int(batch_size, "batch_size")
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


# ---------------------------------------------------------------------------------------------
# The shared preamble of every sampling entry point
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """The checked arguments of one measurement or calibration (see :func:`_check_run`)."""

    x0: torch.Tensor
    grid: torch.Tensor
    name: str
    fn: Callable[..., torch.Tensor]
    units: Units
    seeds: list[int]
    batch_size: int
    opts: dict
    start: Start

    @property
    def n(self) -> int:
        """Number of samples N."""
        return self.x0.shape[0]

    @property
    def steps(self) -> int:
        """Number of sampler steps T' (model calls reported per chain)."""
        return len(self.grid) - 1


def _check_run(
    x0: Any,
    sigmas: torch.Tensor,
    sampler: SamplerLike,
    *,
    seeds: Sequence[int] | None,
    batch_size: int,
    sampler_opts: Mapping[str, Any] | None,
    units: Units | None = None,
    start: str = "data",
    chain_for: str | None = None,
) -> _Run:
    """Validate the arguments every sampling entry point shares, before any network call.

    In order: the data ``x0``, the σ-grid (with ``chain_for``, the caller's name, it must hold
    a chain of at least 2 steps), the sampler (a name or a function), ``units`` (None: "vp"
    for ddpm/ddim, "ve" otherwise), one seed per sample (None: 0..N−1), ``batch_size``,
    ``start`` and ``sampler_opts`` (which may not set the noise, callback or cond). Raises
    ValueError naming the first bad argument.
    """
    x0 = _check_data(x0)
    grid = check_grid(sigmas)
    if chain_for is not None and len(grid) < 3:
        raise ValueError(f"{chain_for} needs a chain of at least 2 steps (a grid of >= 3 sigmas)")
    name, fn = _resolve_sampler(sampler)
    units_r = _resolve_units(name, units)
    seeds_l = _check_seeds(seeds, x0.shape[0])
    batch = _check_batch(batch_size)
    start_r = _check_start(start)
    opts = _check_opts(sampler_opts)
    return _Run(x0=x0, grid=grid, name=name, fn=fn, units=units_r, seeds=seeds_l, batch_size=batch, opts=opts, start=start_r)

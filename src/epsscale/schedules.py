"""Noise schedules and sampling grids.

Two coordinate systems meet here:

* **VP, discrete** (DDPM / ADM): ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` for integer
  ``t = 0 .. T-1``.
* **VE** (EDM / k-diffusion): ``x = x0 + sigma * eps``.

They are the same process under ``sigma_t = sqrt(1 - abar_t) / sqrt(abar_t)`` and
``x_VE = x_VP / sqrt(abar_t)``; every sampler in :mod:`epsscale.samplers` steps in VE form.

Grids are pure functions returning float64 tensors, descending, with a trailing 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from .checks import check_int

__all__ = [
    "VPSchedule",
    "space_timesteps",
    "sigmas_karras",
    "check_grid",
    "sigma_to_alpha_bar",
    "alpha_bar_to_sigma",
    "flow_t_to_sigma",
    "sigma_to_flow_t",
    "vp_grid",
    "GRID_KINDS",
]

BetaKind = Literal["linear", "cosine", "table"]


# ---------------------------------------------------------------------------------------------
# Conversions (closed forms)
# ---------------------------------------------------------------------------------------------


def alpha_bar_to_sigma(alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """VE sigma of a VP marginal: ``sigma = sqrt((1 - abar) / abar)``."""
    a = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return ((1 - a) / a).sqrt()


def sigma_to_alpha_bar(sigma: torch.Tensor | float) -> torch.Tensor:
    """Inverse of :func:`alpha_bar_to_sigma`: ``abar = 1 / (1 + sigma^2)``."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return 1 / (1 + s**2)


def flow_t_to_sigma(t: torch.Tensor | float) -> torch.Tensor:
    """Rectified-flow time to VE sigma.

    ``x_t = (1 - t) x0 + t eps`` divided by ``1 - t`` is ``x0 + t / (1 - t) eps``.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    return t / (1 - t)


def sigma_to_flow_t(sigma: torch.Tensor | float) -> torch.Tensor:
    """Inverse of :func:`flow_t_to_sigma`: ``t = sigma / (1 + sigma)``."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return s / (1 + s)


# ---------------------------------------------------------------------------------------------
# Respacing (guided-diffusion's ``space_timesteps``)
# ---------------------------------------------------------------------------------------------


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """Timesteps kept when a ``num_timesteps`` chain is respaced; sorted ascending.

    Same rule as guided-diffusion's ``respace.space_timesteps`` (Nichol & Dhariwal 2021):
    the chain is cut into ``len(section_counts)`` equal sections and each section keeps its
    count of steps at a fractional stride that includes both of its ends (rounded with Python's
    ``round``). ``"ddimN"`` instead asks for an integer stride ``range(0, T, i)`` with exactly N
    elements.

    >>> space_timesteps(1000, "20")[:3], space_timesteps(1000, "20")[-2:]
    ([0, 53, 105], [946, 999])
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim"):])
            except ValueError:
                raise ValueError(f"bad respacing {section_counts!r}: expected 'ddimN' with an integer N") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} steps of {num_timesteps} with an integer stride ('{spec}')")
        try:
            counts = [int(c) for c in spec.split(",")] if spec else []
        except ValueError:
            raise ValueError(f"bad respacing {section_counts!r}: expected counts like '100' or '10,15,20', or 'ddimN'") from None
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"bad respacing {section_counts!r}: every section count must be >= 1")

    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps (respacing {section_counts!r})")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # The position is a running float sum, not j * stride: guided-diffusion accumulates, and
        # the two round differently where a position lands on .5 (count 21 of 1000: 499 vs 500).
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride
        start += size
    return sorted(set(kept))


# ---------------------------------------------------------------------------------------------
# Discrete VP schedule
# ---------------------------------------------------------------------------------------------


def _betas(kind: str, num_timesteps: int) -> np.ndarray:
    if kind == "linear":
        # Ho et al. 2020, scaled so that any T matches T=1000 (guided-diffusion).
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if kind == "cosine":
        # Nichol & Dhariwal 2021, eq. 17, with betas clipped at 0.999.
        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), 0.999) for i in range(num_timesteps)],
            dtype=np.float64,
        )
    raise ValueError(f"unknown beta schedule {kind!r}: expected 'linear' or 'cosine'")


@dataclass(frozen=True)
class VPSchedule:
    """A discrete variance-preserving schedule (DDPM), ``T`` steps, ``t = 0 .. T-1``.

    ``alphas_cumprod[t]`` is abar_t; :attr:`sigmas` holds the VE sigma of every timestep
    (ascending with t). ``kind`` is ``"linear"`` or ``"cosine"`` (guided-diffusion's), or
    ``"table"`` for explicit betas (:meth:`from_betas`, e.g. a diffusers scheduler's).
    """

    kind: BetaKind = "linear"
    num_timesteps: int = 1000
    table: tuple[float, ...] | None = field(default=None, repr=False)
    betas: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.num_timesteps, bool) or not isinstance(self.num_timesteps, int) or self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive integer, got {self.num_timesteps!r}")
        if self.kind == "table":
            betas = np.asarray(self.table if self.table is not None else (), dtype=np.float64)
            if betas.shape != (self.num_timesteps,) or not np.all((betas > 0) & (betas < 1)):
                raise ValueError(f"a table schedule needs {self.num_timesteps} betas in (0, 1)")
            object.__setattr__(self, "betas", torch.from_numpy(betas.copy()))
            return
        if self.table is not None:
            raise ValueError("explicit betas need kind='table' (VPSchedule.from_betas)")
        object.__setattr__(self, "betas", torch.from_numpy(_betas(self.kind, self.num_timesteps)))

    @classmethod
    def from_betas(cls, betas: Sequence[float] | torch.Tensor | np.ndarray) -> "VPSchedule":
        """A schedule with these betas (float64), e.g. a diffusers scheduler's ``betas``."""
        values = tuple(float(b) for b in torch.as_tensor(betas, dtype=torch.float64).flatten().tolist())
        return cls("table", len(values), values)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1 - self.betas, dim=0)

    @property
    def sigmas(self) -> torch.Tensor:
        """VE sigma of each timestep, float64 [T], ascending."""
        return alpha_bar_to_sigma(self.alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma(self, t: torch.Tensor | int) -> torch.Tensor:
        """sigma of integer timestep(s) t."""
        t = torch.as_tensor(t, dtype=torch.long)
        return self.sigmas.to(t.device)[t]

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Nearest integer timestep for sigma (nearest in log sigma). Exact on the table."""
        s = torch.as_tensor(sigma, dtype=torch.float64)
        log_table = self.sigmas.to(s.device).log()
        idx = torch.searchsorted(log_table, s.log().clamp(log_table[0], log_table[-1]))
        idx = idx.clamp(1, len(log_table) - 1)
        lo, hi = log_table[idx - 1], log_table[idx]
        choose_lo = (s.log() - lo) <= (hi - s.log())
        return torch.where(choose_lo, idx - 1, idx)

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Snap sigma onto the schedule's own table (EDM's ``round_sigma`` for discrete nets)."""
        return self.sigma(self.timestep(sigma))

    def respace(self, spec: str | int | Sequence[int]) -> list[int]:
        """Kept timesteps (ascending) for a guided-diffusion respacing spec."""
        return space_timesteps(self.num_timesteps, spec)

    def grid(self, spec: str | int | Sequence[int] | None = None) -> torch.Tensor:
        """Descending float64 sigma grid of the kept timesteps, with a trailing 0.

        ``spec`` is a respacing spec (``"20"``, ``"10,15,20"``, ``"ddim50"``); ``None`` keeps all.
        """
        kept = list(range(self.num_timesteps)) if spec is None else self.respace(spec)
        s = self.sigmas[torch.tensor(kept[::-1])]
        return torch.cat([s, s.new_zeros(1)])


# ---------------------------------------------------------------------------------------------
# Continuous grids
# ---------------------------------------------------------------------------------------------


def check_grid(sigmas: torch.Tensor) -> torch.Tensor:
    """A sampling grid as float64: 1-D, finite, >= 0 and strictly decreasing; the network is
    evaluated at every entry but the last, where sampling ends (0 for a whole chain)."""
    s = torch.as_tensor(sigmas, dtype=torch.float64)
    if s.ndim != 1 or len(s) < 2:
        raise ValueError("sigmas must be a 1-D grid with at least two entries (the last one 0)")
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("sigmas must be finite and >= 0")
    if not bool((s[1:] < s[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing")
    return s


def sigmas_karras(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's time discretisation (Karras et al. 2022, eq. 5): n sigmas plus a trailing 0, float64.

    ``sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.
    """
    check_int(n, "n")
    if not (0 < sigma_min <= sigma_max) or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got {sigma_min}, {sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    i = torch.arange(n, dtype=torch.float64)
    frac = i / (n - 1) if n > 1 else i
    s = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


# ---------------------------------------------------------------------------------------------
# Grids for a discrete VP model
# ---------------------------------------------------------------------------------------------

GRID_KINDS = ("respaced", "ddim", "karras")


def vp_grid(schedule: VPSchedule, steps: int, kind: str = "respaced", karras_sigma_max: float = 80.0) -> torch.Tensor:
    """The σ-grid a sampler runs on for a discrete VP model.

    * ``"respaced"``: guided-diffusion's respacing of the whole chain (``schedule.grid("20")``);
    * ``"ddim"``: guided-diffusion's integer stride ``"ddimN"`` (it stops below the top timestep);
    * ``"karras"``: EDM's grid (ρ = 7) over [max(0.002, σ_min), min(karras_sigma_max, σ_max)] of
      the schedule; the network is then called at the nearest timestep.
    """
    if kind == "respaced":
        return schedule.grid(str(steps))
    if kind == "ddim":
        return schedule.grid(f"ddim{steps}")
    if kind == "karras":
        top = min(karras_sigma_max, schedule.sigma_max)
        return sigmas_karras(steps, sigma_min=max(0.002, schedule.sigma_min), sigma_max=top)
    raise ValueError(f"unknown grid {kind!r}: expected {', '.join(GRID_KINDS)}")

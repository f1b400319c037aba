"""A sampling run as one object: the :class:`SamplingPlan`.

Every model source builds its plan with one function that lives next to that source:

=====================  ===========================================
source                 builder
=====================  ===========================================
epsscale models        :func:`epsscale.models.pretrained.build_plan`
guided-diffusion       :func:`epsscale.integrations.guided_diffusion.build_plan`
EDM and PFGM++         :func:`epsscale.models.edm.build_plan`
diffusers pipelines    :func:`epsscale.integrations.pipelines.build_plan`
the 2-D toy            :func:`epsscale.data.toy.build_plan`
=====================  ===========================================

A plan holds everything that determines a sample besides its seed: the model as a VE denoiser
(before Epsilon Scaling), the σ-grid, the sampler and its options, the shape of one sample, the
prior, the quantiser that turns the sampler's output into what is saved, and the fingerprint that
identifies the weights. Two rules live here and nowhere else:

* :func:`choose_lam`: which λ a run uses when several places could set it;
* :meth:`SamplingPlan.scaled_denoiser`: the one place Epsilon Scaling is applied to a run.

Builders raise ``ValueError`` for settings that cannot apply; the CLI maps those to exit 2.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .samplers import SAMPLERS, StackedGenerator, nfe, prior
from .scaling import (
    Calibrated,
    EpsScaled,
    ScheduleLike,
    eps_scaling,
    is_schedule_spec,
    load_schedule,
    parse_schedule_spec,
)

__all__ = ["SamplingPlan", "choose_lam", "schedule_mismatch", "fingerprint_file"]

log = logging.getLogger("epsscale")

PRIORS = ("vp", "ve", "pfgmpp")


def _frozen(d: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class SamplingPlan:
    """Everything that determines a sample besides its seed.

    Attributes:
        denoiser: the model, ``D(x, sigma, **cond) -> x0`` (or a ``Prediction``), VE units,
            *before* Epsilon Scaling.
        sigmas: the σ-grid (float64, descending; a whole chain ends in 0).
        sampler: a name of :data:`epsscale.samplers.SAMPLERS`.
        shape: one sample's shape, e.g. ``(C, H, W)``.
        quantize: the sampler's output (VE units at the grid's end) -> what is saved: uint8 NHWC
            for images, in the model's own convention (``epsscale.data.images``).
        lam: the Epsilon Scaling λ (a number or a schedule); 1 is off, bit for bit.
        sampler_opts: keyword options of the sampler (clip, eta, churn, variance, guidance...).
        prior: ``"vp"`` (x_T ~ N(0, I) in VP units), ``"ve"`` (σ_max·z) or ``"pfgmpp"``
            (with ``aug_dim`` D: radius r = σ√D, as PFGM++).
        prior_dtype: the dtype of each seed's x_T draw (float32, as EDM and guided-diffusion).
        num_classes: class-conditional models: each seed draws its label right after x_T
            unless ``labels`` gives one label per seed.
        cycle_labels: instead of drawing, the k-th seed of a run takes label k mod num_classes
            (a text pipeline's prompts, cycled over the seeds).
        fingerprint: identifies the weights (resume manifests, calibration JSON).
        name: how messages name the model.
        device: where the denoiser runs and the noise is drawn.
        schedule: the VP schedule of a discrete model (timesteps in reports), else None.
        data_space: uint8 NHWC data -> the model's x0 space, for measurements that start from
            real data (``epsscale measure`` / ``calibrate``); None where it is not known.
        meta: what the source wants recorded beside a run (flags, preset, ...).
    """

    denoiser: Any
    sigmas: torch.Tensor
    sampler: str
    shape: tuple[int, ...]
    quantize: Callable[[torch.Tensor], np.ndarray]
    lam: ScheduleLike = 1.0
    sampler_opts: Mapping[str, Any] = field(default_factory=dict)
    prior: str = "vp"
    aug_dim: int | None = None
    prior_dtype: torch.dtype = torch.float32
    num_classes: int | None = None
    labels: tuple[int, ...] | None = None
    cycle_labels: bool = False
    fingerprint: str = ""
    name: str = ""
    device: torch.device = torch.device("cpu")
    schedule: Any = None
    data_space: Callable[[np.ndarray], torch.Tensor] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}: expected one of {', '.join(SAMPLERS)}")
        if self.prior not in PRIORS:
            raise ValueError(f"unknown prior {self.prior!r}: expected one of {', '.join(PRIORS)}")
        if self.prior == "pfgmpp" and (isinstance(self.aug_dim, bool) or not isinstance(self.aug_dim, int) or self.aug_dim < 1):
            raise ValueError(f"the PFGM++ prior needs aug_dim D, a positive integer; got {self.aug_dim!r}")
        if self.prior != "pfgmpp" and self.aug_dim is not None:
            raise ValueError("aug_dim is for the PFGM++ prior (prior='pfgmpp')")
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        object.__setattr__(self, "sigmas", torch.as_tensor(self.sigmas, dtype=torch.float64))
        object.__setattr__(self, "sampler_opts", _frozen(self.sampler_opts))
        object.__setattr__(self, "meta", _frozen(self.meta))
        object.__setattr__(self, "device", torch.device(self.device))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(int(v) for v in self.labels))
        if self.cycle_labels and not self.num_classes:
            raise ValueError("cycle_labels needs num_classes")

    # -- what the run is ----------------------------------------------------------------------

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def nfe(self) -> int:
        """Network evaluations per sample."""
        return nfe(self.sampler, self.steps)

    @property
    def prior_kind(self) -> str:
        """``"vp"``, ``"ve"`` or ``"pfgmpp:D"``: the prior as one string (manifests)."""
        return f"pfgmpp:{self.aug_dim}" if self.prior == "pfgmpp" else self.prior

    def labels_for(self, seeds: Sequence[int]) -> list[int] | None:
        """The label of each seed of a run: given, cycled, or None (each seed draws its own)."""
        if self.labels is not None:
            return list(self.labels)
        if self.cycle_labels:
            return [k % int(self.num_classes) for k in range(len(seeds))]  # type: ignore[arg-type]
        return None

    def replace(self, **changes: Any) -> "SamplingPlan":
        """A copy with some fields changed (``plan.replace(lam=1.01)``)."""
        return dataclasses.replace(self, **changes)

    # -- the run ------------------------------------------------------------------------------

    def scaled_denoiser(self, denoiser: Any = None) -> EpsScaled:
        """The denoiser with Epsilon Scaling: the one place a run applies ES.

        ``denoiser`` replaces the plan's own (a wrapper around it that records or guards its
        calls); λ is bound to the plan's grid, so step-indexed schedules work, and a bad λ is a
        ``ValueError`` before any network call.
        """
        return eps_scaling(self.denoiser if denoiser is None else denoiser, self.lam, sigmas=self.sigmas)

    def start(self, gen: StackedGenerator, labels: list[int] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each seed's x_T (VE units) and class labels, drawn from its own generator.

        Draw order per seed: the unit normal z (``prior_dtype``), then the label (class-conditional
        models without given ``labels``), then, for PFGM++, the radius. So a seed keeps its
        label whatever the prior.
        """
        rows = len(gen)
        z = gen.randn((rows, *self.shape), dtype=self.prior_dtype, device=self.device)
        cond: dict[str, torch.Tensor] = {}
        if labels is not None:
            cond["y"] = torch.tensor(labels, device=self.device)
        elif self.num_classes:
            cond["y"] = gen.randint(self.num_classes, (rows,), device=self.device)
        if self.prior == "pfgmpp":
            from .pfgmpp import pfgmpp_prior_from_normal

            return pfgmpp_prior_from_normal(z, self.sigmas[0], self.aug_dim, gen), cond
        return prior(z, self.sigmas[0], kind=self.prior), cond  # type: ignore[arg-type]

    def run(self, denoiser: Any, x: torch.Tensor, gen: Any, cond: Mapping[str, torch.Tensor] | None = None, *, callback: Any = None) -> torch.Tensor:
        """The sampler on ``x`` with ``denoiser`` (normally :meth:`scaled_denoiser`), no gradients."""
        with torch.no_grad():
            return SAMPLERS[self.sampler](denoiser, x, self.sigmas, noise=gen, cond=dict(cond) if cond else None, callback=callback, **self.sampler_opts)


def choose_lam(
    *,
    eps_scale: float | None = None,
    eps_schedule: str | os.PathLike | None = None,
    checkpoint: float | None = None,
    preset: ScheduleLike | None = None,
) -> tuple[ScheduleLike, str]:
    """The one rule for which λ a run uses, and where it came from.

    In order: the user's ``--eps-scale`` or ``--eps-schedule`` (one of them), or the λ that the
    user pasted into a checkpoint's own flags (ADM-ES's ``--eps_scaler``); then a preset's λ;
    else 1 (ES off). Giving λ twice is a ``ValueError``.

    ``eps_schedule`` is a schedule JSON file, or a compact spec: ``"tsr"`` or a string that
    starts with ``"tsr:"`` (``tsr:k=0.95,sigma=1``, :func:`epsscale.scaling.parse_schedule_spec`)
    is read as Temporal Score Rescaling, never as a file name.
    """
    if eps_scale is not None and eps_schedule is not None:
        raise ValueError("give lambda once: --eps-scale or --eps-schedule")
    explicit: ScheduleLike | None = eps_scale
    if eps_schedule is not None:
        explicit = parse_schedule_spec(eps_schedule) if is_schedule_spec(eps_schedule) else load_schedule(eps_schedule)  # type: ignore[arg-type]
    if explicit is not None and checkpoint is not None:
        raise ValueError("give lambda once: either --eps_scaler inside --flags or --eps-scale/--eps-schedule")
    if explicit is not None:
        return explicit, "--eps-schedule" if eps_schedule is not None else "--eps-scale"
    if checkpoint is not None:
        return checkpoint, "--eps_scaler"
    if preset is not None:
        return preset, "preset"
    return 1.0, "default"


def schedule_mismatch(lam: ScheduleLike, plan: SamplingPlan) -> str | None:
    """Why a schedule file was tuned for another run than ``plan``, or None.

    Compares what the file's ``meta`` records (model fingerprint, sampler, steps, grid) with the
    plan; a schedule without that record is not questioned.
    """
    if not isinstance(lam, Calibrated):
        return None
    m = lam.meta
    tuned = m.get("tuned_on") if isinstance(m.get("tuned_on"), dict) else m
    diffs = []
    if tuned.get("fingerprint") and plan.fingerprint and _weights_id(tuned["fingerprint"]) != _weights_id(plan.fingerprint):
        diffs.append("model")
    if tuned.get("sampler") and tuned["sampler"] != plan.sampler:
        diffs.append(f"sampler {tuned['sampler']}")
    if isinstance(tuned.get("steps"), int) and tuned["steps"] != plan.steps:
        diffs.append(f"{tuned['steps']} steps")
    grid = tuned.get("sigmas")
    if isinstance(grid, list) and tuned.get("steps") == plan.steps and len(grid) == len(plan.sigmas):
        if any(abs(a - b) > 1e-9 * max(1.0, abs(b)) for a, b in zip(grid, plan.sigmas.tolist())):
            diffs.append("another grid")
    if not diffs:
        return None
    return f"this schedule was tuned for {', '.join(diffs)}; it is used here as it is"


def _weights_id(fingerprint: str) -> tuple[str, str]:
    """What identifies weights across checkouts: the file name and its size (or a folder's digest),
    not the path and the modification time that :func:`fingerprint_file` adds for resumes."""
    from pathlib import Path

    parts = str(fingerprint).rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit():  # path:size:mtime
        return Path(parts[0]).name, parts[1]
    head, _, digest = str(fingerprint).rpartition(":")
    return Path(head).name, digest


def fingerprint_file(path: str | os.PathLike) -> str:
    """Identify weights by path, size and modification time, so that a resume never mixes models.

    A folder (a diffusers pipeline) is identified by every file under it.
    """
    from pathlib import Path

    from .hashing import digest_tree

    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return str(p)
    if p.is_dir():
        return f"{p.resolve()}:{digest_tree(p)}"
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"

"""Exposure bias: the δ_t metric, ε-norm curves, the analytic variance model and λ calibration.

Everything here is a pure function of a denoiser (the VE contract of :mod:`epsscale.adapters`),
real data ``x0`` (model space, ``[N, ...]``) and a sampler with its σ-grid. Samplers report
through their :class:`~epsscale.samplers.StepInfo` callback; this package never prints.

Notation (docs/paper.md). ᾱ = 1 / (1 + σ²); a VP state is ``x_vp = √ᾱ · x_VE``. A chain of T' steps
is a descending grid ``σ_0 > … > σ_{T'-1} > σ_{T'} = 0``; step i calls the network at σ_i
(σ̂_i with EDM churn) and reaches the state x̂ at σ_{i+1}.

* :func:`delta_t`: the variance error δ_t = (σ̂_t − √(1−ᾱ_t))² along real trajectories
  (docs/paper.md, "Exposure-bias metric δ_t"); for σ-space samplers (euler, heun, dpmpp_2m) in VE
  units, δ = (σ̂ − σ)².
* :func:`eps_norms`: ‖ε‖ curves "training", "sampling" and "sampling_es" (docs/paper.md,
  "ε-norm curves").
* :func:`analytic_variance`: the prediction-error model Δ_{t−1} = c_t² Δ_t + c_0² γ_t²
  (docs/paper.md, "Sampling distribution with prediction error").
* :func:`calibrate_norm_matching`: λ chosen so the ES sampling ε-norm curve meets the training
  curve; :func:`fid_search`: a cached golden-section, grid or parabola search over uniform b.
  On the shipped Fashion-MNIST model the parabola search on 100-sample FIDs is the one that
  finds the grid's λ cheaply; norm matching points the wrong way there (benchmarks/RESULTS.md,
  "Which calibration works").
* :func:`exposure_json`: the report as JSON; :func:`plot_delta`, :func:`plot_eps_norms` and
  :func:`plot_fid_vs_b` (from :mod:`epsscale.plots`, re-exported here): the figures.

Randomness follows docs/design.md §2: sample *s* draws from
``torch.Generator().manual_seed(s)``, first its starting noise (float32), then one tensor per
sampler step. The training curve reuses that starting ε at every σ (common random numbers, see
:class:`~epsscale.exposure.measure._TrainingNorms`): at step 0 the training and sampling inputs
coincide, and the ratio of the two curves is nearly free of Monte Carlo noise at high σ.
Results depend on ``batch_size`` only through the network's float rounding for another batch shape.

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

Modules: :mod:`~epsscale.exposure.measure` (δ_t, ε-norm curves, the JSON report),
:mod:`~epsscale.exposure.analytic` (the variance model), :mod:`~epsscale.exposure.calibrate`
(norm matching), :mod:`~epsscale.exposure.search` (FID search, saving a schedule); figures live
in :mod:`epsscale.plots`. Import from the package: ``from epsscale.exposure import delta_t``.
"""

from __future__ import annotations

from ..plots import plot_delta, plot_eps_norms, plot_fid_vs_b
from ._common import SamplerLike, Start, Units
from .analytic import AnalyticResult, analytic_variance
from .calibrate import CalibrationInfo, calibrate_norm_matching, influence_weights
from .measure import (
    EXPOSURE_FORMAT,
    DeltaResult,
    EpsNormResult,
    ExposureReport,
    delta_t,
    eps_norms,
    exposure_json,
    measure_exposure,
)
from .search import (
    FID_CACHE_FORMAT,
    FidSearchResult,
    LinearSearchResult,
    fid_objective,
    fid_search,
    linear_from_tilt,
    linear_search,
    write_calibrated_schedule,
)

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
    "fid_objective",
    "linear_search",
    "linear_from_tilt",
    "LinearSearchResult",
    "write_calibrated_schedule",
    "exposure_json",
    "plot_delta",
    "plot_eps_norms",
    "plot_fid_vs_b",
]

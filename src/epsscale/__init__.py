"""epsscale: measure and correct exposure bias in diffusion models with Epsilon Scaling.

Ning et al., "Elucidating the Exposure Bias in Diffusion Models", ICLR 2024 (arXiv 2308.15321).
"""

from .adapters import Denoiser, EDMDenoiser, FlowDenoiser, Prediction, VPDenoiser
from .dcw import DCW
from .guidance import classifier_free
from .samplers import (
    SAMPLERS,
    StackedGenerator,
    StepInfo,
    ddim,
    ddpm,
    dpmpp_2m,
    euler,
    heun,
    prior,
)
from .scaling import (
    TSR,
    Calibrated,
    Linear,
    PerSigma,
    Uniform,
    eps_scaling,
    load_schedule,
    save_schedule,
)
from .schedules import (
    VPSchedule,
    alpha_bar_to_sigma,
    sigma_to_alpha_bar,
    sigmas_karras,
    space_timesteps,
)
from .timeshift import TimeShift

__version__ = "0.1.0"

__all__ = [
    "Denoiser", "Prediction", "VPDenoiser", "EDMDenoiser", "FlowDenoiser",
    "classifier_free",
    "SAMPLERS", "StackedGenerator", "StepInfo", "prior", "ddpm", "ddim", "euler", "heun", "dpmpp_2m",
    "Uniform", "Linear", "PerSigma", "TSR", "Calibrated", "eps_scaling", "load_schedule", "save_schedule",
    "TimeShift", "DCW",
    "VPSchedule", "space_timesteps", "sigmas_karras", "alpha_bar_to_sigma", "sigma_to_alpha_bar",
]

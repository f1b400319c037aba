"""Guidance as denoiser transforms (the ``guidance/clip`` arrow of docs/design.md, "Data flow").

Classifier-free guidance (Ho & Salimans 2022) mixes a conditional and an unconditional
prediction: ``eps = eps_u + w (eps_c - eps_u)``. eps and x0 are affine in each other at fixed
(x, sigma), so the same mix applies to x0. Epsilon Scaling wraps the *result* (ES after the
guidance mix). Classifier guidance (ADM-G) shifts the ancestral mean instead: see
``epsscale.samplers.ddpm(classifier_grad=...)``.
"""

from __future__ import annotations

from typing import Any

import torch

from .adapters import Denoiser, Prediction, as_prediction, forward_attrs
from .checks import check_number

__all__ = ["ClassifierFree", "classifier_free"]


class ClassifierFree:
    """``D_w = D_u + w (D_c - D_u)``, where D_u is the denoiser called with ``uncond`` kwargs.

    The learned-variance channels (if any) are taken from the conditional call, as DiT does.
    """

    def __init__(self, denoiser: Denoiser, scale: float, uncond: dict[str, Any]) -> None:
        check_number(scale, "guidance scale")
        if not isinstance(uncond, dict):
            raise ValueError(f"uncond must be a dict of the keyword arguments for the unconditional call (e.g. {{'class_labels': None}}), got {uncond!r}")
        self.inner = denoiser
        self.scale = float(scale)
        self.uncond = dict(uncond)
        forward_attrs(self, denoiser)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor | Prediction:
        out_c = self.inner(x, sigma, **cond)
        c = as_prediction(out_c)
        u = as_prediction(self.inner(x, sigma, **{**cond, **self.uncond}))
        x0 = u.x0 + self.scale * (c.x0 - u.x0)
        return c.replace_x0(x0) if isinstance(out_c, Prediction) else x0


def classifier_free(denoiser: Denoiser, scale: float, uncond: dict[str, Any]) -> ClassifierFree:
    """Classifier-free guidance with scale w (w = 1 is the conditional model)."""
    return ClassifierFree(denoiser, scale, uncond)

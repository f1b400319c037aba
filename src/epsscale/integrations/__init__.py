"""Bridges from epsscale to other libraries.

Import-light on purpose: nothing here imports a third-party library at package import time.
The names below are loaded on first access.

* :mod:`epsscale.integrations.diffusers`: Epsilon Scaling for any diffusers pipeline
  (:func:`apply_epsilon_scaling`, :func:`remove_epsilon_scaling`); it never imports diffusers.
* :mod:`epsscale.integrations.guided_diffusion`: guided-diffusion (ADM) checkpoints and flags.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["apply_epsilon_scaling", "remove_epsilon_scaling", "EpsilonScalingHandle"]

_LAZY = {name: ".diffusers" for name in __all__}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

"""Opt-in loading of NVlabs EDM network pickles.

EDM (Karras et al. 2022) and the forks that share its code (EDM-ES, PFGM++) publish networks as
pickles: ``pickle.load(f)["ema"]`` is the EMA network, an ``EDMPrecond`` / ``VPPrecond`` /
``VEPrecond`` module. Those pickles carry Python source (``torch_utils.persistence``), so
unpickling one runs code from the file, and needs EDM's ``dnnlib`` and ``torch_utils`` packages
importable. epsscale's own checkpoints are safetensors plus JSON; this loader is an explicit
opt-in (``allow_pickle=True``) and warns every time it runs.

The network it returns is what :class:`epsscale.adapters.EDMDenoiser` wraps: called as
``net(x, sigma, class_labels)``, with ``sigma_min``, ``sigma_max``, ``round_sigma``,
``img_channels``, ``img_resolution`` and ``label_dim``.
"""

from __future__ import annotations

import os
import pickle
import warnings
from typing import Any

import torch

__all__ = ["EDM_NET_ATTRIBUTES", "load_edm_pickle"]

#: What EDM's ``generate.py`` (and :class:`~epsscale.adapters.EDMDenoiser`) use of a network.
EDM_NET_ATTRIBUTES = ("sigma_min", "sigma_max", "round_sigma", "img_channels", "img_resolution", "label_dim")


def load_edm_pickle(
    path: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    key: str = "ema",
    device: torch.device | str | None = None,
) -> Any:
    """Load the network of an NVlabs EDM pickle (``pickle.load(f)[key]``, key ``"ema"``).

    Args:
        path: the ``.pkl`` file (download it first; URLs are not fetched).
        allow_pickle: must be True. Unpickling runs code stored in the file: only load files
            you trust. A ``UserWarning`` says so on every load.
        key: the entry of the pickled dict that holds the network.
        device: move the network there (``net.to(device)``) when given.

    Returns:
        The network, as pickled (EDM stores the EMA network in eval mode without gradients). Wrap
        it with :class:`epsscale.adapters.EDMDenoiser`.

    Raises:
        ValueError: ``allow_pickle`` is not True, the file is missing, or the pickle holds no
            EDM-like network under ``key``.
        ImportError: the pickle needs a module that is not importable, usually EDM's
            ``dnnlib``/``torch_utils``: EDM's repository must be on PYTHONPATH.
    """
    if allow_pickle is not True:
        raise ValueError(
            f"{os.fspath(path)}: refusing to unpickle an EDM network (pickles run code); "
            "pass allow_pickle=True only for files you trust"
        )
    if not os.path.isfile(path):
        raise ValueError(f"{os.fspath(path)}: no such file")
    warnings.warn(
        f"{os.fspath(path)}: unpickling runs code stored in the file; only load pickles you trust",
        UserWarning,
        stacklevel=2,
    )

    # Unpickle; a missing module is almost always EDM's own packages.
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except ModuleNotFoundError as err:
        missing = (err.name or "?").split(".")[0]
        raise ImportError(
            f"{os.fspath(path)}: the pickle needs module {missing!r}, which is not importable; "
            "EDM's repository (github.com/NVlabs/edm, which provides dnnlib and torch_utils) must be on PYTHONPATH",
            name=missing,
        ) from None
    except (pickle.UnpicklingError, EOFError, AttributeError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"{os.fspath(path)}: not a readable pickle ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None

    # Find the network and check that it looks like an EDM *Precond module.
    if not isinstance(data, dict) or key not in data:
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{os.fspath(path)}: expected a dict with key {key!r} (an EDM network pickle), found {found}")
    net = data[key]
    missing_attrs = [a for a in EDM_NET_ATTRIBUTES if not hasattr(net, a)]
    if missing_attrs or not callable(net):
        what = f"lacks {', '.join(missing_attrs)}" if missing_attrs else "is not callable"
        raise ValueError(f"{os.fspath(path)}: {key!r} holds a {type(net).__name__} that {what}; not an EDM network")
    if device is not None and hasattr(net, "to"):  # a duck-typed net without .to stays as it is
        net = net.to(device)
    return net

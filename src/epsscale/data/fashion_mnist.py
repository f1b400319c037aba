"""Fashion-MNIST (Xiao et al. 2017) from Debian's ``dataset-fashion-mnist`` package.

The package installs the original IDX files, gzipped, in ``/usr/share/datasets/fashion-mnist/``.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Literal

import numpy as np
import torch

__all__ = ["DEFAULT_ROOT", "CLASSES", "data_root", "read_idx", "load_fashion_mnist", "to_model_space"]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_HOWTO = "install the Debian package dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist), or point $EPSSCALE_FASHION_MNIST (train: --data) at a folder holding the IDX .gz files"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian header, magic 0x0000 08 ndim, then uint8."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read IDX file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(">" + "I" * ndim, data[4:header])
    expected = int(np.prod(shape)) if shape else 0
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX payload has {len(data) - header} bytes, header says {expected}")
    # A writable copy: torch warns on (and must not write into) a read-only buffer.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def data_root() -> Path:
    """Where Fashion-MNIST is read from by default: ``$EPSSCALE_FASHION_MNIST``, else the Debian package's folder."""
    return Path(os.environ.get("EPSSCALE_FASHION_MNIST", DEFAULT_ROOT))


def load_fashion_mnist(split: Literal["train", "test"] = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels uint8 [N] of one split."""
    if split not in _FILES:
        raise ValueError(f"unknown split {split!r}: expected 'train' or 'test'")
    root = Path(root) if root is not None else data_root()
    img_path, lbl_path = (root / n for n in _FILES[split])
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise FileNotFoundError(f"Fashion-MNIST not found: {p} is missing; {_HOWTO}")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{root}: unexpected Fashion-MNIST shapes {images.shape} and {labels.shape}")
    return images, labels


def to_model_space(images: np.ndarray | torch.Tensor, size: int = 32) -> torch.Tensor:
    """uint8 [N, 28, 28] (or NHWC) -> float32 [N, 1, size, size] in [-1, 1], padded with -1 (black)."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 4:  # NHWC
        x = x.permute(0, 3, 1, 2)
    elif x.ndim == 3:
        x = x[:, None]
    x = x.to(torch.float32) / 127.5 - 1
    pad = size - x.shape[-1]
    if pad < 0 or pad % 2:
        raise ValueError(f"cannot pad {x.shape[-1]} px images to {size} px")
    return torch.nn.functional.pad(x, (pad // 2,) * 4, value=-1.0) if pad else x

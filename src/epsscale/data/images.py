"""Images as uint8 NHWC arrays: the quantisers that make them, and the files that hold them.

Quantisers turn a sampler's output (float, NCHW, data in [-1, 1]) into uint8 NHWC, one per
reference convention:

- :func:`quantize_adm`: guided-diffusion's ``image_sample.py``, ``((x + 1) * 127.5).clamp(0, 255)``
  truncated to uint8 (with an optional centre crop, for models trained on padded images);
- :func:`quantize_edm`: NVlabs EDM's ``generate.py``, ``(x * 127.5 + 128).clip(0, 255)`` truncated;
- :func:`quantize_diffusers`: diffusers' ``numpy_to_pil``, ``round(clamp(x / 2 + 0.5, 0, 1) * 255)``.

Three formats are read, matching what the reference code bases write:

- ``.npz``: ADM / guided-diffusion sample batches, ``arr_0`` uint8 NHWC and an optional ``arr_1``
  with labels;
- a folder of ``.png`` / ``.jpg`` / ``.jpeg`` images (searched recursively, sorted by path);
- a ``.zip`` of PNG/JPG images (EDM's ``dataset_tool.py`` format; ``dataset.json`` is ignored).
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_write

__all__ = [
    "quantize_adm",
    "quantize_edm",
    "quantize_diffusers",
    "to_unit_range",
    "IMAGE_EXTENSIONS",
    "load_images",
    "load_npz",
    "save_npz",
    "validate_images",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------
# Quantisers.


def quantize_adm(x: torch.Tensor, crop: int | None = None) -> np.ndarray:
    """guided-diffusion's quantisation: ``((x + 1) * 127.5).clamp(0, 255)`` -> uint8 NHWC.

    ``crop``: keep the centred ``crop`` x ``crop`` pixels (a 28 px Fashion-MNIST image padded to
    32 for the network comes back as 28 x 28); None keeps the whole image.
    """
    if crop is not None:
        off = (x.shape[-1] - crop) // 2
        if off > 0:
            x = x[..., off : off + crop, off : off + crop]
    u8 = ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return u8.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def quantize_edm(x: torch.Tensor) -> np.ndarray:
    """EDM's ``generate.py`` quantisation: ``(x * 127.5 + 128).clip(0, 255)`` -> uint8 NHWC."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def quantize_diffusers(x: torch.Tensor) -> np.ndarray:
    """diffusers' ``numpy_to_pil`` quantisation: ``round(clamp(x / 2 + 0.5, 0, 1) * 255)`` -> uint8 NHWC."""
    u8 = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return u8.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def to_unit_range(images: np.ndarray, channels: int, size: int) -> torch.Tensor:
    """uint8 NHWC images -> float32 NCHW in [-1, 1] (the data space of ADM and EDM models),
    checked against the model's channels and size."""
    imgs = np.asarray(images)
    if imgs.ndim == 3:
        imgs = imgs[..., None]
    if imgs.ndim != 4 or imgs.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [N, H, W, C], got {imgs.dtype} {imgs.shape}")
    if imgs.shape[-1] != channels:
        raise ValueError(f"the model takes {channels}-channel images, these have {imgs.shape[-1]}")
    if imgs.shape[1:3] != (size, size):
        raise ValueError(f"the model takes {size}x{size} images, these are {imgs.shape[1]}x{imgs.shape[2]}")
    return torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------
# Validation.


def validate_images(images: np.ndarray, *, source: str = "images") -> np.ndarray:
    """Check that ``images`` is a uint8 array of shape [N, H, W, C] with C in {1, 3}; return it."""
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{source}: expected a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: expected dtype uint8, got {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"{source}: expected shape [N, H, W, C], got {tuple(images.shape)}")
    if images.shape[-1] not in (1, 3):
        raise ValueError(
            f"{source}: expected 1 or 3 channels last (NHWC), got shape {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{source}: contains no images")
    return images


# ----------------------------------------------------------------------------------------------
# Readers.


def load_npz(path: PathLike, *, with_labels: bool = False):
    """Read an ADM-style ``.npz``: ``arr_0`` uint8 NHWC, optional ``arr_1`` labels.

    Returns the images, or ``(images, labels_or_None)`` when ``with_labels`` is set.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic[:4] != b"PK\x05\x06":
        raise ValueError(f"{path}: not an .npz file (an .npz is a zip archive of arrays; expected arr_0 with uint8 NHWC images)")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise ValueError(f"{path}: no 'arr_0' array in npz (found {sorted(data.files)})")
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data.files else None
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable npz file ({_one_line(e)})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{path}: not a readable npz file ({_one_line(e)})") from None
    validate_images(images, source=str(path))
    if labels is not None and (labels.ndim != 1 or len(labels) != len(images)):
        raise ValueError(
            f"{path}: 'arr_1' must hold one label per image, got shape {tuple(labels.shape)} "
            f"for {len(images)} images"
        )
    return (images, labels) if with_labels else images


def _decode_image(data: bytes | PathLike, *, source: str) -> np.ndarray:
    """Decode one image file into uint8 HWC with 1 or 3 channels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im.load()
            if im.mode in ("L", "1", "I;16", "I", "F"):
                im = im.convert("L")
            elif im.mode != "RGB":
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{source}: cannot decode image ({_one_line(e)})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _stack(arrays: list[np.ndarray], names: list[str], *, source: str) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        first = arrays[0].shape
        bad = next(i for i, a in enumerate(arrays) if a.shape != first)
        raise ValueError(
            f"{source}: images differ in shape ({names[0]} is {first}, {names[bad]} is "
            f"{arrays[bad].shape})"
        )
    return validate_images(np.stack(arrays), source=source)


def _load_folder(path: Path) -> np.ndarray:
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise ValueError(f"{path}: folder contains no {'/'.join(IMAGE_EXTENSIONS)} images")
    arrays = [_decode_image(f, source=str(f)) for f in files]
    return _stack(arrays, [str(f.relative_to(path)) for f in files], source=str(path))


def _load_zip(path: Path) -> np.ndarray:
    try:
        with zipfile.ZipFile(path) as zf:
            names = sorted(
                n
                for n in zf.namelist()
                if not n.endswith("/") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
            )
            if not names:
                raise ValueError(f"{path}: zip contains no {'/'.join(IMAGE_EXTENSIONS)} images")
            arrays = [_decode_image(zf.read(n), source=f"{path}:{n}") for n in names]
    except ValueError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable zip file ({_one_line(e)})") from None
    return _stack(arrays, names, source=str(path))


def load_images(path: PathLike) -> np.ndarray:
    """Load an image set as a uint8 NHWC array (C in {1, 3}).

    ``path`` may be an ADM ``.npz`` (``arr_0``), a folder of PNG/JPG images, or an EDM-style
    ``.zip`` of images. Anything missing, empty, corrupt or of the wrong layout raises a
    one-line ``ValueError`` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_dir():
        return _load_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return load_npz(path)
    if suffix == ".zip":
        return _load_zip(path)
    if suffix in IMAGE_EXTENSIONS:
        return validate_images(_decode_image(path, source=str(path))[None], source=str(path))
    raise ValueError(f"{path}: unsupported format (expected .npz, .zip, or a folder of images)")


# ----------------------------------------------------------------------------------------------
# Writer.


def save_npz(path: PathLike, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write images (uint8 NHWC) and optional labels as an ADM ``.npz`` (``arr_0``, ``arr_1``).

    The file is written to a temporary name in the same folder and then moved into place with
    ``os.replace``, so a reader never sees a half-written file.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: save_npz writes .npz files only")
    validate_images(images, source=str(path))
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(
                f"{path}: labels must have shape [{len(images)}], got {tuple(labels.shape)}"
            )
        arrays["arr_1"] = labels
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__

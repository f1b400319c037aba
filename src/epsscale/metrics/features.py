"""Feature extractors for FID, and feature statistics of image sets.

An extractor maps a batch of uint8 NHWC images to float features ``[N, dim]``:

- ``"fmnist"``: ``FashionMNISTClassifier``, a small CNN trained on Fashion-MNIST and shipped with
  the package (``assets/fmnist_classifier.safetensors``); its penultimate layer (128-d) is the
  feature. Default for 1-channel 28×28 (or 32×32 padded) data. Trained by
  ``scripts/train_classifier.py``.
- ``"inception"``: the FID Inception-v3 (2048-d pool3), see ``epsscale.metrics.inception``.
  Needs the pytorch-fid weights file on disk; nothing is downloaded.

``feature_stats`` runs an extractor over an array in batches and returns ``FeatureStats``;
``reference_stats`` does so for a dataset once and caches the result.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..hashing import digest_file, digest_state, digest_tree
from .fid import FeatureStats

__all__ = [
    "FeatureExtractor",
    "FashionMNISTClassifier",
    "ClassifierFeatures",
    "FMNIST_WEIGHTS",
    "FMNIST_TRAIN_STATS",
    "load_fmnist_extractor",
    "get_extractor",
    "default_extractor_name",
    "images_to_tensor",
    "feature_stats",
    "reference_stats",
    "TorchScriptFeatures",
]

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
FMNIST_WEIGHTS = ASSETS / "fmnist_classifier.safetensors"
FMNIST_TRAIN_STATS = ASSETS / "fmnist_train_stats.npz"

# Fashion-MNIST pixel mean and standard deviation (train split, pixels scaled to [0, 1]).
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps uint8 images ``[N, H, W, C]`` (a tensor) to float features ``[N, dim]``.

    ``name`` identifies the network family (``"fmnist"``, ``"inception"``); ``weights_id`` (when
    present) identifies the weights, and keys cached statistics.
    """

    name: str
    dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


# ----------------------------------------------------------------------------------------------
# The Fashion-MNIST classifier.


class FashionMNISTClassifier(nn.Module):
    """Small CNN for 1×28×28 Fashion-MNIST; its penultimate layer is the FID feature.

    conv3×3(32)-BN-ReLU-maxpool → conv3×3(64)-BN-ReLU-maxpool → linear(3136→128)-ReLU [features]
    → dropout → linear(128→10). About 420 K parameters.

    Input: float images ``[N, C, H, W]`` in [0, 1]. 32×32 inputs (28×28 zero-padded by 2 px, the
    usual diffusion-model layout) are centre-cropped by 2 px; 3-channel inputs are averaged to
    grey. Normalisation to the dataset's mean/std happens inside.
    """

    def __init__(self, widths: tuple[int, int] = (32, 64), feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        c1, c2 = widths
        self.config = {"widths": [c1, c2], "feature_dim": feature_dim, "num_classes": num_classes}
        self.feature_dim = feature_dim
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2 * 7 * 7, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """Crop 32→28, average RGB to grey, normalise: [N, C, H, W] in [0, 1] → [N, 1, 28, 28]."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"FashionMNISTClassifier: expected [N, 1|3, H, W], got {tuple(x.shape)}")
        if tuple(x.shape[-2:]) == (32, 32):
            x = x[:, :, 2:30, 2:30]
        elif tuple(x.shape[-2:]) != (28, 28):
            raise ValueError(
                f"FashionMNISTClassifier: expected 28×28 or 32×32 images, got {tuple(x.shape[-2:])}"
            )
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        return (x - FMNIST_MEAN) / FMNIST_STD

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, feature_dim]."""
        h = self.prepare(x)
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(h))), 2)  # [N, c1, 14, 14]
        h = F.max_pool2d(F.relu(self.bn2(self.conv2(h))), 2)  # [N, c2, 7, 7]
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [N, num_classes]."""
        return self.head(self.dropout(self.features(x)))


def images_to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (numpy or tensor) → uint8 NHWC tensor, validated."""
    if isinstance(images, np.ndarray):
        arr = np.ascontiguousarray(images)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    else:
        t = images
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"expected uint8 images as a numpy array or tensor, got {type(images).__name__}")
    if t.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got dtype {t.dtype}")
    if t.ndim != 4 or t.shape[-1] not in (1, 3):
        raise ValueError(f"expected images of shape [N, H, W, C] with C in {{1, 3}}, got {tuple(t.shape)}")
    return t


class ClassifierFeatures:
    """``FeatureExtractor`` around a ``FashionMNISTClassifier``: uint8 NHWC → [N, feature_dim]."""

    def __init__(self, model: FashionMNISTClassifier, *, name: str = "fmnist", weights_id: str = "untrained"):
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.dim = model.feature_dim
        self.weights_id = weights_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> ClassifierFeatures:
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images_to_tensor(images).to(self.device)
        x = x.permute(0, 3, 1, 2).float() / 255.0  # [N, C, H, W] in [0, 1]
        return self.model.features(x).float()


def _weights_id(extractor: Any) -> str | None:
    """What identifies an extractor's weights in a cache key: its ``weights_id`` (a file hash),
    else, for placeholder ids of networks built in memory, a hash of the network's state."""
    wid = getattr(extractor, "weights_id", None)
    if wid is not None and str(wid) not in ("untrained", "random-init", "unknown"):
        return str(wid)
    module = extractor if isinstance(extractor, torch.nn.Module) else getattr(extractor, "model", None)
    if not isinstance(module, torch.nn.Module):
        return None
    return "state-" + digest_state(module)


def load_fmnist_extractor(
    path: str | os.PathLike | None = None, *, device: torch.device | str = "cpu"
) -> ClassifierFeatures:
    """The Fashion-MNIST feature extractor with trained weights.

    ``path`` defaults to the weights shipped in ``epsscale/assets``; the architecture comes from
    the JSON file next to the weights (same stem), or the defaults when there is none.
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else FMNIST_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST classifier weights not found at {path}; train them with "
            "`python scripts/train_classifier.py` or pass the path of a .safetensors file"
        )
    config: dict = {}
    meta_path = path.with_suffix(".json")
    if meta_path.is_file():
        config = json.loads(meta_path.read_text()).get("config", {})
    model = FashionMNISTClassifier(
        widths=tuple(config.get("widths", (32, 64))),
        feature_dim=int(config.get("feature_dim", 128)),
        num_classes=int(config.get("num_classes", 10)),
    )
    try:
        state = load_file(str(path))
        model.load_state_dict(state)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: cannot load Fashion-MNIST classifier weights ({first})") from None
    return ClassifierFeatures(model.to(device), name="fmnist", weights_id=digest_file(path))


# ----------------------------------------------------------------------------------------------
# Registry.

ExtractorName = Literal["fmnist", "inception"]


class TorchScriptFeatures:
    """A user's own feature extractor: a TorchScript module mapping uint8 NCHW to float [N, dim].

    Saved with ``torch.jit.save(torch.jit.script(module), path)`` (or ``trace``). Its weights are
    identified by the file's hash, so cached reference statistics follow the file.
    """

    def __init__(self, path: str | os.PathLike, *, device: torch.device | str = "cpu") -> None:
        p = Path(path)
        try:
            self.module = torch.jit.load(str(p), map_location=device).eval()
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"--extractor {p}: not a TorchScript module ({first[:160]}); save one with torch.jit.save(torch.jit.script(net), path)") from None
        self.name = f"torchscript-{p.stem}"
        self.weights_id = digest_file(p)
        self.device = torch.device(device)
        self.dim = -1  # known after the first call (see probe)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.module(x.to(self.device))
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            raise ValueError(f"--extractor {self.name}: expected features [N, dim] for {x.shape[0]} images, got {getattr(out, 'shape', type(out).__name__)}")
        if not out.is_floating_point():
            raise ValueError(f"--extractor {self.name}: features must be floating point, got {out.dtype}")
        return out.float()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images_to_tensor(images).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
        feats = self._run(x)
        if self.dim < 0:
            self.dim = feats.shape[1]
        elif feats.shape[1] != self.dim:
            raise ValueError(f"--extractor {self.name}: feature dimension changed from {self.dim} to {feats.shape[1]}")
        return feats

    def probe(self, image_shape: tuple[int, int, int]) -> int:
        """The feature dimension, from one blank image of ``image_shape`` (H, W, C)."""
        self(torch.zeros((1, *image_shape), dtype=torch.uint8))
        return self.dim


def get_extractor(
    name: ExtractorName | str = "fmnist",
    path: str | os.PathLike | None = None,
    *,
    device: torch.device | str = "cpu",
    image_shape: tuple[int, int, int] | None = None,
) -> FeatureExtractor:
    """Build the extractor ``"fmnist"`` or ``"inception"`` (weights from ``path`` if given), or
    load a TorchScript extractor when ``name`` is the path of one (``image_shape`` (H, W, C), when
    given, probes its feature dimension at once)."""
    if name == "fmnist":
        return load_fmnist_extractor(path, device=device)
    if name == "inception":
        from .inception import load_inception_extractor

        return load_inception_extractor(path, device=device)
    if Path(str(name)).is_file():
        ext = TorchScriptFeatures(name, device=device)
        if image_shape is not None:
            ext.probe(image_shape)
        return ext
    raise ValueError(f"unknown feature extractor {name!r}: expected fmnist, inception, or the path of a TorchScript module")


def default_extractor_name(image_shape: tuple[int, ...]) -> ExtractorName:
    """``"fmnist"`` for 1-channel 28×28 / 32×32 images ([H, W, C] or [N, H, W, C]), else ``"inception"``."""
    h, w, c = image_shape[-3:]
    return "fmnist" if c == 1 and (h, w) in ((28, 28), (32, 32)) else "inception"


# ----------------------------------------------------------------------------------------------
# Statistics of image sets.


def _batches(n: int, batch_size: int) -> Iterable[slice]:
    return (slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size))


def feature_stats(
    images: np.ndarray | torch.Tensor,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 250,
    progress: bool | Callable[[Iterable], Iterable] = False,
    stats: FeatureStats | None = None,
) -> FeatureStats:
    """Run ``extractor`` over uint8 NHWC ``images`` in batches and accumulate ``FeatureStats``.

    ``progress=True`` shows a tqdm bar; a callable wraps the batch iterator instead. Pass
    ``stats`` to add to existing statistics.
    """
    images = images_to_tensor(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if getattr(extractor, "dim", 0) < 0 and hasattr(extractor, "probe"):
        extractor.probe(tuple(images.shape[1:]))  # a user's extractor: its dimension, from these images
    if stats is None:
        stats = FeatureStats(extractor.dim)
    it: Iterable[slice] = _batches(images.shape[0], batch_size)
    if progress is True:
        from tqdm.auto import tqdm

        it = tqdm(list(it), desc=f"features ({extractor.name})", unit="batch")
    elif callable(progress):
        it = progress(it)
    for sl in it:
        stats.update(extractor(images[sl]))
    return stats


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("EPSSCALE_CACHE"):
        return Path(os.environ["EPSSCALE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "epsscale"


_NAMED_DATASETS = ("fashion-mnist-train", "fashion-mnist-test")


def _dataset_images(dataset: str) -> np.ndarray:
    from ..data.fashion_mnist import load_fashion_mnist
    from ..data.images import load_images

    if dataset in _NAMED_DATASETS:
        return load_fashion_mnist(dataset.rsplit("-", 1)[1])[0][..., None]  # [N, 28, 28, 1]
    return load_images(dataset)


def _dataset_key(dataset: str) -> str:
    if dataset in _NAMED_DATASETS:
        from ..data.fashion_mnist import DEFAULT_ROOT, data_root

        root = data_root()
        if root.resolve() == DEFAULT_ROOT.resolve():
            return dataset  # the Debian package's files: the same everywhere
        # Another copy (EPSSCALE_FASHION_MNIST): keyed by its files, like any folder.
        return f"{dataset}-{digest_tree(root)}"
    if not Path(dataset).exists():
        raise ValueError(
            f"unknown dataset {dataset!r}; expected 'fashion-mnist-train', 'fashion-mnist-test', "
            "or the path of an .npz / .zip / image folder"
        )
    p = Path(dataset).resolve()
    return f"{p.stem}-{digest_tree(p)}"


def reference_stats(
    extractor: FeatureExtractor,
    dataset: str = "fashion-mnist-train",
    cache_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 250,
    progress: bool = False,
    refresh: bool = False,
) -> FeatureStats:
    """Feature statistics of a reference dataset, computed once and cached.

    ``dataset`` is ``"fashion-mnist-train"``, ``"fashion-mnist-test"`` or a path accepted by
    ``load_images``. The cache file ``{dataset}-{extractor.name}-{weights_id}.npz`` lives in
    ``cache_dir`` (default ``$EPSSCALE_CACHE`` or ``~/.cache/epsscale``). For the shipped
    classifier and the train split, the statistics shipped in ``epsscale/assets`` are used.
    """
    weights_id = _weights_id(extractor)
    if weights_id is None:  # nothing identifies the weights: compute, but never share a cache file
        log.info("computing reference statistics of %s (extractor without weights_id: not cached)", dataset)
        return feature_stats(_dataset_images(dataset), extractor, batch_size=batch_size, progress=progress)
    key = f"{_dataset_key(dataset)}-{extractor.name}-{weights_id}"

    # Shipped statistics.
    if not refresh and cache_dir is None and FMNIST_TRAIN_STATS.is_file() and dataset == "fashion-mnist-train":
        with np.load(FMNIST_TRAIN_STATS, allow_pickle=False) as f:
            shipped_key = str(f["key"]) if "key" in f.files else None
        if shipped_key == key:
            return FeatureStats.load(FMNIST_TRAIN_STATS)

    # Cached statistics.
    path = _cache_dir(cache_dir) / f"{key}.npz"
    if path.is_file() and not refresh:
        try:
            return FeatureStats.load(path)
        except ValueError as e:
            log.warning("ignoring unreadable cached statistics: %s", e)

    # Compute and cache.
    log.info("computing reference statistics %s", key)
    stats = feature_stats(_dataset_images(dataset), extractor, batch_size=batch_size, progress=progress)
    stats.save(path, key=np.array(key))
    return stats

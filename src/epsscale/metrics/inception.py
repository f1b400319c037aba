"""The FID Inception-v3 network (2048-d pool3 features), written for epsscale.

This is the network of TensorFlow's original FID code (``inception-2015-12-05``) as ported to
PyTorch by pytorch-fid. Its parameter names equal those of pytorch-fid's weights file
``pt_inception-2015-12-05-6726825d.pth`` (torchvision's ``Inception3`` layout, 1008 classes, no
auxiliary head), so that file loads directly. It differs from torchvision's ImageNet Inception in
three places, all reproduced here:

- the 3×3 average pools inside the A, C and first E blocks ignore the zero padding
  (``count_include_pad=False``, as TensorFlow's average pool does);
- the pool branch of the last E block (``Mixed_7c``) uses max pooling, not average pooling;
- inputs are resized to 299×299 bilinearly (``align_corners=False``) and scaled from [0, 1] to
  [-1, 1], with no per-channel ImageNet normalisation.

Nothing is downloaded: the weights are read from an explicit path or from the torch hub cache,
where pytorch-fid puts them (``$TORCH_HOME/hub/checkpoints``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "InceptionV3Features",
    "INCEPTION_WEIGHTS_NAME",
    "INCEPTION_WEIGHTS_URL",
    "find_inception_weights",
    "load_inception_extractor",
]

INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS_NAME
)


# ----------------------------------------------------------------------------------------------
# Building blocks. Attribute names follow the weights file.


class ConvBN(nn.Module):
    """conv (no bias) → batch norm (eps 1e-3) → ReLU. Keys: ``conv.weight``, ``bn.*``."""

    def __init__(self, c_in: int, c_out: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    """3×3 stride-1 average pool whose border averages skip the zero padding (TensorFlow's)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35×35 block (Mixed_5b/c/d): 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avgpool→1×1."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_same(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class BlockB(nn.Module):
    """Grid reduction 35→17 (Mixed_6a): 3×3/2 | 1×1→3×3→3×3/2 | maxpool/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, b3d, bp], dim=1)


class BlockC(nn.Module):
    """17×17 block with factorised 7×7 convolutions (Mixed_6b..e)."""

    def __init__(self, c_in: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = conv(b7d)
        bp = self.branch_pool(_avg_pool_same(x))
        return torch.cat([b1, b7, b7d, bp], dim=1)


class BlockD(nn.Module):
    """Grid reduction 17→8 (Mixed_7a): 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | maxpool/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class BlockE(nn.Module):
    """8×8 block with split 1×3 / 3×1 branches (Mixed_7b, Mixed_7c).

    ``max_pool=True`` (Mixed_7c in the FID network) pools the pool branch with a 3×3 max pool
    instead of the padding-excluding average pool.
    """

    def __init__(self, c_in: int, *, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        h = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(h), self.branch3x3_2b(h)], dim=1)
        h = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(h), self.branch3x3dbl_3b(h)], dim=1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_same(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], dim=1)


# ----------------------------------------------------------------------------------------------
# The network.


class InceptionV3Features(nn.Module):
    """FID Inception-v3: uint8 images [N, H, W, C] → pool3 features [N, 2048] (float32).

    A ``FeatureExtractor`` (``name = "inception"``, ``dim = 2048``). ``pool3`` takes float
    images [N, 3, H, W] in [0, 1] instead (pytorch-fid's input convention); ``logits`` gives the
    1008-way classifier output. Grey images are repeated to three channels, as PIL's
    ``convert("RGB")`` does in pytorch-fid. Built with random weights; use
    ``load_inception_extractor`` or ``load_weights`` for the FID weights.
    """

    name = "inception"
    dim = 2048

    def __init__(self):
        super().__init__()
        self.weights_id = "random-init"
        # Stem: 299 → 35.
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        # Inception blocks.
        self.Mixed_5b = BlockA(192, pool_features=32)
        self.Mixed_5c = BlockA(256, pool_features=64)
        self.Mixed_5d = BlockA(288, pool_features=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, channels_7x7=128)
        self.Mixed_6c = BlockC(768, channels_7x7=160)
        self.Mixed_6d = BlockC(768, channels_7x7=160)
        self.Mixed_6e = BlockC(768, channels_7x7=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        # Classifier (unused for FID, present in the weights file).
        self.fc = nn.Linear(2048, 1008)
        self.eval().requires_grad_(False)

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """Float images [N, 3, H, W] in [0, 1] → pool3 features [N, 2048]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"InceptionV3Features.pool3: expected [N, 3, H, W], got {tuple(x.shape)}")
        # Resize to 299 and scale to [-1, 1].
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        # Stem.
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [N, 64, 147, 147]
        x = F.max_pool2d(x, 3, stride=2)  # [N, 64, 73, 73]
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # [N, 192, 71, 71]
        x = F.max_pool2d(x, 3, stride=2)  # [N, 192, 35, 35]
        # Inception blocks.
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a):
            x = block(x)  # → [N, 768, 17, 17]
        for block in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)
        for block in (self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # → [N, 2048, 8, 8]
        # Global average pool.
        return x.mean(dim=(2, 3))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float images [N, 3, H, W] in [0, 1] → 1008-way logits."""
        return self.fc(self.pool3(x))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, H, W, C] (C in {1, 3}) → pool3 features [N, 2048], float32."""
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise ValueError("InceptionV3Features: expected a uint8 tensor of images [N, H, W, C]")
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"InceptionV3Features: expected images [N, H, W, C] with C in {{1, 3}}, got {tuple(images.shape)}"
            )
        p = next(self.parameters())
        x = images.to(p.device).permute(0, 3, 1, 2).to(p.dtype) / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.pool3(x).float()

    def load_weights(self, path: str | os.PathLike) -> InceptionV3Features:
        """Load pytorch-fid's weights file (``.pth``; a ``.safetensors`` copy works too)."""
        path = Path(path)
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{path}: cannot read Inception weights ({first})") from None
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
        # BatchNorm's num_batches_tracked counters are irrelevant in eval mode; files may or may
        # not carry them.
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        ours = {k for k in self.state_dict() if not k.endswith("num_batches_tracked")}
        missing, unexpected = sorted(ours - state.keys()), sorted(state.keys() - ours)
        if missing or unexpected:
            raise ValueError(
                f"{path}: not the FID Inception weights ({len(missing)} missing keys, e.g. "
                f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})"
            )
        self.load_state_dict(state, strict=False)
        from ..hashing import digest_file

        self.weights_id = digest_file(path)
        return self


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """Locate the FID Inception weights: ``path``, or the torch hub cache. Never downloads.

    The hub cache is ``$TORCH_HOME/hub/checkpoints`` (``TORCH_HOME`` defaults to
    ``~/.cache/torch``), where pytorch-fid's first run stores the file.
    """
    if path is not None:
        candidate = Path(path).expanduser()
    else:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME
    if not candidate.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {candidate}: download {INCEPTION_WEIGHTS_URL} "
            f"to that path, or pass --inception PATH"
        )
    return candidate


def load_inception_extractor(
    path: str | os.PathLike | None = None, *, device: torch.device | str = "cpu"
) -> InceptionV3Features:
    """``InceptionV3Features`` with the FID weights from ``path`` or the torch hub cache."""
    return InceptionV3Features().load_weights(find_inception_weights(path)).to(device)

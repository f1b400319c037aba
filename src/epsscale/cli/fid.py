"""``epsscale fid``: FID of a sample set against reference statistics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from . import common
from .common import UserError

DESCRIPTION = """\
FID of samples (an ADM .npz, a folder of images or a zip) against a reference: a split of
Fashion-MNIST, another image set, or a statistics .npz (mu, sigma). Features come from the
project's Fashion-MNIST classifier (fmnist, the default), the standard Inception network
(inception, with --inception WEIGHTS), or your own TorchScript extractor (a .pt path).
Reference statistics are cached in $EPSSCALE_CACHE (default ~/.cache/epsscale). Under
torchrun each rank featurises a share of the images and the float64 sums are added.

examples:
  epsscale fid fm.npz --ref fashion-mnist-test
  epsscale fid samples.npz --ref ref_images/ --extractor inception --inception pt_inception-2015-12-05-6726825d.pth
"""


def add_parser(sub: Any) -> None:
    f = sub.add_parser("fid", help="FID of samples (npz, folder or zip) against reference statistics", description=DESCRIPTION)
    f.add_argument("samples", help="the samples: an ADM .npz (arr_0), a folder of images, or a zip")
    f.add_argument("--ref", default="fashion-mnist-train", help="fashion-mnist-train, fashion-mnist-test, a stats .npz (mu, sigma) or images")
    add_extractor_options(f)
    f.add_argument("--batch", type=common.positive_int, default=250, help="images per feature batch")
    f.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")
    common.add_run_options(f)
    f.set_defaults(func=run)


def add_extractor_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--extractor", default=None, metavar="fmnist|inception|PATH", help="feature extractor: the project's Fashion-MNIST classifier, Inception (needs --inception), or a TorchScript module mapping uint8 NCHW to features (default: fmnist for 1-channel 28 or 32 px images, else inception)")
    p.add_argument("--inception", default=None, metavar="PATH", help="with --extractor inception: pytorch-fid's weights file pt_inception-2015-12-05-6726825d.pth")


def extractor_from_args(args: argparse.Namespace, device: Any, image_shape: tuple[int, ...]) -> Any:
    """The extractor the options name, or the one that fits images of ``image_shape`` (H, W, C)."""
    from ..metrics import get_extractor
    from ..metrics.features import default_extractor_name

    name = args.extractor or default_extractor_name(tuple(image_shape))
    if args.inception and name != "inception":
        raise UserError("--inception WEIGHTS is for --extractor inception")
    if name == "inception" and args.extractor is None and not args.inception:
        raise UserError(f"images of {image_shape[0]}x{image_shape[1]}x{image_shape[2]} need a feature extractor: --extractor inception --inception WEIGHTS (pytorch-fid's pt_inception-2015-12-05-6726825d.pth), or --extractor PATH.pt (a TorchScript module)")
    return get_extractor(name, args.inception if name == "inception" else None, device=device, image_shape=tuple(image_shape))


def run(args: argparse.Namespace) -> int:
    """FID of a sample set. Under ``torchrun`` rank r featurises images r, r + W, ..., and the
    float64 sums (n, sum x, sum x x^T) are added over ranks with all_reduce; rank 0 prints."""
    from .. import distributed as dist
    from ..data.images import load_images
    from ..metrics import FeatureStats, compute_fid, feature_stats, reference_stats

    common.set_threads(args)
    dist.init()
    ref = args.ref
    if ref not in ("fashion-mnist-train", "fashion-mnist-test") and not Path(ref).exists():
        raise UserError(f"--ref {ref}: no such file or folder (expected fashion-mnist-train, fashion-mnist-test, a stats .npz or images)")
    images = load_images(args.samples)
    if len(images) < 2:
        raise UserError(f"{args.samples}: FID needs at least 2 images, found {len(images)}")
    ext = extractor_from_args(args, common.device(), images.shape[1:])
    r, w = dist.rank(), dist.world_size()
    stats = FeatureStats(ext.dim)
    if len(images[r::w]):
        feature_stats(images[r::w], ext, batch_size=args.batch, progress=not args.quiet and r == 0, stats=stats)
    for t in stats.tensors():
        dist.all_reduce_sum(t)
    if r != 0:
        return 0
    ref_stats: Any = ref if ref.endswith(".npz") and Path(ref).exists() and _is_stats_npz(ref) else reference_stats(ext, ref, progress=not args.quiet)
    fid = compute_fid(stats, ref_stats)
    print(json.dumps({"fid": fid, "samples": len(images), "extractor": ext.name, "ref": ref}) if args.json else f"FID {fid:.4f}  ({len(images)} samples, {ext.name} features, ref {ref})")
    return 0


def _is_stats_npz(path: str) -> bool:
    import numpy as np

    try:
        with np.load(path) as z:
            return "mu" in z.files and "sigma" in z.files
    except Exception:
        return False

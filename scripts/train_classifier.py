"""Train the Fashion-MNIST classifier whose penultimate layer is epsscale's FID feature.

    python scripts/train_classifier.py            # writes src/epsscale/assets/fmnist_classifier.*

Deterministic (fixed seed, one thread), a few minutes on one CPU core. Writes the weights as
safetensors, a JSON file with the test accuracy and the command, and the feature statistics of
the train split (``fmnist_train_stats.npz``) used as the default FID reference.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from epsscale.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from epsscale.metrics.features import (  # noqa: E402
    FashionMNISTClassifier,
    feature_stats,
    load_fmnist_extractor,
)

log = logging.getLogger("train_classifier")


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 px (zero padding) and horizontal flips. x: [N, 1, 28, 28]."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))  # [N, 1, 32, 32]
    oy = torch.randint(0, 5, (n,), generator=gen)
    ox = torch.randint(0, 5, (n,), generator=gen)
    ar = torch.arange(28)
    rows = (oy[:, None] + ar)[:, :, None]  # [N, 28, 1]
    cols = (ox[:, None] + ar)[:, None, :]  # [N, 1, 28]
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]  # [N, 1, 28, 28]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def accuracy(model: FashionMNISTClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), 1000):
        correct += int((model(images[i : i + 1000]).argmax(1) == labels[i : i + 1000]).sum())
    return correct / len(images)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", type=Path, default=None, help="folder with the Fashion-MNIST IDX .gz files")
    p.add_argument("--out", type=Path, default=ROOT / "src/epsscale/assets/fmnist_classifier.safetensors")
    p.add_argument("--stats-out", type=Path, default=ROOT / "src/epsscale/assets/fmnist_train_stats.npz")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    # Data: uint8 [N, 28, 28] → float [N, 1, 28, 28] in [0, 1].
    train_u8, train_y = load_fashion_mnist("train", args.data)
    test_u8, test_y = load_fashion_mnist("test", args.data)
    to_float = lambda a: torch.from_numpy(np.array(a[:, None])).float() / 255.0  # noqa: E731
    train_x, test_x = to_float(train_u8), to_float(test_u8)
    train_y, test_y = torch.from_numpy(np.array(train_y)).long(), torch.from_numpy(np.array(test_y)).long()

    # Model and optimiser (AdamW, one-cycle learning rate).
    model = FashionMNISTClassifier()
    n_params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = len(train_x) // args.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.2
    )
    log.info("FashionMNISTClassifier: %d parameters, %d steps/epoch", n_params, steps_per_epoch)

    # Train.
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train_x), generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            x = augment(train_x[idx], gen)
            loss = F.cross_entropy(model(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        acc = accuracy(model, test_x, test_y)
        log.info("epoch %d: loss %.4f, test accuracy %.4f (%.0f s)", epoch + 1, total / steps_per_epoch, acc, time.perf_counter() - t0)
    train_seconds = time.perf_counter() - t0
    test_acc = accuracy(model, test_x, test_y)

    # Save weights and metadata.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out), metadata={"format": "pt"})
    args.out.chmod(0o644)
    meta = {
        "test_accuracy": round(test_acc, 4),
        "epochs": args.epochs,
        "command": shlex.join(["python", "scripts/train_classifier.py", *(argv if argv is not None else sys.argv[1:])]),
        "feature_dim": model.feature_dim,
        "config": model.config,
        "parameters": n_params,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "train_seconds": round(train_seconds, 1),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("wrote %s (test accuracy %.4f, %.0f s)", args.out, test_acc, train_seconds)

    # Reference statistics of the train split, keyed like reference_stats() keys its cache.
    if args.stats_out:
        extractor = load_fmnist_extractor(args.out)
        stats = feature_stats(train_u8[..., None], extractor, batch_size=1000)
        key = f"fashion-mnist-train-{extractor.name}-{extractor.weights_id}"
        stats.save(args.stats_out, key=np.array(key))
        log.info("wrote %s (%s)", args.stats_out, key)


if __name__ == "__main__":
    main()

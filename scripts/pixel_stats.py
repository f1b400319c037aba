"""How bright are the shipped model's samples? Mean intensity and shares of black and white pixels.

Samples come from the demo's discretisation of each sampler (λ = 1), or from sample files given
with ``--npz``, and are compared with the Fashion-MNIST test split. If a deterministic sampler
stays too bright when its steps grow, the error is the model's, not the discretisation's.

    python scripts/pixel_stats.py --num 64 --runs ddpm:20,ddim:20,ddim:100,ddim:250,euler:100
    python scripts/pixel_stats.py --npz a.npz b.npz      # files from `epsscale sample`
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def stats(images: np.ndarray, black: int, white: int) -> tuple[float, float, float]:
    """(mean intensity in [0, 1], share of pixels <= ``black``, share >= ``white``) of uint8 images."""
    return float(images.mean() / 255), float((images <= black).mean()), float((images >= white).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=64, help="seeds 0..num-1")
    ap.add_argument("--runs", default="ddpm:20,ddim:20,ddim:100,ddim:250,euler:100", help="sampler:steps,...")
    ap.add_argument("--npz", nargs="+", metavar="FILE", help="report these sample files instead of sampling")
    ap.add_argument("--black", type=int, default=5, help="a pixel <= this uint8 value counts as black")
    ap.add_argument("--white", type=int, default=250, help="a pixel >= this uint8 value counts as white")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from epsscale.data.fashion_mnist import load_fashion_mnist
    from epsscale.data.images import load_images
    from epsscale.models.pretrained import load_model, shipped_plan
    from epsscale.sampling import sample_seeds

    test, _ = load_fashion_mnist("test")
    rows = [("data (test split)", "", *stats(test, args.black, args.white), "")]
    if args.npz:
        for path in args.npz:
            images = load_images(path)
            rows.append((path, f"{len(images)} images", *stats(images, args.black, args.white), ""))
        print(f"black = pixel <= {args.black}/255, white = pixel >= {args.white}/255\n")
    else:
        model = load_model("fmnist")
        for run in args.runs.split(","):
            sampler, steps = run.split(":")
            t0 = time.time()
            images, _ = sample_seeds(shipped_plan(sampler, int(steps), model=model), range(args.num), batch_size=args.num)
            rows.append((sampler, steps, *stats(images, args.black, args.white), f"{time.time() - t0:.0f}"))
        print(f"{args.num} samples per row (seeds 0..{args.num - 1}), λ = 1, black = pixel <= {args.black}/255, white = pixel >= {args.white}/255\n")
    print("| sampler | steps | mean intensity | black pixels | white pixels | seconds |")
    print("|---|---|---|---|---|---|")
    for name, steps, mean, blk, wht, sec in rows:
        print(f"| {name} | {steps} | {mean:.3f} | {100 * blk:.1f}% | {100 * wht:.1f}% | {sec} |")


if __name__ == "__main__":
    main()

"""Check epsscale's FID Inception against pytorch-fid's, layer for layer, without the real weights.

No FID weights can be downloaded on the development machine, so this checks the next best thing:
both networks get the *same* random weights (our state dict, loaded by pytorch-fid with
``strict=True``, which also checks the key layout), and their pool3 features and FIDs are
compared on real images. With the real weights file the two then compute the same function.

pytorch-fid needs torchvision, which does not import beside the project's torch 2.13 CPU build,
so this runs in a separate environment:

    python3 -m venv /tmp/tvenv
    /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid numpy scipy safetensors tqdm
    PYTHONPATH=src /tmp/tvenv/bin/python scripts/check_inception.py --num 64
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def randomise(net: torch.nn.Module, seed: int) -> None:
    """Random conv/fc weights (default init) and random, well-conditioned BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("running_mean"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith("bn.weight"):
                t.copy_(0.8 + 0.4 * torch.rand(t.shape, generator=g))
            elif name.endswith("bn.bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif t.dtype.is_floating_point and t.ndim > 1:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=64, help="images per set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import pytorch_fid
    import pytorch_fid.inception as pfi
    from pytorch_fid.fid_score import calculate_frechet_distance

    from epsscale.data.fashion_mnist import load_fashion_mnist
    from epsscale.metrics.fid import frechet_distance
    from epsscale.metrics.inception import InceptionV3Features

    ours = InceptionV3Features()
    randomise(ours, args.seed)
    state = {k: v.clone() for k, v in ours.state_dict().items()}

    # pytorch-fid builds its FID Inception and loads "the" weights from a URL: hand it ours.
    pfi.load_state_dict_from_url = lambda *a, **k: state
    theirs = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True, use_fid_inception=True).eval()

    # Real images, as pytorch-fid's ImagePathDataset would hand them over: PIL convert("RGB")
    # repeats the grey channel, ToTensor scales to [0, 1].
    train, _ = load_fashion_mnist("train")
    test, _ = load_fashion_mnist("test")
    sets = {name: x[: args.num].reshape(args.num, 28, 28, 1).copy() for name, x in (("train", train), ("test", test))}
    feats_ours, feats_theirs = {}, {}
    t0 = time.time()
    with torch.no_grad():
        for name, u8 in sets.items():
            feats_ours[name] = ours(torch.from_numpy(u8)).double().numpy()
            x = torch.from_numpy(u8).permute(0, 3, 1, 2).float().div(255).expand(-1, 3, -1, -1)
            feats_theirs[name] = theirs(x)[0].squeeze(-1).squeeze(-1).double().numpy()
    secs = time.time() - t0
    print(f"pytorch-fid {pytorch_fid.__version__}, torch {torch.__version__}; {args.num} FMNIST train + {args.num} test images; {secs:.1f}s")
    worst = 0.0
    for name in sets:
        a, b = feats_ours[name], feats_theirs[name]
        rel = float(np.abs(a - b).max() / np.abs(b).max())
        worst = max(worst, rel)
        print(f"pool3 features ({name}): max |ours - pytorch-fid| / max |pytorch-fid| = {rel:.2e}")

    def stats(f):
        return f.mean(0), np.cov(f, rowvar=False)

    fid_theirs = calculate_frechet_distance(*stats(feats_theirs["train"]), *stats(feats_theirs["test"]))
    fid_ours = frechet_distance(*stats(feats_ours["train"]), *stats(feats_ours["test"]))
    print(f"FID train vs test: pytorch-fid (its features, its formula) {fid_theirs:.6f}; epsscale (its features, its formula) {fid_ours:.6f}; relative difference {abs(fid_ours / fid_theirs - 1):.2e}")
    ok = worst < 1e-4 and abs(fid_ours / fid_theirs - 1) < 1e-4
    print("AGREE" if ok else "DISAGREE")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

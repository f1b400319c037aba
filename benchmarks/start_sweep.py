"""Where a deterministic sampler should start on a model: FID against the top of its grid.

    python benchmarks/start_sweep.py --model src/epsscale/assets/fmnist_adm --steps 20 --threads 2
    python benchmarks/start_sweep.py --report
    python benchmarks/start_sweep.py --model DIR --device cuda    # its own cache: start_sweep_cuda.json

An ε-prediction model on the cosine schedule is asked, at the top of the 1000-step chain
(σ ≈ 2·10⁴), for an x0 it cannot give: x0 = x − σ·ε magnifies ε's error. DDPM's injected noise
absorbs that; DDIM, Euler and Heun carry it to the end. So where their grid starts is a setting
of the model, measured here at λ = 1 on the tuning seeds (FID of 500 samples against the train
split, project extractor):

* Euler and Heun on EDM's Karras grid (ρ = 7) from σ_max in ``--sigma-maxes``, and on the
  respaced chain (from the top);
* DDIM on the respaced chain (t ≤ 999), on guided-diffusion's ``ddimN`` stride (t ≤ 1000 − 1000/N),
  and on Karras grids from the same σ_max values.

Every point is cached in ``--cache`` (one JSON), so a run resumes and ``--report`` costs nothing.
The best start of each sampler becomes the model config's ``sampling`` block (``--disc`` and
``--sigma-max`` defaults): see benchmarks/RESULTS.md, "Where the deterministic samplers start".
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def settings(sampler: str, sigma_maxes: list[float]) -> list[tuple[str, float | None]]:
    out: list[tuple[str, float | None]] = [("respaced", None)]
    if sampler == "ddim":
        out.append(("ddim", None))
    return out + [("karras", s) for s in sigma_maxes]


def label(disc: str, sigma_max: float | None) -> str:
    return disc if sigma_max is None else f"{disc}{sigma_max:g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="fmnist")
    ap.add_argument("--samplers", default="ddim,euler,heun")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sigma-maxes", default="5,10,20,40,80,160")
    ap.add_argument("--num", type=int, default=500)
    ap.add_argument("--batch", type=int, default=125)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=None, help="default benchmarks/start_sweep.json (with --device cuda: start_sweep_cuda.json)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda; a seed's noise differs between them, so each keeps its own cache")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from epsscale._atomic import atomic_write_text
    from epsscale.exposure import fid_objective
    from epsscale.exposure.search import TUNING_SEED0
    from epsscale.metrics import get_extractor, reference_stats
    from epsscale.models.pretrained import build_plan, load_model

    cache_path = Path(args.cache or HERE / ("start_sweep.json" if args.device == "cpu" else f"start_sweep_{args.device.split(':')[0]}.json"))
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    sigma_maxes = [float(s) for s in args.sigma_maxes.split(",")]
    samplers = args.samplers.split(",")
    if not args.report:
        model = load_model(args.model, device=args.device)
        ext = get_extractor("fmnist", device=args.device)
        ref = reference_stats(ext, "fashion-mnist-train")
        for sampler in samplers:
            for disc, sigma_max in settings(sampler, sigma_maxes):
                key = f"{sampler}|{label(disc, sigma_max)}|{args.steps}|{args.num}"
                if key in cache:
                    continue
                plan = build_plan(model, sampler=sampler, steps=args.steps, disc=disc, sigma_max=sigma_max, sampler_opts={"clip": 1.0} if sampler == "ddim" else {}, device=args.device)
                t0 = time.time()
                fid = fid_objective(plan, args.num, TUNING_SEED0, args.batch, ext, ref)(1.0)
                cache[key] = {"fid": fid, "sigma_top": float(plan.sigmas[0]), "nfe": plan.nfe, "seconds": round(time.time() - t0, 1)}
                atomic_write_text(cache_path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
                print(f"{key}: FID {fid:.2f} (top sigma {float(plan.sigmas[0]):.4g}, {time.time() - t0:.0f}s)", flush=True)
    print(f"FID of {args.num} tuning samples (seeds {1_000_000}...) against the train split at λ = 1, {args.steps} steps\n")
    print("| sampler | grid | top σ | FID |")
    print("|---|---|---|---|")
    for sampler in samplers:
        rows = [(k, v) for k, v in cache.items() if k.split("|")[0] == sampler and k.split("|")[2] == str(args.steps) and k.split("|")[3] == str(args.num)]
        if not rows:
            continue
        best = min(v["fid"] for _, v in rows)
        for k, v in sorted(rows, key=lambda kv: kv[1]["sigma_top"]):
            mark = " **best**" if v["fid"] == best else ""
            print(f"| {sampler} | {k.split('|')[1]} | {v['sigma_top']:.4g} | {v['fid']:.2f}{mark} |")


if __name__ == "__main__":
    main()

"""Print `epsscale measure` results side by side: the sampling ε-norm against the training norm,
and δ_t, with and without ES, at a few steps of each run.

    python scripts/exposure_table.py benchmarks/exposure_ddpm20_data benchmarks/exposure_ddpm20_prior

Each argument is a `measure --out` folder (or its exposure.json). The ratio columns are
‖ε_θ‖ along sampling trajectories over ‖ε_θ(q_sample(x0, t))‖ at the same t: below 1 means the
sampler's ε is smaller than in training, which norm matching corrects with λ < 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: str) -> dict:
    p = Path(path)
    p = p / "exposure.json" if p.is_dir() else p
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"exposure_table: cannot read {p}: {e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="measure output folders or exposure.json files")
    ap.add_argument("--every", type=int, default=4, help="report every N-th step (and the last two)")
    args = ap.parse_args()
    print("| run | start | t | ‖ε‖ sampling / training | same with ES | δ_t | δ_t with ES |")
    print("|---|---|---|---|---|---|---|")
    for path in args.runs:
        d = load(path)
        meta, norm, delta = d["meta"], d["eps_norm"], d["delta_t"]
        n = len(d["t"])
        picks = sorted(set(range(0, n, args.every)) | {n - 2, n - 1})
        name = f"{meta['sampler']} {meta['steps']}, λ = {meta['lam']}"
        for i in picks:
            ratio = norm["sampling"][i] / norm["training"][i]
            ratio_es = norm["sampling_es"][i] / norm["training"][i] if "sampling_es" in norm else float("nan")
            t = d["t"][i]
            print(f"| {name} | {meta.get('start', 'data')} | {t:g} | {ratio:.4f} | {ratio_es:.4f} | {delta['baseline'][i]:.3g} | {delta['es'][i]:.3g} |")
        mid = [norm["sampling"][i] / norm["training"][i] for i in range(n - 1)]
        print(f"| {name} | {meta.get('start', 'data')} | all but the last | {min(mid):.4f}–{max(mid):.4f} | | Σ {sum(delta['baseline']):.3g} | Σ {sum(delta['es']):.3g} |")


if __name__ == "__main__":
    main()

"""Install a trained model as the shipped one (src/epsscale/assets/fmnist_adm.*), with the start
of each deterministic sampler taken from a start sweep (benchmarks/start_sweep.py).

    python scripts/ship_model.py runs/fmnist28/model --start-sweep benchmarks/start_sweep.json --steps 20

For DDIM, Euler and Heun, the grid with the lowest FID in the sweep at ``--steps`` becomes the
config's ``sampling.disc`` entry (and, for a Karras grid, its ``sampling.sigma_max`` entry);
``sampling.karras_sigma_max`` (the start of a Karras grid for any other sampler) is Euler's best
Karras start. The note in the block names the sweep that chose them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "epsscale" / "assets"


def best_starts(sweep: dict, steps: int, samplers: list[str]) -> dict[str, tuple[str, float | None, float]]:
    """sampler -> (grid kind, Karras top or None, FID) of the sweep's best start at ``steps``."""
    out = {}
    for sampler in samplers:
        rows = [(k.split("|")[1], v["fid"]) for k, v in sweep.items() if k.split("|")[0] == sampler and k.split("|")[2] == str(steps)]
        if not rows:
            raise SystemExit(f"ship_model: the sweep has no {sampler} points at {steps} steps")
        label, fid = min(rows, key=lambda r: r[1])
        if label.startswith("karras"):
            out[sampler] = ("karras", float(label.removeprefix("karras")), fid)
        else:
            out[sampler] = (label, None, fid)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="an exported model prefix (PREFIX.json + PREFIX.safetensors)")
    ap.add_argument("--start-sweep", required=True, help="a start_sweep.py cache (JSON)")
    ap.add_argument("--steps", type=int, default=20, help="the sweep's sampling steps to decide by")
    ap.add_argument("--samplers", default="ddim,euler,heun")
    ap.add_argument("--dest", default=str(ASSETS / "fmnist_adm"), help="the prefix to write (default: the shipped model)")
    args = ap.parse_args()

    src = Path(args.model)
    cfg = json.loads(src.with_suffix(".json").read_text())
    sweep_path = Path(args.start_sweep)
    starts = best_starts(json.loads(sweep_path.read_text()), args.steps, args.samplers.split(","))
    disc = {s: kind for s, (kind, _, _) in starts.items()}
    tops = {s: top for s, (_, top, _) in starts.items() if top is not None}
    sampling = {"disc": disc, "sigma_max": tops, "karras_sigma_max": tops.get("euler", 80.0),
                "note": f"best start per sampler at {args.steps} steps, lambda = 1, in benchmarks/{sweep_path.name} (benchmarks/start_sweep.py; see benchmarks/RESULTS.md)",
                "fid_at_best_start": {s: round(f, 2) for s, (_, _, f) in starts.items()}}
    cfg["sampling"] = sampling
    dest = Path(args.dest)
    shutil.copyfile(src.with_suffix(".safetensors"), dest.with_suffix(".safetensors.tmp"))
    dest.with_suffix(".safetensors.tmp").replace(dest.with_suffix(".safetensors"))
    from epsscale._atomic import atomic_write_text

    atomic_write_text(dest.with_suffix(".json"), json.dumps(cfg, indent=2) + "\n")
    print(f"shipped {src} as {dest}: " + ", ".join(f"{s} {k}{'' if t is None else f' from sigma {t:g}'}" for s, (k, t, _) in starts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

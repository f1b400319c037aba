"""Write assets/fmnist_adm_es.json (the demo's ES lambdas) from benchmarks/calibration.py reports.

    python scripts/ship_es.py benchmarks/calibration_ddpm.json benchmarks/calibration_ddim.json \
        benchmarks/calibration_euler.json

Each sampler ships the uniform b that the FID grid chose on tuning seeds (1,000,000..); the
demo then scores it on held-out seeds 0.. against the test split.
"""

import json
import sys
from pathlib import Path

from epsscale._atomic import atomic_write_text

OUT = Path(__file__).resolve().parents[1] / "src" / "epsscale" / "assets" / "fmnist_adm_es.json"


def main(paths: list[str]) -> None:
    samplers = {}
    for p in paths:
        r = json.loads(Path(p).read_text())
        samplers[r["sampler"]] = {
            "b": r["grid"]["best_b"],
            "steps": r["steps"],
            "disc": r["disc"],
            "chosen_by": f"FID grid over uniform b, {r['grid_num']} samples per point, tuning seeds 1000000.., Fashion-MNIST train-split statistics",
            "grid_points": r["grid"]["points"],
            "report": str(Path(p).name),
        }
    doc = {"format": "epsscale.es_settings/1", "model": "fmnist", "samplers": samplers, "command": "python benchmarks/calibration.py --sampler S --steps 20 ... (see benchmarks/RESULTS.md)"}
    atomic_write_text(OUT, json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT}: " + ", ".join(f"{k} b={v['b']}" for k, v in samplers.items()))


if __name__ == "__main__":
    main(sys.argv[1:])

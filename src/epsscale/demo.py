"""``epsscale demo``: baseline vs Epsilon Scaling, end to end, on this CPU.

* ``fmnist_demo``: the shipped Fashion-MNIST model; DDPM (20 respaced steps), DDIM (the
  20-step "ddim20" stride) and Euler (20 Karras steps from sigma 13), each at lambda = 1 and with the shipped ES lambda; FID (the project's
  Fashion-MNIST classifier features) against the train and the test split. The lambdas were
  chosen on other seeds (see ``assets/fmnist_adm_es.json``), so these seeds are a held-out
  yardstick.
* ``toy_demo``: a 2-D mixture of 8 Gaussians with its exact denoiser and a deliberately
  imperfect one; lambda is chosen on one set of seeds and reported on another.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._atomic import atomic_write, atomic_write_text

__all__ = ["fmnist_demo", "toy_demo", "DEMO_SETTINGS", "demo_discretisation", "demo_sampler_options", "sample_images"]

# (label, sampler, discretisation, steps, sigma_max of a karras grid). DDIM takes guided-diffusion's
# "ddimN" integer stride (t <= 950) and Euler a Karras grid topped at sigma 13 (about t = 950):
# the cosine schedule's last timesteps reach sigma ~ 2e4, where this small eps-prediction model's
# x0 is too inaccurate for a deterministic sampler (see README, "The Fashion-MNIST model").
DEMO_SETTINGS = (("DDPM", "ddpm", "respaced", 20, None), ("DDIM", "ddim", "ddim", 20, None), ("Euler", "euler", "karras", 20, 13.0))
ES_FILE = Path(__file__).resolve().parent / "assets" / "fmnist_adm_es.json"


def demo_discretisation(sampler: str) -> tuple[str, float | None]:
    """(grid kind, Karras sigma_max) for ``sampler`` on the shipped model, as the demo and the
    benchmarks run it: DEMO_SETTINGS' choice, and a Karras grid from sigma 13 for the other
    sigma-space samplers (heun, dpmpp_2m)."""
    for _, s, kind, _, sigma_max in DEMO_SETTINGS:
        if s == sampler:
            return kind, sigma_max
    return "karras", 13.0


def demo_sampler_options(sampler: str) -> dict:
    """ADM's x0 clipping to [-1, 1] for the VP samplers (ddpm, ddim); nothing for the others."""
    return {"clip": 1.0} if sampler in ("ddpm", "ddim") else {}


def sample_images(model: Any, sampler: str, sigmas: torch.Tensor, lam: Any, seeds: Any, *, batch: int, opts: dict | None = None, **kw: Any) -> np.ndarray:
    """uint8 28×28 NHWC samples of a loaded Fashion-MNIST model, one per seed, with ES ``lam``.

    ``kw`` goes to :func:`epsscale.distributed.sample_seeds` (``work_dir``, ``progress``, ``device``...).
    """
    from .data.fashion_mnist import from_model_space
    from .distributed import sample_seeds
    from .scaling import eps_scaling

    images, _ = sample_seeds(eps_scaling(model.denoiser, lam, sigmas=sigmas), seeds, model.shape, sampler=sampler, sigmas=sigmas, to_uint8=lambda x: from_model_space(x, 28), batch_size=batch, prior_kind="vp", sampler_opts=opts, **kw)
    return images


def shipped_lambdas() -> dict[str, float]:
    """The uniform ES lambda per sampler chosen for the shipped model (see the file's provenance)."""
    if not ES_FILE.exists():
        raise FileNotFoundError(f"{ES_FILE} is missing: the demo needs the shipped ES settings")
    d = json.loads(ES_FILE.read_text())
    return {k: float(v["b"]) for k, v in d["samplers"].items()}


def fmnist_demo(out: Path, *, num: int | None = None, batch: int = 250, seed0: int = 0) -> int:
    from .cli import make_grid
    from .metrics import compute_fid, feature_stats, get_extractor, reference_stats
    from .models.pretrained import load_model

    num = num or 300  # about 3 minutes on this project's 2-core CPU
    out.mkdir(parents=True, exist_ok=True)
    model = load_model("fmnist")
    lams = shipped_lambdas()
    ext = get_extractor("fmnist")
    refs = {"train": reference_stats(ext, "fashion-mnist-train"), "test": reference_stats(ext, "fashion-mnist-test")}
    seeds = list(range(seed0, seed0 + num))
    rows, panels = [], []
    t_all = time.time()
    for label, sampler, grid_kind, steps, sigma_max in DEMO_SETTINGS:
        sigmas = make_grid(model, sampler, steps, grid_kind, sigma_max)
        opts = demo_sampler_options(sampler)
        for lam in dict.fromkeys((1.0, lams[sampler])):  # one row when the tuned lambda is 1
            t0 = time.time()
            images = sample_images(model, sampler, sigmas, lam, seeds, batch=batch, opts=opts, progress=True)
            stats = feature_stats(images, ext)
            row = {"sampler": label, "steps": steps, "grid": grid_kind, "lambda": lam, "fid_train": compute_fid(stats, refs["train"]), "fid_test": compute_fid(stats, refs["test"]), "seconds": round(time.time() - t0, 1)}
            rows.append(row)
            panels.append((f"{label} {'baseline' if lam == 1.0 else f'ES {lam:g}'}", images[:36]))
    # Side-by-side grid: one column of images per setting.
    _panel_grid(panels, out / "samples.png")
    report = {"model": "fmnist", "num_samples": num, "seeds": f"{seeds[0]}-{seeds[-1]}", "extractor": ext.name, "rows": rows, "seconds": round(time.time() - t_all, 1), "lambdas_from": str(ES_FILE.name)}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    table = _markdown_table(rows)
    atomic_write_text(out / "report.md", f"# epsscale demo: Fashion-MNIST, {num} samples per setting\n\n{table}\n\nFID uses the project's Fashion-MNIST classifier features; lambda chosen on other seeds ({ES_FILE.name}).\n")
    print(table)
    print(f"\nwrote {out / 'samples.png'}, {out / 'report.md'}, {out / 'report.json'} in {report['seconds']}s")
    return 0


def _markdown_table(rows: list[dict]) -> str:
    lines = ["| sampler | steps | lambda | FID vs train | FID vs test | change (test) |", "|---|---|---|---|---|---|"]
    base: dict[str, float] = {}
    for r in rows:
        if r["lambda"] == 1.0:
            base[r["sampler"]] = r["fid_test"]
            change = "baseline"
        else:
            change = f"{100 * (r['fid_test'] / base[r['sampler']] - 1):+.1f}%"
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['lambda']:g} | {r['fid_train']:.3f} | {r['fid_test']:.3f} | {change} |")
    return "\n".join(lines)


def _panel_grid(panels: list[tuple[str, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.6), squeeze=False)
    for ax, (title, ims) in zip(axes[0], panels):
        n = int(math.ceil(math.sqrt(len(ims))))
        h, w = ims.shape[1:3]
        canvas = np.full((n * (h + 1), n * (w + 1)), 255, dtype=np.uint8)
        for i, im in enumerate(ims):
            r, c = divmod(i, n)
            canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = im[..., 0]
        ax.imshow(canvas, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# 2-D toy
# ---------------------------------------------------------------------------------------------


def _toy_distance(pts: np.ndarray, ref: np.ndarray, mix: Any) -> dict[str, float]:
    """Frechet distance of the 2-D point clouds, and the RMS distance to the nearest mode."""
    from .metrics import frechet_distance

    fd = frechet_distance(pts.mean(0), np.cov(pts, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False))
    d = np.linalg.norm(pts[:, None, :] - mix.means.numpy()[None], axis=-1).min(1)
    return {"frechet": float(fd), "mode_rms": float(np.sqrt((d**2).mean()))}


def toy_demo(out: Path, *, num: int | None = None, steps: int = 20) -> int:
    from .cli import _scatter
    from .data.toy import ImperfectDenoiser, default_mixture
    from .samplers import StackedGenerator, ddpm, prior
    from .scaling import eps_scaling
    from .schedules import VPSchedule

    num = num or 4000
    out.mkdir(parents=True, exist_ok=True)
    mix = default_mixture()
    ref = mix.sample(20000, torch.Generator().manual_seed(12345)).numpy()
    sch = VPSchedule("cosine")
    sigmas = sch.grid(str(steps))
    imperfect = ImperfectDenoiser(mix)

    def run(den: Any, seeds: list[int]) -> np.ndarray:
        gen = StackedGenerator(seeds)
        x = prior(gen.randn((len(seeds), 2), dtype=torch.float64), sigmas[0], kind="vp")
        return ddpm(den, x, sigmas, noise=gen, dtype=torch.float64).numpy()

    # Choose lambda on calibration seeds, report on held-out seeds.
    cal = list(range(10**6, 10**6 + num))
    grid = [1.0 + 0.01 * k for k in range(0, 16)]
    scores = {b: _toy_distance(run(eps_scaling(imperfect, b), cal), ref, mix)["frechet"] for b in grid}
    best = min(scores, key=scores.get)
    held = list(range(num))
    results = {
        "exact denoiser": run(mix, held),
        "imperfect, baseline": run(imperfect, held),
        f"imperfect, ES {best:.2f}": run(eps_scaling(imperfect, best), held),
    }
    rows = {k: _toy_distance(v, ref, mix) for k, v in results.items()}
    lines = ["| denoiser | Frechet distance to data | RMS distance to nearest mode |", "|---|---|---|"]
    lines += [f"| {k} | {v['frechet']:.4f} | {v['mode_rms']:.4f} |" for k, v in rows.items()]
    true_rms = _toy_distance(ref, ref, mix)["mode_rms"]
    table = "\n".join(lines) + f"\n\n(data itself: RMS distance to nearest mode {true_rms:.4f}; DDPM, {steps} steps, {num} held-out seeds; lambda chosen on other seeds from {grid[0]:.2f}..{grid[-1]:.2f})"
    _scatter([(f"{k}\nFD {rows[k]['frechet']:.4f}", v) for k, v in results.items()], out / "toy.png", reference=ref[:4000])
    atomic_write_text(out / "toy_report.json", json.dumps({"steps": steps, "num": num, "lambda": best, "lambda_scores": {str(k): v for k, v in scores.items()}, "rows": rows}, indent=2) + "\n")
    atomic_write_text(out / "toy_report.md", "# epsscale demo: 2-D mixture\n\n" + table + "\n")
    print(table)
    print(f"\nwrote {out / 'toy.png'} and {out / 'toy_report.md'}")
    return 0

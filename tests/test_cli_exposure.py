"""epsscale measure / calibrate end to end on a tiny random Fashion-MNIST-shaped model."""

import json

import numpy as np
import pytest
import torch
from conftest import fid_roundoff
from safetensors.torch import save_file

from epsscale.cli import main
from epsscale.data.fashion_mnist import DEFAULT_ROOT
from epsscale.metrics import compute_fid, feature_stats, get_extractor, reference_stats
from epsscale.models.adm import create_adm_model
from epsscale.scaling import load_schedule

pytestmark = pytest.mark.skipif(not (DEFAULT_ROOT / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")

FLAGS = {"image_size": 32, "in_channels": 1, "num_channels": 32, "channel_mult": "1", "num_res_blocks": 1, "attention_resolutions": "", "learn_sigma": True, "class_cond": False, "dropout": 0.0}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_fm")
    torch.manual_seed(0)
    net = create_adm_model(FLAGS)
    with torch.no_grad():
        for p in net.parameters():  # the zero-initialised output layers would make eps = 0
            p.add_(torch.randn_like(p) * 0.02)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / "model.safetensors"))
    (d / "model.json").write_text(json.dumps({"format": "epsscale.model/1", "arch": "adm", "flags": FLAGS, "schedule": "cosine", "num_timesteps": 1000, "prediction": "eps", "learn_sigma": True, "data": "fashion-mnist", "crop": 28}))
    return d


def test_measure_writes_curves_and_json(tiny_model, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["measure", "--model", str(tiny_model), "--sampler", "ddpm", "--steps", "4", "--eps-scale", "1.01", "--num", "8", "--batch", "8", "--out", str(out)]) == 0
    doc = json.loads((out / "exposure.json").read_text())
    n = len(doc["t"])
    assert n == 3 and doc["t_kind"] == "timestep"
    for key in ("baseline", "es"):
        assert len(doc["delta_t"][key]) == n
    for key in ("training", "sampling", "sampling_es"):
        assert len(doc["eps_norm"][key]) == n
    assert (out / "delta_t.png").exists() and (out / "eps_norm.png").exists()
    assert "delta_t" in capsys.readouterr().out


def test_calibrate_norm_and_fid_write_loadable_schedules(tiny_model, tmp_path):
    out = tmp_path / "norm.json"
    assert main(["calibrate", "--model", str(tiny_model), "--sampler", "ddim", "--steps", "3", "--method", "norm", "--kind", "uniform", "--num", "8", "--batch", "8", "--out", str(out)]) == 0
    sched = load_schedule(out)
    assert sched.meta["sampler"] == "ddim" and sched.meta["steps"] == 3 and sched.meta["nfe"] > 0
    assert out.with_suffix(".png").exists()
    out2 = tmp_path / "fid.json"
    args = ["calibrate", "--model", str(tiny_model), "--sampler", "ddim", "--steps", "2", "--method", "fid", "--search", "grid", "--lo", "1.0", "--hi", "1.6", "--points", "4", "--fid-num", "16", "--batch", "16", "--out", str(out2)]
    assert main(args) == 0
    sched2 = load_schedule(out2)
    points = {float(k): v for k, v in sched2.meta["points"].items()}
    assert sorted(points) == pytest.approx([1.0, 1.2, 1.4, 1.6], abs=1e-12)  # lo + i (hi - lo) / 3
    assert out2.with_suffix(".png").exists()
    # Each score is the FID of the tuning seeds sampled at that b, computed independently here:
    # `epsscale sample` of the same seeds, then the statistics and the distance from the library.
    ext = get_extractor("fmnist")
    ref = reference_stats(ext, "fashion-mnist-train")
    seed0, num = sched2.meta["seed0"], sched2.meta["num"]
    assert num == 16
    independent = {}
    for b, score in points.items():
        npz = tmp_path / f"b{b!r}.npz"
        assert main(["sample", "--model", str(tiny_model), "--sampler", "ddim", "--steps", "2", "--seeds", f"{seed0}-{seed0 + num - 1}", "--eps-scale", repr(b), "--batch", "16", "--out", str(npz), "--quiet"]) == 0
        stats = feature_stats(np.load(npz)["arr_0"], ext)
        independent[b] = compute_fid(stats, ref)
        # The same images and features give the same statistics; what is left is the Fréchet
        # distance's own round-off (16 samples in 128 dimensions: a singular covariance).
        assert score == pytest.approx(independent[b], rel=0, abs=fid_roundoff(stats.cov, ref.cov)), b
    # The chosen b is the grid point of lowest FID, and its FID is the one reported. That point is
    # inside the grid, and the scores are far apart, so a search that kept the first or the last
    # point, or the highest score, fails here.
    best = min(independent, key=independent.get)
    assert 1.0 < best < 1.6
    assert sorted(independent.values())[1] - independent[best] > 1.0
    assert sched2.schedule.b == pytest.approx(best, abs=1e-6)  # b is written rounded to 6 decimals
    assert sched2.meta["best_fid"] == min(points.values())
    # The search resumes from its cache: a rerun evaluates nothing new and agrees.
    assert main(args) == 0
    assert load_schedule(out2).schedule.b == sched2.schedule.b


def test_calibrate_parabola_writes_the_vertex(tiny_model, tmp_path, capsys):
    out = tmp_path / "para.json"
    args = ["calibrate", "--model", str(tiny_model), "--sampler", "ddim", "--steps", "2", "--method", "fid", "--search", "parabola", "--fid-num", "8", "--batch", "8", "--spacing", "0.05", "--out", str(out)]
    assert main(args) == 0
    sched = load_schedule(out)
    pts = {float(k): v for k, v in sched.meta["points"].items()}
    assert len(pts) >= 3 and sched.meta["search"] == "parabola" and sched.meta["num"] == 8
    best = min(pts, key=pts.get)
    if sched.meta["bracketed"]:
        assert abs(sched.schedule.b - best) <= 0.025 + 1e-9  # within step/2 of the lowest point
    else:
        assert sched.schedule.b == best
    assert sched.meta["nfe"] == len(pts) * 8 * 2
    assert "parabola" in capsys.readouterr().out


def test_measure_without_lambda_runs_the_baseline_alone(tiny_model, tmp_path, capsys):
    """lambda follows the one rule of sample: 1 (off) unless given, so there is no ES curve, and the summary says how to get one."""
    assert main(["measure", "--model", str(tiny_model), "--steps", "3", "--num", "4", "--out", str(tmp_path / "m")]) == 0
    doc = json.loads((tmp_path / "m" / "exposure.json").read_text())
    assert doc["delta_t"]["es"] is None and len(doc["delta_t"]["baseline"]) == 2
    assert "--eps-scale" in capsys.readouterr().out


def test_exposure_table_prints_the_norm_ratio_of_a_measure_run(tmp_path):
    # scripts/exposure_table.py, which RESULTS.md's exposure tables come from: sampling over
    # training norm per step, and a one-line error for a folder without exposure.json.
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "exposure_table.py"
    d = {
        "t": [900, 500, 100],
        "eps_norm": {"training": [2.0, 4.0, 5.0], "sampling": [2.2, 3.0, 5.0], "sampling_es": [2.0, 4.0, 4.5]},
        "delta_t": {"baseline": [0.1, 0.2, 0.3], "es": [0.05, 0.2, 0.4]},
        "meta": {"sampler": "ddim", "steps": 3, "lam": "1.01", "start": "prior"},
    }
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "exposure.json").write_text(json.dumps(d))
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), "--every", "1"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "| ddim 3, λ = 1.01 | prior | 900 | 1.1000 | 1.0000 | 0.1 | 0.05 |" in p.stdout
    assert "| ddim 3, λ = 1.01 | prior | 500 | 0.7500 | 1.0000 | 0.2 | 0.2 |" in p.stdout
    assert "0.7500–1.1000" in p.stdout and "Σ 0.6" in p.stdout
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "nothing")], capture_output=True, text=True)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "cannot read" in p.stderr

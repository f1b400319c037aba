"""The command line: end to end on the toy mixture, and one-line errors for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from epsscale.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


def run_cli(*args, check=False):
    p = subprocess.run([sys.executable, "-m", "epsscale", *args], capture_output=True, text=True, env=ENV, timeout=300)
    return p


def test_python_m_help_lists_subcommands():
    p = run_cli("--help")
    assert p.returncode == 0
    for cmd in ("demo", "sample", "fid", "train", "measure", "calibrate"):
        assert cmd in p.stdout


def test_sample_toy_end_to_end(tmp_path):
    out = tmp_path / "toy.npz"
    assert main(["sample", "--model", "toy", "--sampler", "heun", "--steps", "12", "--disc", "karras", "--seeds", "0-99", "--eps-scale", "1.01", "--out", str(out), "--grid", str(tmp_path / "toy.png"), "--quiet"]) == 0
    pts = np.load(out)["arr_0"]
    assert pts.shape == (100, 2) and np.isfinite(pts).all()
    assert (tmp_path / "toy.png").stat().st_size > 1000
    # Same seeds, same points.
    out2 = tmp_path / "toy2.npz"
    assert main(["sample", "--model", "toy", "--sampler", "heun", "--steps", "12", "--disc", "karras", "--seeds", "50-99", "--eps-scale", "1.01", "--out", str(out2), "--quiet"]) == 0
    # Seeds 50-99 sit in other rows of other batches here: the toy mixture's float64 reductions
    # may then round differently (a few eps relative per call), and 23 network calls from
    # sigma = 80 pass that on, contracted, to points of size ~3: 1e-12 is ~1000x that.
    np.testing.assert_allclose(np.load(out2)["arr_0"], pts[50:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["sample", "--sampler", "plms", "--out", "x.npz"], "invalid choice"),
        (["sample", "--steps", "0", "--out", "x.npz"], "positive integer"),
        (["sample", "--eps-scale", "0", "--out", "x.npz"], "lambda"),
        (["sample", "--eps-scale", "-1.2", "--out", "x.npz"], "lambda"),
        (["sample", "--eps-scale", "nan", "--out", "x.npz"], "finite"),
        (["sample", "--eps-scale", "inf", "--out", "x.npz"], "finite"),
        (["sample", "--seeds", "5-2", "--out", "x.npz"], "seed"),
        (["sample", "--seeds", "a-b", "--out", "x.npz"], "seed"),
        (["sample", "--seeds", "-3", "--out", "x.npz"], "seed"),
        (["sample", "--model", "toy", "--out", "/nonexistent/dir/x.npz"], "cannot write"),
        (["sample", "--model", "toy", "--eps-schedule", "/nonexistent.json", "--out", "x.npz"], "no such schedule"),
        (["sample", "--model", "no-such-model", "--out", "x.npz"], "unknown model"),
        (["fid", "/nonexistent.npz"], "nonexistent"),
        (["train", "--run-dir", "r", "--karras-sigma-max", "25"], "--export"),
        (["train", "--run-dir", "r", "--lr", "0"], "> 0"),
        (["train", "--run-dir", "r", "--export", "m", "--karras-sigma-max", "0"], "> 0"),
        (["train", "--run-dir", "r", "--export", "m", "--karras-sigma-max", "nan"], "finite"),
    ],
)
def test_bad_input_one_line_error(args, needle, tmp_path, capsys):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = main(args)
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err.lower()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("*.npz"))


def test_bad_schedule_json_is_one_line(tmp_path, capsys):
    bad = tmp_path / "s.json"
    for payload in ("{not json", json.dumps({"format": "epsscale.schedule/1", "type": "uniform", "b": -1}), json.dumps({"format": "epsscale.schedule/1", "type": "linear", "k": "x", "b": 1})):
        bad.write_text(payload)
        assert main(["sample", "--model", "toy", "--eps-schedule", str(bad), "--out", str(tmp_path / "o.npz")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and str(bad) in err


def test_subprocess_error_has_no_traceback(tmp_path):
    p = run_cli("sample", "--model", "toy", "--eps-scale", "0", "--out", str(tmp_path / "x.npz"))
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_karras_grid_top_defaults_to_the_model_config():
    """--disc karras without --sigma-max starts at the shipped model's recommended sigma (its config's
    sampling.karras_sigma_max), an explicit value wins, and a model without one gets EDM's 80."""
    import dataclasses

    from epsscale.models.pretrained import build_plan, load_model

    m = load_model("fmnist")
    top = m.config["sampling"]["karras_sigma_max"]
    assert float(build_plan(m, sampler="heun", steps=6, disc="karras").sigmas[0]) == pytest.approx(top)
    assert float(build_plan(m, sampler="heun", steps=6, disc="karras", sigma_max=13.0).sigmas[0]) == pytest.approx(13.0)
    bare = dataclasses.replace(m, config={k: v for k, v in m.config.items() if k != "sampling"})
    assert float(build_plan(bare, sampler="heun", steps=6, disc="karras").sigmas[0]) == pytest.approx(80.0)
    assert float(build_plan(bare, sampler="heun", steps=6, disc="karras", sigma_max=1e9).sigmas[0]) == pytest.approx(float(m.schedule.sigma_max))


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_train_exports_a_model_that_loads_with_its_karras_top(tmp_path):
    from epsscale.models.pretrained import build_plan, load_model

    run, prefix = tmp_path / "run", tmp_path / "m" / "model"
    prefix.parent.mkdir()
    assert main(["train", "--run-dir", str(run), "--steps", "1", "--batch", "2", "--threads", "1", "--quiet", "--export", str(prefix), "--karras-sigma-max", "25"]) == 0
    m = load_model(prefix.parent)
    assert m.config["sampling"] == {"karras_sigma_max": 25.0} and m.config["training"]["steps_done"] == 1
    assert float(build_plan(m, sampler="euler", steps=5, disc="karras").sigmas[0]) == pytest.approx(25.0, rel=1e-12)
    # Without the option the config has no sampling block, and a Karras grid starts at the model's top (capped at 80).
    assert main(["train", "--run-dir", str(run), "--steps", "1", "--batch", "2", "--threads", "1", "--quiet", "--export", str(prefix)]) == 0
    m = load_model(prefix.parent)
    assert "sampling" not in m.config and float(build_plan(m, sampler="euler", steps=5, disc="karras").sigmas[0]) > 25.0

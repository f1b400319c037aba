"""The command line as a newcomer meets it: mistakes give one line, long runs say what they do.

Each test here is one of the frictions found by trying the CLI as a new user would.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from epsscale.cli import build_parser, main
from epsscale.cli.common import auto_batch, format_lam

needs_fmnist_data = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
COMMANDS = ("demo", "sample", "measure", "calibrate", "fid", "train")


def run(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def one_line(err: str, prefix: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


# ---------------------------------------------------------------------------------------------
# Options cannot be mistaken
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,hint",
    [
        (["sample", "--seed", "3"], "--seeds"),  # was silently --seeds 3
        (["calibrate", "--step", "20"], "--steps"),  # was the parabola's spacing
        (["sample", "--n", "8"], None),  # was --no-clip
        (["measure", "--data-sed", "3"], "--data-seed"),
    ],
)
def test_no_prefix_matching(argv, hint, tmp_path):
    code, out, err = run([*argv, "--out", tmp_path / "x.npz"])
    line = one_line(err, f"epsscale {argv[0]}: error: unrecognized arguments:")
    assert code == 2 and (hint is None or f"did you mean {hint}?" in line)
    assert not list(tmp_path.iterdir())


def test_every_parser_refuses_abbreviations():
    parsers = [build_parser(), *_subparsers().values()]
    assert all(p.allow_abbrev is False for p in parsers)


def test_every_option_has_help_and_its_default_and_every_command_a_description():
    for name, p in _subparsers().items():
        assert p.description and len(p.description) > 80, name
        text = p.format_help()
        for a in p._actions:
            if not a.option_strings or a.dest == "help":
                continue
            assert a.help, f"{name} {a.option_strings[0]} has no help line"
            shown = a.default not in (None, False, argparse.SUPPRESS) and not isinstance(a, argparse._StoreConstAction)
            if shown:
                assert "default" in a.help or f"(default: {a.default})" in text, f"{name} {a.option_strings[0]} does not state its default"


# ---------------------------------------------------------------------------------------------
# One error format
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["sample", "--model", "toy", "--steps", "0"], "positive integer"),  # argparse's own refusal
        (["sample", "--model", "toy", "--out", "/nonexistent/x.npz"], "cannot write"),  # a check in the command
        (["sample", "--model", "no-such-model"], "unknown model"),  # a ValueError from the library
        (["fid", "/nonexistent.npz"], "no such file"),
        (["train", "--run-dir", "r", "--karras-sigma-max", "25"], "--export"),
        (["calibrate", "--method", "norm", "--search", "grid"], "does not apply"),
    ],
)
def test_one_error_format_for_every_command(argv, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "--out" not in argv and argv[0] in ("sample", "calibrate"):
        argv = [*argv, "--out", tmp_path / ("x.npz" if argv[0] == "sample" else "x.json")]
    code, out, err = run(argv)
    line = one_line(err, f"epsscale {argv[0]}: error: ")
    assert code == 2 and needle in line


def test_a_schedule_that_is_a_folder_and_an_npz_that_is_not_one(tmp_path):
    (tmp_path / "d").mkdir()
    code, _, err = run(["sample", "--model", "toy", "--eps-schedule", tmp_path / "d", "--out", tmp_path / "x.npz"])
    assert code == 2 and "is a directory" in one_line(err, "epsscale sample: error:") and "Errno" not in err
    (tmp_path / "t.npz").write_text("just text")
    code, _, err = run(["fid", tmp_path / "t.npz"])
    line = one_line(err, "epsscale fid: error:")
    assert code == 2 and "not an .npz" in line and "pickle" not in line


# ---------------------------------------------------------------------------------------------
# Settings that do not apply are said, in one line
# ---------------------------------------------------------------------------------------------


def test_eta_with_euler_is_a_warning(tmp_path):
    code, _, err = run(["sample", "--model", "toy", "--sampler", "euler", "--disc", "karras", "--steps", "3", "--eta", "0.5", "--seeds", "0-3", "--quiet", "--out", tmp_path / "x.npz"])
    assert code == 0 and "--eta does not apply to --sampler euler" in one_line(err, "epsscale sample: warning:")


def test_a_new_batch_on_a_resumed_run_is_a_warning(tmp_path, monkeypatch):
    import epsscale.store as store

    _tiny_model(tmp_path / "m")
    base = ["sample", "--model", tmp_path / "m", "--steps", "2", "--seeds", "0-5", "--quiet", "--out", tmp_path / "s.npz"]
    orig, written = store.write_shard, []

    def write_then_stop(*a):  # the first run is stopped right after its first batch is saved
        orig(*a)
        written.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "write_shard", write_then_stop)
    code, _, _ = run([*base, "--batch", "2"])
    assert code == 130 and written == [1] and (tmp_path / "s.npz.parts").is_dir()
    monkeypatch.setattr(store, "write_shard", orig)
    code, _, err = run([*base, "--batch", "4"])
    assert code == 0 and "batch size 2, not 4" in one_line(err, "epsscale sample: warning:")


def test_a_refused_resume_names_the_setting(tmp_path):
    _tiny_model(tmp_path / "m")
    out = tmp_path / "s.npz"
    (tmp_path / "s.npz.parts").mkdir()
    (tmp_path / "s.npz.parts" / "run.json").write_text(json.dumps({"job": "x", "job_fields": {"sampler": "ddim", "sigmas": "a", "shape": [1, 8, 8], "prior": "vp", "lam": "1.0", "options": "{}", "model": "m"}, "seeds": "s", "labels": None}))
    code, _, err = run(["sample", "--model", tmp_path / "m", "--steps", "2", "--seeds", "0-5", "--quiet", "--out", out])
    line = one_line(err, "epsscale sample: error:")
    assert code == 2 and "sampler" in line and "grid" in line and "seed list" in line


# ---------------------------------------------------------------------------------------------
# Summaries say what was measured, what was cached, and lambda readably
# ---------------------------------------------------------------------------------------------


def test_lambda_is_printed_readably():
    from epsscale.scaling import Linear, PerSigma, Uniform

    assert format_lam(Uniform(1.0081094036317122)) == "1.0081"
    assert format_lam(1.0) == "1"
    assert format_lam(Linear(0.0025, 1.0)) == "linear (k = 0.0025, b = 1)"
    table = PerSigma(tuple(np.geomspace(0.01, 100, 40)), tuple(np.linspace(1.0, 1.02, 40)))
    assert format_lam(table) == "per-sigma table (40 knots, lambda 1 to 1.02)"


@pytest.mark.parametrize("n", [1, 2, 63, 64, 127, 128, 129, 300, 500, 1000, 5000])
def test_the_default_batch_pads_less_than_one_row_per_batch(n):
    b = auto_batch(n)
    batches = math.ceil(n / b)
    assert 1 <= b <= 128 and batches * b - n < batches
    assert batches == math.ceil(n / 128)  # as few batches as the largest batch allows


@needs_fmnist_data
def test_calibrate_says_measured_vs_predicted_and_new_vs_cached(tmp_path):
    _tiny_model(tmp_path / "m", data=True)
    argv = ["calibrate", "--model", tmp_path / "m", "--sampler", "ddim", "--steps", "2", "--fid-num", "8", "--spacing", "0.05", "--out", tmp_path / "l.json"]
    code, out, err = run(argv)
    assert code == 0, err
    assert err.count("  lambda ") >= 3  # one line per measured point
    summary = next(line for line in out.splitlines() if line.startswith("FID search"))
    doc = json.loads((tmp_path / "l.json").read_text())
    if doc["meta"]["bracketed"]:
        assert "predicted FID" in summary and "lowest measured" in summary
    assert "network evaluations" in summary and "new" in summary
    code, out, err = run(argv)  # a rerun: every point comes from the cache
    summary = next(line for line in out.splitlines() if line.startswith("FID search"))
    assert code == 0 and "from the cache: no network evaluations" in summary and "  lambda " not in err


@needs_fmnist_data
def test_norm_matching_warns_and_shows_progress(tmp_path):
    _tiny_model(tmp_path / "m", data=True)
    code, out, err = run(["calibrate", "--model", tmp_path / "m", "--sampler", "ddim", "--steps", "2", "--method", "norm", "--num", "4", "--out", tmp_path / "l.json"])
    assert code == 0
    assert "warning: norm matching" in err and "norm matching (uniform)" in err  # the warning, then the progress bar
    assert "lambda " in out and "network evaluations" in out


# ---------------------------------------------------------------------------------------------
# train: the README's command works, Ctrl-C keeps the work and says where it resumes
# ---------------------------------------------------------------------------------------------


@needs_fmnist_data
def test_train_export_inside_its_own_run_dir(tmp_path):
    run_dir = tmp_path / "runs" / "my-model"
    code, out, err = run(["train", "--run-dir", run_dir, "--steps", "1", "--batch", "2", "--quiet", "--export", run_dir / "model"])
    assert code == 0, err
    assert (run_dir / "model.safetensors").exists() and (run_dir / "model.json").exists()


@needs_fmnist_data
def test_ctrl_c_in_train_saves_and_says_where_it_resumes(tmp_path, monkeypatch):
    import os
    import signal

    from epsscale.models import train as train_mod

    real, calls = train_mod.hybrid_loss, []

    def loss(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "hybrid_loss", loss)
    code, out, err = run(["train", "--run-dir", tmp_path / "r", "--steps", "5", "--batch", "2", "--quiet"])
    line = one_line(err, "epsscale train: warning: interrupted")
    assert code == 130 and "step 2" in line and "rerun the same command" in line


def _tiny_model(d: Path, data: bool = False) -> Path:
    """A small random ADM model directory; ``data``: one that says it was trained on Fashion-MNIST (28 px)."""
    import torch
    from safetensors.torch import save_file

    from epsscale.models.adm import create_adm_model

    flags = {"image_size": 28 if data else 8, "in_channels": 1, "num_channels": 32, "channel_mult": "1", "num_res_blocks": 1, "attention_resolutions": "", "learn_sigma": True, "class_cond": False, "dropout": 0.0}
    torch.manual_seed(0)
    net = create_adm_model(flags)
    with torch.no_grad():  # ADM zero-initialises its output layer: random weights there make the net matter
        for p in net.out[-1].parameters():
            p.normal_(0.0, 0.05)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / "model.safetensors"))
    cfg = {"format": "epsscale.model/1", "arch": "adm", "flags": flags, "schedule": "cosine", "num_timesteps": 1000, "prediction": "eps", "learn_sigma": True}
    if data:
        cfg = {**cfg, "data": "fashion-mnist", "crop": 28}
    (d / "model.json").write_text(json.dumps(cfg))
    return d


@needs_fmnist_data
def test_calibrate_linear_by_fid_writes_a_linear_schedule_that_sample_reads(tmp_path):
    from epsscale.scaling import Linear, load_schedule

    _tiny_model(tmp_path / "m", data=True)
    out = tmp_path / "lin.json"
    code, stdout, err = run(["calibrate", "--model", tmp_path / "m", "--sampler", "ddim", "--steps", "3", "--fid-num", "8", "--kind", "linear", "--spacing", "0.05", "--tilt-spacing", "0.05", "--out", out])
    assert code == 0, err
    assert "  lambda linear (k = " in err and "FID search (linear" in stdout  # the progress lines name each schedule
    sched = load_schedule(out)
    assert isinstance(sched.schedule, Linear) and sched.meta["kind"] == "linear" and len(sched.meta["tilt_points"]) >= 3
    assert abs(sched.schedule.b + sched.schedule.k - sched.meta["mean"]) < 1e-9  # mean over 3 steps = b + k
    code, _, err = run(["sample", "--model", tmp_path / "m", "--sampler", "ddim", "--steps", "3", "--eps-schedule", out, "--seeds", "0-1", "--quiet", "--out", tmp_path / "s.npz"])
    assert code == 0 and not err, err
    code, _, err = run(["calibrate", "--model", tmp_path / "m", "--search", "grid", "--kind", "linear", "--out", tmp_path / "x.json"])
    assert code == 2 and "--kind does not apply" in err



def test_the_toy_is_not_clipped_unless_asked(tmp_path):
    """--clip's default is the model's convention: ADM's 1 for our models, nothing for the 2-D toy (a ring of radius 2)."""
    code, _, err = run(["sample", "--model", "toy", "--steps", "10", "--seeds", "0-199", "--quiet", "--out", tmp_path / "a.npz"])
    assert code == 0, err
    pts = np.load(tmp_path / "a.npz")["arr_0"]
    assert np.abs(pts).max() > 1.5
    code, _, err = run(["sample", "--model", "toy", "--steps", "10", "--seeds", "0-199", "--clip", "1", "--quiet", "--out", tmp_path / "b.npz"])
    assert code == 0 and np.abs(np.load(tmp_path / "b.npz")["arr_0"]).max() <= 1.0 + 1e-12


@needs_fmnist_data
def test_calibrate_and_measure_with_peer_options(tmp_path):
    """The peer methods' options are recorded (as descriptions) in the schedule JSON and cache; Time-Shift is refused by measure."""
    _tiny_model(tmp_path / "m", data=True)
    base = ["--model", tmp_path / "m", "--sampler", "ddim", "--steps", "3"]
    code, _, err = run(["calibrate", *base, "--dcw", "0.01", "--search", "grid", "--lo", "1.0", "--hi", "1.02", "--points", "2", "--fid-num", "8", "--quiet", "--out", tmp_path / "l.json"])
    assert code == 0, err
    doc = json.loads((tmp_path / "l.json").read_text())
    assert doc["meta"]["sampler_options"]["dcw"] == ["DCW", {"c": "0.01"}]
    code, _, err = run(["measure", *base, "--time-shift", "--num", "4", "--out", tmp_path / "m2"])
    assert code == 2 and "--time-shift" in one_line(err, "epsscale measure: error:")
    code, _, err = run(["measure", *base, "--labels", "1,2", "--num", "4", "--out", tmp_path / "m3"])
    assert code == 2 and "--labels is for sample" in err

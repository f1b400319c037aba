"""The peer methods on the command line: --time-shift (--ts-window, --ts-cutoff), --dcw and
--eps-schedule tsr:..., on the shipped model and a tiny guided-diffusion checkpoint."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from epsscale import TSR, DCW, TimeShift
from epsscale.cli import build_parser, common, main
from epsscale.store import job_options

BASE = ["sample", "--sampler", "ddim", "--steps", "3", "--seeds", "0-1", "--quiet"]
GD_FLAGS = "--image_size 32 --num_channels 32 --num_res_blocks 1 --num_head_channels 16 --attention_resolutions 16 --resblock_updown True --use_new_attention_order True --learn_sigma True --dropout 0.0 --use_scale_shift_norm True --class_cond False --noise_schedule cosine --diffusion_steps 1000 --timestep_respacing 10 --use_ddim True"


def plan_of(*argv):
    args = build_parser().parse_args(["sample", *argv, "--out", "x.npz"])
    return common.build_plan(args)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "b.npz"
    assert main(BASE + ["--out", str(out)]) == 0
    return np.load(out)["arr_0"]


@pytest.fixture(scope="module")
def gd_ckpt(tmp_path_factory):
    p = tmp_path_factory.mktemp("gd") / "tiny_uncond.pt"
    torch.save(load_file(str(FIXTURES / "adm_tiny" / "tiny_uncond.safetensors")), p)
    return p


@pytest.mark.parametrize(
    "extra",
    [
        ["--time-shift"],
        ["--time-shift", "--ts-window", "100", "--ts-cutoff", "0"],
        ["--dcw", "0.5"],
        ["--eps-schedule", "tsr:k=0.9,sigma=1"],
    ],
)
def test_each_option_samples_and_changes_the_samples(extra, baseline, tmp_path):
    out = tmp_path / "o.npz"
    assert main(BASE + extra + ["--out", str(out)]) == 0
    got = np.load(out)["arr_0"]
    assert got.shape == baseline.shape and got.dtype == np.uint8
    assert (got != baseline).any()


def test_all_together_with_heun_on_a_karras_grid(tmp_path):
    out = tmp_path / "o.npz"
    argv = ["sample", "--sampler", "heun", "--steps", "3", "--disc", "karras", "--seeds", "0", "--time-shift", "--dcw", "0.05", "--eps-schedule", "tsr", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert np.load(out)["arr_0"].shape == (1, 28, 28, 1)


def test_options_reach_the_plan_and_the_resume_manifest():
    plan = plan_of("--steps", "20", "--time-shift", "--dcw", "0.01", "--eps-schedule", "tsr:sigma=3")
    ts = plan.sampler_opts["time_shift"]
    assert ts == TimeShift(plan.schedule, 30, 300)  # the paper's for 20 steps
    assert plan.sampler_opts["dcw"] == DCW(0.01)
    assert plan.lam == TSR(0.95, 3.0)
    assert plan.sampler_opts["clip"] == 1.0  # the sampler's own options stay
    opts = job_options(dict(plan.sampler_opts))
    assert '"window": 30' in opts and '"cutoff": 300' in opts and '"c": "0.01"' in opts
    other = plan_of("--steps", "20", "--time-shift", "--ts-window", "8", "--ts-cutoff", "250")
    assert other.sampler_opts["time_shift"] == TimeShift(plan.schedule, 8, 250)
    assert job_options(dict(other.sampler_opts)) != job_options({**dict(plan.sampler_opts)})  # a resume would refuse
    assert plan_of("--steps", "10", "--time-shift").sampler_opts["time_shift"] == TimeShift(plan.schedule, 40, 200)
    plain = plan_of("--dcw", "0")  # 0 is off: nothing recorded, the manifest of a plain run
    assert "dcw" not in plain.sampler_opts and "time_shift" not in plain.sampler_opts


def test_guided_diffusion_takes_its_schedule_from_the_plan(gd_ckpt, tmp_path):
    plan = plan_of("--guided-diffusion", str(gd_ckpt), "--flags", GD_FLAGS, "--time-shift", "--ts-cutoff", "100", "--dcw", "0.1")
    assert plan.sampler_opts["time_shift"] == TimeShift(plan.schedule, 40, 100) and plan.schedule.kind == "cosine"
    assert plan.sampler_opts["dcw"] == DCW(0.1)
    out = tmp_path / "g.npz"
    assert main(["sample", "--guided-diffusion", str(gd_ckpt), "--flags", GD_FLAGS + " --num_samples 2", "--time-shift", "--dcw", "0.1", "--eps-schedule", "tsr", "--out", str(out), "--quiet"]) == 0
    assert np.load(out)["arr_0"].shape == (2, 32, 32, 3)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--ts-window", "8"], "--ts-window needs --time-shift"),
        (["--ts-window", "8", "--ts-cutoff", "10"], "need --time-shift"),
        (["--time-shift", "--ts-window", "-1"], "integer >= 0"),
        (["--time-shift", "--ts-window", "2.5"], "integer >= 0"),
        (["--time-shift", "--ts-cutoff", "-5"], "integer >= 0"),
        (["--time-shift", "--ts-cutoff", "1000"], "[0, 999]"),
        (["--time-shift", "--sampler", "dpmpp_2m"], "not dpmpp_2m"),
        (["--model", "toy", "--time-shift"], "discrete vp model"),
        (["--edm", "net.pkl", "--time-shift"], "discrete vp model"),
        (["--dcw", "-0.1"], ">= 0"),
        (["--dcw", "nan"], "finite"),
        (["--dcw", "inf"], "finite"),
        (["--model", "toy", "--dcw", "0.1"], "even height and width"),
        (["--eps-schedule", "tsr:k=0"], "bad schedule spec"),
        (["--eps-schedule", "tsr:q=1"], "unknown key"),
        (["--eps-schedule", "tsr:k=1", "--eps-scale", "1.01"], "not allowed with"),
    ],
)
def test_bad_values_are_one_line_errors(args, needle, tmp_path, capsys):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = main(["sample", *args, "--out", "x.npz"])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err.lower()
    assert len(err.strip().splitlines()) == 1 and err.startswith("epsscale sample: error:") and "Traceback" not in err
    assert not list(tmp_path.glob("*.npz"))


def test_toy_takes_tsr(tmp_path):
    out = tmp_path / "t.npz"
    assert main(["sample", "--model", "toy", "--sampler", "heun", "--steps", "6", "--seeds", "0-9", "--eps-schedule", "tsr:k=0.9", "--out", str(out), "--quiet"]) == 0
    assert np.isfinite(np.load(out)["arr_0"]).all()

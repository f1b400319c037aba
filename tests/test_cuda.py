"""The shipped model on a GPU: schedules, samplers, ES, seeded sampling and FID on CUDA.

Skipped without CUDA (CI has none). Run them on a GPU machine before a GPU benchmark:
``python -m pytest -q tests/test_cuda.py``. TF32 is switched off so CUDA and CPU agree to
float32 rounding.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ROOT = Path(__file__).resolve().parents[1]
SAMPLER_NAMES = ("ddpm", "ddim", "euler", "heun", "dpmpp_2m")


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="module")
def models():
    from epsscale.models.pretrained import load_model

    return load_model("fmnist"), load_model("fmnist", device="cuda")


def test_schedule_lookups_follow_the_device(models):
    sched = models[0].schedule
    s = torch.tensor([0.01, 0.5, 3.0, 150.0], dtype=torch.float64)
    t_cpu, t_gpu = sched.timestep(s), sched.timestep(s.cuda())
    assert t_gpu.device.type == "cuda"
    assert torch.equal(t_cpu, t_gpu.cpu())
    assert torch.equal(sched.round_sigma(s), sched.round_sigma(s.cuda()).cpu())


@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun"])
@pytest.mark.parametrize("lam", [1.0, 1.01])
def test_deterministic_samplers_agree_with_cpu(models, sampler, lam):
    from epsscale.models.pretrained import shipped_plan

    out = []
    x = torch.randn((4, *models[0].shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for m, dev in zip(models, ("cpu", "cuda")):
        plan = shipped_plan(sampler, 5, lam, model=m, device=dev)
        out.append(plan.run(plan.scaled_denoiser(), (x * plan.sigmas[0]).to(dev), None).cpu())
    assert torch.allclose(out[0], out[1], atol=2e-3), (out[0] - out[1]).abs().max()


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_seeded_sampling_and_fid_on_cuda(models, sampler):
    from epsscale.exposure import fid_objective
    from epsscale.metrics import get_extractor, reference_stats
    from epsscale.models.pretrained import shipped_plan
    from epsscale.sampling import sample_seeds
    from epsscale.scaling import PerSigma

    m = models[1]
    plan = shipped_plan(sampler, 4, model=m, device="cuda")
    sigmas = plan.sigmas
    sched = PerSigma(sigmas[:-1].tolist(), [1.0, 1.005, 1.01, 1.02][: len(sigmas) - 1])
    a, b = (sample_seeds(plan.replace(lam=sched), range(10), batch_size=n)[0] for n in (10, 3))
    assert a.shape == (10, 28, 28, 1) and a.dtype == np.uint8
    # Another batch shape may round the network's float32 differently: a pixel by 1 at most.
    assert np.abs(a.astype(int) - b).max() <= 1
    ext = get_extractor("fmnist", device="cuda")
    fid = fid_objective(plan, 16, 0, 8, ext, reference_stats(ext, "fashion-mnist-train"))(1.01)
    assert np.isfinite(fid) and fid > 0


def test_quality_benchmark_runs_on_cuda(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--device", "cuda", "--samplers", "ddim", "--steps", "2",
           "--num", "16", "--tune-num", "16", "--tune-points", "3", "--cache", str(tmp_path / "c.json"), "--tune-dir", str(tmp_path / "t")]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=300)
    assert len(list((tmp_path / "t").glob("*.json"))) == 1
    assert "ddim|ddim|2|1|16|0|fashion-mnist-test" in (tmp_path / "c.json").read_text()


def test_cli_sample_and_fid_on_cuda(tmp_path):
    """Every CLI path that samples or featurises picks CUDA and hands uint8 back on the CPU."""
    import pickle

    from conftest import FakeEDMNet
    from epsscale.cli import main
    from epsscale.models.adm import create_adm_model

    out = tmp_path / "fm.npz"
    assert main(["sample", "--steps", "3", "--seeds", "0-7", "--out", str(out), "--quiet"]) == 0
    assert np.load(out)["arr_0"].shape == (8, 28, 28, 1)
    assert main(["fid", str(out), "--ref", "fashion-mnist-test", "--json", "--quiet"]) == 0
    flags = {"image_size": 8, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "4", "channel_mult": "1,2", "learn_sigma": True}
    torch.save(create_adm_model(flags).state_dict(), tmp_path / "gd.pt")
    text = "--image_size 8 --num_channels 32 --num_res_blocks 1 --attention_resolutions 4 --channel_mult 1,2 --learn_sigma True --timestep_respacing 3 --num_samples 4"
    assert main(["sample", "--guided-diffusion", str(tmp_path / "gd.pt"), "--flags", text, "--out", str(tmp_path / "gd.npz"), "--quiet"]) == 0
    assert np.load(tmp_path / "gd.npz")["arr_0"].shape == (4, 8, 8, 3)
    (tmp_path / "edm.pkl").write_bytes(pickle.dumps({"ema": FakeEDMNet()}))
    with pytest.warns(UserWarning):
        assert main(["sample", "--edm", str(tmp_path / "edm.pkl"), "--allow-pickle", "--sampler", "heun", "--steps", "5", "--seeds", "0-3", "--out", str(tmp_path / "edm.npz"), "--quiet"]) == 0
    assert np.load(tmp_path / "edm.npz")["arr_0"].shape == (4, 8, 8, 3)

"""The trainer: the hybrid loss's identities, resumption, export and loading."""

import json
from pathlib import Path

import pytest
import torch

from epsscale.models.pretrained import load_model
from epsscale.models.train import TrainConfig, export_model, hybrid_loss, train
from epsscale.schedules import VPSchedule

TINY = {"image_size": 8, "in_channels": 1, "num_channels": 32, "channel_mult": "1,2", "num_res_blocks": 1, "attention_resolutions": "4", "num_head_channels": 32, "learn_sigma": True, "class_cond": False, "dropout": 0.0}


class Oracle(torch.nn.Module):
    """Returns the true eps and v = -1 (log variance = the clipped posterior's)."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x, t):
        return torch.cat([self.eps, -torch.ones_like(self.eps)], 1)


def test_hybrid_loss_vanishes_for_the_true_posterior():
    sch = VPSchedule("cosine")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(16, 1, 8, 8, generator=g)
    t = torch.randint(1, 1000, (16,), generator=g)
    loss, parts = hybrid_loss(Oracle(eps), sch, x0, t, eps)
    assert parts["mse"] == 0.0
    assert abs(parts["vb"]) < 1e-4


def test_vlb_is_rescaled_by_t_over_1000_like_improved_diffusion():
    from types import SimpleNamespace

    sch = VPSchedule("cosine", 2000)
    # The same tables, but claiming T = 1000: the only difference is the T / 1000 factor.
    as_1000 = SimpleNamespace(alphas_cumprod=sch.alphas_cumprod, betas=sch.betas, num_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 3, 700, 1999])
    net = torch.nn.Conv2d(1, 2, 3, padding=1)
    wrap = lambda x, t: net(x)  # noqa: E731
    _, a = hybrid_loss(wrap, sch, x0, t, eps)
    _, b = hybrid_loss(wrap, as_1000, x0, t, eps)
    assert a["mse"] == b["mse"] and a["vb"] == pytest.approx(2 * b["vb"], rel=1e-6) and b["vb"] > 0


def test_hybrid_loss_penalises_wrong_variance():
    sch = VPSchedule("cosine")
    x0 = torch.zeros(4, 1, 8, 8)
    eps = torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 3)  # where beta_t and the posterior variance differ most

    class WrongVar(Oracle):
        def forward(self, x, t):
            return torch.cat([self.eps, torch.ones_like(self.eps)], 1)

    _, right = hybrid_loss(Oracle(eps), sch, x0, t, eps)
    _, wrong = hybrid_loss(WrongVar(eps), sch, x0, t, eps)
    assert wrong["vb"] > right["vb"] + 1e-3


def test_resume_gives_the_same_weights_and_exports(tmp_path):
    cfg = dict(flags={**TINY, "image_size": 32, "channel_mult": "1", "attention_resolutions": ""}, batch_size=4, steps=4, save_every=2, warmup=2, lr_schedule="constant")
    train(TrainConfig(**cfg), tmp_path / "a", progress=False)
    train(TrainConfig(**cfg), tmp_path / "b", progress=False, max_seconds=0.0)  # stops after the first checkpoint
    assert json.loads((tmp_path / "b" / "loss.json").read_text())[-1]["step"] == 2
    train(TrainConfig(**cfg), tmp_path / "b", progress=False)  # resumes
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    # A run can also be extended: 2 steps, then --steps 4, is the 4-step run.
    train(TrainConfig(**{**cfg, "steps": 2}), tmp_path / "c", progress=False)
    train(TrainConfig(**cfg), tmp_path / "c", progress=False)
    c = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(a["ema"][k], c["ema"][k]) for k in a["ema"])
    with pytest.raises(ValueError, match="past --steps"):
        train(TrainConfig(**{**cfg, "steps": 2}), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match=r"different configuration \(lr: 0.0005 in the run, 0.001 now\)"):
        train(TrainConfig(**{**cfg, "lr": 1e-3}), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match=r"batch_size: 4 in the run, 8 now"):
        train(TrainConfig(**{**cfg, "batch_size": 8}), tmp_path / "b", progress=False)
    (tmp_path / "m").mkdir()
    export_model(tmp_path / "a", tmp_path / "m" / "model")
    m = load_model(tmp_path / "m")
    assert m.shape == (1, 32, 32) and m.num_classes is None
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    out = m.denoiser(x, torch.tensor([1.0, 10.0], dtype=torch.float64))
    assert out.x0.shape == x.shape and out.var_interp.shape == x.shape


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        load_model(tmp_path / "nothing")
    (tmp_path / "model.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"format": "epsscale.model/1", "arch": "adm", "flags": TINY, "schedule": "cosine", "num_timesteps": 1000, "prediction": "eps", "learn_sigma": True}))
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="cannot read safetensors"):
        load_model(tmp_path)


def test_bad_train_config():
    with pytest.raises(ValueError):
        TrainConfig(steps=0).validate()
    with pytest.raises(ValueError):
        TrainConfig(ema_decay=1.5).validate()


SMALL = dict(flags={**TINY, "image_size": 28, "channel_mult": "1", "attention_resolutions": ""}, batch_size=4, steps=6, save_every=2, warmup=2)


def test_cosine_learning_rate():
    from epsscale.models.train import learning_rate

    cfg = TrainConfig(lr=1e-3, warmup=10, steps=110)
    assert learning_rate(cfg, 0) == pytest.approx(1e-4)
    assert learning_rate(cfg, 9) == pytest.approx(1e-3)
    assert learning_rate(cfg, 10) == pytest.approx(1e-3)
    assert learning_rate(cfg, 60) == pytest.approx(0.5e-3)  # half way through the cosine
    assert learning_rate(cfg, 110) == pytest.approx(0.0, abs=1e-12)  # lr (1 + cos pi) / 2: eps lr ~ 2e-19
    assert learning_rate(TrainConfig(lr=1e-3, warmup=10, steps=110, lr_schedule="constant"), 100) == 1e-3
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step").validate()


def test_cosine_run_cannot_change_its_step_count(tmp_path):
    train(TrainConfig(**{**SMALL, "steps": 2}), tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="steps: 2 in the run, 6 now"):
        train(TrainConfig(**SMALL), tmp_path / "r", progress=False)


def test_interrupt_saves_the_step_in_flight_and_resumes_bit_identically(tmp_path, monkeypatch):
    import os
    import signal

    from epsscale.models import train as train_mod
    from epsscale.models.train import TrainingInterrupted

    train(TrainConfig(**SMALL), tmp_path / "whole", progress=False)
    calls = []
    real = train_mod.hybrid_loss

    def loss_then_ctrl_c(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C arrives during the third step, between checkpoints
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "hybrid_loss", loss_then_ctrl_c)
    with pytest.raises(TrainingInterrupted, match="checkpoint saved at step 3"):
        train(TrainConfig(**SMALL), tmp_path / "cut", progress=False)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(train_mod, "hybrid_loss", real)
    train(TrainConfig(**SMALL), tmp_path / "cut", progress=False)
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert a["log"] == [{**e, "time": a["log"][i]["time"]} for i, e in enumerate(b["log"])]  # same losses, same blocks


def test_snapshots_and_fork(tmp_path):
    run = train(TrainConfig(**SMALL), tmp_path / "base", progress=False, snapshot_every=2)
    snaps = sorted(p.name for p in (run / "snapshots").iterdir())
    assert snaps == sorted(f"{kind}_step{s:06d}.{ext}" for s in (2, 4, 6) for kind, ext in (("checkpoint", "pt"), ("ema", "safetensors")))
    # A fork from step 4 with the same configuration is the base run, step for step.
    fork = train(TrainConfig(**SMALL), tmp_path / "fork", progress=False, init_from=run / "snapshots" / "checkpoint_step000004.pt")
    a = torch.load(run / "checkpoint.pt", weights_only=True)
    b = torch.load(fork / "checkpoint.pt", weights_only=True)
    assert b["step"] == 6 and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    # With input perturbation the last two steps differ.
    ip = train(TrainConfig(**{**SMALL, "input_perturbation": 0.1}), tmp_path / "ip", progress=False, init_from=run / "snapshots" / "checkpoint_step000004.pt")
    c = torch.load(ip / "checkpoint.pt", weights_only=True)
    assert not all(torch.equal(a["ema"][k], c["ema"][k]) for k in a["ema"])
    # The same fork command again resumes it (here: it is done, so nothing changes); another source is refused.
    train(TrainConfig(**{**SMALL, "input_perturbation": 0.1}), tmp_path / "ip", progress=False, init_from=run / "snapshots" / "checkpoint_step000004.pt")
    assert torch.equal(torch.load(ip / "checkpoint.pt", weights_only=True)["ema"]["out.2.weight"], c["ema"]["out.2.weight"])
    with pytest.raises(ValueError, match="checkpoint of another run"):
        train(TrainConfig(**{**SMALL, "input_perturbation": 0.1}), tmp_path / "ip", progress=False, init_from=run / "snapshots" / "checkpoint_step000002.pt")
    with pytest.raises(ValueError, match="no such checkpoint"):
        train(TrainConfig(**SMALL), tmp_path / "x", progress=False, init_from=tmp_path / "nope.pt")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_gpu_train_script_at_toy_size_on_the_cpu(tmp_path):
    """scripts/gpu_train.sh trains the recipe and its DDPM-IP twin side by side and packs them in
    parts under 16 MiB (checkpoints while unfinished, weights and snapshots once done). What comes
    back is unpacked, committed by save_train_state.sh (the checkpoint in pieces), and a second call
    on a fresh machine resumes both runs from that commit (restore_train_state.sh)."""
    import os
    import subprocess
    import sys
    import tarfile

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "STEPS": "4", "BATCH": "2", "SNAPSHOT": "2", "KEEP": "2 4", "DEVICE": "cpu", "MINUTES": "0",
           "DATA": "/usr/share/datasets/fashion-mnist", "OUT": str(tmp_path / "out"), "RUN": "runs/gpu", "IP_RUN": "runs/gpu-ip",
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(root / "src")
    work = tmp_path / "work"
    work.mkdir()
    (work / "src").symlink_to(root / "src")
    (work / "scripts").symlink_to(root / "scripts")
    out = tmp_path / "out"
    git_env = {**env, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)

    logs = []

    def call() -> dict[str, bytes]:
        p = subprocess.run(["bash", str(root / "scripts" / "gpu_train.sh")], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        logs.append(p.stdout)
        parts = sorted(out.glob("train.tgz.part-*"))
        assert parts and all(q.stat().st_size <= 15 * 2**20 for q in parts) and len(list(out.iterdir())) <= 8
        (tmp_path / "train.tgz").write_bytes(b"".join(q.read_bytes() for q in parts))
        with tarfile.open(tmp_path / "train.tgz") as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}

    first = call()  # MINUTES=0: each run stops after its first save (the snapshot at step 2)
    for run in ("runs/gpu", "runs/gpu-ip"):
        assert json.loads(first[f"{run}/state.json"]) == {"step": 2}
        assert f"{run}/checkpoint.pt" in first and f"{run}/model.safetensors" not in first
    assert not any("snapshots" in name for name in first)
    import shutil

    # Here: unpack what came back and keep it on main; then a fresh machine has only the commit.
    shutil.rmtree(work / "runs")
    with tarfile.open(tmp_path / "train.tgz") as tar:
        tar.extractall(work, filter="data")
    p = subprocess.run(["bash", "scripts/save_train_state.sh", "runs/gpu", "runs/gpu-ip"], cwd=work, env=git_env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    tracked = subprocess.run(["git", "ls-files", "train_state"], cwd=work, capture_output=True, text=True).stdout.split()
    assert "train_state/gpu/checkpoint.pt.part-00" in tracked and not any(t.endswith("checkpoint.pt") for t in tracked)
    shutil.rmtree(work / "runs")
    env["MINUTES"] = "10"
    second = call()
    assert "runs/gpu: restored from train_state/gpu" in logs[-1] and "runs/gpu-ip: restored from train_state/gpu-ip" in logs[-1]
    # The pieces put together again are the checkpoint that came back (the trainer's own resume is tested above).
    p = subprocess.run(["bash", "scripts/restore_train_state.sh", "again/gpu"], cwd=work, capture_output=True, text=True)
    assert p.returncode == 0 and (work / "again/gpu/checkpoint.pt").read_bytes() == first["runs/gpu/checkpoint.pt"], p.stderr
    assert json.loads((work / "again/gpu/state.json").read_text()) == {"step": 2}
    for run in ("runs/gpu", "runs/gpu-ip"):
        assert json.loads(second[f"{run}/loss.json"])[-1]["step"] == 4
        assert f"{run}/model.safetensors" in second and f"{run}/checkpoint.pt" not in second
    assert "runs/gpu/snapshots/ema_step000004.safetensors" in second
    assert json.loads(second["runs/gpu-ip/train_config.json"])["input_perturbation"] == 0.1
    assert json.loads(second["runs/gpu/train_config.json"])["input_perturbation"] == 0.0
    assert json.loads(second["runs/gpu/model.json"])["training"]["steps_done"] == 4

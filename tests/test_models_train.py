"""The trainer: the hybrid loss's identities, resumption, export and loading."""

import json

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
    cfg = dict(flags={**TINY, "image_size": 32, "channel_mult": "1", "attention_resolutions": ""}, batch_size=4, steps=4, save_every=2, warmup=2)
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
    with pytest.raises(ValueError, match="different configuration"):
        train(TrainConfig(**{**cfg, "lr": 1e-3}), tmp_path / "b", progress=False)
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

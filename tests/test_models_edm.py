"""Opt-in loading of NVlabs EDM network pickles, and the loaded net inside our samplers."""

from __future__ import annotations

import pickle
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import GaussianDenoiser
from epsscale import EDMDenoiser, StackedGenerator, eps_scaling, sigmas_karras
from epsscale.models.edm import load_edm_pickle
from epsscale.samplers import euler, heun

torch.set_num_threads(1)

S = 0.5  # data standard deviation of the fake net's Gaussian data


class FakeEDMNet(nn.Module):
    """Duck-typed like EDM's ``EDMPrecond``: the exact denoiser for x0 ~ N(0, S² I)."""

    def __init__(self, label_dim: int = 0) -> None:
        super().__init__()
        self.img_channels = 3
        self.img_resolution = 4
        self.label_dim = label_dim
        self.sigma_min = 0.0
        self.sigma_max = float("inf")
        self.scale = nn.Parameter(torch.tensor(1.0))  # something to pickle
        self.calls = 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        k = S**2 / (S**2 + sigma**2)
        return (k * self.scale * x.to(torch.float32)).to(torch.float32)  # EDM returns float32


def _dump(tmp_path: Path, obj, name: str = "net.pkl") -> Path:
    path = tmp_path / name
    path.write_bytes(pickle.dumps(obj))
    return path


# ---------------------------------------------------------------------------------------------
# Refusal, warnings and errors.
# ---------------------------------------------------------------------------------------------


def test_refuses_without_opt_in(tmp_path: Path) -> None:
    path = _dump(tmp_path, {"ema": FakeEDMNet()})
    for allow in (False, 1, "yes"):
        with pytest.raises(ValueError, match="allow_pickle=True") as err:
            load_edm_pickle(path, allow_pickle=allow)  # type: ignore[arg-type]
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_edm_pickle(path)
    with pytest.raises(ValueError, match="no such file"):
        load_edm_pickle(tmp_path / "missing.pkl", allow_pickle=True)


@pytest.mark.parametrize("package", ["torch_utils", "dnnlib"])
def test_missing_edm_modules_fail_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    # A pickle that references a class of a fake EDM package, which is then made unimportable.
    pkg_root = tmp_path / "edm_repo"
    (pkg_root / package).mkdir(parents=True)
    (pkg_root / package / "__init__.py").write_text("")
    (pkg_root / package / "persistence.py").write_text(textwrap.dedent("""
        class Persistent:
            sigma_min = 0.002
    """))
    monkeypatch.syspath_prepend(str(pkg_root))
    module = __import__(f"{package}.persistence", fromlist=["Persistent"])
    path = _dump(tmp_path, {"ema": module.Persistent()})
    monkeypatch.delitem(sys.modules, f"{package}.persistence")
    monkeypatch.delitem(sys.modules, package)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(pkg_root)])

    with pytest.warns(UserWarning, match="runs code"):
        with pytest.raises(ImportError, match="PYTHONPATH") as err:
            load_edm_pickle(path, allow_pickle=True)
    message = str(err.value)
    assert "\n" not in message and package in message and "NVlabs/edm" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_rejects_pickles_without_an_edm_net(tmp_path: Path) -> None:
    with pytest.warns(UserWarning):
        with pytest.raises(ValueError, match="'ema'"):
            load_edm_pickle(_dump(tmp_path, {"net": FakeEDMNet()}), allow_pickle=True)
    with pytest.warns(UserWarning):
        with pytest.raises(ValueError, match="lacks"):
            load_edm_pickle(_dump(tmp_path, {"ema": nn.Linear(2, 2)}), allow_pickle=True)
    with pytest.warns(UserWarning):
        with pytest.raises(ValueError, match="dict"):
            load_edm_pickle(_dump(tmp_path, [1, 2]), allow_pickle=True)


# ---------------------------------------------------------------------------------------------
# A loaded (duck-typed) EDM net inside EDMDenoiser and the EDM samplers.
# ---------------------------------------------------------------------------------------------


def test_loaded_net_samples_like_the_original(tmp_path: Path) -> None:
    path = _dump(tmp_path, {"ema": FakeEDMNet(), "loss_fn": None, "augment_pipe": None})
    with pytest.warns(UserWarning, match="trust"):
        net = load_edm_pickle(path, allow_pickle=True)
    assert isinstance(net, FakeEDMNet) and net.img_resolution == 4 and net.label_dim == 0

    seeds = [0, 1, 2]
    grid = sigmas_karras(18, 0.002, 80.0, 7.0)
    shape = (len(seeds), net.img_channels, net.img_resolution, net.img_resolution)

    def sample(model, lam, sampler=heun):
        gen = StackedGenerator(seeds)
        x = gen.randn(shape).to(torch.float64) * grid[0]
        den = EDMDenoiser(model)
        return sampler(den if lam is None else eps_scaling(den, lam), x, grid, noise=gen), x

    with torch.no_grad():
        plain, x_T = sample(net, None)
        same, _ = sample(FakeEDMNet(), None)
        lam1, _ = sample(net, 1.0)
        es, _ = sample(net, 1.0005)
    assert torch.equal(plain, same)  # the loaded net is the pickled one
    assert torch.equal(plain, lam1)  # lambda == 1 is bit-identical to no ES
    assert net.calls == 3 * (2 * 18 - 1)  # Heun: NFE = 2 steps - 1 per run

    # The same run with the float64 exact denoiser of the test suite: agreement to float32.
    with torch.no_grad():
        ref = heun(eps_scaling(GaussianDenoiser(S), 1.0005), x_T, grid, noise=StackedGenerator(seeds))
    torch.testing.assert_close(es, ref, rtol=1e-5, atol=0)
    # ES moves the result by far more than that.
    assert ((es - plain).abs() / plain.abs()).min() > 1e-4

    # docs/design.md, "Reproducibility contracts" 2, on a fine grid (Heun's error is 5.5% at 18 steps, 2e-4 at 256):
    # x(0) = x(sigma_max) (s² / (s² + sigma_max²))^(1 / (2 lambda)).
    fine = sigmas_karras(256, 0.002, 80.0, 7.0)
    for lam in (1.0, 1.0005, 1.05):
        with torch.no_grad():
            out = heun(eps_scaling(EDMDenoiser(net), lam), x_T, fine)
        exact = x_T * (S**2 / (S**2 + 80.0**2)) ** (1 / (2 * lam))
        torch.testing.assert_close(out, exact, rtol=1e-3, atol=0)


def test_loaded_net_with_euler_and_labels(tmp_path: Path) -> None:
    path = _dump(tmp_path, {"ema": FakeEDMNet(label_dim=10)})
    with pytest.warns(UserWarning):
        net = load_edm_pickle(path, allow_pickle=True, device="cpu")
    gen = StackedGenerator([7, 8])
    labels = torch.eye(net.label_dim)[gen.randint(net.label_dim, (2,))]
    grid = sigmas_karras(35)
    x = gen.randn((2, 3, 4, 4)).to(torch.float64) * grid[0]
    with torch.no_grad():
        out = euler(eps_scaling(EDMDenoiser(net), 1.0034), x, grid, noise=gen, cond={"class_labels": labels})
    assert out.shape == x.shape and out.dtype == torch.float64 and bool(torch.isfinite(out).all())


def test_cli_samples_an_edm_pickle_with_a_preset(tmp_path, capsys):
    import pickle

    import numpy as np

    from conftest import FakeEDMNet
    from epsscale.cli import main

    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(pickle.dumps({"ema": FakeEDMNet()}))
    out = tmp_path / "s.npz"
    assert main(["sample", "--edm", str(pkl), "--out", str(out)]) == 2  # pickles are opt-in
    assert "allow" in capsys.readouterr().err.lower()
    with pytest.warns(UserWarning):
        code = main(["sample", "--edm", str(pkl), "--allow-pickle", "--preset", "edm-cifar10-cond", "--sampler", "heun", "--steps", "7", "--seeds", "0-5", "--out", str(out), "--quiet"])
    assert code == 0
    z = np.load(out)
    assert z["arr_0"].shape == (6, 8, 8, 3) and z["arr_1"].shape == (6,)


def test_cli_edm_options_take_effect_or_are_refused(tmp_path, capsys):
    import pickle

    import numpy as np

    from conftest import FakeEDMNet
    from epsscale.cli import main

    uncond = FakeEDMNet()
    uncond.label_dim = 0
    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(pickle.dumps({"ema": uncond}))
    base = ["sample", "--edm", str(pkl), "--allow-pickle", "--sampler", "euler", "--steps", "5", "--seeds", "0-1", "--quiet"]
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    with pytest.warns(UserWarning):
        assert main([*base, "--out", str(a)]) == 0
        assert main([*base, "--sigma-max", "20", "--out", str(b)]) == 0  # the grid's top moves
    assert not np.array_equal(np.load(a)["arr_0"], np.load(b)["arr_0"])
    capsys.readouterr()
    for extra, needle in ((["--disc", "ddim"], "Karras"), (["--labels", "1,2"], "unconditional"), (["--preset", "edm-cifar10-cond", "--steps", "13", "--s-churn", "5"], "--s-churn")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = main([*base, *extra, "--out", str(tmp_path / "c.npz")])
        err = capsys.readouterr().err
        assert code == 2 and needle in err, err
    assert not (tmp_path / "c.npz").exists()

"""Epsilon Scaling schedules and the transform."""


import pytest
import torch

from conftest import EPS64, ForbiddenDenoiser, GaussianDenoiser
from epsscale import TSR, Calibrated, Linear, PerSigma, StackedGenerator, Uniform, VPSchedule, eps_scaling, load_schedule, prior, save_schedule
from epsscale.plan import choose_lam
from epsscale.samplers import SAMPLERS
from epsscale.scaling import parse_schedule_spec, resolve_schedule, schedule_from_dict


def test_linear_indexing_follows_the_paper():
    """lambda_i = b + k i with i the respaced index and i = 0 the last (cleanest) step."""
    grid = VPSchedule("cosine").grid("20")
    bound = Linear(k=0.0025, b=1.0).bind(grid)
    lams = bound.lam(grid[:-1])
    assert lams[0].item() == pytest.approx(1.0 + 0.0025 * 19)  # first, noisiest step
    assert lams[-1].item() == pytest.approx(1.0)  # last step
    assert torch.allclose(lams, 1.0 + 0.0025 * torch.arange(19, -1, -1, dtype=torch.float64))
    assert torch.allclose(Linear(0.001, 1.0).values(3), torch.tensor([1.002, 1.001, 1.0], dtype=torch.float64))


def test_per_sigma_interpolates_in_log_sigma_and_clamps():
    ps = PerSigma((0.1, 10.0), (1.0, 1.02))
    assert ps.lam(torch.tensor([1.0])).item() == pytest.approx(1.01)  # midpoint in log sigma
    assert ps.lam(torch.tensor([0.01, 1000.0])).tolist() == pytest.approx([1.0, 1.02])
    assert PerSigma((1.0,), (1.05,)).lam(torch.tensor([0.3, 3.0])).tolist() == [1.05, 1.05]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "1.01", None])
def test_bad_lambda_fails_before_any_network_call(bad):
    with pytest.raises(ValueError):
        eps_scaling(ForbiddenDenoiser(), bad)


def test_bad_schedules():
    grid = VPSchedule("cosine").grid("20")
    with pytest.raises(ValueError, match="sigma grid"):
        eps_scaling(ForbiddenDenoiser(), Linear(0.001, 1.0))  # needs the grid
    with pytest.raises(ValueError, match="> 0"):
        eps_scaling(ForbiddenDenoiser(), Linear(-0.1, 1.0), sigmas=grid)  # negative at the first step
    for args in [((1.0,), (0.0,)), ((1.0, 2.0), (1.0,)), ((-1.0,), (1.0,)), ((1.0, 1.0), (1.0, 1.0)), ((), ())]:
        with pytest.raises(ValueError):
            PerSigma(*args)
    with pytest.raises(ValueError):
        Linear(float("nan"), 1.0)


def test_transform_is_eps_over_lambda():
    x = torch.randn(5, 3, dtype=torch.float64) * 3
    sigma = torch.full((5,), 2.0, dtype=torch.float64)
    d = GaussianDenoiser(0.5)
    eps = (x - d(x, sigma)) / sigma[:, None]
    es = eps_scaling(d, 1.02)(x, sigma)
    torch.testing.assert_close((x - es) / sigma[:, None], eps / 1.02)
    assert torch.equal(eps_scaling(d, 1.0)(x, sigma), d(x, sigma))
    # per-sample lambda from a per-sigma table
    ps = eps_scaling(d, PerSigma((1.0, 4.0), (1.0, 1.1)))
    sig = torch.tensor([1.0, 4.0, 1.0, 4.0, 2.0], dtype=torch.float64)
    out = ps(x, sig)
    lam = torch.tensor([1.0, 1.1, 1.0, 1.1, 1.05], dtype=torch.float64)
    torch.testing.assert_close((x - out) / sig[:, None], ((x - d(x, sig)) / sig[:, None]) / lam[:, None])


def test_json_round_trip(tmp_path):
    for sched in (Uniform(1.017), Linear(0.0025, 1.0), PerSigma((0.1, 1.0, 10.0), (1.0, 1.01, 1.005)), TSR(0.93, 3.0)):
        p = tmp_path / "s.json"
        save_schedule(p, sched, {"model": "m", "sampler": "ddpm", "steps": 20})
        back = load_schedule(p)
        assert isinstance(back, Calibrated) and back.schedule == sched and back.meta["steps"] == 20
        assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"format": "other", "type": "uniform", "b": 1.0},
        {"format": "epsscale.schedule/1", "type": "cubic"},
        {"format": "epsscale.schedule/1", "type": "uniform", "b": "1.0"},
        {"format": "epsscale.schedule/1", "type": "uniform", "b": 0},
        {"format": "epsscale.schedule/1", "type": "per_sigma", "sigmas": [1, 2], "lams": [1]},
        {"format": "epsscale.schedule/1", "type": "per_sigma", "sigmas": "x", "lams": [1]},
        {"format": "epsscale.schedule/1", "type": "linear", "k": None, "b": 1},
        {"format": "epsscale.schedule/1", "type": "uniform", "b": 1.0, "meta": []},
        {"format": "epsscale.schedule/1", "type": "tsr", "k": 0, "sigma": 1.0},
        {"format": "epsscale.schedule/1", "type": "tsr", "k": 0.95, "sigma": -1.0},
        {"format": "epsscale.schedule/1", "type": "tsr", "k": 0.95},
        {"format": "epsscale.schedule/1", "type": "tsr", "k": "0.95", "sigma": 1.0},
    ],
)
def test_schedule_json_validation(doc):
    with pytest.raises(ValueError):
        schedule_from_dict(doc, "s.json")


def test_numpy_and_tensor_scalars_are_numbers_and_bools_are_not():
    import numpy as np

    d = GaussianDenoiser()
    x, s = torch.ones(2, 3, dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)
    want = eps_scaling(d, 1.005)(x, s)
    for lam in (np.float64(1.005), torch.tensor(1.005, dtype=torch.float64)):
        assert torch.equal(eps_scaling(d, lam)(x, s), want)  # the same float64 lambda
    # float32(1.005) is 1.005 to within half a float32 ulp (2^-24 relative), which moves
    # x - sigma eps / lambda by at most 2^-24 |sigma eps / lambda| = 2^-24 |x - want|, plus float64
    # rounding of values of size |x|.
    tol = 2**-24 * float((x - want).abs().max()) + 4 * EPS64 * float(x.abs().max())
    torch.testing.assert_close(eps_scaling(d, np.float32(1.005))(x, s), want, rtol=0, atol=tol)
    assert Linear(np.float32(0.5), torch.tensor(1.0)) == Linear(0.5, 1.0)
    assert Uniform(np.float64(1.01)) == Uniform(1.01) and type(Uniform(np.float64(1.01)).b) is float
    for bad in (True, torch.tensor([1.0, 1.01]), "1.01", torch.tensor(True)):
        with pytest.raises(ValueError, match="number"):
            eps_scaling(d, bad)


def test_linear_refuses_a_grid_that_is_not_a_sampling_grid():
    g = torch.tensor([10.0, 2.0, 0.5, 0.0], dtype=torch.float64)
    lin = Linear(0.1, 1.0)
    # The network is evaluated at all sigmas but the last (i = 0 is the last step), also on a
    # grid that ends above 0 (part of a chain).
    assert lin.bind(g).lams == pytest.approx((1.2, 1.1, 1.0))
    assert lin.bind(g[:-1]).lams == pytest.approx((1.1, 1.0)) and lin.bind(g[:-1]).sigmas == (10.0, 2.0)
    for bad in (g.flip(0), g[1:].flip(0), torch.tensor([10.0, 10.0, 0.0]), torch.tensor([1.0, -1.0, 0.0]), torch.tensor([0.0])):
        with pytest.raises(ValueError, match="sampling grid"):
            eps_scaling(GaussianDenoiser(), lin, sigmas=bad)


def test_per_sigma_from_tensors_is_plain_floats(tmp_path):
    a = PerSigma(torch.tensor([0.1, 1.0], dtype=torch.float64), torch.tensor([1.01, 1.02], dtype=torch.float64))
    assert a == PerSigma((0.1, 1.0), (1.01, 1.02)) and all(type(v) is float for v in a.sigmas + a.lams)
    save_schedule(tmp_path / "s.json", a)
    assert load_schedule(tmp_path / "s.json").schedule == a


# ---------------------------------------------------------------------------------------------
# TSR: Temporal Score Rescaling as an ES schedule (lambda = 1 / r)
# ---------------------------------------------------------------------------------------------


def tsr_r(snr: float, k: float, s: float) -> float:
    """The paper's form, r = (snr s^2 + 1) / (snr s^2 / k + 1)."""
    return (snr * s**2 + 1) / (snr * s**2 / k + 1)


@pytest.mark.parametrize("k,s", [(0.95, 1.0), (0.93, 3.0), (1.3, 0.1)])
def test_tsr_r_matches_its_closed_form_and_limits(k, s):
    tsr = TSR(k, s)
    sig = torch.tensor([1e-3, 0.1, 0.5, 1.0, 2.0, 10.0, 80.0], dtype=torch.float64)
    want = torch.tensor([tsr_r(1 / v**2, k, s) for v in sig.tolist()], dtype=torch.float64)
    torch.testing.assert_close(tsr.r(sig), want, rtol=1e-14, atol=0)  # two float64 forms of one fraction
    torch.testing.assert_close(tsr.lam(sig), 1 / want, rtol=1e-14, atol=0)
    # Limits: snr = inf (sigma = 0) -> k; snr = 0 (sigma = inf) -> 1; monotone in between.
    assert tsr.r(torch.tensor(0.0)).item() == pytest.approx(k, rel=1e-15)
    assert tsr.r(torch.tensor(float("inf"))).item() == 1.0
    assert tsr.r(torch.tensor(1e8)).item() == pytest.approx(1.0, abs=1e-12)
    r = tsr.r(torch.logspace(-3, 3, 50, dtype=torch.float64))
    assert bool((r.diff() > 0).all()) if k < 1 else bool((r.diff() < 0).all())


def test_tsr_snr_in_vp_and_flow_units():
    """snr = abar / (1 - abar) (VP) and ((1 - t) / t)^2 (flow) give the same r at the same VE sigma."""
    tsr = TSR(0.9, 1.5)
    abar = VPSchedule("linear").alphas_cumprod[[0, 100, 500, 999]]
    sigma_vp = ((1 - abar) / abar).sqrt()
    want_vp = torch.tensor([tsr_r(a / (1 - a), 0.9, 1.5) for a in abar.tolist()], dtype=torch.float64)
    torch.testing.assert_close(tsr.r(sigma_vp), want_vp, rtol=1e-12, atol=0)
    t = torch.tensor([0.05, 0.3, 0.7, 0.99], dtype=torch.float64)
    want_flow = torch.tensor([tsr_r(((1 - v) / v) ** 2, 0.9, 1.5) for v in t.tolist()], dtype=torch.float64)
    torch.testing.assert_close(tsr.r(t / (1 - t)), want_flow, rtol=1e-12, atol=0)


def test_tsr_is_eps_times_r_and_k_one_is_the_identity():
    x = torch.randn(4, 3, dtype=torch.float64) * 2
    sig = torch.tensor([0.1, 1.0, 3.0, 30.0], dtype=torch.float64)
    d = GaussianDenoiser(0.5)
    eps = (x - d(x, sig)) / sig[:, None]
    tsr = TSR(0.9, 2.0)
    got = eps_scaling(d, tsr)(x, sig)
    torch.testing.assert_close((x - got) / sig[:, None], eps * tsr.r(sig)[:, None])
    assert resolve_schedule(tsr) is tsr and resolve_schedule(Calibrated(tsr)) is tsr
    # k = 1: lambda is exactly 1, so every sampler is bit-identical to the baseline.
    assert bool((TSR(1.0, 2.0).lam(torch.logspace(-3, 3, 20, dtype=torch.float64)) == 1).all())
    grid = VPSchedule("cosine").grid("10")
    z = StackedGenerator(range(3)).randn((3, 2))
    for name in SAMPLERS:
        x0 = prior(z, grid[0], kind="vp")
        base = SAMPLERS[name](GaussianDenoiser(0.5), x0, grid, noise=StackedGenerator(range(3)))
        assert torch.equal(SAMPLERS[name](eps_scaling(GaussianDenoiser(0.5), TSR(1.0, 3.0)), x0, grid, noise=StackedGenerator(range(3))), base)
        assert not torch.equal(SAMPLERS[name](eps_scaling(GaussianDenoiser(0.5), TSR()), x0, grid, noise=StackedGenerator(range(3))), base)


@pytest.mark.parametrize("args", [(0.0, 1.0), (-0.5, 1.0), (float("nan"), 1.0), (float("inf"), 1.0), (0.95, 0.0), (0.95, float("inf")), (True, 1.0), ("0.9", 1.0)])
def test_tsr_bad_parameters(args):
    with pytest.raises(ValueError, match="TSR"):
        TSR(*args)


def test_schedule_specs():
    assert parse_schedule_spec("tsr") == TSR(0.95, 1.0)
    assert parse_schedule_spec("tsr:") == TSR()
    assert parse_schedule_spec("tsr:k=0.95,sigma=1") == TSR(0.95, 1.0)
    assert parse_schedule_spec("tsr:sigma=3, k=0.93") == TSR(0.93, 3.0)
    assert parse_schedule_spec("tsr:k=1.1") == TSR(1.1, 1.0)
    for bad, needle in [("tsr:q=1", "unknown key 'q'"), ("tsr:k", "key=value"), ("tsr:k=x", "must be a number"), ("tsr:k=0", "> 0"),
                        ("tsr:k=1,k=2", "twice"), ("tsr:sigma=nan", "> 0"), ("tsrx", "expected tsr"), ("uniform:b=1", "expected tsr")]:
        with pytest.raises(ValueError, match=needle) as e:
            parse_schedule_spec(bad)
        assert len(str(e.value).splitlines()) == 1 and repr(bad) in str(e.value)


def test_choose_lam_reads_specs_and_files(tmp_path):
    assert choose_lam(eps_schedule="tsr:k=0.9") == (TSR(0.9, 1.0), "--eps-schedule")
    assert choose_lam(eps_schedule="tsr") == (TSR(), "--eps-schedule")
    save_schedule(tmp_path / "t.json", TSR(0.97, 2.0))
    lam, where = choose_lam(eps_schedule=str(tmp_path / "t.json"))
    assert lam.schedule == TSR(0.97, 2.0) and where == "--eps-schedule"
    with pytest.raises(ValueError, match="bad schedule spec"):
        choose_lam(eps_schedule="tsr:k=-1")
    with pytest.raises(ValueError, match="once"):
        choose_lam(eps_scale=1.01, eps_schedule="tsr")

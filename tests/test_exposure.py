"""Exposure: δ_t, ε-norm curves, the analytic variance model, norm-matching calibration, FID search."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import ForbiddenDenoiser, GaussianDenoiser
from epsscale import Prediction, StackedGenerator, VPSchedule, load_schedule, sigmas_karras
from epsscale.data import ImperfectDenoiser, default_mixture
from epsscale.exposure import (
    analytic_variance,
    calibrate_norm_matching,
    delta_t,
    eps_norms,
    exposure_json,
    fid_search,
    influence_weights,
    measure_exposure,
    plot_delta,
    plot_eps_norms,
    plot_fid_vs_b,
    write_calibrated_schedule,
)
from epsscale.plots import save_figure
from epsscale.samplers import SAMPLERS, nfe
from epsscale.scaling import Linear, PerSigma, Uniform

S = 0.5


class Oracle:
    """docs/paper.md's error model: x̂0 = x0 + γ(σ) ξ, fresh ξ every call; x0 is one fixed vector."""

    def __init__(self, x0_row, gamma, seed=123):
        self.x0_row, self.gamma = x0_row, gamma
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, x, sigma, **cond):
        xi = torch.randn(x.shape, generator=self.gen, dtype=torch.float64)
        g = self.gamma(sigma.to(torch.float64)).reshape(-1, 1)
        return (self.x0_row.expand(x.shape[0], -1) + g * xi).to(x.dtype)


class Inflated:
    """D_c = x − c(σ)·(x − D): the same x0 information, ε reported c times too large."""

    def __init__(self, inner, c):
        self.inner, self.c = inner, c

    def __call__(self, x, sigma, **cond):
        d = self.inner(x, sigma)
        c = self.c(sigma).reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype) if callable(self.c) else self.c
        return x - c * (x - d)


class EpsLog:
    """Logs the ε norms the network itself produces, call by call."""

    def __init__(self, inner):
        self.inner, self.log = inner, []

    def __call__(self, x, sigma, **cond):
        out = self.inner(x, sigma)
        eps = (x.double() - out.double()) / sigma.double().reshape(-1, *[1] * (x.ndim - 1))
        self.log.append((float(sigma[0]), eps.flatten(1).norm(dim=1)))
        return out


def gaussian_data(n, d, seed=5):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * S


def mixture_data(n, seed=0):
    return default_mixture().sample(n, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# δ_t
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler,units", [("ddpm", "vp"), ("heun", "ve")])
def test_delta_t_is_the_protocol_and_batch_invariant(sampler, units):
    """Streaming δ_t equals the protocol computed by hand on all trajectories at once."""
    den = ImperfectDenoiser(default_mixture(), gamma=0.5)
    x0 = mixture_data(40)
    grid = VPSchedule("cosine").grid("12")
    seeds = list(range(100, 140))

    # By hand: q_sample at the first step, the sampler, residual after each step.
    gen = StackedGenerator(seeds)
    x = x0 + grid[0] * gen.randn(x0.shape).double()
    states = []
    SAMPLERS[sampler](den, x, grid, noise=gen, callback=lambda info: states.append(info.x_next.double().clone()))
    std, target = [], []
    for i, s in enumerate(grid[1:-1]):
        r = states[i] - x0
        if units == "vp":
            abar = 1 / (1 + s**2)
            r, tgt = r * abar.sqrt(), (1 - abar).sqrt()
        else:
            tgt = s
        std.append(r.std(0, correction=0).mean())  # divisor N, as ADM-ES (np.std)
        target.append(tgt)
    std, target = torch.stack(std), torch.stack(target)

    for batch in (40, 7):
        res = delta_t(den, x0, grid, sampler, seeds=seeds, batch_size=batch)
        assert res.units == units and res.n == 40 and res.steps == 12 and len(res.delta) == 11
        assert torch.allclose(res.std, std, rtol=1e-10, atol=0)
        assert torch.allclose(res.target, target, rtol=1e-12)
        assert torch.allclose(res.delta, (std - target) ** 2, rtol=1e-8, atol=1e-14)
        assert torch.equal(res.sigma, grid[1:-1])
        assert res.nfe == 40 * nfe(sampler, 12)


def test_delta_t_units_differ_by_abar():
    """DDIM (η = 0) in VP units and Euler in VE units are the same chain: δ_vp = ᾱ δ_ve."""
    den = ImperfectDenoiser(default_mixture(), gamma=0.5)
    x0 = mixture_data(30)
    grid = VPSchedule("linear").grid("10")
    vp = delta_t(den, x0, grid, "ddim", sampler_opts={"dtype": torch.float64})
    ve = delta_t(den, x0, grid, "euler")
    abar = 1 / (1 + grid[1:-1] ** 2)
    assert (vp.units, ve.units) == ("vp", "ve")
    assert torch.allclose(vp.std, ve.std * abar.sqrt(), rtol=1e-9)
    assert torch.allclose(vp.delta, ve.delta * abar, rtol=1e-7, atol=1e-15)
    forced = delta_t(den, x0, grid, "euler", units="vp")
    assert torch.allclose(forced.delta, vp.delta, rtol=1e-7, atol=1e-15)


def test_delta_t_with_es_records_lambda_and_lambda_one_is_baseline():
    den = ImperfectDenoiser(default_mixture(), gamma=0.5)
    x0 = mixture_data(20)
    grid = VPSchedule("cosine").grid("8")
    base = delta_t(den, x0, grid, "ddpm")
    one = delta_t(den, x0, grid, "ddpm", lam=Uniform(1.0))
    es = delta_t(den, x0, grid, "ddpm", lam=Linear(0.01, 1.0))
    assert torch.equal(base.std, one.std)
    assert torch.equal(base.lam, torch.ones(8, dtype=torch.float64))
    assert torch.allclose(es.lam, Linear(0.01, 1.0).values(8))
    assert not torch.equal(es.std, base.std)


# ---------------------------------------------------------------------------------------------
# The analytic model, checked by Monte Carlo
# ---------------------------------------------------------------------------------------------


CASES = [
    ("ddpm", {}, dict(sampler="ddpm"), lambda s: torch.full_like(s, 0.2)),
    ("ddpm", {"variance": "fixed_large"}, dict(sampler="ddpm", variance="fixed_large"), lambda s: torch.full_like(s, 0.2)),
    ("ddpm", {}, dict(sampler="ddpm"), lambda s: 0.4 * s / (1 + s)),
    ("ddim", {}, dict(sampler="ddim"), lambda s: 0.4 * s / (1 + s)),
    ("ddim", {"eta": 0.5}, dict(sampler="ddim", eta=0.5), lambda s: torch.full_like(s, 0.2)),
    ("euler", {}, dict(sampler="euler"), lambda s: torch.full_like(s, 0.2)),
]


@pytest.mark.parametrize("sampler,opts,model,gamma", CASES)
def test_analytic_variance_matches_monte_carlo(sampler, opts, model, gamma):
    """Var(x̂_t − √ᾱ_t x0 | x0) = 1 − ᾱ_t + Δ_t with Δ_{t−1} = ct² Δ_t + c0² γ_t² (docs/paper.md, "Sampling distribution with prediction error")."""
    n, d = 3000, 8
    x0_row = torch.linspace(-0.8, 0.8, d, dtype=torch.float64)
    x0 = x0_row.expand(n, d).clone()
    grid = VPSchedule("linear").grid("20")
    res = delta_t(Oracle(x0_row, gamma), x0, grid, sampler, sampler_opts=opts, batch_size=n)
    pred = analytic_variance(grid, lambda s: gamma(s) ** 2, **model)
    var = pred.var if res.units == "vp" else pred.var_ve
    # Monte Carlo s.d. of a pixel-averaged variance: sqrt(2 / (n d)) ~ 0.9%.
    assert torch.allclose(res.var, var, rtol=0.05)
    assert float(pred.excess.min()) > 0
    assert float(pred.excess[-1]) > float(pred.excess[0])  # the excess accumulates


def test_analytic_variance_identities():
    grid = VPSchedule("cosine").grid("25")
    abar = 1 / (1 + grid[1:-1] ** 2)
    for kw in (dict(sampler="ddpm"), dict(sampler="ddim"), dict(sampler="ddim", eta=0.7), dict(sampler="euler")):
        exact = analytic_variance(grid, 0.0, **kw)  # no prediction error: the forward marginals
        assert torch.allclose(exact.var, 1 - abar, rtol=1e-12)
        assert float(exact.delta.abs().max()) < 1e-20 and exact.final_var == 0.0
    # DDIM with η = 1 is DDPM with the posterior variance.
    g2 = torch.linspace(0.01, 0.05, 25, dtype=torch.float64)
    a, b = analytic_variance(grid, g2, sampler="ddim", eta=1.0), analytic_variance(grid, g2, sampler="ddpm")
    assert torch.allclose(a.var, b.var, rtol=1e-12)
    # The final sample carries the last step's x0 error in full (c0 = 1, ct = 0 in DDPM).
    assert b.final_var == pytest.approx(0.05, rel=1e-12)
    with pytest.raises(ValueError):
        analytic_variance(grid, [0.1, 0.2])
    with pytest.raises(ValueError):
        analytic_variance(grid, -1.0)
    with pytest.raises(ValueError):
        analytic_variance(grid, 0.1, sampler="heun")


# ---------------------------------------------------------------------------------------------
# ε-norm curves
# ---------------------------------------------------------------------------------------------


def test_eps_norm_training_curve_closed_form():
    """For N(0, s²) data the exact ε is σ x/(s²+σ²): per image ‖ε‖ ≈ √(d σ²/(s²+σ²))."""
    n, d = 200, 64
    x0 = gaussian_data(n, d)
    grid = sigmas_karras(10, 0.01, 80.0)
    res = eps_norms(GaussianDenoiser(S), x0, grid, "heun")
    chi_mean = math.sqrt(2) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))
    expect = chi_mean * (grid[:-1] ** 2 / (S**2 + grid[:-1] ** 2)).sqrt()
    assert torch.allclose(res.training, expect, rtol=0.03)
    assert res.sqrt_d == 8.0
    assert res.sampling[0] == res.training[0]  # step 0: the same input, x0 + σ_0 ε
    assert res.sampling_es is None and res.lam is None
    assert res.nfe == n * (nfe("heun", 10) + 10)


def test_eps_norms_es_curves_are_raw_and_scaled():
    """ES with λ = c on D_c is the exact denoiser: its scaled curve is the exact sampling curve."""
    c = 1.07
    x0 = gaussian_data(32, 16)
    grid = VPSchedule("linear").grid("15")
    exact = eps_norms(GaussianDenoiser(S), x0, grid, "ddpm")
    res = eps_norms(Inflated(GaussianDenoiser(S), c), x0, grid, "ddpm", lam=c, batch_size=10)
    assert torch.allclose(res.sampling_es, exact.sampling, rtol=1e-6)
    assert torch.allclose(res.sampling_es_raw, c * exact.sampling, rtol=1e-6)
    assert torch.allclose(res.training, c * exact.training, rtol=1e-6)
    assert torch.equal(res.lam, torch.full((15,), c, dtype=torch.float64))


def test_eps_norms_raw_is_the_networks_own_first_call_even_with_clipping():
    """The raw ε is recorded inside ES, before clipping; Heun's correction call is not counted."""
    x0 = mixture_data(6)
    for sampler, opts, grid in (("heun", {}, sigmas_karras(6, 0.01, 20.0)), ("ddpm", {"clip": 1.0}, VPSchedule("linear").grid("6"))):
        net = EpsLog(ImperfectDenoiser(default_mixture(), gamma=0.5))
        res = eps_norms(net, x0, grid, sampler, lam=1.2, sampler_opts=opts)
        # Calls: baseline pass, ES pass, then the training curve; the ES pass's first calls per step.
        per_pass = nfe(sampler, 6)
        es_calls = net.log[per_pass : 2 * per_pass]
        firsts = es_calls[0::2] if sampler == "heun" else es_calls  # Heun: σ_i, correction at σ_{i+1}, ...
        assert [s for s, _ in firsts] == pytest.approx(grid[:-1].tolist())
        assert torch.allclose(res.sampling_es_raw, torch.stack([v.mean() for _, v in firsts]), rtol=1e-12)
        assert torch.allclose(res.sampling_es, res.sampling_es_raw / 1.2, rtol=1e-12)


def test_measure_exposure_and_json_report(tmp_path):
    den = ImperfectDenoiser(default_mixture(), gamma=0.5)
    x0 = mixture_data(24)
    sch = VPSchedule("cosine")
    grid = sch.grid("10")
    rep = measure_exposure(den, x0, grid, "ddpm", lam=1.05, batch_size=9)
    assert torch.allclose(rep.delta_baseline.std, delta_t(den, x0, grid, "ddpm").std, rtol=1e-12)
    assert torch.allclose(rep.delta_es.std, delta_t(den, x0, grid, "ddpm", lam=1.05).std, rtol=1e-12)
    sep = eps_norms(den, x0, grid, "ddpm", lam=1.05)
    for k in ("training", "sampling", "sampling_es", "sampling_es_raw"):
        assert torch.allclose(getattr(rep.eps, k), getattr(sep, k), rtol=1e-12)

    assert rep.nfe == 24 * (10 + 10 + 10)  # baseline pass, ES pass, training curve
    assert exposure_json(rep.delta_baseline, rep.delta_es, rep.eps) == {**exposure_json(rep), "meta": exposure_json(rep.delta_baseline, rep.delta_es, rep.eps)["meta"]}
    d = exposure_json(rep, schedule=sch, meta={"model": "toy"})
    d = json.loads(json.dumps(d))  # plain JSON
    assert d["format"] == "epsscale.exposure/1" and d["units"] == "vp" and d["t_kind"] == "timestep"
    assert d["t"] == sch.respace("10")[::-1][1:]  # reported states, sampling order
    n = len(d["t"])
    assert n == 9
    for block in ("std", "delta_t"):
        assert len(d[block]["baseline"]) == n and len(d[block]["es"]) == n
    for k in ("training", "sampling", "sampling_es", "sampling_es_raw"):
        assert d["eps_norm"][k] == pytest.approx(getattr(rep.eps, k)[1:].tolist())
        assert len(d["eps_norm_all_steps"][k]) == 10
    assert d["lam"] == pytest.approx([1.05] * n)
    assert d["meta"]["model"] == "toy" and d["meta"]["steps"] == 10 and d["meta"]["n"] == 24 and d["meta"]["nfe"] == rep.nfe
    assert exposure_json(rep.delta_baseline)["t_kind"] == "sigma"

    plot_delta(rep.delta_baseline, rep.delta_es, tmp_path / "delta.png")
    plot_eps_norms(rep.eps, tmp_path / "eps.png")
    plot_fid_vs_b([(1.0, 5.0), (1.01, 4.5), (1.02, 4.8)], tmp_path / "fid.png")
    for name in ("delta.png", "eps.png", "fid.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class Conditional:
    """Class-conditional toy with a learned-variance channel: x0 shifts with the label."""

    def __init__(self):
        self.inner = ImperfectDenoiser(default_mixture(), gamma=0.5)

    def __call__(self, x, sigma, class_labels=None):
        assert class_labels is not None and class_labels.shape[0] == x.shape[0]
        x0 = self.inner(x, sigma) + 0.1 * class_labels.to(x.dtype)[:, None]
        return Prediction(x0, torch.tanh(x0[:, :1]).expand_as(x0))


def test_conditioning_and_learned_variance_are_cut_per_batch():
    x0 = mixture_data(12)
    cond = {"class_labels": torch.arange(12) % 3}
    grid = VPSchedule("cosine").grid("8")
    a = measure_exposure(Conditional(), x0, grid, "ddpm", lam=1.02, cond=cond, batch_size=12)
    b = measure_exposure(Conditional(), x0, grid, "ddpm", lam=1.02, cond=cond, batch_size=5)
    assert torch.allclose(a.delta_es.std, b.delta_es.std, rtol=1e-12)
    assert torch.allclose(a.eps.training, b.eps.training, rtol=1e-12)
    # Lockstep calibration chunks the network calls (and the Prediction record) the same way.
    s1, i1 = calibrate_norm_matching(Conditional(), x0, grid, "ddpm", "per_sigma", cond=cond, batch_size=12)
    s5, i5 = calibrate_norm_matching(Conditional(), x0, grid, "ddpm", "per_sigma", cond=cond, batch_size=5)
    assert torch.allclose(i1.lam, i5.lam, rtol=1e-12)


def test_churn_moves_the_model_calls_and_the_report_follows():
    den = ImperfectDenoiser(default_mixture(), gamma=0.5)
    x0 = mixture_data(16)
    grid = sigmas_karras(8, 0.01, 20.0)
    opts = dict(s_churn=10.0, s_tmin=0.05, s_tmax=10.0)
    rep = measure_exposure(den, x0, grid, "heun", lam=1.01, sampler_opts=opts)
    assert bool((rep.eps.sigma >= grid[:-1]).all()) and bool((rep.eps.sigma > grid[:-1]).any())
    d = exposure_json(rep.delta_baseline, rep.delta_es, rep.eps)
    assert d["units"] == "ve" and d["eps_norm"]["training"] == pytest.approx(rep.eps.training[1:].tolist())
    prior_start = eps_norms(den, x0, grid, "heun", start="prior")
    assert float(prior_start.sampling[0]) != float(prior_start.training[0])


def test_arguments_are_checked_before_the_network_runs():
    x0 = torch.zeros(4, 2)
    grid = VPSchedule("linear").grid("5")
    bad = [
        dict(sampler="plms"),
        dict(lam=0.0),
        dict(lam=float("nan")),
        dict(lam=Linear(-1.0, 1.0)),
        dict(seeds=[0, 1]),
        dict(batch_size=0),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            delta_t(ForbiddenDenoiser(), x0, grid, **kw)
    with pytest.raises(ValueError):
        delta_t(ForbiddenDenoiser(), torch.zeros(1, 2), grid)
    with pytest.raises(ValueError):
        delta_t(ForbiddenDenoiser(), x0, grid, sampler_opts={"noise": None})
    with pytest.raises(ValueError):
        calibrate_norm_matching(ForbiddenDenoiser(), x0, grid, sampler_opts={"callback": print})
    with pytest.raises(ValueError):
        eps_norms(ForbiddenDenoiser(), x0, grid, start="noise")
    with pytest.raises(ValueError):
        calibrate_norm_matching(ForbiddenDenoiser(), x0, grid, kind="cubic")
    with pytest.raises(ValueError):
        calibrate_norm_matching(ForbiddenDenoiser(), x0, grid, weights=[1.0, 2.0])


# ---------------------------------------------------------------------------------------------
# Calibration by norm matching
# ---------------------------------------------------------------------------------------------

# A nearly exact sampler on Gaussian data: with the exact denoiser as the reference, the ideal λ
# for D_c is c (ES with λ = c turns D_c back into the exact denoiser).
CAL_GRID = sigmas_karras(32, 0.002, 80.0)
CAL_X0 = gaussian_data(256, 32)


@pytest.mark.parametrize("c", [1.03, 0.98])
def test_norm_matching_recovers_uniform_lambda(c):
    sched, info = calibrate_norm_matching(Inflated(GaussianDenoiser(S), c), CAL_X0, CAL_GRID, "heun", "uniform", reference=GaussianDenoiser(S))
    assert isinstance(sched, Uniform)
    assert sched.b == pytest.approx(c, rel=0.01)
    assert info.converged and abs(info.objective) < 1e-4
    assert float(info.baseline[0]) == pytest.approx(c * float(info.training[0]), rel=1e-12)  # step 0: same input
    # Network evaluations: every pass is N × NFE; the training curve N per grid σ.
    assert info.nfe == info.passes * 256 * nfe("heun", 32) + 256 * 32
    assert len(info.iterations) == info.passes <= 12


def test_norm_matching_recovers_linear_lambda():
    k, b = 0.002, 1.0
    steps = len(CAL_GRID) - 1
    i_of = {round(float(s), 12): steps - 1 - j for j, s in enumerate(CAL_GRID[:-1])}

    def c_of(sigma):
        return torch.tensor([b + k * i_of[round(float(s), 12)] for s in sigma.reshape(-1)], dtype=torch.float64)

    truth = Linear(k, b).values(steps)
    sched, info = calibrate_norm_matching(Inflated(GaussianDenoiser(S), c_of), CAL_X0, CAL_GRID, "heun", "linear", reference=GaussianDenoiser(S))
    assert isinstance(sched, Linear)
    assert info.converged
    assert float((sched.values(steps) / truth - 1).abs().max()) < 0.03
    # Where the weights put the fit (high and middle σ) it is tighter.
    w = info.weights
    assert float((w * sched.values(steps)).sum()) == pytest.approx(float((w * truth).sum()), rel=0.01)


def test_norm_matching_per_sigma():
    c = lambda s: 1.0 + 0.02 * torch.log1p(s.double())  # noqa: E731  (λ grows with σ)
    sched, info = calibrate_norm_matching(Inflated(GaussianDenoiser(S), c), CAL_X0, CAL_GRID, "heun", "per_sigma", reference=GaussianDenoiser(S))
    assert isinstance(sched, PerSigma)
    truth = c(info.sigma)
    err = (info.lam / truth - 1).abs()
    assert float(err[0]) < 1e-12  # step 0 compares identical inputs
    assert float(err[info.sigma >= 4 * S].max()) < 0.01
    assert float(err.max()) < 0.10  # low σ: finite-sample drift, amplified by ES feedback
    assert torch.allclose(sched.lam(info.sigma), info.lam)


def test_per_sigma_fixed_point_is_exact_in_one_pass():
    """Without Heun's correction call, the table reproduces the adaptive pass: residual ≡ 1."""
    den = ImperfectDenoiser(default_mixture(), gamma=0.5)
    x0 = mixture_data(64)
    grid = VPSchedule("cosine").grid("12")
    for sampler in ("ddpm", "euler"):
        sched, info = calibrate_norm_matching(den, x0, grid, sampler, "per_sigma", batch_size=16)
        assert torch.allclose(info.residual, torch.ones(12, dtype=torch.float64), rtol=1e-9)
        assert info.passes == 3 and info.converged  # baseline, adaptive, verification
        assert info.nfe == 3 * 64 * 12 + 64 * 12


def test_norm_matching_on_an_imperfect_model_meets_the_training_curve(tmp_path):
    den = ImperfectDenoiser(default_mixture(), gamma=0.5)
    x0 = mixture_data(128)
    grid = VPSchedule("cosine").grid("20")
    sched, info = calibrate_norm_matching(den, x0, grid, "ddpm", "uniform", sampler_opts={"clip": 3.0}, batch_size=50)
    assert info.converged and abs(info.objective) < 1e-4
    # The root is bracketed by the passes it made (or hit directly).
    h = [p["objective"] for p in info.iterations]
    assert min(h) <= 1e-4 and max(h) >= -1e-4
    assert info.weights.sum() == pytest.approx(1.0)
    # The first call sees the untouched starting state (residual 1/λ whatever λ): weight 0.
    assert float(info.weights[0]) == 0.0 and bool((info.weights[1:] > 0).all())
    assert abs(sched.b - 1.0) > 1e-3

    path = tmp_path / "lam.json"
    write_calibrated_schedule(path, sched, {"model": "toy", "sampler": "ddpm", "steps": 20, "n": 128, "calibration": info})
    loaded = load_schedule(path)
    assert loaded.schedule == sched
    assert loaded.meta["model"] == "toy" and loaded.meta["steps"] == 20
    assert loaded.meta["calibration"]["lam"] == pytest.approx(info.lam.tolist())
    assert loaded.meta["calibration"]["nfe"] == info.nfe
    with pytest.raises(ValueError):
        write_calibrated_schedule(path, sched, {"model": "toy"})


class FakeLockstep:
    """Stands in for the sampling passes: an objective h(b), or conditions F(b, k), and a pass count."""

    def __init__(self, h=None, F=None, steps=10):
        self.h, self.F, self.count = h, F, 1  # the baseline pass
        self.idx = torch.arange(steps - 1, -1, -1, dtype=torch.float64)

    def offset(self, k, b):
        self.count += 1
        return ("pass", b), self.h(b)

    def linear_conditions(self, k, b):
        self.count += 1
        return self.F(b, k), ("pass", b, k)


def test_norm_matching_solvers_on_synthetic_objectives():
    from epsscale.exposure.calibrate import _solve_linear, _solve_uniform, _uniform_step

    # Fixed-point step first, capped at 10% a pass until bracketed; bisection once bracketed.
    assert _uniform_step(1.0, 0.05, None, None, [(1.0, 0.05)]) == pytest.approx(math.exp(0.05))
    assert _uniform_step(1.0, 0.5, None, None, [(1.0, 0.5)]) == pytest.approx(1.1)
    assert _uniform_step(1.05, 0.01, 1.0, 0.02, [(1.0, 0.02), (1.05, 0.01), (1.2, -0.1)]) == pytest.approx(1.1)
    assert _uniform_step(1.05, 0.01, 1.0, 0.0101, [(1.0, 0.0101), (1.05, 0.01), (1.08, -0.1)]) == pytest.approx(1.065)

    h = lambda b: 2.0 * math.log(1.07 / b)  # noqa: E731  (λ feeds back: h falls twice as fast as log b)
    runner = FakeLockstep(h=h)
    b, acc, ok = _solve_uniform(runner, ("pass", 1.0), h(1.0), tol=1e-9, max_passes=12)
    assert ok and b == pytest.approx(1.07, rel=1e-8) and acc == ("pass", b)
    runner = FakeLockstep(h=h)
    b, _, ok = _solve_uniform(runner, ("pass", 1.0), h(1.0), tol=1e-12, max_passes=3)
    assert not ok and runner.count == 3  # the pass budget counts the baseline

    target = torch.tensor([1.02, 0.003], dtype=torch.float64)
    M = torch.tensor([[-1.0, -4.5], [0.2, -1.0]], dtype=torch.float64)
    runner = FakeLockstep(F=lambda b, k: M @ (torch.tensor([b, k], dtype=torch.float64) - target))
    (b, k), _, ok = _solve_linear(runner, 1.0, 0.0, tol=1e-10, max_passes=30)
    assert ok and (b, k) == (pytest.approx(1.02, abs=1e-9), pytest.approx(0.003, abs=1e-9))


def test_influence_weights():
    grid = sigmas_karras(10, 0.002, 80.0)
    w = influence_weights(grid, 0.5)
    assert w.sum() == pytest.approx(1.0) and bool((w > 0).all())
    assert float(w[-1]) < 1e-3  # the last step barely moves the sample
    with pytest.raises(ValueError):
        influence_weights(grid, 0.0)


# ---------------------------------------------------------------------------------------------
# FID search
# ---------------------------------------------------------------------------------------------


class Quadratic:
    def __init__(self, b_star=1.013, fail_after=None):
        self.b_star, self.fail_after, self.calls = b_star, fail_after, []

    def __call__(self, b):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("interrupted")
        self.calls.append(b)
        return 3.0 + 1e4 * (b - self.b_star) ** 2


def test_fid_search_golden_and_grid():
    f = Quadratic()
    res = fid_search(f, 0.99, 1.03, method="golden", tol=1e-4)
    assert res.best_b == pytest.approx(1.013, abs=1e-4)
    assert res.new_evaluations == len(f.calls) == len(res.points) < 20
    g = fid_search(Quadratic(), 0.99, 1.03, method="grid", points=5)
    assert [b for b, _ in g.points] == pytest.approx([0.99, 1.0, 1.01, 1.02, 1.03])
    assert g.best_b == pytest.approx(1.01)


@pytest.mark.parametrize("b_star, calls", [(0.9973, 3), (1.0, 3), (1.0049, 3), (1.013, 4), (1.0381, 7)])
def test_fid_search_parabola_is_exact_on_a_parabola(b_star, calls):
    # A quadratic score: the vertex is exact, from 3 points (or more when it must walk there).
    f = Quadratic(b_star)
    res = fid_search(f, 0.95, 1.05, method="parabola", start=1.0, step=0.01)
    assert res.bracketed and res.method == "parabola"
    assert res.best_b == pytest.approx(b_star, abs=1e-9)
    assert res.best_score == pytest.approx(3.0, abs=1e-7)
    assert len(f.calls) == res.new_evaluations == calls
    # The points it evaluated are all on the lattice 1 + j * 0.01.
    assert all(abs((b - 1.0) / 0.01 - round((b - 1.0) / 0.01)) < 1e-9 for b in f.calls)


def test_fid_search_parabola_walks_and_stops_at_bounds():
    # Minimum far outside [lo, hi]: walk downhill to the bound and say it is not bracketed.
    f = Quadratic(1.2)
    res = fid_search(f, 0.98, 1.04, method="parabola", start=1.0, step=0.01)
    assert not res.bracketed and res.best_b == pytest.approx(1.04)
    assert max(f.calls) == pytest.approx(1.04) and len(f.calls) == 6
    # ... or at max_evals.
    f = Quadratic(1.2)
    res = fid_search(f, 0.9, 1.5, method="parabola", max_evals=4)
    assert not res.bracketed and len(f.calls) == 4 and res.best_b == pytest.approx(1.02)
    # A flat (non-convex) triple returns the middle point.
    res = fid_search(lambda b: 5.0, 0.9, 1.1, method="parabola")
    assert res.bracketed and res.best_b == pytest.approx(1.0) and res.best_score == 5.0
    # Starting at a bound: the first three points lie inside [lo, hi].
    f = Quadratic(1.013)
    res = fid_search(f, 1.0, 1.1, method="parabola", start=1.0)
    assert min(f.calls) >= 1.0 and res.bracketed and res.best_b == pytest.approx(1.013)
    # A vertex that the three points only reach by extrapolation is not trusted: it walks.
    f = Quadratic(1.013)
    fid_search(f, 0.9, 1.1, method="parabola")
    assert sorted(f.calls) == pytest.approx([0.99, 1.0, 1.01, 1.02])
    with pytest.raises(ValueError):
        fid_search(f, 1.0, 1.1, method="parabola", start=0.9)
    with pytest.raises(ValueError):
        fid_search(f, 0.9, 1.1, method="parabola", step=0.0)
    with pytest.raises(ValueError):
        fid_search(f, 0.9, 1.1, method="parabola", max_evals=2)


def test_fid_search_parabola_needs_a_bracket_on_an_asymmetric_curve():
    # Convex, steep below the minimum at 1.04 and shallow above it (piecewise linear). The first
    # triple (10, 5, 4.9) is convex with its vertex inside it, at 1.0052, where the curve is
    # worse than the 4.9 already measured at 1.01; the search must walk on to a bracket.
    knots = [(0.99, 10.0), (1.0, 5.0), (1.01, 4.9), (1.02, 4.85), (1.03, 4.82), (1.04, 4.8), (1.05, 4.9), (1.06, 5.5)]
    f = lambda b: float(np.interp(b, *zip(*knots)))  # noqa: E731
    res = fid_search(f, 0.9, 1.1, method="parabola", start=1.0, step=0.01)
    assert res.bracketed and 1.03 < res.best_b < 1.05
    assert f(res.best_b) < 4.85
    assert sorted(b for b, _ in res.points) == pytest.approx([0.99, 1.0, 1.01, 1.02, 1.03, 1.04, 1.05])


def test_fid_search_parabola_robust_to_noise():
    # Noisy scores (FID of a few samples): the vertex stays near the optimum.
    rng = np.random.default_rng(0)
    errs = []
    for _ in range(50):
        noise = {}
        f = lambda b: 100 + 2e4 * (b - 1.007) ** 2 + noise.setdefault(round(b, 6), rng.normal(0, 0.3))  # noqa: E731
        errs.append(fid_search(f, 0.95, 1.05, method="parabola").best_b - 1.007)
    assert np.median(np.abs(errs)) < 0.002


@pytest.mark.parametrize("method", ["golden", "grid", "parabola"])
def test_fid_search_cache_resumes(tmp_path, method):
    cache = tmp_path / "fid.json"
    kw = dict(method=method, tol=1e-4, points=9, key={"model": "toy", "steps": 20})
    full = fid_search(Quadratic(), 0.99, 1.03, **kw)

    # Interrupted after 3 evaluations: those 3 are on disk.
    with pytest.raises(KeyboardInterrupt):
        fid_search(Quadratic(fail_after=3), 0.99, 1.03, cache_path=cache, **kw)
    assert len(json.loads(cache.read_text())["points"]) == 3

    # Resume: only the rest is evaluated, and the answer is the uninterrupted one.
    f = Quadratic()
    resumed = fid_search(f, 0.99, 1.03, cache_path=cache, **kw)
    assert resumed.new_evaluations == len(f.calls) == full.new_evaluations - 3
    assert resumed.cached == 3
    assert (resumed.best_b, resumed.best_score) == (full.best_b, full.best_score)
    assert resumed.points == full.points

    # A finished search replays from the cache alone.
    again = fid_search(ForbiddenEvaluate(), 0.99, 1.03, cache_path=cache, **kw)
    assert again.new_evaluations == 0 and again.points == full.points
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries

    with pytest.raises(ValueError):
        fid_search(Quadratic(), 0.99, 1.03, cache_path=cache, **{**kw, "key": {"model": "other"}})
    # A keyed cache is no answer for a search without a key, nor the other way round.
    with pytest.raises(ValueError, match="written for"):
        fid_search(Quadratic(), 0.99, 1.03, cache_path=cache, **{**kw, "key": None})
    keyless = tmp_path / "keyless.json"
    fid_search(Quadratic(), 0.99, 1.03, cache_path=keyless, **{**kw, "key": None})
    with pytest.raises(ValueError, match="written for"):
        fid_search(Quadratic(), 0.99, 1.03, cache_path=keyless, **kw)


class ForbiddenEvaluate:
    def __call__(self, b):
        raise AssertionError("evaluated a cached point")


def test_fid_search_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError):
        fid_search(Quadratic(), 1.02, 1.0)
    with pytest.raises(ValueError):
        fid_search(lambda b: float("nan"), 1.0, 1.02, method="grid", points=3)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError):
        fid_search(Quadratic(), 1.0, 1.02, cache_path=bad)
    res = fid_search(Quadratic(), 1.0, 1.02, method="grid", points=3)
    plot_fid_vs_b(res, tmp_path / "fid.png")
    rgb = check_png(tmp_path / "fid.png")
    assert is_colour(rgb, (255, 0, 0)).sum() > 50  # the red star marks the best b
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "fid.png"]  # no temporary left behind


# ---------------------------------------------------------------------------------------------
# Figures (epsscale.plots)
# ---------------------------------------------------------------------------------------------


def check_png(path, size=(600, 420)):
    """A PNG of ``size`` pixels (the report figures: 5 × 3.5 in at 120 dpi) with ink on it; its RGB."""
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == size
        rgb = np.asarray(img.convert("RGB")).astype(int)
    ink = float((rgb < 200).any(-1).mean())  # pixels clearly darker than white
    assert 0.005 < ink < 0.5, f"{path}: {ink:.1%} of the pixels are drawn on"
    return rgb


def is_colour(rgb, colour, tol=40):
    """Pixels within ``tol`` of ``colour`` in every channel."""
    return (np.abs(rgb - np.array(colour)) <= tol).all(-1)


C0, C1 = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours


def test_report_figures_are_pngs_of_the_figure_size_with_every_curve(tmp_path):
    den = ImperfectDenoiser(default_mixture(), gamma=0.5)
    rep = measure_exposure(den, mixture_data(8), VPSchedule("cosine").grid("5"), "ddpm", lam=1.05)
    plot_delta(rep.delta_baseline, rep.delta_es, tmp_path / "delta.png")
    plot_delta(rep.delta_baseline, None, tmp_path / "delta_base.png")
    plot_eps_norms(rep.eps, tmp_path / "eps.png")
    plot_fid_vs_b({1.0: 5.0, 1.01: 4.5, 1.02: 4.8}, tmp_path / "fid.png")
    # Baseline and ES curves each get their colour; without ES there is no second one.
    delta = check_png(tmp_path / "delta.png")
    assert is_colour(delta, C0).sum() > 100 and is_colour(delta, C1).sum() > 100
    assert is_colour(check_png(tmp_path / "delta_base.png"), C1).sum() == 0
    eps = check_png(tmp_path / "eps.png")
    assert is_colour(eps, C0).sum() > 100 and is_colour(eps, C1).sum() > 100
    assert is_colour(check_png(tmp_path / "fid.png"), (255, 0, 0)).sum() > 50
    # Always PNG, whatever the name says; nothing but the four files in the folder.
    plot_fid_vs_b([(1.0, 5.0), (1.01, 4.5)], tmp_path / "fid.pdf")
    check_png(tmp_path / "fid.pdf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta.png", "delta_base.png", "eps.png", "fid.pdf", "fid.png"]
    with pytest.raises(ValueError):
        plot_fid_vs_b([], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_save_figure_is_atomic_and_sized_by_the_figure(tmp_path):
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.0, 1.0), dpi=50)
    fig.add_subplot(1, 1, 1).plot([0, 1], [0, 1], linewidth=3)
    with matplotlib.rc_context({"savefig.dpi": 300}):  # the figure's dpi, not matplotlib's setting
        out = save_figure(fig, tmp_path / "a.png")
    assert out == tmp_path / "a.png"
    check_png(out, size=(100, 50))
    check_png(save_figure(fig, tmp_path / "b.png", dpi=100), size=(200, 100))
    assert save_figure(fig, tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")
    before = out.read_bytes()

    # Rendering fails: an unknown format, or a savefig that dies half-way through the file.
    with pytest.raises(ValueError):
        save_figure(fig, tmp_path / "d.nope")

    def broken(f, **kw):
        f.write(b"\x89PNG\r\n\x1a\n half an image")
        raise RuntimeError("disk full")

    fig.savefig = broken
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(fig, tmp_path / "e.png")
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(fig, out)
    assert out.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.svg"]  # no target, no temporary


def test_linear_search_finds_mean_and_tilt_of_a_known_optimum(tmp_path):
    """Two parabola searches: the uniform b, then the tilt at that mean (the paper's linear family)."""
    from epsscale.exposure import linear_from_tilt, linear_search
    from epsscale.scaling import Linear, Uniform

    def score(s):  # a bowl in (mean, tilt) with its bottom at mean 1.012, tilt 0.028 over 20 steps
        mean, tilt = (s.b, 0.0) if isinstance(s, Uniform) else (s.b + 19 * s.k / 2, 19 * s.k)
        return 5.0 + 1e4 * (mean - 1.012) ** 2 + 2e3 * (tilt - 0.028) ** 2

    res = linear_search(score, 20, cache_path=tmp_path / "c.json", key={"t": 1})
    assert abs(res.uniform.best_b - 1.012) < 1e-9 and abs(res.tilt.best_b - 0.028) < 1e-9  # exact on a parabola
    lam = res.schedule.bind(__import__("epsscale").VPSchedule("cosine").grid("20")).lams
    assert abs(sum(lam) / len(lam) - 1.012) < 1e-12 and abs((max(lam) - min(lam)) - 0.028) < 1e-12
    again = linear_search(score, 20, cache_path=tmp_path / "c.json", key={"t": 1})
    assert again.new_evaluations == 0 and again.schedule == res.schedule
    assert linear_from_tilt(1.0, 0.0, 20) == Linear(k=0.0, b=1.0)

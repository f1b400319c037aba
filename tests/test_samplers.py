"""Samplers: closed forms, identities between samplers, seed conventions, and EDM(-ES) itself."""

import math

import numpy as np
import pytest
import torch

from conftest import EPS64, CountingNoise, GaussianDenoiser
from epsscale import Prediction, StackedGenerator, VPSchedule, eps_scaling, prior, sigmas_karras
from epsscale.data import ImperfectDenoiser, default_mixture
from epsscale.samplers import SAMPLERS, ddim, ddpm, euler, heun, nfe

S = 0.5
SIGMA_MAX = 80.0


def closed_form(x_T, lam=1.0, s=S, sigma_max=SIGMA_MAX):
    """PF-ODE solution at sigma = 0 for N(0, s^2) data with uniform ES (docs/design.md, "Reproducibility contracts", 2)."""
    return x_T * (s**2 / (s**2 + sigma_max**2)) ** (1 / (2 * lam))


@pytest.mark.parametrize("lam", [1.0, 1.02])
@pytest.mark.parametrize("sampler,order", [(euler, 1), (heun, 2)])
def test_pf_ode_closed_form_and_order(sampler, order, lam):
    x_T = torch.linspace(-2, 2, 8, dtype=torch.float64).reshape(8, 1) * SIGMA_MAX
    den = eps_scaling(GaussianDenoiser(S), lam)
    errors = []
    for n in (32, 64, 128):
        grid = sigmas_karras(n, sigma_min=1e-4, sigma_max=SIGMA_MAX)
        out = sampler(den, x_T, grid, noise=StackedGenerator(range(8)))
        errors.append((out - closed_form(x_T, lam)).abs().max().item())
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert errors[-1] < (3e-2 if order == 1 else 2e-3)
    for r in rates:
        assert r == pytest.approx(order, abs=0.25)


def test_es_closed_form_differs_from_baseline():
    x_T = torch.ones(1, 1, dtype=torch.float64) * SIGMA_MAX
    grid = sigmas_karras(256, sigma_min=1e-4, sigma_max=SIGMA_MAX)
    base = heun(GaussianDenoiser(S), x_T, grid)
    es = heun(eps_scaling(GaussianDenoiser(S), 1.05), x_T, grid)
    assert es.item() > base.item()  # less shrinkage: eps / lambda removes less noise... of the ODE
    assert es.item() == pytest.approx(closed_form(x_T, 1.05).item(), rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ddim_eta0_equals_euler(dtype):
    sch = VPSchedule("cosine")
    grid = sch.grid("25")
    den = ImperfectDenoiser(default_mixture(), gamma=0.3)
    x = prior(StackedGenerator(range(16)).randn((16, 2), dtype=dtype), grid[0], kind="vp")
    a = ddim(den, x, grid, eta=0.0, dtype=dtype)
    b = euler(den, x, grid)
    if dtype == torch.float64:
        # Two algebraically equal updates (VP and VE coordinates) round differently, each step
        # at the scale of the state, which starts at |x_T| ~ sigma_max |z| ~ 4e4; the ODE does not
        # amplify an error made on the way (it contracts it): 25 steps x eps x max|x_T|, ~2e-10
        # (measured 1e-13 on outputs of size ~2; a wrong update is off by ~1e-2).
        tol = 25 * EPS64 * float(x.abs().max())
        torch.testing.assert_close(a, b, rtol=0, atol=tol)
    else:
        # DDIM's float32 state against Euler's float64 one: float32 rounding of outputs of size ~2,
        # ~25 steps of it (measured 3e-7).
        assert torch.allclose(a.to(torch.float64), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name,opts,draws",
    [
        ("ddpm", {}, 12),
        ("ddim", {"eta": 0.5}, 12),
        ("ddim", {}, 0),
        ("euler", {"s_churn": 5.0, "s_tmin": 0.5, "s_tmax": 2.0}, 12),  # every step, as EDM, window or not
        ("euler", {}, 0),
        ("heun", {"s_churn": 5.0}, 12),
        ("heun", {"s_churn": 5.0, "s_noise": 0.0}, 0),
        ("heun", {}, 0),
        ("dpmpp_2m", {}, 0),
    ],
)
def test_noise_draws_per_step_and_nfe(name, opts, draws):
    """One draw per step for a stochastic run (also steps that mask it), none for a deterministic one."""
    den = GaussianDenoiser(S)
    grid = VPSchedule("linear").grid("12")
    noise = CountingNoise(StackedGenerator([0, 1]))
    SAMPLERS[name](den, torch.randn(2, 3, dtype=torch.float64), grid, noise=noise, **opts)
    assert noise.calls == draws
    assert den.calls == nfe(name, 12)


STOCHASTIC = {
    "ddpm": dict(),
    "ddim": dict(eta=1.0),
    "euler": dict(s_churn=20.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003),
    "heun": dict(s_churn=20.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003),
    "dpmpp_2m": dict(),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_batch_size_invariance(name):
    """A sample depends only on its seed (docs/design.md, "Reproducibility contracts", 4)."""
    den = eps_scaling(ImperfectDenoiser(default_mixture(), gamma=0.3), 1.01)
    grid = VPSchedule("cosine").grid("10")
    seeds = list(range(7))

    def run(batch):
        outs = []
        for i in range(0, len(seeds), batch):
            gen = StackedGenerator(seeds[i : i + batch])
            x = prior(gen.randn((len(gen), 2)), grid[0], kind="vp")
            outs.append(SAMPLERS[name](den, x, grid, noise=gen, **STOCHASTIC[name]))
        return torch.cat(outs)

    # Same noise for every batch size; only floating-point reduction order may differ in the net
    # (the mixture's float64 matmuls and sums change kernel with the batch shape): a few eps
    # relative per call, over 10 steps of a contracting sampler. Measured: 3e-16 relative
    # (5.7e-13 on Heun's churned states of size ~2e3); rtol 1e-12 leaves 1000x.
    full = run(7)
    for b in (1, 3):
        assert torch.allclose(run(b), full, rtol=1e-12, atol=1e-12)


class WithVariance:
    """A denoiser that also returns a learned-variance channel."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, x, sigma, **cond):
        x0 = self.inner(x, sigma)
        return Prediction(x0, torch.tanh(x0 * 3))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_lambda_one_is_bit_identical(name):
    den = WithVariance(ImperfectDenoiser(default_mixture(), gamma=0.3))
    grid = VPSchedule("cosine").grid("15")
    z = StackedGenerator(range(5)).randn((5, 2))
    x = prior(z, grid[0], kind="vp")
    opts = STOCHASTIC[name]
    base = SAMPLERS[name](den, x, grid, noise=StackedGenerator(range(5)), **opts)
    same = SAMPLERS[name](eps_scaling(den, 1.0), x, grid, noise=StackedGenerator(range(5)), **opts)
    assert torch.equal(base, same)
    other = SAMPLERS[name](eps_scaling(den, 1.01), x, grid, noise=StackedGenerator(range(5)), **opts)
    assert not torch.equal(base, other)


def test_es_never_touches_learned_variance():
    den = WithVariance(ImperfectDenoiser(default_mixture(), gamma=0.3))
    x = torch.randn(4, 2)
    s = torch.full((4,), 3.0, dtype=torch.float64)
    a, b = den(x, s), eps_scaling(den, 1.2)(x, s)
    assert torch.equal(a.var_interp, b.var_interp)
    assert torch.allclose((x - b.x0), (x - a.x0) / 1.2, atol=1e-6)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_variance_follows_its_gaussian_recursion(variance):
    """For N(0, s^2) data everything stays Gaussian: Var' = (c0 k + ct)^2 Var + var_t, exactly.

    (k maps x_t to the exact x0 prediction.) A Monte Carlo run of the sampler must agree.
    """
    sch = VPSchedule("linear")
    grid = sch.grid("50")
    v = 1.0  # the VP prior
    for i in range(len(grid) - 1):
        a_t, a_p = 1 / (1 + grid[i] ** 2), 1 / (1 + grid[i + 1] ** 2)
        beta = 1 - a_t / a_p
        k = S**2 / (S**2 + grid[i] ** 2) / a_t.sqrt()
        c0, ct = a_p.sqrt() * beta / (1 - a_t), (1 - beta).sqrt() * (1 - a_p) / (1 - a_t)
        step_var = beta * (1 - a_p) / (1 - a_t) if variance == "fixed_small" else beta
        v = (c0 * k + ct) ** 2 * v + (step_var if grid[i + 1] > 0 else 0)
    n = 4000
    gen = StackedGenerator(range(n))
    x = prior(gen.randn((n, 4)), grid[0], kind="vp")
    out = ddpm(GaussianDenoiser(S), x, grid, noise=gen, variance=variance)
    assert out.var().item() == pytest.approx(v.item(), rel=0.04)
    assert out.mean().abs().item() < 0.02


def test_clipping_bounds_x0():
    seen = []
    grid = VPSchedule("linear").grid("10")
    x = prior(torch.randn(8, 2, dtype=torch.float64) * 3, grid[0], kind="vp")
    ddpm(lambda x, s: x * 2, x, grid, clip=1.0, callback=lambda info: seen.append(info.denoised.abs().max().item()))
    assert max(seen) <= 1.0


def test_bad_grid_and_options():
    den = GaussianDenoiser(S)
    x = torch.randn(2, 2, dtype=torch.float64)
    for bad in (torch.tensor([1.0]), torch.tensor([1.0, 2.0, 0.0]), torch.tensor([float("nan"), 0.0])):
        with pytest.raises(ValueError):
            euler(den, x, bad)
    with pytest.raises(ValueError):
        ddim(den, x, sigmas_karras(4), eta=-1.0)
    with pytest.raises(ValueError):
        heun(den, x, sigmas_karras(4), s_churn=float("nan"))
    with pytest.raises(ValueError):
        nfe("plms", 10)
    with pytest.raises(ValueError):
        StackedGenerator([0, 1]).randn((3, 2))


def test_callback_reports_every_step():
    infos = []
    grid = sigmas_karras(6)
    heun(GaussianDenoiser(S), torch.randn(3, 2, dtype=torch.float64) * 80, grid, callback=infos.append)
    assert [i.index for i in infos] == list(range(6))
    assert torch.allclose(infos[0].eps, (infos[0].x - infos[0].denoised) / grid[0])
    with pytest.raises(Exception):
        infos[0].index = 3  # frozen


# ---------------------------------------------------------------------------------------------
# NVlabs EDM / EDM-ES reference, transcribed as an oracle from the published algorithm
# (edm_sampler with EDM-ES's eps_scaler; Euler = the ablation sampler with solver='euler').
# ---------------------------------------------------------------------------------------------


class RefStackedRandomGenerator:
    def __init__(self, seeds):
        self.gens = [torch.Generator().manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn(self, size, **kw):
        return torch.stack([torch.randn(size[1:], generator=g, **kw) for g in self.gens])

    def randn_like(self, x):
        return self.randn(x.shape, dtype=x.dtype)


class EDMNetFromDenoiser:
    """An EDM-style net around the mixture denoiser: net(x, sigma, labels), 0-d sigma allowed."""

    sigma_min, sigma_max = 0.0, float("inf")

    def __init__(self, den):
        self.den = den

    def round_sigma(self, s):
        return torch.as_tensor(s)

    def __call__(self, x, sigma, labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return self.den(x, sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(-1))


def edm_es_reference(net, latents, randn_like, num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise, eps_scaler, solver):
    steps = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho) + steps / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur)
        denoised = net(x_hat, t_hat).to(torch.float64)
        eps = (x_hat - denoised) / t_hat / eps_scaler
        denoised = x_hat - eps * t_hat
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if solver == "heun" and i < num_steps - 1:
            denoised = net(x_next, t_next).to(torch.float64)
            eps = (x_next - denoised) / t_next / eps_scaler
            denoised = x_next - eps * t_next
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@pytest.mark.parametrize("solver", ["heun", "euler"])
@pytest.mark.parametrize("lam", [1.0, 1.0034, 0.9985])
@pytest.mark.parametrize("churn", [dict(S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0), dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003)])
def test_matches_edm_es_seed_for_seed(solver, lam, churn):
    mix = ImperfectDenoiser(default_mixture(), gamma=0.4)
    net = EDMNetFromDenoiser(mix)
    seeds = [0, 1, 2, 3, 1000, 2**33 + 5]
    steps = 18
    ref_rng = RefStackedRandomGenerator(seeds)
    latents = ref_rng.randn([len(seeds), 2])
    ref = edm_es_reference(net, latents, ref_rng.randn_like, steps, 0.002, 80.0, 7.0, churn["S_churn"], churn["S_min"], churn["S_max"], churn["S_noise"], lam, solver)

    from epsscale import EDMDenoiser

    gen = StackedGenerator(seeds)
    x = prior(gen.randn((len(seeds), 2)), 80.0)
    den = eps_scaling(EDMDenoiser(net), lam)
    sampler = heun if solver == "heun" else euler
    ours = sampler(den, x, sigmas_karras(steps), noise=gen, s_churn=churn["S_churn"], s_tmin=churn["S_min"], s_tmax=churn["S_max"], s_noise=churn["S_noise"])
    assert ours.dtype == torch.float64
    # The reference's algebra (eps divided, then x0 rebuilt) rounds differently from ours, by a
    # few eps of the state per step; the ODE contracts what is made at high sigma, so the outputs
    # (size ~2) differ by ~35 calls x few eps (measured 1.6e-15): 1e-12 leaves 500x.
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)


def test_heun_on_part_of_a_chain_is_second_order_throughout():
    # EDM skips the correction on the step to sigma = 0 only; a grid that stops above 0 is Heun
    # on every step, so running it in two pieces gives the same state.
    d = GaussianDenoiser()
    x = torch.randn(4, 3, dtype=torch.float64)
    g = torch.tensor([10.0, 1.0, 0.5], dtype=torch.float64)
    whole = heun(d, x, g)
    # The same two Heun steps on the same tensors, in one call or two: bit-identical.
    assert torch.equal(heun(d, heun(d, x, g[:2]), g[1:]), whole)
    x_T = x * 10.0
    exact = x_T * ((S**2 + 0.5**2) / (S**2 + 10.0**2)) ** 0.5  # the PF-ODE's closed form at sigma 0.5
    err = [(heun(d, x_T, torch.linspace(10.0, 0.5, n + 1, dtype=torch.float64)) - exact).abs().max() for n in (40, 80)]
    assert err[0] / err[1] > 3.5  # and it converges at order 2 to the closed form


def test_sampler_options_must_make_sense():
    d = GaussianDenoiser()
    x = torch.randn(2, 3, dtype=torch.float64)
    g = VPSchedule("cosine").grid("5")
    for clip in (0.0, -1.0, float("nan"), float("inf"), True):
        for sampler in (ddpm, ddim):
            with pytest.raises(ValueError, match="clip"):
                sampler(d, x, g, clip=clip)
    for bad in (float("nan"), -1.0, True):
        with pytest.raises(ValueError, match="s_tmax"):
            heun(d, x, sigmas_karras(4), s_churn=1.0, s_tmin=0.0, s_tmax=bad)
    with pytest.raises(ValueError, match="s_churn"):
        heun(d, x, sigmas_karras(4), s_churn=True)
    for bad in (-80.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="sigma_max"):
            prior(x, bad)

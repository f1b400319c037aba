"""PFGM++ prior: the radius law, the Gaussian limit D -> infinity, per-seed draws, and ES with it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import EPS64, GaussianDenoiser
from epsscale import StackedGenerator, eps_scaling, sigmas_karras
from epsscale.pfgmpp import betaprime_ppf, pfgmpp_noise, pfgmpp_prior, pfgmpp_prior_from_normal, r_to_sigma, sigma_to_r
from epsscale.samplers import euler, heun

torch.set_num_threads(1)


def _radius2_over_r2(x: torch.Tensor, sigma: float, D: int) -> np.ndarray:
    return (x.flatten(1).norm(dim=1) ** 2 / (sigma**2 * D)).numpy()


# ---------------------------------------------------------------------------------------------
# The radius law: R² / r² ~ BetaPrime(N/2, D/2), direction uniform.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "D", "sigma"), [((3, 8, 8), 128, 80.0), ((1, 4, 4), 1, 2.5), ((2, 3, 3), 2048, 0.3)])
def test_radius_follows_beta_prime(shape: tuple[int, ...], D: int, sigma: float) -> None:
    n = 3000
    x = pfgmpp_prior((n, *shape), sigma, D, generator=StackedGenerator(range(n)))
    assert x.shape == (n, *shape) and x.dtype == torch.float64
    N = math.prod(shape)
    ks = stats.kstest(_radius2_over_r2(x, sigma, D), stats.betaprime(N / 2, D / 2).cdf)
    assert ks.pvalue > 0.01, ks


def test_radius_density_is_the_kernel_marginal() -> None:
    """p(R) ∝ R^(N-1) / (R² + r²)^((N+D)/2), integrated numerically, against the empirical CDF."""
    N, D, r = 12, 6, 1.7
    n = 3000
    x = pfgmpp_noise((n, N), r / math.sqrt(D), D, generator=StackedGenerator(range(10_000, 10_000 + n)))
    radii = x.norm(dim=1).numpy()
    grid = np.linspace(0, 60, 200_001)
    log_p = (N - 1) * np.log(np.maximum(grid, 1e-300)) - (N + D) / 2 * np.log(grid**2 + r**2)
    pdf = np.exp(log_p - log_p.max())
    cdf = np.concatenate([[0], np.cumsum((pdf[1:] + pdf[:-1]) / 2)])
    cdf /= cdf[-1]  # the tail beyond 60 r/1.7 holds < 1e-6 of the mass for these N, D
    ks = stats.kstest(radii, lambda v: np.interp(v, grid, cdf))
    assert ks.pvalue > 0.01, ks


def test_direction_is_uniform() -> None:
    n, N = 3000, 20
    x = pfgmpp_prior((n, N), 5.0, 16, generator=StackedGenerator(range(n)))
    u1 = (x[:, 0] / x.norm(dim=1)).numpy()
    # One coordinate of a uniform unit vector: u1² ~ Beta(1/2, (N-1)/2), sign symmetric.
    assert stats.kstest(u1**2, stats.beta(0.5, (N - 1) / 2).cdf).pvalue > 0.01
    assert abs(np.mean(np.sign(u1))) < 4 / math.sqrt(n)


def test_betaprime_ppf_inverts_the_cdf() -> None:
    u = np.array([1e-12, 1e-6, 0.01, 0.3, 0.5, 0.7, 0.99, 1 - 1e-6, 1 - 2**-40])
    for a, b in [(1536, 64), (8, 0.5), (384, 5e6), (0.5, 0.5)]:
        q = betaprime_ppf(u, a, b)
        assert np.all(np.diff(q) > 0)
        np.testing.assert_allclose(stats.betaprime(a, b).cdf(q), u, rtol=1e-6)
        np.testing.assert_allclose(stats.betaprime(a, b).sf(q[u > 0.5]), 1 - u[u > 0.5], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# D -> infinity is EDM's Gaussian prior; small D is not.
# ---------------------------------------------------------------------------------------------


def test_large_D_recovers_the_gaussian_prior() -> None:
    n, shape, sigma = 1000, (3, 16, 16), 80.0
    N = math.prod(shape)
    big = pfgmpp_prior((n, *shape), sigma, 10**7, generator=StackedGenerator(range(n)))
    small = pfgmpp_prior((n, *shape), sigma, 8, generator=StackedGenerator(range(n)))

    # R / (sigma sqrt(N)) -> 1 with the chi spread 1/sqrt(2N) ≈ 0.026; small D spreads far wider.
    rho_big = (big.flatten(1).norm(dim=1) / (sigma * math.sqrt(N))).numpy()
    rho_small = (small.flatten(1).norm(dim=1) / (sigma * math.sqrt(N))).numpy()
    assert abs(np.median(rho_big) - 1) < 0.01 and rho_big.std() < 0.04
    assert rho_small.std() > 0.2
    # R² / sigma² ~ chi²_N in the limit.
    assert stats.kstest(rho_big**2 * N, stats.chi2(N).cdf).pvalue > 0.01
    assert stats.kstest(rho_small**2 * N, stats.chi2(N).cdf).pvalue < 1e-6

    # Coordinates: N(0, sigma²) moments for large D; variance D / (D - 2) sigma² for small D.
    z_big, z_small = (big / sigma).flatten(), (small / sigma).flatten()
    assert abs(z_big.mean()) < 0.01 and abs(z_big.var() - 1) < 0.01
    assert abs(stats.kurtosis(z_big.numpy(), fisher=False) - 3) < 0.05
    assert z_small.var() > 1.2  # expected 8 / 6 = 1.33
    assert stats.kurtosis(z_small.numpy(), fisher=False) > 3.5


# ---------------------------------------------------------------------------------------------
# Per-seed draws.
# ---------------------------------------------------------------------------------------------


def test_draws_depend_only_on_the_seed() -> None:
    shape, D = (3, 4, 4), 64
    batch = pfgmpp_prior((4, *shape), 80.0, D, generator=StackedGenerator([5, 6, 7, 8]))
    again = pfgmpp_prior((4, *shape), 80.0, D, generator=StackedGenerator([5, 6, 7, 8]))
    single = torch.cat([pfgmpp_prior((1, *shape), 80.0, D, generator=StackedGenerator([s])) for s in (5, 6, 7, 8)])
    assert torch.equal(batch, again) and torch.equal(batch, single)
    assert not torch.equal(batch[0], batch[1])

    # Draw order: the direction is the first float32 normal draw (EDM's latents), then one
    # float64 uniform sets the radius by the inverse CDF.
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7, 8)]
    z = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]).double()
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens])
    radius = 80.0 * math.sqrt(D) * np.sqrt(betaprime_ppf(u.numpy(), 48 / 2, D / 2))
    expected = z / z.flatten(1).norm(dim=1)[:, None, None, None] * torch.from_numpy(radius)[:, None, None, None]
    # Each side takes the norm of N = 48 squares (relative error <= (N/2 + 1) eps in any summation
    # order) and rounds a division and a product: they agree to 2 (N/2 + 3) eps = (N + 6) eps.
    N = math.prod(shape)
    torch.testing.assert_close(batch, expected, rtol=(N + 6) * EPS64, atol=0)
    latents = StackedGenerator([5, 6, 7, 8]).randn((4, *shape)).double()
    direction = batch / batch.flatten(1).norm(dim=1)[:, None, None, None]
    torch.testing.assert_close(direction, latents / latents.flatten(1).norm(dim=1)[:, None, None, None])


def test_single_generator_and_per_sample_sigma() -> None:
    a = pfgmpp_noise((3, 5), torch.tensor([1.0, 2.0, 3.0]), 10, generator=torch.Generator().manual_seed(0))
    b = pfgmpp_noise((3, 5), torch.tensor([2.0, 4.0, 6.0]), 10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(b, 2 * a)  # the radius scales with sigma, the draws are the same
    torch.manual_seed(0)
    assert pfgmpp_noise((2, 5), 1.0, 10).shape == (2, 5)  # torch's global generator


def test_sampling_is_batch_invariant_and_es_acts_as_for_edm() -> None:
    """Prior and sampler draw from the same per-seed generators; ES is the EDM transform."""
    s, D, shape = 0.5, 128, (2, 4, 4)
    grid = sigmas_karras(7, 0.002, 80.0, 7.0)

    def run(seeds, lam, sampler=heun, s_churn=0.0):
        gen = StackedGenerator(seeds)
        x = pfgmpp_prior((len(seeds), *shape), grid[0], D, generator=gen)
        den = GaussianDenoiser(s) if lam is None else eps_scaling(GaussianDenoiser(s), lam)
        return sampler(den, x, grid, noise=gen, s_churn=s_churn), x

    together, _ = run([1, 2, 3], 1.006, s_churn=5.0)
    apart = torch.cat([run([k], 1.006, s_churn=5.0)[0] for k in (1, 2, 3)])
    assert torch.equal(together, apart)
    plain, x_T = run([1, 2, 3], None, sampler=euler)
    assert torch.equal(plain, run([1, 2, 3], 1.0, sampler=euler)[0])  # lambda == 1: bit-identical

    # The closed form of docs/design.md, "Reproducibility contracts" 2, holds from any x(sigma_max), the PFGM++ prior included.
    fine = sigmas_karras(256, 0.002, 80.0, 7.0)
    for lam in (1.0, 1.02):
        out = heun(eps_scaling(GaussianDenoiser(s), lam), x_T, fine)
        torch.testing.assert_close(out, x_T * (s**2 / (s**2 + 80.0**2)) ** (1 / (2 * lam)), rtol=1e-3, atol=0)


# ---------------------------------------------------------------------------------------------
# Conversions and validation.
# ---------------------------------------------------------------------------------------------


def test_sigma_r_conversion() -> None:
    assert sigma_to_r(80.0, 128).item() == pytest.approx(80.0 * math.sqrt(128))
    torch.testing.assert_close(r_to_sigma(sigma_to_r(torch.tensor([0.1, 3.0]), 7), 7), torch.tensor([0.1, 3.0], dtype=torch.float64))


@pytest.mark.parametrize("D", [0, -3, 2.5, 1e6, True, "128", None])
def test_bad_augmentation_dimension(D: object) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        pfgmpp_prior((2, 3), 80.0, D)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive integer"):
        sigma_to_r(1.0, D)  # type: ignore[arg-type]


def test_bad_arguments() -> None:
    for sigma in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma"):
            pfgmpp_prior((2, 3), sigma, 4)
    with pytest.raises(ValueError, match="number of seeds"):
        pfgmpp_prior((2, 3), 80.0, 4, generator=StackedGenerator([1, 2, 3]))
    with pytest.raises(ValueError, match="batch shape"):
        pfgmpp_prior((2,), 80.0, 4)
    with pytest.raises(ValueError, match="generator"):
        pfgmpp_prior((2, 3), 80.0, 4, generator=42)  # type: ignore[arg-type]
    assert pfgmpp_prior((2, 3), 80.0, np.int64(4)).shape == (2, 3)  # numpy integers are integers


# ---------------------------------------------------------------------------------------------
# Seeded sampling of a PFGM++ net (sample_seeds, the CLI's --aug-dim).
# ---------------------------------------------------------------------------------------------


def test_prior_from_normal_continues_the_generator() -> None:
    gen = StackedGenerator([4, 9])
    z = gen.randn((2, 3, 4, 4))
    a = pfgmpp_prior_from_normal(z, 80.0, 512, gen)
    b = pfgmpp_prior((2, 3, 4, 4), 80.0, 512, generator=StackedGenerator([4, 9]))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="StackedGenerator"):
        pfgmpp_prior_from_normal(z, 80.0, 512, StackedGenerator([4]))
    with pytest.raises(ValueError, match="sigma_max"):
        pfgmpp_prior_from_normal(z, float("nan"), 512, StackedGenerator([4, 9]))


def test_sample_seeds_with_the_pfgmpp_prior_equals_the_library_loop() -> None:
    from epsscale.plan import SamplingPlan
    from epsscale.sampling import sample_seeds

    s, D, shape, seeds = 0.5, 2048, (1, 4, 4), [3, 1, 7]
    grid = sigmas_karras(6, 0.002, 80.0, 7.0)
    den = eps_scaling(GaussianDenoiser(s), 1.004)
    ident = lambda x: x.numpy()  # noqa: E731
    plan = SamplingPlan(GaussianDenoiser(s), grid, "heun", shape, ident, lam=1.004, sampler_opts={"s_churn": 3.0}, prior="pfgmpp", aug_dim=D)
    got, _ = sample_seeds(plan, seeds, batch_size=2)
    for k, seed in enumerate(seeds):
        gen = StackedGenerator([seed])
        x = pfgmpp_prior((1, *shape), grid[0], D, generator=gen)
        np.testing.assert_array_equal(got[k], heun(den, x, grid, noise=gen, s_churn=3.0)[0].numpy())
    gauss, _ = sample_seeds(plan.replace(prior="ve", aug_dim=None), seeds, batch_size=2)
    assert not np.array_equal(got, gauss)
    for bad in ({"prior": "pfgmpp", "aug_dim": 0}, {"prior": "pfgmpp", "aug_dim": None}, {"prior": "edm", "aug_dim": None}, {"prior": "ve", "aug_dim": 3}):
        with pytest.raises(ValueError, match="prior|aug_dim"):
            plan.replace(**bad)


def test_cli_aug_dim_samples_a_pfgmpp_net_or_is_refused(tmp_path, capsys) -> None:
    import pickle
    import warnings

    from conftest import FakeEDMNet
    from epsscale.cli import main

    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(pickle.dumps({"ema": FakeEDMNet()}))
    base = ["sample", "--edm", str(pkl), "--allow-pickle", "--sampler", "heun", "--steps", "5", "--seeds", "0-3", "--eps-scale", "1.003", "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*base, "--aug-dim", "128", "--out", str(tmp_path / "p.npz")]) == 0
        assert main([*base, "--out", str(tmp_path / "e.npz")]) == 0
    p, e = (np.load(tmp_path / f"{n}.npz") for n in "pe")
    assert p["arr_0"].shape == e["arr_0"].shape == (4, 8, 8, 3) and p["arr_0"].dtype == np.uint8
    assert not np.array_equal(p["arr_0"], e["arr_0"])  # another prior
    np.testing.assert_array_equal(p["arr_1"], e["arr_1"])  # a seed draws its label before its radius: EDM's label
    capsys.readouterr()
    for argv, needle in (
        ([*base, "--aug-dim", "0"], "positive integer"),
        (["sample", "--model", "toy", "--seeds", "0-1", "--aug-dim", "64"], "--edm"),
        ([*base, "--aug-dim", "64", "--preset", "edm-cifar10-cond", "--steps", "7"], "--eps-scale"),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                code = main([*argv, "--out", str(tmp_path / "x.npz")])
            except SystemExit as ex:  # argparse's own refusals
                code = ex.code
        err = capsys.readouterr().err
        assert code == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "x.npz").exists()

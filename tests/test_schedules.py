import math

import pytest
import torch

from epsscale.schedules import (
    VPSchedule,
    alpha_bar_to_sigma,
    flow_t_to_sigma,
    sigma_to_alpha_bar,
    sigma_to_flow_t,
    sigmas_karras,
    space_timesteps,
)


def test_respacing_20_of_1000_matches_guided_diffusion():
    kept = space_timesteps(1000, "20")
    assert kept[:4] == [0, 53, 105, 158]
    assert kept[-3:] == [894, 946, 999]
    assert len(kept) == 20


def test_respacing_rounds_a_running_sum_like_guided_diffusion():
    # guided-diffusion's space_timesteps adds the fractional stride up in a float and rounds the
    # sum. Where the exact position is k + 0.5 the sum and j * stride land on different sides:
    # count 21: ten additions of 49.95 give 499.49999999999994 (10 * 49.95 = 499.5 -> 500);
    # count 31: fifteen additions of 33.3 give 499.5000000000001 (15 * 33.3 = 499.49999999999994 -> 499).
    assert space_timesteps(1000, "21")[10] == 499
    assert space_timesteps(1000, "31")[15] == 500
    kept = space_timesteps(1000, "43")
    assert kept[21] == 499 and 833 in kept and 832 not in kept


def test_respacing_sections_and_ddim():
    # Sections of 334, 333, 333 steps; each keeps both of its ends.
    kept = space_timesteps(1000, "10,15,20")
    assert len(kept) == 45
    assert kept[:2] == [0, 37] and 333 in kept and 334 in kept and 666 in kept and 667 in kept and kept[-1] == 999
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(1000, "1000") == list(range(1000))
    assert space_timesteps(1000, "1") == [0]


@pytest.mark.parametrize("spec", ["", "abc", "0", "-3", "ddimx", "ddim999", "2000", "5,,3"])
def test_respacing_bad_specs(spec):
    with pytest.raises(ValueError):
        space_timesteps(1000, spec)


def test_vp_schedules():
    lin = VPSchedule("linear")
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(0.02)
    cos = VPSchedule("cosine")
    assert cos.betas.max().item() == pytest.approx(0.999)
    # abar of the cosine schedule: cos^2((t/T + s)/(1 + s) pi/2) / cos^2(s/(1+s) pi/2), t = i+1.
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    # abar is a running product of 500 float64 factors here (<= 500 eps = 1e-13 relative).
    assert cos.alphas_cumprod[499].item() == pytest.approx(f(0.5) / f(0), rel=1e-9)
    for sch in (lin, cos):
        assert torch.all(sch.sigmas[1:] > sch.sigmas[:-1])
    with pytest.raises(ValueError):
        VPSchedule("quadratic")


def test_timestep_sigma_round_trip_and_grid():
    sch = VPSchedule("cosine")
    t = torch.arange(1000)
    assert torch.equal(sch.timestep(sch.sigma(t)), t)
    g = sch.grid("20")
    assert g.dtype == torch.float64 and g[-1] == 0 and len(g) == 21
    assert torch.all(g[1:] < g[:-1])
    assert sch.timestep(g[:-1]).tolist() == space_timesteps(1000, "20")[::-1]
    assert torch.equal(sch.round_sigma(g[:-1] * 1.0001), g[:-1])


def test_conversions_are_inverse():
    a = torch.linspace(0.01, 0.99, 17, dtype=torch.float64)
    assert torch.allclose(sigma_to_alpha_bar(alpha_bar_to_sigma(a)), a)
    t = torch.linspace(0.01, 0.99, 17, dtype=torch.float64)
    assert torch.allclose(sigma_to_flow_t(flow_t_to_sigma(t)), t)


def test_sigmas_karras():
    s = sigmas_karras(18)
    assert s.dtype == torch.float64 and len(s) == 19 and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    assert torch.all(s[1:] < s[:-1])
    # rho = 1 is linear in sigma.
    assert torch.allclose(sigmas_karras(5, 1.0, 5.0, rho=1.0)[:-1], torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    for bad in (dict(n=0), dict(n=5, sigma_min=0.0), dict(n=5, sigma_min=2.0, sigma_max=1.0), dict(n=5, rho=0.0)):
        with pytest.raises(ValueError):
            sigmas_karras(**bad)


def test_step_counts_are_integers_not_bools():
    with pytest.raises(ValueError, match="positive integer"):
        sigmas_karras(True)
    with pytest.raises(ValueError):
        VPSchedule("linear", True)

"""Every adapter turns its parameterisation of the same exact Gaussian model into the same denoiser."""

import pytest
import torch

from conftest import GaussianDenoiser
from epsscale import EDMDenoiser, FlowDenoiser, Prediction, VPDenoiser, VPSchedule
from epsscale.adapters import as_prediction

S = 0.5
SCH = VPSchedule("linear")


def exact_x0_vp(x_vp, t):
    """E[x0 | x_t] for x0 ~ N(0, S^2): sqrt(abar) S^2 / (abar S^2 + 1 - abar) x_t."""
    a = SCH.alphas_cumprod[t].reshape(-1, 1).to(x_vp.dtype)
    return a.sqrt() * S**2 / (a * S**2 + 1 - a) * x_vp


def eps_net(x_vp, t):
    a = SCH.alphas_cumprod[t].reshape(-1, 1).to(x_vp.dtype)
    return (x_vp - a.sqrt() * exact_x0_vp(x_vp, t)) / (1 - a).sqrt()


def v_net(x_vp, t):
    a = SCH.alphas_cumprod[t].reshape(-1, 1).to(x_vp.dtype)
    return a.sqrt() * eps_net(x_vp, t) - (1 - a).sqrt() * exact_x0_vp(x_vp, t)


def x0_net(x_vp, t):
    return exact_x0_vp(x_vp, t)


class EDMNet:
    sigma_min, sigma_max = 0.002, 80.0

    def round_sigma(self, s):
        return torch.as_tensor(s)

    def __call__(self, x, sigma, class_labels=None):
        return GaussianDenoiser(S)(x, sigma)


def flow_net(x_t, t):
    """u = eps - x0 for x_t = (1 - t) x0 + t eps, exact for Gaussian data."""
    t = t.reshape(-1, 1).to(torch.float64)
    x0 = (1 - t) * S**2 / ((1 - t) ** 2 * S**2 + t**2) * x_t
    eps = (x_t - (1 - t) * x0) / t
    return eps - x0


@pytest.mark.parametrize("t", [0, 10, 250, 999])
def test_adapters_agree_on_the_exact_gaussian_denoiser(t):
    x = torch.randn(6, 3, dtype=torch.float64) * 4
    sigma = SCH.sigmas[torch.full((6,), t)]
    truth = GaussianDenoiser(S)(x, sigma)
    outs = {
        "eps": VPDenoiser(eps_net, SCH, prediction="eps", dtype=torch.float64)(x, sigma),
        "v": VPDenoiser(v_net, SCH, prediction="v", dtype=torch.float64)(x, sigma),
        "x0": VPDenoiser(x0_net, SCH, prediction="x0", dtype=torch.float64)(x, sigma),
        "edm": EDMDenoiser(EDMNet())(x, sigma),
        "flow": FlowDenoiser(flow_net, dtype=torch.float64)(x, sigma),
    }
    # float64 throughout; the eps and v routes divide by sqrt(abar), 6e-3 at t = 999, so rounding
    # of |x| <= ~20 is amplified ~160x there: ~1e-12 at worst (measured 4e-15). 1e-9 leaves 1000x.
    for name, out in outs.items():
        torch.testing.assert_close(out, truth, rtol=1e-9, atol=1e-9, msg=name)


def test_vp_adapter_calls_the_original_integer_timestep():
    seen = []

    def net(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    grid = SCH.grid("20")
    VPDenoiser(net, SCH)(torch.zeros(2, 3, dtype=torch.float64), grid[[0, 5]])
    assert seen[0].tolist() == [999, 736] and seen[0].dtype == torch.long


def test_learned_sigma_is_carried_next_to_x0():
    def net(x, t):
        return torch.cat([torch.zeros_like(x), torch.full_like(x, 0.25)], 1)

    out = VPDenoiser(net, SCH, learn_sigma=True)(torch.randn(2, 3, 4, 4), SCH.sigmas[[3, 7]])
    assert isinstance(out, Prediction) and out.x0.shape == (2, 3, 4, 4)
    assert torch.all(out.var_interp == 0.25)
    with pytest.raises(ValueError, match="output channels"):
        VPDenoiser(lambda x, t: x, SCH, learn_sigma=True)(torch.randn(2, 3, 4, 4), SCH.sigmas[[3, 7]])


def test_bad_adapter_arguments():
    with pytest.raises(ValueError):
        VPDenoiser(eps_net, SCH, prediction="score")
    with pytest.raises(ValueError, match="sigma_min"):
        EDMDenoiser(lambda x, s, c: x)
    assert as_prediction(torch.zeros(1)).var_interp is None


def test_channel_count_and_sigma_shape_errors_say_what_is_wrong():
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    s = torch.tensor([1.0, 2.0], dtype=torch.float64)
    two = VPDenoiser(lambda x_vp, t: torch.zeros(x_vp.shape[0], 2, 4, 4), SCH)  # a learned-sigma net
    with pytest.raises(ValueError, match="learn_sigma=True"):
        two(x, s)
    three = VPDenoiser(lambda x_vp, t: torch.zeros(x_vp.shape[0], 3, 4, 4), SCH)
    with pytest.raises(ValueError, match="3 channels for 1-channel input"):
        three(x, s)
    ok = VPDenoiser(lambda x_vp, t: torch.zeros_like(x_vp), SCH)
    assert as_prediction(ok(x, s)).x0.shape == x.shape
    assert as_prediction(ok(x, torch.tensor(1.0))).x0.shape == x.shape  # a scalar sigma is broadcast
    with pytest.raises(ValueError, match="one value per sample"):
        ok(x, torch.tensor([1.0]))

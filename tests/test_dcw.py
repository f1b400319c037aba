"""DCW (epsscale.dcw): the Haar LL band by hand, the closed form against the transform, and the
correction inside every sampler."""

import pytest
import torch

from conftest import ForbiddenDenoiser, GaussianDenoiser
from epsscale import StackedGenerator, VPSchedule, eps_scaling, prior, sigmas_karras
from epsscale.dcw import DCW, haar_dwt, haar_idwt, haar_ll, haar_ll_inverse, haar_ll_project
from epsscale.samplers import SAMPLERS, ddim, euler, heun

STOCHASTIC = {"ddpm": {}, "ddim": {"eta": 0.5}, "euler": {"s_churn": 5.0}, "heun": {"s_churn": 5.0}, "dpmpp_2m": {}}


class Wobbly:
    """A Gaussian denoiser with a deterministic, spatially varying error, so that x - x0 has a low band."""

    def __init__(self):
        self.inner = GaussianDenoiser(0.5)

    def __call__(self, x, sigma, **cond):
        x0 = self.inner(x, sigma).to(torch.float64)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return (x0 + 0.1 * torch.tanh(x.to(torch.float64) / (1 + s)).roll(1, dims=-1)).to(x.dtype)


def start(n=3, shape=(2, 4, 6), grid=None):
    grid = VPSchedule("cosine").grid("8") if grid is None else grid
    return grid, prior(StackedGenerator(range(n)).randn((n, *shape)), grid[0], kind="vp")


# ---------------------------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------------------------


def test_haar_ll_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [0.0, -2.0, 1.0, 1.0], [4.0, 2.0, 1.0, 5.0]])
    # Blocks (a, b / c, d): (1 2 / 5 6), (3 4 / 7 8), (0 -2 / 4 2), (1 1 / 1 5); LL = (a+b+c+d)/2.
    assert haar_ll(x).tolist() == [[7.0, 11.0], [2.0, 4.0]]
    assert haar_ll_inverse(torch.tensor([[7.0, 11.0], [2.0, 4.0]])).tolist() == [
        [3.5, 3.5, 5.5, 5.5], [3.5, 3.5, 5.5, 5.5], [1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]
    # The projection is 2x2 average pooling then nearest upsampling.
    assert haar_ll_project(x).tolist() == [[3.5, 3.5, 5.5, 5.5], [3.5, 3.5, 5.5, 5.5], [1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]
    y = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    pooled = torch.nn.functional.avg_pool2d(y, 2)
    torch.testing.assert_close(haar_ll_project(y), pooled.repeat_interleave(2, -2).repeat_interleave(2, -1), rtol=1e-15, atol=1e-15)


def test_haar_dwt_by_hand_orthonormal_and_invertible():
    x = torch.tensor([[1.0, 2.0], [5.0, 6.0]], dtype=torch.float64)  # a=1 b=2 c=5 d=6
    ll, (lh, hl, hh) = haar_dwt(x)
    assert [ll.item(), lh.item(), hl.item(), hh.item()] == [7.0, -4.0, -1.0, 0.0]
    y = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    ll, high = haar_dwt(y)
    energy = ll.square().sum() + sum(h.square().sum() for h in high)
    torch.testing.assert_close(energy, y.square().sum(), rtol=1e-13, atol=0)  # orthonormal
    torch.testing.assert_close(haar_idwt(ll, high), y, rtol=1e-14, atol=1e-14)
    assert torch.equal(ll, haar_ll(y))


@pytest.mark.parametrize("w", [0.0, 0.005, 0.3, -0.2])
def test_closed_form_equals_transform_ll_inverse_transform(w):
    """The official dcw_low: DWT both, LL(x) += w (LL(x) - LL(x0)), keep x's high bands, inverse DWT."""
    g = torch.Generator().manual_seed(1)
    x, x0 = torch.randn(3, 2, 8, 6, generator=g, dtype=torch.float64), torch.randn(3, 2, 8, 6, generator=g, dtype=torch.float64)
    ll_x, high_x = haar_dwt(x)
    ll_0, _ = haar_dwt(x0)
    want = haar_idwt(ll_x + w * (ll_x - ll_0), high_x)
    # Two float64 evaluations of one linear map: rounding only.
    torch.testing.assert_close(DCW.correct(x, x0, w), want, rtol=1e-13, atol=1e-13)
    # Only the LL band moved.
    _, high_new = haar_dwt(DCW.correct(x, x0, w))
    for a, b in zip(high_new, high_x):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_weights_follow_sigma_over_sigma_max():
    grid = torch.tensor([10.0, 5.0, 1.0, 0.0], dtype=torch.float64)
    assert DCW(0.2).weights(grid) == pytest.approx([0.2, 0.1, 0.02])


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1", None])
def test_bad_strength(bad):
    with pytest.raises(ValueError, match="DCW"):
        DCW(bad)


@pytest.mark.parametrize("shape", [(2,), (1, 5, 4), (1, 4, 3), (4,)])
def test_images_need_even_height_and_width_before_any_network_call(shape):
    grid = VPSchedule("cosine").grid("4")
    for name in SAMPLERS:
        with pytest.raises(ValueError, match="even height and width"):
            SAMPLERS[name](ForbiddenDenoiser(), torch.zeros(2, *shape), grid, dcw=DCW(0.1))
    with pytest.raises(ValueError, match="even height and width"):
        haar_ll(torch.zeros(3, 5))


# ---------------------------------------------------------------------------------------------
# In the samplers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_c_zero_is_bit_identical(name):
    grid, x = start()
    opts = STOCHASTIC[name]
    den = eps_scaling(Wobbly(), 1.01)
    base = SAMPLERS[name](den, x, grid, noise=StackedGenerator(range(3)), **opts)
    for fix in (None, DCW(0.0), DCW(0)):
        assert torch.equal(SAMPLERS[name](den, x, grid, noise=StackedGenerator(range(3)), dcw=fix, **opts), base)
    assert not torch.equal(SAMPLERS[name](den, x, grid, noise=StackedGenerator(range(3)), dcw=DCW(0.05), **opts), base)


def edm_with_dcw_by_hand(den, x, sigmas, c, second_order):
    """EDM's ablation sampler with the official dcw_low line, written out (no churn)."""
    x = x.to(torch.float64)
    steps = len(sigmas) - 1

    def D(v, s):
        return den(v, torch.full((v.shape[0],), s, dtype=torch.float64)).to(torch.float64)

    for i in range(steps):
        t_cur, t_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = D(x, t_cur)
        d_cur = (x - denoised) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if second_order and i < steps - 1:
            denoised = D(x_next, t_next)  # the corrector's x0 is the step's last
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * (x_next - denoised) / t_next)
        ll_x, high = haar_dwt(x_next)
        ll_0, _ = haar_dwt(denoised)
        x = haar_idwt(ll_x + (t_cur / float(sigmas[0])) * c * (ll_x - ll_0), high)
    return x


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_euler_and_heun_match_the_official_loop(name):
    grid = sigmas_karras(8, sigma_min=0.002, sigma_max=80.0)
    x = StackedGenerator(range(3)).randn((3, 2, 4, 4), dtype=torch.float64) * 80
    c = 0.3
    got = SAMPLERS[name](Wobbly(), x, grid, dcw=DCW(c))
    want = edm_with_dcw_by_hand(Wobbly(), x, grid, c, name == "heun")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # float64 throughout; the orders of operations differ
    assert not torch.allclose(got, SAMPLERS[name](Wobbly(), x, grid), atol=1e-3)


def test_ddim_corrects_in_ve_units_like_euler():
    """DDIM (eta = 0) is Euler on the same grid; DCW in VE units keeps it so (the VP state goes to VE and back)."""
    grid, x = start(grid=VPSchedule("cosine").grid("12"))
    a = ddim(Wobbly(), x, grid, dtype=torch.float64, dcw=DCW(0.3))
    b = euler(Wobbly(), x, grid, dcw=DCW(0.3))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)  # float64; DDIM and Euler differ in rounding only
    assert not torch.allclose(a, ddim(Wobbly(), x, grid, dtype=torch.float64), atol=1e-3)


def test_step_info_reports_the_corrected_state():
    grid, x = start()
    infos = []
    out = heun(Wobbly(), x, grid, dcw=DCW(0.2), callback=infos.append)
    assert torch.equal(infos[-1].x_next, out)
    for a, b in zip(infos, infos[1:]):
        assert torch.equal(a.x_next, b.x)

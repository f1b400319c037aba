"""Time-Shift sampling (epsscale.timeshift): the choice of tau, where it acts, and the off switch."""

import math

import pytest
import torch

from conftest import ForbiddenDenoiser, GaussianDenoiser
from epsscale import StackedGenerator, VPSchedule, prior, sigmas_karras
from epsscale.data import ImperfectDenoiser, default_mixture
from epsscale.samplers import SAMPLERS, ddim, ddpm, euler, heun
from epsscale.timeshift import PAPER_DEFAULTS, TimeShift, paper_defaults

SCH = VPSchedule("linear")
ONE_MINUS_ABAR = (1 - SCH.alphas_cumprod).tolist()
STOCHASTIC = {"ddpm": {}, "ddim": {"eta": 0.5}, "euler": {"s_churn": 5.0}, "heun": {"s_churn": 5.0}}


def brute_force_tau(v: float, t: int, window: int, T: int = 1000) -> int:
    """The paper's rule written out: the smallest tau in [t - w//2, t + w//2] ∩ [0, T-1] minimising |v - (1 - abar_tau)|."""
    best, best_d = None, math.inf
    for tau in range(max(0, t - window // 2), min(T - 1, t + window // 2) + 1):
        d = abs(v - ONE_MINUS_ABAR[tau])
        if d < best_d:  # strict: a tie keeps the smaller tau
            best, best_d = tau, d
    return best


def state_with_variance(v: torch.Tensor, shape=(3, 8, 8), seed=0) -> torch.Tensor:
    """One sample per entry of v whose unbiased per-sample variance is exactly v (up to rounding)."""
    z = torch.randn(len(v), *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.flatten(1).mean(1).reshape(-1, 1, 1, 1) + 0.3  # a mean of its own, which the variance removes
    z = (z - 0.3) / z.flatten(1).std(1).reshape(-1, 1, 1, 1) + 0.3
    return z * v.sqrt().reshape(-1, 1, 1, 1)


class Recorder:
    """A denoiser that records every call's input (VE) and sigma [N], around an exact Gaussian denoiser."""

    def __init__(self, inner=None):
        self.inner = inner or GaussianDenoiser(0.5)
        self.xs, self.sigmas, self.outs = [], [], []

    def __call__(self, x, sigma, **cond):
        out = self.inner(x, sigma)
        self.xs.append(x.detach().to(torch.float64).clone())
        self.sigmas.append(torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0]).clone())
        self.outs.append(out.detach().to(torch.float64).clone())
        return out


def first_calls(name: str, steps: int) -> list[int]:
    """Indices, among all recorded calls, of each step's first call (Heun adds a corrector but on the last step)."""
    return [2 * i for i in range(steps)] if name == "heun" else list(range(steps))


# ---------------------------------------------------------------------------------------------
# The choice of tau
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t,window", [(500, 40), (888, 30), (999, 40), (10, 40), (0, 8), (300, 2), (777, 1), (650, 200)])
def test_choice_matches_brute_force_on_states_of_known_variance(t, window):
    ts = TimeShift(SCH, window, 0)
    lo, hi = max(0, t - window // 2), min(999, t + window // 2)
    # Variances at, between and beyond the window's targets, and far outside [0, 1].
    v = torch.tensor([ONE_MINUS_ABAR[lo], ONE_MINUS_ABAR[hi], (ONE_MINUS_ABAR[lo] + ONE_MINUS_ABAR[hi]) / 2, ONE_MINUS_ABAR[(lo + hi) // 2], 1e-6, 3.0, 0.5, 0.97], dtype=torch.float64)
    x = state_with_variance(v)
    got = ts.choose(x, t)
    measured = x.flatten(1).var(1)  # unbiased, per-sample mean removed
    assert torch.allclose(measured, v, rtol=1e-12)
    want = [brute_force_tau(float(m), t, window) for m in measured]
    assert got.tolist() == want
    assert all(lo <= tau <= hi for tau in want)


def test_choice_is_per_sample_and_uses_the_unbiased_variance():
    ts = TimeShift(SCH, 40, 0)
    v = torch.tensor([ONE_MINUS_ABAR[480], ONE_MINUS_ABAR[510]], dtype=torch.float64)
    x = state_with_variance(v, shape=(1, 2, 2))  # 4 values: unbiased and biased variances differ by 4/3
    assert ts.choose(x, 500).tolist() == [480, 510]
    assert ts.choose(x.to(torch.float32), 500).tolist() == [480, 510]
    biased = x.flatten(1).var(1, unbiased=False)
    assert [brute_force_tau(float(b), 500, 40) for b in biased] != [480, 510]


class Plateau(VPSchedule):
    """The linear schedule with 1 - abar flat over timesteps 500..519: every one of them ties."""

    @property
    def alphas_cumprod(self):
        a = super().alphas_cumprod.clone()
        a[500:520] = a[510]
        return a


def test_ties_go_to_the_smaller_tau():
    ts = TimeShift(Plateau("linear"), 40, 0)
    v = 1 - Plateau("linear").alphas_cumprod[510]
    x = state_with_variance(torch.stack([v, v * (1 + 1e-9), v * (1 - 1e-9)]))
    assert ts.choose(x, 510).tolist() == [500, 500, 500]
    assert ts.choose(x, 525).tolist() == [505, 505, 505]  # window [505, 545]: its smallest tied tau


def test_window_never_reaches_the_next_planned_level():
    """Our guard: tau stays above the planned timestep of the step's end (only binds for windows wider than 2 strides)."""
    ts = TimeShift(SCH, 200, 0)
    assert ts.candidates(500, 450) == (451, 600)
    assert ts.candidates(500, 300) == (400, 600)
    assert ts.candidates(500) == (400, 600)
    x = state_with_variance(torch.tensor([ONE_MINUS_ABAR[420]], dtype=torch.float64))
    assert ts.choose(x, 500, 450).tolist() == [451]


def test_paper_defaults_and_nearest_step_count():
    assert PAPER_DEFAULTS == {10: (40, 200), 20: (30, 300), 50: (8, 300), 100: (2, 300)}
    for steps, want in [(10, (40, 200)), (20, (30, 300)), (50, (8, 300)), (100, (2, 300)), (5, (40, 200)), (14, (40, 200)), (15, (30, 300)), (30, (30, 300)), (40, (8, 300)), (1000, (2, 300))]:
        assert paper_defaults(steps) == want, steps
    ts = TimeShift.for_steps(SCH, 20, cutoff=100)
    assert (ts.window, ts.cutoff) == (30, 100)


@pytest.mark.parametrize("args", [(SCH, -1, 300), (SCH, 40, -1), (SCH, 40, 1000), (SCH, True, 300), (SCH, 4.0, 300), ("linear", 40, 300)])
def test_bad_settings(args):
    with pytest.raises(ValueError, match="TimeShift"):
        TimeShift(*args)


def test_samples_need_two_values_for_a_variance():
    with pytest.raises(ValueError, match="variance"):
        ddim(ForbiddenDenoiser(), torch.zeros(2, 1), SCH.grid("10"), time_shift=TimeShift(SCH, 40, 200))


# ---------------------------------------------------------------------------------------------
# In the samplers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "heun"])
def test_window_zero_and_a_cutoff_above_every_step_are_bit_identical(name):
    den = ImperfectDenoiser(default_mixture(), gamma=0.3)
    grid = VPSchedule("cosine").grid("10")
    x = prior(StackedGenerator(range(5)).randn((5, 2)), grid[0], kind="vp")
    opts = STOCHASTIC[name]
    base = SAMPLERS[name](den, x, grid, noise=StackedGenerator(range(5)), **opts)
    for ts in (None, TimeShift(VPSchedule("cosine"), 0, 0), TimeShift(VPSchedule("cosine"), 40, 999)):
        same = SAMPLERS[name](den, x, grid, noise=StackedGenerator(range(5)), time_shift=ts, **opts)
        assert torch.equal(base, same)
    shifted = SAMPLERS[name](den, x, grid, noise=StackedGenerator(range(5)), time_shift=TimeShift(VPSchedule("cosine"), 40, 200), **opts)
    assert not torch.equal(base, shifted)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "heun"])
@pytest.mark.parametrize("disc,cutoff", [("respaced", 200), ("respaced", 222), ("respaced", 221), ("karras", 200)])
def test_network_is_called_at_the_brute_force_tau(name, disc, cutoff):
    """First call unshifted; then, per sample, the tau a brute force picks from the recorded state,
    while the planned timestep is above the cutoff (strictly: 222 is a planned timestep), and the
    planned sigma at and below it."""
    window = 40
    grid = SCH.grid("10") if disc == "respaced" else sigmas_karras(10, sigma_min=0.01, sigma_max=80.0)
    steps = len(grid) - 1
    planned = [int(SCH.timestep(s)) for s in grid[:-1]]
    rec = Recorder()
    x = prior(StackedGenerator(range(6)).randn((6, 1, 4, 4)), grid[0], kind="vp")
    SAMPLERS[name](rec, x, grid, noise=StackedGenerator(range(6)), time_shift=TimeShift(SCH, window, cutoff))
    idx = first_calls(name, steps)
    assert len(rec.sigmas) == len(idx) + (steps - 1 if name == "heun" else 0)
    table = SCH.sigmas
    moved = 0
    for i, c in enumerate(idx):
        sig = rec.sigmas[c]
        if i == 0 or planned[i] <= cutoff:
            assert torch.equal(sig, grid[i].expand(6)), i  # never shifted
            continue
        x_vp = rec.xs[c] / (1 + sig**2).sqrt().reshape(-1, 1, 1, 1)  # the VP state: the input is x_vp sqrt(1 + sigma_tau^2)
        t_next = int(SCH.timestep(grid[i + 1])) if grid[i + 1] > 0 else -1
        for n in range(6):
            tau = brute_force_tau(float(x_vp[n].flatten().var()), planned[i], window)
            assert tau > t_next  # the guard never binds here
            want = grid[i] if tau == planned[i] else table[tau]
            assert sig[n].item() == want.item(), (i, n)
            moved += tau != planned[i]
    assert moved >= 6  # the test sees real shifts
    assert any(planned[i] <= cutoff for i in range(1, steps))  # and the cutoff


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "heun"])
def test_step_starts_at_sigma_tau_and_ends_at_the_planned_level(name):
    """One shifted step, by hand: x0 and eps from the call at tau, the update to the planned next sigma."""
    grid = SCH.grid("10")
    rec = Recorder()
    x = prior(StackedGenerator(range(4)).randn((4, 1, 4, 4)), grid[0], kind="vp")

    class Zero:  # DDPM without noise: its state is the posterior mean
        def randn_like(self, x):
            return torch.zeros_like(x)

    opts = {"dtype": torch.float64} if name in ("ddpm", "ddim") else {}
    SAMPLERS[name](rec, x, grid, noise=Zero(), time_shift=TimeShift(SCH, 40, 200), **opts)
    idx = first_calls(name, len(grid) - 1)
    i = 2  # planned 777, shifted
    c = idx[i]
    s_tau = rec.sigmas[c].reshape(-1, 1, 1, 1)
    assert not torch.equal(s_tau.flatten(), grid[i].expand(4))
    x_in, x0 = rec.xs[c], rec.outs[c]
    s_next = grid[i + 1]
    a_tau, a_next = 1 / (1 + s_tau**2), 1 / (1 + s_next**2)
    x_vp = x_in * a_tau.sqrt()
    eps = (x_in - x0) / s_tau
    if name == "ddim":
        want_vp = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    elif name == "ddpm":
        beta = 1 - a_tau / a_next
        want_vp = a_next.sqrt() * beta / (1 - a_tau) * x0 + (1 - beta).sqrt() * (1 - a_next) / (1 - a_tau) * x_vp
    elif name == "euler":
        want_vp = (x_in + (s_next - s_tau) * eps) * a_next.sqrt()
    else:
        x_pred = x_in + (s_next - s_tau) * eps
        x_corr_in, x0_corr = rec.xs[c + 1], rec.outs[c + 1]
        assert torch.allclose(x_corr_in, x_pred, rtol=1e-13, atol=1e-13)
        assert torch.equal(rec.sigmas[c + 1], s_next.expand(4))  # the corrector stays at the planned level
        want_vp = (x_in + (s_next - s_tau) * 0.5 * (eps + (x_pred - x0_corr) / s_next)) * a_next.sqrt()
    # The next step's VP state, whatever sigma it is called at.
    c2 = idx[i + 1]
    got_vp = rec.xs[c2] / (1 + rec.sigmas[c2] ** 2).sqrt().reshape(-1, 1, 1, 1)
    # float64 throughout: only rounding separates the two.
    torch.testing.assert_close(got_vp, want_vp, rtol=1e-12, atol=1e-12)


def test_ddim_equals_euler_under_time_shift():
    """DDIM (eta = 0) and Euler are one method; with Time-Shift they pick the same taus and agree."""
    grid = SCH.grid("20")
    x = prior(StackedGenerator(range(8)).randn((8, 1, 4, 4)), grid[0], kind="vp")
    ts = TimeShift.for_steps(SCH, 20)
    a = ddim(GaussianDenoiser(0.5), x, grid, dtype=torch.float64, time_shift=ts)
    b = euler(GaussianDenoiser(0.5), x, grid, time_shift=ts)
    # The two compute the same step in different algebraic orders (float64 rounding only).
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(a, euler(GaussianDenoiser(0.5), x, grid), atol=1e-3)


def test_step_info_reports_per_sample_sigma_only_when_shifting():
    grid = SCH.grid("10")
    infos = []
    x = prior(StackedGenerator(range(3)).randn((3, 1, 4, 4)), grid[0], kind="vp")
    heun(GaussianDenoiser(0.5), x, grid, time_shift=TimeShift(SCH, 40, 200), callback=infos.append)
    shapes = [tuple(info.sigma.shape) for info in infos]
    assert shapes == [()] + [(3,)] * 7 + [(), ()]  # planned 999 | 888 ... 222 | 111, 0
    for info in infos:
        s = info.sigma.reshape(-1, 1, 1, 1) if info.sigma.ndim else info.sigma
        torch.testing.assert_close(info.eps, (info.x - info.denoised) / s)


def test_classifier_gradient_sees_the_shifted_sigma():
    grid = SCH.grid("10")
    seen = []

    def grad(x_vp, sigma, **cond):
        seen.append(sigma.clone())
        return torch.zeros_like(x_vp)

    x = prior(StackedGenerator(range(3)).randn((3, 1, 4, 4)), grid[0], kind="vp")
    rec = Recorder()
    ddpm(rec, x, grid, noise=StackedGenerator(range(3)), classifier_grad=grad, time_shift=TimeShift(SCH, 40, 200))
    for s_grad, s_call in zip(seen, rec.sigmas):
        assert torch.equal(s_grad, s_call)

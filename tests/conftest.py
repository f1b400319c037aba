import contextlib
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(int(os.environ.get("EPSSCALE_TEST_THREADS", "1")))

FIXTURES = Path(__file__).parent / "fixtures"

# Unit round-offs for tolerances derived from a computation (see the comments at each use).
EPS64 = float(torch.finfo(torch.float64).eps)  # 2.2e-16
EPS32 = float(torch.finfo(torch.float32).eps)  # 1.2e-7


# ---------------------------------------------------------------------------------------------
# Isolation: no test sees global state left behind by another, whatever the order they run in
# (`pytest --reverse`, scripts/test_matrix.sh).
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _private_stats_cache(tmp_path_factory):
    """Reference statistics are cached in a directory of this session's own, never in the user's
    ~/.cache/epsscale (or $EPSSCALE_CACHE): a stale or foreign file there cannot change a result,
    and the suite leaves nothing behind. Subprocesses inherit the variable."""
    old = os.environ.get("EPSSCALE_CACHE")
    os.environ["EPSSCALE_CACHE"] = str(tmp_path_factory.mktemp("epsscale-cache"))
    yield
    if old is None:
        os.environ.pop("EPSSCALE_CACHE", None)
    else:
        os.environ["EPSSCALE_CACHE"] = old


@pytest.fixture(scope="module", autouse=True)
def _seed_module():
    """Module fixtures that draw from torch's global generator get the same numbers in any order."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _isolate_torch_globals():
    """Each test starts from a seeded global generator (unseeded draws no longer depend on which
    tests ran before), and torch's thread count (the CLI's --threads sets it in-process) and default
    dtype are put back afterwards."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.manual_seed(0)
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if torch.get_default_dtype() != dtype:
        torch.set_default_dtype(dtype)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block at ``n`` intra-op threads (float32 kernels round differently at another count:
    in-process results compared bit for bit with a subprocess must use the subprocess's count)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def fid_roundoff(sigma1, sigma2) -> float:
    """A bound on the round-off of ``frechet_distance`` for d x d covariances sigma1, sigma2.

    tr((S1 S2)^1/2) is the sum of sqrt(l_i) over the eigenvalues l_i of the symmetric
    M = B^T S2 B (B B^T = S1), which are those of S1 S2. A backward-stable eigensolver, and forming
    M, get each l_i to within delta = d eps ||S1|| ||S2||, which moves sqrt(l_i) by at most
    min(sqrt(delta), delta / (2 sqrt(l_i))). Where a sample covariance is singular (fewer samples
    than dimensions) many l_i are 0 and each of them costs sqrt(delta), ~2e-7 ||S|| at d = 128:
    this, not eps, is why another order of summation, BLAS kernel or thread count can move such an
    FID by ~1e-7 relative. The FID has 2 tr((S1 S2)^1/2), and traces rounded at d eps their size.
    """
    s1, s2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    d = s1.shape[0]
    delta = d * EPS64 * np.linalg.norm(s1, 2) * np.linalg.norm(s2, 2)
    lam = np.clip(np.linalg.eigvals(s1 @ s2).real, 0.0, None)
    with np.errstate(divide="ignore"):
        per_root = np.minimum(math.sqrt(delta), delta / (2 * np.sqrt(lam)))
    return float(2 * per_root.sum() + d * EPS64 * (np.trace(s1) + np.trace(s2)))


class GaussianDenoiser:
    """Exact denoiser for x0 ~ N(0, s^2 I): D(x, sigma) = s^2 / (s^2 + sigma^2) x."""

    def __init__(self, s: float = 0.5) -> None:
        self.s = s
        self.calls = 0

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        k = self.s**2 / (self.s**2 + sigma.to(torch.float64) ** 2)
        return (k.reshape(-1, *[1] * (x.ndim - 1)) * x.to(torch.float64)).to(x.dtype)


class ForbiddenDenoiser:
    """Fails the test if it is ever called."""

    def __call__(self, x, sigma, **cond):
        raise AssertionError("the network was called")


class CountingNoise:
    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def randn_like(self, x):
        self.calls += 1
        return self.inner.randn_like(x)


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


class FakeEDMNet:
    """A duck-typed EDM net (picklable): the exact denoiser of N(0, 0.5^2) data at 3x8x8."""

    sigma_min, sigma_max = 0.0, float("inf")
    img_channels, img_resolution, label_dim = 3, 8, 10

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        assert class_labels is None or class_labels.shape == (x.shape[0], self.label_dim)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return (0.25 / (0.25 + s**2)) * x.to(torch.float64)


def randomise_output_layer(net: torch.nn.Module) -> None:
    """ADM zero-initialises its last conv, so an untrained net predicts eps = 0 and its samples
    would not depend on the network at all. Random weights there make tests see the network
    (and its batch-shape-dependent float32 rounding)."""
    with torch.no_grad():
        for p in net.out[-1].parameters():
            p.normal_(0.0, 0.05)

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("EPSSCALE_TEST_THREADS", "1")))

FIXTURES = Path(__file__).parent / "fixtures"


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

"""FID maths: identities of the Fréchet distance, streaming statistics, files."""

import numpy as np
import pytest
import torch
from conftest import EPS64, fid_roundoff

from epsscale.metrics.fid import (
    FeatureStats,
    compute_fid,
    frechet_distance,
    frechet_distance_scipy,
    load_mu_sigma,
)

torch.set_num_threads(1)


def random_psd(d: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or 2 * d)) / np.sqrt(d)
    return a @ a.T


# ----------------------------------------------------------------------------------------------
# Fréchet distance identities.


def test_same_stats_give_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(32), random_psd(32, rng)
    # 2 tr S - 2 tr((S S)^1/2) cancels to 0 up to the eigensolver's round-off (~7e-12 here).
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=fid_roundoff(sigma, sigma))


def test_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(1)
    sigma = random_psd(48, rng)
    mu1, mu2 = rng.standard_normal(48), rng.standard_normal(48)
    expected = float(np.sum((mu1 - mu2) ** 2))
    # The covariance terms cancel to round-off; the squared distance is rounded at d eps its size.
    tol = fid_roundoff(sigma, sigma) + 2 * 48 * EPS64 * expected
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=0, abs=tol)


def test_diagonal_covariances_closed_form():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3.0, 40), rng.uniform(0.0, 3.0, 40)
    mu1, mu2 = rng.standard_normal(40), rng.standard_normal(40)
    expected = float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2))
    tol = fid_roundoff(np.diag(a), np.diag(b)) + 2 * 40 * EPS64 * expected
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=0, abs=tol)


def test_symmetric_in_its_arguments():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    s1, s2 = random_psd(20, rng), random_psd(20, rng)
    # Swapped, the Cholesky factor is of the other matrix: each order is within round-off of the truth.
    tol = 2 * fid_roundoff(s1, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=0, abs=tol)


@pytest.mark.parametrize("d", [64, 256])
def test_agrees_with_scipy_sqrtm_formula(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) * 0.1
    s1, s2 = random_psd(d, rng), random_psd(d, rng) * 1.3
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = frechet_distance_scipy(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-6)


def test_singular_covariance_uses_eigen_route_and_agrees():
    # Fewer samples than dimensions: Σ₁ is singular, Cholesky fails, the PSD square root is used.
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((30, 64)), rng.standard_normal((500, 64)) + 0.2
    mu1, s1 = x.mean(0), np.cov(x, rowvar=False)
    mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(frechet_distance_scipy(mu1, s1, mu2, s2), rel=1e-6)
    assert ours == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-6)


def test_accepts_tensors_and_float32():
    rng = np.random.default_rng(6)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = random_psd(16, rng), random_psd(16, rng)
    ref = frechet_distance(mu1, s1, mu2, s2)
    got = frechet_distance(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2)))
    assert got == ref  # the same float64 values, whatever the container: the same computation
    got32 = frechet_distance(*(a.astype(np.float32) for a in (mu1, s1, mu2, s2)))
    assert got32 == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), "dims differ"),
        ((np.zeros(3), np.eye(4), np.zeros(3), np.eye(3)), "sigma must have shape"),
        ((np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3)), "mu must be 1-d"),
        ((np.array([0.0, np.nan, 0.0]), np.eye(3), np.zeros(3), np.eye(3)), "NaN"),
        ((np.zeros(3), np.eye(3), np.zeros(3), np.full((3, 3), np.inf)), "NaN or inf"),
    ],
)
def test_frechet_distance_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(*args)


# ----------------------------------------------------------------------------------------------
# Streaming statistics.


def features(n=1000, d=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 5.0


def test_stats_match_numpy():
    x = features()
    stats = FeatureStats(12).update(x)
    assert stats.count == 1000
    # Sums of 1000 terms in other orders (torch vs numpy): within 1000 eps max|x| (~5e-12) for the
    # mean; the covariance from raw moments cancels n mu mu^T (|x| <= 23, so ~1000 eps 23^2 ~ 1e-10
    # at worst). Measured: 7e-15 and 3e-14.
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 7, 64, 999, 1000])
def test_stats_invariant_to_batch_size(chunk):
    x = features()
    stats = FeatureStats(12)
    for i in range(0, len(x), chunk):
        stats.update(torch.from_numpy(x[i : i + chunk]))
    # As in test_stats_match_numpy (the means are ~5, so relative is fine). Measured: 7e-15, 8e-14.
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)


def test_merge_equals_single_pass():
    x = features()
    whole = FeatureStats(12).update(x)
    parts = [FeatureStats(12).update(x[i : i + 300]) for i in range(0, 1000, 300)]
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    assert merged.count == whole.count
    # Raw sums (up to 4e4) of 1000 terms added in another grouping: within (n - 1) eps sum|term|,
    # ~1e-8 at worst (measured 3e-11), inside atol + rtol |sum| ~ 4e-8.
    for a, b in zip(merged.tensors(), whole.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)
    # The raw tensors are float64 and can be summed like an all_reduce would.
    n, s, so = (sum(t) for t in zip(*(p.tensors() for p in [FeatureStats(12).update(x[:400]), FeatureStats(12).update(x[400:])])))
    rebuilt = FeatureStats.from_tensors(n, s, so)
    # ~1e-13 absolute, and no entry of this covariance is smaller than 0.016 in magnitude.
    np.testing.assert_allclose(rebuilt.cov, whole.cov, rtol=1e-10)
    assert all(t.dtype == torch.float64 for t in whole.tensors())


def test_save_load_round_trip(tmp_path):
    x = features()
    stats = FeatureStats(12).update(x)
    path = stats.save(tmp_path / "sub" / "stats.npz", note=np.array("hello"))
    loaded = FeatureStats.load(path)
    assert loaded.count == stats.count
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    with np.load(path) as f:
        assert {"mu", "sigma", "count", "sum", "sum_outer", "note"} <= set(f.files)
    mu, sigma = load_mu_sigma(path)
    np.testing.assert_array_equal(mu, stats.mean)
    assert not list(tmp_path.glob("sub/.*tmp"))  # no temporary file left behind


def test_load_pytorch_fid_style_files(tmp_path):
    x = features()
    np.savez(tmp_path / "pf.npz", mu=x.mean(0), sigma=np.cov(x, rowvar=False))
    mu, sigma = load_mu_sigma(tmp_path / "pf.npz")
    # cond(sigma) ~ 3e3: the smallest roots carry the round-off (~4e-10 bound, measured 3e-14).
    assert compute_fid((mu, sigma), tmp_path / "pf.npz") == pytest.approx(0.0, abs=fid_roundoff(sigma, sigma))
    with pytest.raises(ValueError, match="load_mu_sigma"):
        FeatureStats.load(tmp_path / "pf.npz")
    # mu/sigma plus a count is enough to rebuild the raw sums.
    np.savez(tmp_path / "pfc.npz", mu=x.mean(0), sigma=np.cov(x, rowvar=False), count=1000)
    rebuilt = FeatureStats.load(tmp_path / "pfc.npz")
    # Rebuilt as (n - 1) sigma + n mu mu^T, then n mu mu^T taken off again: rounding at the scale of
    # n max|x|^2 ~ 5e5, divided by n - 1 (~1e-13; measured 4e-15).
    np.testing.assert_allclose(rebuilt.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)


def test_compute_fid_from_stats():
    x, y = features(seed=0), features(seed=0)[:, ::-1] + 1.0
    a, b = FeatureStats(12).update(x), FeatureStats(12).update(y)
    expected = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    # numpy's covariances and the raw-moment ones differ by ~1e-13 relative (test_stats_match_numpy);
    # the FID is Lipschitz in them with constant ~sqrt(cond) ~ 50 here, and each side has the
    # distance's own round-off: 1e-9 relative (~8e-8) is far above both (measured 7e-16).
    assert compute_fid(a, b) == pytest.approx(expected, rel=1e-9)
    assert compute_fid(a, a) == pytest.approx(0.0, abs=fid_roundoff(a.cov, a.cov))
    with pytest.raises(ValueError, match="feature dims differ"):
        compute_fid(a, FeatureStats(3).update(np.ones((4, 3)) + np.eye(4, 3)))


def test_stats_reject_bad_features(tmp_path):
    stats = FeatureStats(4)
    with pytest.raises(ValueError, match="NaN or inf"):
        stats.update(np.array([[0.0, 1.0, np.nan, 2.0]]))
    with pytest.raises(ValueError, match=r"expected features of shape \[N, 4\]"):
        stats.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"expected features of shape \[N, 4\]"):
        stats.update(np.zeros(4))
    assert stats.count == 0  # failed updates leave no trace
    with pytest.raises(ValueError, match="no features"):
        stats.mean
    stats.update(np.ones((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        stats.cov
    with pytest.raises(ValueError, match="dims differ"):
        stats.merge(FeatureStats(5))
    with pytest.raises(ValueError, match="positive integer"):
        FeatureStats(0)
    with pytest.raises(ValueError, match="no such statistics file"):
        FeatureStats.load(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="bad.npz: not a readable npz"):
        load_mu_sigma(tmp_path / "bad.npz")

"""Distributed sampling and FID: the same seeds give the same samples, and the same FID, at
world size 1 and 2 (``torchrun``, gloo, 2 CPU processes) and at batch sizes 1, 7 and 64.

One ``torchrun`` launch runs every world-size-2 case (the CLI's ``sample`` and ``fid``, the
library's ``sample_seeds`` without a work directory, and the library's all-reduced feature sums)
so the suite pays its start-up once. The processes run at one thread (``ENV``); what this process
compares with them bit for bit it computes at one thread too (``torch_threads(1)``).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EPS32, EPS64, fid_roundoff, randomise_output_layer, torch_threads

import epsscale.distributed as dist
from epsscale.cli import main
from epsscale.plan import SamplingPlan
from epsscale.sampling import parse_seeds, sample_seeds

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
SEEDS = "0-16"  # 17 seeds: uneven over 2 ranks and over batches of 7
STEPS = "3"
BATCHES = (1, 7, 64)

TINY_FLAGS = {
    "image_size": 32, "in_channels": 1, "num_channels": 32, "channel_mult": "1,2", "num_res_blocks": 1,
    "attention_resolutions": "4", "num_head_channels": 32, "learn_sigma": True, "class_cond": False, "dropout": 0.0,
}


def make_tiny_model(directory: Path, *, image_size: int = 32, seed: int = 0) -> Path:
    """A random-init ADM model saved as model.safetensors + model.json ("epsscale.model/1", no crop)."""
    from safetensors.torch import save_file

    from epsscale.models.adm import create_adm_model

    flags = {**TINY_FLAGS, "image_size": image_size}
    torch.manual_seed(seed)
    net = create_adm_model(flags)
    randomise_output_layer(net)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(directory / "model.safetensors"))
    cfg = {"format": "epsscale.model/1", "arch": "adm", "flags": flags, "schedule": "cosine", "num_timesteps": 1000, "prediction": "eps", "learn_sigma": True}
    (directory / "model.json").write_text(json.dumps(cfg, indent=2))
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [str(TORCHRUN), f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


# What every world size runs: the CLI at each batch size, a stochastic float64 sampler, the FID,
# and the library call without a work directory (raw float samples, gathered to rank 0).
CASES = [(f"ddpm-b{b}", ["--batch", str(b)]) for b in BATCHES] + [("heun-b7", ["--batch", "7", "--sampler", "heun", "--s-churn", "2"])]
# The FIDs, as (samples, feature batch size): at a feature batch of 1 an image's features do not
# depend on which rank computed them; at 5 and 250 they may, by float32 rounding (the slices differ).
FID_RUNS = [(name, 250) for name, _ in CASES] + [("ddpm-b7", 5), ("ddpm-b7", 1)]

DRIVER = r'''
import json, sys
import numpy as np
import torch
import epsscale.distributed as dist
from epsscale.cli import main
from epsscale.models.pretrained import load_model
from epsscale.plan import SamplingPlan
from epsscale.sampling import parse_seeds, sample_seeds

out, model_dir, ref, seeds, steps, cases, fid_runs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], json.loads(sys.argv[6]), json.loads(sys.argv[7])
for name, extra in cases:
    assert main(["sample", "--model", model_dir, "--steps", steps, "--seeds", seeds, "--out", f"{out}/{name}.npz", "--quiet", *extra]) == 0
for name, fid_batch in fid_runs:
    assert main(["fid", f"{out}/{name}.npz", "--ref", ref, "--json", "--quiet", "--batch", str(fid_batch)]) == 0
# The library's reduction on its own: rank r's features of images r, r + W, ... summed over ranks.
from epsscale.data.images import load_images
from epsscale.metrics import FeatureStats, feature_stats, get_extractor
ext = get_extractor("fmnist")
for name, fid_batch in fid_runs:
    images = load_images(f"{out}/{name}.npz")
    stats = FeatureStats(ext.dim)
    feature_stats(images[dist.rank()::dist.world_size()], ext, batch_size=fid_batch, stats=stats)
    for t in stats.tensors():
        dist.all_reduce_sum(t)
    if dist.rank() == 0:
        np.savez(f"{out}/stats-{name}-b{fid_batch}.npz", *(t.numpy() for t in stats.tensors()))
m = load_model(model_dir)
sigmas = m.schedule.grid(steps)
for b in (1, 7, 64):
    res = sample_seeds(SamplingPlan(m.denoiser, sigmas, "ddpm", m.shape, lambda x: x.numpy()), parse_seeds(seeds), batch_size=b)
    if dist.rank() == 0:
        np.save(f"{out}/float-b{b}.npy", res[0])
if dist.rank() == 0:
    print("WORLD", dist.world_size())
'''


def _fid_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"fid"')]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from epsscale.metrics import feature_stats, get_extractor

    root = tmp_path_factory.mktemp("dist")
    model = make_tiny_model(root / "model")
    # Reference statistics of 40 random images (mu/sigma file, as pytorch-fid writes).
    rng = np.random.default_rng(0)
    ref_images = rng.integers(0, 256, size=(40, 32, 32, 1), dtype=np.uint8)
    ref = feature_stats(ref_images, get_extractor("fmnist")).save(root / "ref.npz")
    return root, model, ref


@pytest.fixture(scope="module")
def world2(setup):
    root, model, ref = setup
    out = root / "ws2"
    out.mkdir()
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    p = torchrun(2, str(driver), str(out), str(model), str(ref), SEEDS, STEPS, json.dumps(CASES), json.dumps(FID_RUNS))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "WORLD 2" in p.stdout
    return out, _fid_lines(p.stdout)


@pytest.fixture(scope="module")
def world1(setup, tmp_path_factory):
    root, model, ref = setup
    out = root / "ws1"
    out.mkdir()
    with torch_threads(1):
        for name, extra in CASES:
            assert main(["sample", "--model", str(model), "--steps", STEPS, "--seeds", SEEDS, "--out", str(out / f"{name}.npz"), "--quiet", *extra]) == 0
    return out


def _load(path: Path) -> np.ndarray:
    with np.load(path) as z:
        assert z.files == ["arr_0"]
        return z["arr_0"]


def test_samples_identical_at_world_size_1_and_2(world1, world2):
    ws2, _ = world2
    ref = _load(world1 / "ddpm-b64.npz")
    assert ref.shape == (17, 32, 32, 1) and ref.dtype == np.uint8 and ref.std() > 0
    for name, _ in CASES:
        # Bit-identical over world sizes at one batch size (every network call has batch rows).
        np.testing.assert_array_equal(_load(ws2 / f"{name}.npz"), _load(world1 / f"{name}.npz"), err_msg=name)
        if name.startswith("ddpm"):
            # Another batch size changes only the network's float32 rounding: a pixel by 1 at most.
            diff = np.abs(_load(world1 / f"{name}.npz").astype(int) - ref)
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, name
    # Nothing but the outputs is left behind (work directories are removed).
    for d in (world1, ws2):
        assert sorted(p.name for p in d.iterdir() if not p.name.startswith(("float", "stats"))) == sorted(f"{n}.npz" for n, _ in CASES)


def test_library_float_samples_identical_without_work_dir(setup, world2):
    """Bit-identical float32 samples (before quantisation), gathered with all_gather_object."""
    root, model, _ = setup
    from epsscale.models.pretrained import load_model

    ws2, _ = world2
    m = load_model(str(model))
    sigmas = m.schedule.grid(STEPS)
    seeds = parse_seeds(SEEDS)
    plan = SamplingPlan(m.denoiser, sigmas, "ddpm", m.shape, lambda x: x.numpy())
    # The network matters here: its output is not the zero of an untrained ADM.
    x = torch.randn(2, *m.shape, dtype=torch.float64)
    assert (m.denoiser(x, torch.tensor([5.0, 5.0], dtype=torch.float64)).x0 - x).abs().max() > 1e-3
    first = None
    with torch_threads(1):  # the torchrun processes' thread count
        for b in BATCHES:
            ref, labels = sample_seeds(plan, seeds, batch_size=b)
            assert labels is None and ref.dtype == np.float32 and ref.shape == (17, 1, 32, 32)
            np.testing.assert_array_equal(np.load(ws2 / f"float-b{b}.npy"), ref)
            first = ref if first is None else first
            np.testing.assert_allclose(ref, first, rtol=1e-5, atol=1e-6 * float(np.abs(first).max()))
        # Seed order is the order asked for, whatever the striding; a shorter list is padded to the
        # batch, so its samples are bit-identical to the same seeds in the full run.
        part, _ = sample_seeds(plan, [16, 3, 9], batch_size=7)
        full, _ = sample_seeds(plan, seeds, batch_size=7)
    np.testing.assert_array_equal(part, full[[16, 3, 9]])


def _features(images: np.ndarray, ext, batch: int) -> torch.Tensor:
    """float64 features of ``images``, computed as ``feature_stats`` does: in slices of ``batch``."""
    from epsscale.metrics import images_to_tensor

    x = images_to_tensor(images)
    return torch.cat([ext(x[i : i + batch]) for i in range(0, len(x), batch)]).double()


def _fid_lipschitz(stats, ref_mu: np.ndarray, ref_sigma: np.ndarray, delta: float) -> float:
    """How far the FID can move when every feature of ``stats``' n samples moves by <= delta.

    With X the centred n x d features and S2 the reference covariance,
    FID = |mu1 - mu2|^2 + |X|_F^2 / (n - 1) + tr S2 - 2 |S2^1/2 X^T|_* / sqrt(n - 1), and
    |E|_F <= sqrt(n d) delta for a perturbation E (centring does not enlarge it); the nuclear norm
    is 1-Lipschitz in itself and |A|_* <= sqrt(rank A) |A|_F. The three terms below bound the
    changes of the three sample-dependent terms, second-order parts included.
    """
    n, d = stats.count, stats.dim
    mu_gap = float(np.linalg.norm(stats.mean - ref_mu))
    tr1 = float(np.trace(stats.cov))
    s2 = float(np.linalg.norm(ref_sigma, 2))
    e_f = math.sqrt(n * d) * delta
    mean_term = 2 * mu_gap * math.sqrt(d) * delta + d * delta**2
    trace_term = (2 * math.sqrt((n - 1) * tr1) * e_f + e_f**2) / (n - 1)
    nuclear_term = 2 * math.sqrt(min(n, d) * s2) * e_f / math.sqrt(n - 1)
    return mean_term + trace_term + nuclear_term


def test_fid_identical_at_world_size_1_and_2(setup, world1, world2, capsys):
    """The gathered float64 sums are reproduced here bit for bit; the FIDs agree to the round-off
    of the Fréchet distance itself (``fid_roundoff``), plus, where a rank's feature batches differ
    from world size 1's, what the float32 features' batch-dependent rounding can move the FID."""
    from epsscale.data.images import load_images
    from epsscale.metrics import FeatureStats, compute_fid, feature_stats, get_extractor, load_mu_sigma

    _, _, ref = setup
    ws2, fids2 = world2
    assert len(fids2) == len(FID_RUNS)  # only rank 0 prints
    ref_mu, ref_sigma = load_mu_sigma(ref)
    ext = get_extractor("fmnist")
    for (name, batch), got in zip(FID_RUNS, fids2):
        images = load_images(ws2 / f"{name}.npz")
        with torch_threads(1):  # the torchrun processes' thread count
            # Rank r featurised images r, r + 2, ... in slices of `batch`; the two ranks' float64
            # sums are added (a + b == b + a: exact in any order for two ranks).
            union = FeatureStats(ext.dim)
            for r in range(2):
                union.merge(feature_stats(images[r::2], ext, batch_size=batch))
            with np.load(ws2 / f"stats-{name}-b{batch}.npz") as z:
                gathered = [z[f"arr_{i}"] for i in range(3)]
            for mine, theirs in zip(union.tensors(), gathered):
                np.testing.assert_array_equal(theirs, mine.numpy(), err_msg=f"{name} b{batch}")

            # The CLI's FID at world size 2 is the FID of exactly that union.
            roundoff = fid_roundoff(union.cov, ref_sigma)
            assert got["samples"] == union.count == 17
            assert got["fid"] == pytest.approx(compute_fid(union, ref), rel=0, abs=roundoff), (name, batch)

            # World size 1 featurises all 17 images in slices of `batch`. At batch 1 the features
            # are the same, and only the order of the float64 sums differs; otherwise the float32
            # features differ by rounding (measured here, and checked to be rounding).
            assert main(["fid", str(world1 / f"{name}.npz"), "--ref", str(ref), "--json", "--quiet", "--batch", str(batch)]) == 0
            want = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            whole = _features(images, ext, batch)
            sharded = torch.empty_like(whole)
            for r in range(2):
                sharded[r::2] = _features(images[r::2], ext, batch)
        delta = float((whole - sharded).abs().max())
        assert delta <= 64 * EPS32 * float(whole.abs().max()), (name, batch, delta)
        if batch == 1:
            assert delta == 0.0
        assert want["samples"] == 17 and want["fid"] > 0
        tol = 2 * roundoff + _fid_lipschitz(union, ref_mu, ref_sigma, delta)
        assert got["fid"] == pytest.approx(want["fid"], rel=0, abs=tol), (name, batch)
        # The tolerance is well below what one sample more or less does to the FID.
        fewer = FeatureStats(ext.dim).update(whole[:-1])
        assert abs(compute_fid(fewer, ref) - want["fid"]) > 10 * tol, (name, batch)


def test_all_reduce_of_feature_stats_is_exact_union():
    """At world size 1 the reduction is the identity; sums of shards equal the stats of the union."""
    from epsscale.metrics import FeatureStats

    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6))
    whole = FeatureStats(6).update(x)
    parts = [FeatureStats(6).update(x[r::3]) for r in range(3)]
    total = FeatureStats(6)
    for p in parts:
        for mine, theirs in zip(total.tensors(), p.tensors()):
            mine += dist.all_reduce_sum(theirs.clone())
    assert total.count == 50
    # The same 50 float64 terms summed in two orders. A sum of n terms is within
    # (n - 1) eps sum|term| <= n^2 eps max|term| of the exact one, so the means (near 0: a relative
    # tolerance means nothing there) agree to 2 n eps max|x|, and the covariances, which subtract
    # n mu mu^T (as rounded, <= 2 n^2 eps max|x|^2 off) from sum x x^T and divide by n - 1, to
    # 6 n^2 eps max|x|^2 / (n - 1) (~3e-13; measured 3e-16).
    n, big = 50, float(np.abs(x).max())
    np.testing.assert_allclose(total.mean, whole.mean, rtol=0, atol=2 * n * EPS64 * big)
    np.testing.assert_allclose(total.cov, whole.cov, rtol=0, atol=6 * n**2 * EPS64 * big**2 / (n - 1))


def test_world_size_one_needs_no_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist.init()
    assert dist.world_size() == 1 and dist.rank() == 0
    assert not torch.distributed.is_initialized()
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    dist.barrier()

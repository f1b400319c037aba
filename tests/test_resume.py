"""Resumable sampling: a run killed at any moment (SIGKILL) and restarted with the same command
ends with exactly the output of an uninterrupted run, loses at most the batch each rank had in
flight, and never leaves a truncated, half-written or temporary file behind.

The killed runs go through a small driver around ``epsscale.cli.main`` that records the seeds of
every batch as it starts (``ES_TRACE``), can slow each batch down (``ES_DELAY``) so that a kill
lands mid-batch, can SIGKILL itself halfway through writing a shard, the final ``.npz`` or
while removing the work directory (``ES_DIE``), and can stop before it writes the final ``.npz``
(``ES_PAUSE=output``; it touches ``ES_TRACE.paused`` and sleeps) so that a kill lands there
without a race. Restarts at world size 1 run in-process with a
counting sampler, so the test sees exactly which seeds the restart computed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomise_output_layer, torch_threads

from epsscale import samplers, store
from epsscale.cli import main

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
SEEDS = list(range(20))
BATCH = 4  # 5 batches at world size 1; 3 per rank (4, 4, 2) at world size 2

DRIVER = r'''
import io, os, signal, sys, time
import numpy as np
from epsscale import samplers, store
from epsscale.cli import main

trace, delay, die = os.environ["ES_TRACE"], float(os.environ.get("ES_DELAY", "0")), os.environ.get("ES_DIE", "")
pause = os.environ.get("ES_PAUSE", "")
rank = os.environ.get("RANK", "0")

def traced(fn):
    def run(denoiser, x, sigmas, *, noise=None, **kw):
        with open(f"{trace}.r{rank}", "a") as f:
            f.write(" ".join(map(str, dict.fromkeys(noise.seeds))) + "\n")  # without the padding rows
        time.sleep(delay)
        return fn(denoiser, x, sigmas, noise=noise, **kw)
    return run

for name, fn in list(samplers.SAMPLERS.items()):
    samplers.SAMPLERS[name] = traced(fn)

real_savez, shards = np.savez, [0]
def savez(file, *args, **kw):
    kind = "shard" if "seeds" in kw else "output"
    shards[0] += kind == "shard"
    if pause == kind == "output":
        open(f"{trace}.paused", "w").close()
        time.sleep(300)  # the test kills it here
    if die == (f"shard:{shards[0]}" if kind == "shard" else "output"):
        buf = io.BytesIO()
        real_savez(buf, *args, **kw)
        file.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_savez(file, *args, **kw)
np.savez = savez

if die == "finish":
    import shutil
    def rmtree(path, *a, **kw):
        names = sorted(os.listdir(path))
        for n in names[: len(names) // 2]:
            os.unlink(os.path.join(path, n))
        os.kill(os.getpid(), signal.SIGKILL)
    shutil.rmtree = rmtree

sys.exit(main(sys.argv[1:]))
'''

TINY_FLAGS = {
    "image_size": 8, "in_channels": 1, "num_channels": 32, "channel_mult": "1,2", "num_res_blocks": 1,
    "attention_resolutions": "4", "num_head_channels": 32, "learn_sigma": True, "class_cond": False, "dropout": 0.0,
}


def make_tiny_model(directory: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    from epsscale.models.adm import create_adm_model

    torch.manual_seed(seed)
    net = create_adm_model(TINY_FLAGS)
    randomise_output_layer(net)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(directory / "model.safetensors"))
    cfg = {"format": "epsscale.model/1", "arch": "adm", "flags": TINY_FLAGS, "schedule": "cosine", "num_timesteps": 1000, "prediction": "eps", "learn_sigma": True}
    (directory / "model.json").write_text(json.dumps(cfg))
    return directory


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """In-process runs at the subprocesses' one thread (``ENV``): the network's float32 kernels
    may round differently at another count, and the outputs are compared bit for bit. Without this
    the thread count here depended on which other modules were collected (several set one thread
    on import; this file alone under EPSSCALE_TEST_THREADS=2 ran at two)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def command(model: Path, out: Path, *, batch: int = BATCH) -> list[str]:
    return ["sample", "--model", str(model), "--sampler", "ddpm", "--steps", "3", "--seeds", f"0-{len(SEEDS) - 1}", "--batch", str(batch), "--out", str(out), "--quiet"]


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    assert main(command(model, out)) == 0
    with np.load(out) as z:
        assert z.files == ["arr_0"]
        return z["arr_0"]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def is_temp(p: Path) -> bool:
    return p.name.startswith(".") and ("tmp" in p.name or ".removing-" in p.name)


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if is_temp(p) or any(is_temp(q) for q in p.relative_to(root).parents if str(q) != "."))


def shard_seeds(work: Path) -> dict[str, list[int]]:
    """Seeds of every complete shard in the work directory."""
    out = {}
    if work.is_dir():
        for p in sorted(work.glob("seeds-*.npz")):
            with np.load(p) as z:
                out[p.name] = z["seeds"].tolist()
    return out


def assert_no_truncated_files(root: Path) -> None:
    """Every file under its final name is complete: each .npz and .json reads in full."""
    for p in root.rglob("*"):
        if not p.is_file() or is_temp(p) or any(is_temp(q) for q in p.parents):
            continue
        if p.suffix == ".npz":
            with np.load(p) as z:
                for k in z.files:
                    z[k]  # reads and CRC-checks every member
        elif p.suffix == ".json":
            json.loads(p.read_text())


def traced_seeds(prefix: Path) -> dict[str, list[list[int]]]:
    out = {}
    for f in sorted(prefix.parent.glob(prefix.name + ".r*")):
        out[f.suffix] = [[int(v) for v in line.split()] for line in f.read_text().splitlines() if line.strip()]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp: Path, args: list[str], *, nproc: int = 1, delay: float = 0.0, die: str = "", pause: str = "", trace: str = "trace") -> subprocess.Popen:
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    env = {**ENV, "ES_TRACE": str(tmp / trace), "ES_DELAY": str(delay), "ES_DIE": die, "ES_PAUSE": pause}
    launcher = [sys.executable] if nproc == 1 else [str(TORCHRUN), f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    return subprocess.Popen([*launcher, str(driver), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def wait_until(p: subprocess.Popen, condition, timeout: float = 90) -> None:
    t0 = time.time()
    while not condition():
        if p.poll() is not None:
            raise AssertionError(f"the run ended before the kill point (rc {p.returncode}): {p.stderr.read().decode()[-2000:]}")
        if time.time() - t0 > timeout:
            kill(p)
            raise AssertionError("timed out waiting for the kill point")
        time.sleep(0.005)


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill(p: subprocess.Popen) -> None:
    """SIGKILL the run and every process it started, all at once (as a crashed node would)."""
    pids = [p.pid, *descendants(p.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait(timeout=30)
    for pid in pids[1:]:  # wait for the workers to be gone before looking at their files
        t0 = time.time()
        while alive(pid) and time.time() - t0 < 10:
            time.sleep(0.01)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Counting:
    """Wraps every sampler to record the seeds of each batch it is asked for (in-process)."""

    def __init__(self, monkeypatch) -> None:
        self.batches: list[list[int]] = []
        for name, fn in list(samplers.SAMPLERS.items()):
            monkeypatch.setitem(samplers.SAMPLERS, name, self._wrap(fn))

    def _wrap(self, fn):
        def run(denoiser, x, sigmas, *, noise=None, **kw):
            self.batches.append(list(dict.fromkeys(noise.seeds)))  # without the padding rows
            return fn(denoiser, x, sigmas, noise=noise, **kw)

        return run

    @property
    def seeds(self) -> list[int]:
        return [s for b in self.batches for s in b]


def check_final(tmp: Path, out: Path, reference: np.ndarray) -> None:
    with np.load(out) as z:
        assert z.files == ["arr_0"]
        np.testing.assert_array_equal(z["arr_0"], reference)
    assert not out.with_name(out.name + ".parts").exists(), "the work directory was not removed"
    assert leftovers(tmp) == [], "temporary files were left behind"


# ---------------------------------------------------------------------------------------------
# Kill at several points (world size 1), restart with the same command
# ---------------------------------------------------------------------------------------------

N_BATCHES = -(-len(SEEDS) // BATCH)

# (delay per batch, ES_DIE, ES_PAUSE, the condition the test waits for before it kills; None: the run kills itself)
KILL_POINTS = {
    "after-first-shard": (0.4, "", "", lambda work, trace: len(shard_seeds(work)) >= 1),
    "mid-batch": (0.4, "", "", lambda work, trace: sum(len(v) for v in traced_seeds(trace).values()) >= 3),
    "while-writing-a-shard": (0.0, "shard:2", "", None),
    "after-all-shards": (0.0, "", "output", lambda work, trace: trace.with_name(trace.name + ".paused").exists()),
    "while-writing-the-output": (0.0, "output", "", None),
    "while-removing-the-work-dir": (0.0, "finish", "", None),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_and_restart_gives_the_same_output(point, model, reference, tmp_path, monkeypatch):
    delay, die, pause, condition = KILL_POINTS[point]
    out = tmp_path / "out.npz"
    work = tmp_path / "out.npz.parts"
    trace = tmp_path / "trace"
    args = command(model, out)

    # The killed run.
    p = start(tmp_path, args, delay=delay, die=die, pause=pause)
    if condition is None:
        p.wait(timeout=90)
        assert p.returncode == -signal.SIGKILL, p.stderr.read().decode()[-2000:]
    else:
        wait_until(p, lambda: condition(work, trace))
        kill(p)

    # What it left: complete files only; the batches it started but did not save.
    assert_no_truncated_files(tmp_path)
    saved = {s for seeds in shard_seeds(work).values() for s in seeds}
    started = {s for b in traced_seeds(trace).get(".r0", []) for s in b}
    output_done, work_left = out.exists(), work.exists()
    if output_done:  # killed after the final .npz was in place: it is already the right one
        with np.load(out) as z:
            np.testing.assert_array_equal(z["arr_0"], reference)
    if work_left or not output_done:
        assert len(started - saved) <= BATCH, f"lost more than one batch: {sorted(started - saved)}"
    if die.startswith("shard"):
        assert any(is_temp(q) for q in work.iterdir()), "the self-kill should leave a half-written temporary"
    if die == "output":
        assert any(is_temp(q) for q in tmp_path.iterdir())
    if pause == "output":  # stopped before the final .npz: every shard is in place, nothing is written yet
        assert len(shard_seeds(work)) == N_BATCHES and not output_done

    # The restart with the same command computes exactly the seeds that were not saved.
    counting = Counting(monkeypatch)
    assert main(args) == 0
    if work_left or not output_done:
        assert sorted(counting.seeds) == sorted(set(SEEDS) - saved)
    else:  # the run had finished and its work directory was gone: a rerun starts afresh
        assert sorted(counting.seeds) == SEEDS
    assert all(len(b) <= BATCH for b in counting.batches)
    check_final(tmp_path, out, reference)


def test_restart_after_a_crash_keeps_the_runs_batch_size(model, reference, tmp_path, monkeypatch):
    """A resumed run keeps the batch size in run.json whatever it is given: the network's float32
    rounding depends on the batch shape, and the result must be bit-identical."""
    out = tmp_path / "out.npz"
    real = samplers.SAMPLERS["ddpm"]
    calls = []

    def crash_on_third(den, x, sigmas, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(den, x, sigmas, **kw)

    monkeypatch.setitem(samplers.SAMPLERS, "ddpm", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(command(model, out))
    assert sorted(p.name for p in (tmp_path / "out.npz.parts").glob("seeds-*")) == ["seeds-000000-000003.npz", "seeds-000004-000007.npz"]
    monkeypatch.setitem(samplers.SAMPLERS, "ddpm", real)
    counting = Counting(monkeypatch)
    assert main(command(model, out, batch=5)) == 0
    assert sorted(counting.seeds) == list(range(8, 20)) and [len(b) for b in counting.batches] == [4, 4, 4]
    check_final(tmp_path, out, reference)


# ---------------------------------------------------------------------------------------------
# World size 2
# ---------------------------------------------------------------------------------------------


def test_kill_and_restart_under_torchrun(model, reference, tmp_path):
    out = tmp_path / "out.npz"
    work = tmp_path / "out.npz.parts"
    args = command(model, out)

    # Kill both ranks once two shards are written, while the next batches are in flight.
    p = start(tmp_path, args, nproc=2, delay=0.5, trace="run1")
    wait_until(p, lambda: len(shard_seeds(work)) >= 2)
    kill(p)
    assert_no_truncated_files(tmp_path)
    saved = {s for seeds in shard_seeds(work).values() for s in seeds}
    for r, batches in traced_seeds(tmp_path / "run1").items():
        lost = {s for b in batches for s in b} - saved
        assert len(lost) <= BATCH, f"rank {r} lost more than one batch: {sorted(lost)}"
    assert 0 < len(saved) < len(SEEDS)

    # Same command: each rank samples only what is missing, and the output equals world size 1's.
    p = start(tmp_path, args, nproc=2, trace="run2")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()[-3000:]
    again = [s for batches in traced_seeds(tmp_path / "run2").values() for b in batches for s in b]
    assert sorted(again) == sorted(set(SEEDS) - saved)
    check_final(tmp_path, out, reference)


# ---------------------------------------------------------------------------------------------
# Kill at random moments (slow)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(6))
def test_kill_at_a_random_moment(trial, model, reference, tmp_path, monkeypatch):
    rng = np.random.default_rng(trial)
    out = tmp_path / "out.npz"
    work = tmp_path / "out.npz.parts"
    args = command(model, out)
    p = start(tmp_path, args, delay=0.1)
    wait_until(p, lambda: (tmp_path / "trace.r0").exists())  # sampling has begun
    time.sleep(float(rng.uniform(0.0, 0.9)))  # 5 batches of ~0.15 s, then assembly
    kill(p)
    assert_no_truncated_files(tmp_path)
    saved = {s for seeds in shard_seeds(work).values() for s in seeds}
    resumable = work.exists() or not out.exists()
    counting = Counting(monkeypatch)
    assert main(args) == 0
    if resumable:
        assert sorted(counting.seeds) == sorted(set(SEEDS) - saved)
    check_final(tmp_path, out, reference)


# ---------------------------------------------------------------------------------------------
# The run manifest
# ---------------------------------------------------------------------------------------------


class _Hook:
    """Stands for a sampler hook such as ClassifierGuidance (its repr holds a memory address)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.net = torch.nn.Linear(2, 2)


def test_job_key_is_stable_across_processes_and_sees_option_values():
    def key(opts):
        return store.Job("ddpm", (1.0, 0.0), (1, 8, 8), "vp", "1.0", store.job_options(opts), "m").key()

    # A fresh object with the same settings (as in a restarted process) gives the same key ...
    assert key({"clip": 1.0, "classifier_grad": _Hook(0.5)}) == key({"classifier_grad": _Hook(0.5), "clip": 1.0})
    assert key({"t": torch.arange(3.0)}) == key({"t": torch.arange(3.0)})
    # ... and other settings another key.
    assert key({"clip": 1.0, "classifier_grad": _Hook(0.5)}) != key({"clip": 1.0, "classifier_grad": _Hook(1.0)})
    assert key({"clip": 1.0}) != key({"clip": 0.5})
    assert key({"t": torch.arange(3.0)}) != key({"t": torch.arange(1.0, 4.0)})

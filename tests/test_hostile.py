"""Hostile input: every bad option, file or number ends in one clear line on stderr and a
non-zero exit (2 for user errors, 3 for a network that returns NaN/inf), never a traceback, and
leaves no output behind. Property-based tests (hypothesis) cover the seed syntax, the sampling
options and the schedule JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import epsscale.sampling as dist
from epsscale import samplers, store
from epsscale.plan import SamplingPlan
from epsscale.cli import SAMPLER_NAMES, main
from epsscale.scaling import SCHEDULE_FORMAT, load_schedule, resolve_schedule, save_schedule, schedule_from_dict

needs_fmnist_data = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")

TINY_FLAGS = {
    "image_size": 8, "in_channels": 1, "num_channels": 32, "channel_mult": "1,2", "num_res_blocks": 1,
    "attention_resolutions": "4", "num_head_channels": 32, "learn_sigma": True, "class_cond": False, "dropout": 0.0,
}
TINY_CONFIG = {"format": "epsscale.model/1", "arch": "adm", "flags": TINY_FLAGS, "schedule": "cosine", "num_timesteps": 1000, "prediction": "eps", "learn_sigma": True}


def make_tiny_model(directory: Path, *, config: dict | None = None, state: dict | None = None) -> Path:
    from safetensors.torch import save_file

    from epsscale.models.adm import create_adm_model

    torch.manual_seed(0)
    if state is None:
        state = create_adm_model(TINY_FLAGS).state_dict()
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    (directory / "model.json").write_text(json.dumps(config or TINY_CONFIG))
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def run(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` in-process; returns (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def assert_one_line_error(code: int, err: str, *needles: str, status: int = 2) -> None:
    assert code == status, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]


def sample_args(model, out, *extra) -> list:
    return ["sample", "--model", model, "--steps", "2", "--seeds", "0-2", "--batch", "2", "--out", out, "--quiet", *extra]


# ---------------------------------------------------------------------------------------------
# Seeds (hypothesis)
# ---------------------------------------------------------------------------------------------


@st.composite
def seed_specs(draw) -> tuple[str, list[int]]:
    """A valid spec of disjoint ranges in any order, and the seeds it stands for."""
    cuts = sorted(draw(st.sets(st.integers(0, 2**63 - 1) | st.integers(0, 300), min_size=1, max_size=8)))
    ranges, i = [], 0
    while i < len(cuts):
        if i + 1 < len(cuts) and cuts[i + 1] - cuts[i] < 50 and draw(st.booleans()):
            ranges.append((cuts[i], cuts[i + 1]))
            i += 2
        else:
            ranges.append((cuts[i], cuts[i]))
            i += 1
    ranges = draw(st.permutations(ranges))
    pad = draw(st.sampled_from(["", " "]))
    spec = ",".join(f"{pad}{a}{pad}" if a == b else f"{a}-{b}" for a, b in ranges)
    return spec, [s for a, b in ranges for s in range(a, b + 1)]


@settings(max_examples=100, deadline=None)
@given(seed_specs())
def test_valid_seed_specs_parse_to_their_seeds(case):
    spec, seeds = case
    assert dist.parse_seeds(spec) == seeds


SEED_ALPHABET = st.sampled_from(list("0123456789-,, -") + ["+", "x", "²", "١", "\t", "\n", "9" * 20, "_", "0x1", "e"])


@settings(max_examples=100, deadline=None)
@given(st.lists(SEED_ALPHABET, max_size=12).map("".join) | st.text(max_size=12))
def test_parse_seeds_returns_seeds_or_raises_value_error(spec):
    try:
        seeds = dist.parse_seeds(spec)
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert seeds and len(set(seeds)) == len(seeds)
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("", "seeds"), (" ", "seeds"), ("1,,2", "bad seed"), ("-3", "bad seed"), ("5-2", "before the start"),
        ("a-b", "bad seed"), ("1-2-3", "bad seed"), ("+1", "bad seed"), ("²", "bad seed"), ("١", "bad seed"),
        ("1.5", "bad seed"), ("9223372036854775808", "too large"), ("0-" + "9" * 19, "too large"),
        ("9" * 5000, "bad seed"), ("0-10000000", "too many"), ("1,1", "repeat"), ("0-5,3", "repeat"),
    ],
)
def test_bad_seeds(spec, needle):
    with pytest.raises(ValueError, match=needle):
        dist.parse_seeds(spec)


def test_largest_seed_is_accepted():
    assert dist.parse_seeds("9223372036854775807") == [2**63 - 1]


# ---------------------------------------------------------------------------------------------
# Sampling options (hypothesis over the option parser, run on the 2-D toy model)
# ---------------------------------------------------------------------------------------------

FLOAT_TEXT = st.floats(allow_nan=True, allow_infinity=True).map(repr) | st.sampled_from(["nan", "inf", "-inf", "0", "-0", "1e309", "1", "1.004", "0x1", "", " ", "1,0"]) | st.text(max_size=5)
INT_TEXT = st.integers(-3, 12).map(str) | st.sampled_from(["0", "", "1.5", "1e2", "two", "99999", " 3"]) | st.text(max_size=4)
SEEDS_TEXT = st.sampled_from(["0-7", "3", "1,5-9", "0-0"]) | st.lists(SEED_ALPHABET, max_size=6).map("".join)
SAMPLER_TEXT = st.sampled_from(SAMPLER_NAMES) | st.text(max_size=6)
VALID = {
    "sampler": st.sampled_from(SAMPLER_NAMES),
    "steps": st.integers(1, 8).map(str),
    "eps-scale": st.floats(0.5, 2.0).map(repr),
    "seeds": st.sampled_from(["0-7", "3", "1,5-9", "0-0", "10-40"]),
    "batch": st.integers(1, 70).map(str),
}
HOSTILE = {"sampler": SAMPLER_TEXT, "steps": INT_TEXT, "eps-scale": FLOAT_TEXT, "seeds": SEEDS_TEXT, "batch": INT_TEXT}


@st.composite
def sample_options(draw) -> dict[str, str]:
    """Valid values for every option, then hostile ones for a random few (often none)."""
    opts = {k: draw(v) for k, v in VALID.items()}
    for k in draw(st.sets(st.sampled_from(sorted(HOSTILE)), max_size=3)):
        opts[k] = draw(HOSTILE[k])
    return opts


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample_options())
def test_sample_options_exit_0_or_one_line_error(opts):
    # Keep the valid runs small: few steps and seeds.
    with contextlib.suppress(ValueError):
        assume(int(opts["steps"]) <= 12)
    with contextlib.suppress(ValueError):
        assume(len(dist.parse_seeds(opts["seeds"])) <= 64)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "o.npz"
        code, err = run(["sample", "--model", "toy", *(f"--{k}={v}" for k, v in opts.items()), "--out", out, "--quiet"])
        event(f"exit {code}")
        if code == 0:
            # Success says nothing, but for one-line warnings about options the toy does not use.
            assert out.is_file() and all(line.startswith("epsscale sample: warning:") for line in err.splitlines()), err
            assert opts["sampler"] in SAMPLER_NAMES and int(opts["steps"]) >= 1
            assert math.isfinite(float(opts["eps-scale"])) and float(opts["eps-scale"]) > 0
        else:
            assert_one_line_error(code, err)
            assert not out.exists()
        assert sorted(p.name for p in Path(d).iterdir()) in ([], ["o.npz"])


# ---------------------------------------------------------------------------------------------
# Schedule JSON (hypothesis)
# ---------------------------------------------------------------------------------------------

# JSON numbers as Python reads them: floats (NaN and inf included, as json.loads accepts them)
# and integers. Integers beyond the float range have their own test below.
NUMBERS = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**300), 10**300) | st.sampled_from([0, 1, -1, 1.0, 0.5, 1e-320, 1e308])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | NUMBERS | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def schedule_dicts(draw) -> dict:
    """A valid schedule object, then a few fields replaced or added at random (often none)."""
    kind = draw(st.sampled_from(["uniform", "linear", "per_sigma"]))
    d: dict = {"format": SCHEDULE_FORMAT, "type": kind}
    if kind == "uniform":
        d["b"] = draw(st.floats(0.5, 2.0))
    elif kind == "linear":
        d["k"], d["b"] = draw(st.floats(-0.01, 0.01)), draw(st.floats(0.9, 1.1))
    else:
        n = draw(st.integers(1, 5))
        d["sigmas"] = draw(st.lists(st.floats(1e-3, 100.0), min_size=n, max_size=n, unique=True))
        d["lams"] = draw(st.lists(st.floats(0.5, 2.0), min_size=n, max_size=n))
    if draw(st.booleans()):
        d["meta"] = draw(st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=3))
    fields = ["format", "type", "b", "k", "sigmas", "lams", "meta", "extra"]
    for key in draw(st.sets(st.sampled_from(fields), max_size=3)):
        if draw(st.booleans()) and key in d:
            del d[key]
        elif key in ("sigmas", "lams"):
            d[key] = draw(st.lists(NUMBERS, max_size=5) | JSON_VALUES)
        else:
            d[key] = draw(NUMBERS | JSON_VALUES)
    return d


@settings(max_examples=150, deadline=None)
@given(schedule_dicts())
def test_schedule_json_is_valid_or_a_value_error(d):
    try:
        sched = schedule_from_dict(d, "s.json")
    except ValueError as e:
        assert str(e).startswith("s.json") and "\n" not in str(e)
        event("invalid")
        return
    event(f"valid {type(sched.schedule).__name__}")
    # Valid: it round-trips through a file, and bound to a grid it gives lambda finite > 0.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.json"
        save_schedule(path, sched)
        again = load_schedule(path)
        assert again == sched
        assert [p.name for p in Path(tmp).iterdir()] == ["s.json"]
    grid = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.0], dtype=torch.float64)
    try:
        bound = resolve_schedule(sched, grid)
    except ValueError:
        return  # e.g. a linear schedule that goes <= 0 on this grid: refused before sampling
    lam = bound.lam(grid)
    assert bool(torch.isfinite(lam).all()) and bool((lam > 0).all())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule_dicts() | JSON_VALUES)
def test_schedule_file_through_the_cli(d):
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "s.json", Path(tmp) / "o.npz"
        path.write_text(json.dumps(d))
        code, err = run(["sample", "--model", "toy", "--steps", "4", "--seeds", "0-7", "--eps-schedule", path, "--out", out, "--quiet"])
        event(f"exit {code}")
        if code:
            assert_one_line_error(code, err)
            # Bad files are named; a valid linear schedule that is <= 0 on this grid says so.
            assert str(path) in err or "lambda must be finite and > 0" in err, err
            assert not out.exists()
        else:
            assert out.is_file()


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '"x"', "\xff", '{"format": "epsscale.schedule/1"}', '{"format": "epsscale.schedule/1", "type": "uniform", "b": NaN}', '{"format": "epsscale.schedule/1", "type": "uniform", "b": Infinity}', '{"format": "epsscale.schedule/1", "type": "per_sigma", "sigmas": [1, 1], "lams": [1, 1]}', '{"format": "epsscale.schedule/1", "type": "per_sigma", "sigmas": [1, 2], "lams": [1]}', '{"format": "epsscale.schedule/1", "type": "linear", "k": 1, "b": -100}'])
def test_bad_schedule_files(text, tmp_path):
    path = tmp_path / "s.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape") if text != "\xff" else b"\xff")
    code, err = run(["sample", "--model", "toy", "--steps", "4", "--seeds", "0-3", "--eps-schedule", path, "--out", tmp_path / "o.npz"])
    assert_one_line_error(code, err, str(path) if "-100" not in text else "lambda must be finite and > 0")
    assert not (tmp_path / "o.npz").exists()


def test_schedule_json_with_a_huge_integer_is_a_value_error():
    with pytest.raises(ValueError):
        schedule_from_dict({"format": SCHEDULE_FORMAT, "type": "uniform", "b": 10**400})


# ---------------------------------------------------------------------------------------------
# Checkpoints and model configs
# ---------------------------------------------------------------------------------------------


def _state():
    from epsscale.models.adm import create_adm_model

    torch.manual_seed(0)
    return create_adm_model(TINY_FLAGS).state_dict()


def test_tiny_model_loads_and_samples(tiny, tmp_path):
    from epsscale.models.pretrained import load_model

    m = load_model(str(tiny))
    assert m.shape == (1, 8, 8) and m.num_classes is None
    code, err = run(sample_args(tiny, tmp_path / "o.npz"))
    assert code == 0, err
    with np.load(tmp_path / "o.npz") as z:
        assert z["arr_0"].shape == (3, 8, 8, 1) and z["arr_0"].dtype == np.uint8


@pytest.mark.parametrize(
    "name,edit,needles",
    [
        ("missing key", lambda s: s.pop("out.2.bias"), ["missing", "out.2.bias"]),
        ("unexpected key", lambda s: s.__setitem__("extra.weight", torch.zeros(3)), ["unexpected", "extra.weight"]),
        ("wrong shape", lambda s: s.__setitem__("out.2.bias", torch.zeros(5)), ["wrong shape", "out.2.bias", "[2]", "[5]"]),
    ],
)
def test_checkpoint_with_wrong_keys_or_shapes_names_them(name, edit, needles, tmp_path):
    state = _state()
    edit(state)
    model = make_tiny_model(tmp_path / "m", state=state)
    code, err = run(sample_args(model, tmp_path / "o.npz"))
    assert_one_line_error(code, err, *needles)
    assert not list(tmp_path.glob("o.npz*"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing"])
def test_corrupt_safetensors(damage, tiny, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.json").write_text((tiny / "model.json").read_text())
    data = (tiny / "model.safetensors").read_bytes()
    if damage != "missing":
        (model / "model.safetensors").write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(2000), "empty": b""}[damage])
    code, err = run(sample_args(model, tmp_path / "o.npz"))
    assert_one_line_error(code, err, "model.safetensors")
    assert not list(tmp_path.glob("o.npz*"))


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda c: "{not json", "json"),
        (lambda c: {**c, "format": "other"}, "format"),
        (lambda c: {**c, "arch": "dit"}, "arch"),
        (lambda c: {**c, "flags": []}, "flags"),
        (lambda c: {**c, "num_timesteps": "many"}, "num_timesteps"),
        (lambda c: {**c, "num_timesteps": 0}, "num_timesteps"),
        (lambda c: {**c, "schedule": "quadratic"}, "schedule"),
        (lambda c: {**c, "prediction": "score"}, "prediction"),
        (lambda c: {**c, "flags": {**c["flags"], "image_size": -8}}, "image_size"),
        (lambda c: {**c, "flags": {**c["flags"], "channel_mult": "a,b"}}, "channel_mult"),
        (lambda c: {**c, "flags": {**c["flags"], "bogus": 1}}, "bogus"),
        (lambda c: {**c, "flags": {**c["flags"], "in_channels": 3}}, "wrong shape"),
    ],
)
def test_bad_model_config(edit, needle, tiny, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes())
    cfg = edit(json.loads(json.dumps(TINY_CONFIG)))
    (model / "model.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    code, err = run(sample_args(model, tmp_path / "o.npz"))
    assert_one_line_error(code, err, needle)


# ---------------------------------------------------------------------------------------------
# Sample files for fid
# ---------------------------------------------------------------------------------------------


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda p: p.write_bytes(_npz(p.with_suffix(".x.npz"), arr_0=np.zeros((4, 28, 28, 1), np.uint8)).read_bytes()[:300]), "not a readable npz"),
        (lambda p: p.write_bytes(os.urandom(500)), "not an .npz file"),
        (lambda p: p.write_bytes(b""), "npz"),
        (lambda p: _npz(p, images=np.zeros((4, 28, 28, 1), np.uint8)), "arr_0"),
        (lambda p: _npz(p, arr_0=np.zeros((4, 28, 28, 1), np.float32)), "uint8"),
        (lambda p: _npz(p, arr_0=np.zeros((4, 28, 28), np.uint8)), "shape"),
        (lambda p: _npz(p, arr_0=np.zeros((4, 28, 28, 2), np.uint8)), "channels"),
        (lambda p: _npz(p, arr_0=np.zeros((0, 28, 28, 1), np.uint8)), "no images"),
        (lambda p: _npz(p, arr_0=np.zeros((4, 8, 8, 1), np.uint8)), "need a feature extractor"),
        (lambda p: _npz(p, arr_0=np.array([object()], dtype=object)), "npz"),
        (lambda p: None, "no such file"),
    ],
)
def test_fid_rejects_bad_sample_files(make, needle, tmp_path):
    path = tmp_path / "s.npz"
    make(path)
    code, err = run(["fid", path, "--quiet"])
    assert_one_line_error(code, err, needle)


def test_fid_rejects_a_missing_reference(tmp_path):
    path = _npz(tmp_path / "s.npz", arr_0=np.zeros((4, 28, 28, 1), np.uint8))
    code, err = run(["fid", path, "--ref", tmp_path / "nope.npz", "--quiet"])
    assert_one_line_error(code, err, "nope.npz")


# ---------------------------------------------------------------------------------------------
# Output paths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where,needle",
    [
        (lambda t: ["--out", t / "afile" / "o.npz"], "cannot write"),
        (lambda t: ["--out", t / "nodir" / "o.npz"], "does not exist"),
        (lambda t: ["--out", t / "adir"], "directory"),
        (lambda t: ["--out", t / "o.png"], ".npz"),
        (lambda t: ["--out", t / "o.npz", "--work-dir", t / "afile"], "work directory"),
        (lambda t: ["--out", t / "o.npz", "--work-dir", t / "afile" / "w"], "work directory"),
    ],
)
def test_output_that_cannot_be_written(where, needle, tiny, tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    code, err = run(["sample", "--model", tiny, "--steps", "2", "--seeds", "0-1", "--quiet", *where(tmp_path)])
    assert_one_line_error(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]


# ---------------------------------------------------------------------------------------------
# Work directories: different settings, a run already in progress
# ---------------------------------------------------------------------------------------------


def _crash_after_first_batch(monkeypatch):
    real = samplers.SAMPLERS["ddpm"]
    calls = []

    def sampler(den, x, sigmas, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(den, x, sigmas, **kw)

    monkeypatch.setitem(samplers.SAMPLERS, "ddpm", sampler)
    return real


def test_resuming_with_different_settings_is_refused(tiny, tmp_path, monkeypatch):
    out = tmp_path / "o.npz"
    real = _crash_after_first_batch(monkeypatch)
    code, err = run(sample_args(tiny, out))
    assert code == 130 and (tmp_path / "o.npz.parts").is_dir()
    monkeypatch.setitem(samplers.SAMPLERS, "ddpm", real)
    base = sample_args(tiny, out)
    for change in (["--steps", "3"], ["--seeds", "0-3"], ["--eps-scale", "1.01"], ["--sampler", "ddim"]):
        code, err = run([*base, *change])  # the last occurrence of an option wins
        assert_one_line_error(code, err, "different settings")
    assert not out.exists()
    # The same command finishes it.
    code, err = run(sample_args(tiny, out))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.npz"]


def test_a_second_run_in_the_same_work_dir_is_refused(tiny, tmp_path):
    import fcntl

    work = tmp_path / "o.npz.parts"
    work.mkdir()
    with open(work / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = run(sample_args(tiny, tmp_path / "o.npz"))
    assert_one_line_error(code, err, "another run")
    assert not (tmp_path / "o.npz").exists()


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    out = tmp_path / "o.npz"
    stale = [".o.npz.123.tmp", ".o.npz.77.1a2b3c4d.tmp"]
    keep = ["o.npz", ".o.npz", "o.npz.123.tmp", ".other.npz.1.1a2b3c4d.tmp", ".o.npz.parts", ".o.npz.x.tmp"]
    for n in stale + keep:
        (tmp_path / n).write_text("x")
    removed = store.remove_stale_temps(out)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


# ---------------------------------------------------------------------------------------------
# A network that returns NaN or inf
# ---------------------------------------------------------------------------------------------


class PoisonAt:
    """A denoiser that returns ``value`` everywhere from its ``at``-th call on (0-based)."""

    def __init__(self, inner, at: int, value: float = float("nan")) -> None:
        self.inner, self.at, self.value, self.calls = inner, at, value, 0
        self.sigma_seen: list[float] = []

    def __call__(self, x, sigma, **cond):
        out = self.inner(x, sigma, **cond)
        self.sigma_seen.append(float(torch.as_tensor(sigma).flatten()[0]))
        self.calls += 1
        if self.calls > self.at:
            from epsscale.adapters import Prediction

            if isinstance(out, Prediction):
                return out.replace_x0(torch.full_like(out.x0, self.value))
            return torch.full_like(out, self.value)
        return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_network_stops_the_run_naming_step_and_sigma(value, tiny, tmp_path, monkeypatch):
    import epsscale.models.pretrained as pretrained

    real_load = pretrained.load_model
    poisoned = {}

    def load(name, **kw):
        m = real_load(name, **kw)
        m.denoiser = poisoned.setdefault("den", PoisonAt(m.denoiser, at=4, value=value))
        return m

    monkeypatch.setattr(pretrained, "load_model", load)
    out = tmp_path / "o.npz"
    # 3 steps, batches of 2: batch 1 makes calls 0-2, batch 2 is poisoned at its 2nd step.
    code, err = run(["sample", "--model", tiny, "--steps", "3", "--seeds", "0-3", "--batch", "2", "--out", out, "--quiet"])
    sigma = poisoned["den"].sigma_seen[4]
    assert_one_line_error(code, err, "nan or inf", "step 2 of 3", f"sigma = {sigma:.6g}", status=3)
    assert not out.exists()
    # The finished batch is kept for a resume.
    assert [p.name for p in (tmp_path / "o.npz.parts").glob("seeds-*")] == ["seeds-000000-000001.npz"]


def test_check_finite_names_the_step_for_every_sampler():
    from epsscale.samplers import SAMPLERS, StackedGenerator
    from epsscale.schedules import VPSchedule

    sigmas = VPSchedule("cosine").grid("6")

    class Gauss:
        def __call__(self, x, sigma, **cond):
            k = 0.25 / (0.25 + sigma.to(torch.float64) ** 2)
            return (k.reshape(-1, 1) * x.to(torch.float64)).to(x.dtype)

    for name, fn in SAMPLERS.items():
        den = PoisonAt(Gauss(), at=2, value=float("inf"))
        gen = StackedGenerator([0, 1])
        with pytest.raises(dist.NonFiniteError) as e:
            fn(dist.CheckFinite(den, sigmas), gen.randn((2, 3), dtype=torch.float64) * float(sigmas[0]), sigmas, noise=gen)
        s = den.sigma_seen[2]
        step = int((sigmas[:-1].log() - math.log(s)).abs().argmin())
        assert f"step {step + 1} of 6" in str(e.value) and f"sigma = {s:.6g}" in str(e.value), (name, str(e.value))


# ---------------------------------------------------------------------------------------------
# The library's own checks
# ---------------------------------------------------------------------------------------------


def _forbidden(x, sigma, **cond):
    raise AssertionError("the network was called")


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"sampler": "plms"}, "unknown sampler"),
        ({"batch_size": 0}, "batch size"),
        ({"batch_size": True}, "batch size"),
        ({"batch_size": 2.0}, "batch size"),
        ({"seeds": []}, "no seeds"),
        ({"seeds": [1, 1]}, "repeat"),
        ({"seeds": [-1]}, "2\\*\\*63"),
        ({"labels": [1]}, "labels"),
    ],
)
def test_sample_seeds_rejects_bad_arguments_before_sampling(kw, needle):
    args = {"seeds": [0, 1], "sampler": "ddpm", "batch_size": 2, **kw}
    with pytest.raises(ValueError, match=needle):
        plan = SamplingPlan(_forbidden, torch.tensor([1.0, 0.0], dtype=torch.float64), args.pop("sampler"), (2,), lambda x: x.numpy(), labels=args.pop("labels", None))
        dist.sample_seeds(plan, args.pop("seeds"), **args)


# ---------------------------------------------------------------------------------------------
# Found by a review: output directories, option combinations, unreadable files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,needle",
    [
        (lambda t: ["demo", "--toy", "--out", t / "afile"], "not a directory"),
        (lambda t: ["demo", "--toy", "--num", "1", "--out", t / "d"], "at least 2"),
        (lambda t: ["train", "--run-dir", t / "afile", "--steps", "1"], "not a directory"),
        (lambda t: ["train", "--run-dir", t / "r", "--steps", "1", "--export", t / "afile" / "m"], "not a writable directory"),
        (lambda t: ["measure", "--model", "toy", "--out", t / "afile"], "not a directory"),
        (lambda t: ["measure", "--num", "1", "--out", t / "m"], "at least 2"),
        (lambda t: ["calibrate", "--method", "fid", "--cache", t / "nodir" / "c.json", "--out", t / "c.json"], "does not exist"),
        (lambda t: ["sample", "--model", "toy", "--seeds", "0-1", "--out", t / "o.npz", "--grid", t / "o.npz"], "--out"),
        (lambda t: ["sample", "--model", "toy", "--seeds", "0-1", "--out", t / "o.npz", "--grid", t / "o.npz.parts"], "work directory"),
        (lambda t: ["sample", "--model", "toy", "--seeds", "0-1", "--out", t / "o.npz", "--classifier-scale", "5"], "--classifier"),
        (lambda t: ["sample", "--model", "toy", "--seeds", "0-1", "--out", t / "o.npz", "--preset-es", "linear"], "--preset"),
        (lambda t: ["sample", "--model", "toy", "--seeds", "0-1", "--out", t / "o.npz", "--allow-pickle"], "--edm"),
        (lambda t: ["sample", "--model", "toy", "--seeds", "0-1", "--out", t / "o.npz", "--disc", "ddim"], "toy"),
        (lambda t: ["sample", "--model", "toy", "--seeds", "0-1", "--out", t / "o.npz", "--sigma-max", "3"], "toy"),
    ],
)
def test_bad_paths_and_option_combinations_fail_before_any_work(args, needle, tmp_path):
    (tmp_path / "afile").write_text("x")
    code, err = run(args(tmp_path))
    assert_one_line_error(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@needs_fmnist_data
def test_a_wrong_data_dir_leaves_no_run_dir(tmp_path):
    code, err = run(["train", "--run-dir", tmp_path / "r", "--steps", "1", "--data", tmp_path / "nodata"])
    assert_one_line_error(code, err, "Fashion-MNIST not found")
    assert not (tmp_path / "r").exists()


@needs_fmnist_data
def test_an_unreadable_checkpoint_names_itself(tmp_path):
    from epsscale.models.train import TrainConfig

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(TrainConfig(steps=1, batch_size=1))))
    (run_dir / "checkpoint.pt").write_bytes(b"\x80\x02garbage" * 5)
    code, err = run(["train", "--run-dir", run_dir, "--steps", "1", "--batch", "1", "--quiet"])
    assert_one_line_error(code, err, "checkpoint.pt", "not a readable checkpoint")


@pytest.mark.parametrize(
    "payload,needle",
    [
        (b"\xe0garbage", "not a readable pickle"),
        (b"", "not a readable pickle"),
        (b"cdnnlib\nFoo\n.", "dnnlib"),  # a GLOBAL opcode for a module that is not importable
    ],
)
def test_unreadable_edm_pickles(payload, needle, tmp_path):
    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(payload)
    argv = ["sample", "--edm", pkl, "--allow-pickle", "--seeds", "0-1", "--out", tmp_path / "o.npz"]
    with pytest.warns(UserWarning, match="only load pickles you trust"):
        code, err = run(argv)
    assert_one_line_error(code, err, needle, str(pkl))
    assert not (tmp_path / "o.npz").exists()
    if needle == "dnnlib":
        # Outside pytest (which catches warnings), the pickle warning is one line of its own.
        import subprocess
        import sys

        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, "-m", "epsscale", *map(str, argv)], capture_output=True, text=True, env=env)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 2, r.stderr
        assert lines[0].startswith("epsscale sample: warning:") and "only load pickles you trust" in lines[0]
        assert "dnnlib" in lines[1] and lines[1].startswith("epsscale sample: error:")


def test_labels_that_are_not_numbers_name_the_option(tmp_path):
    from epsscale.cli.common import UserError, parse_labels as _parse_labels

    np.save(tmp_path / "l.npy", np.array(["a", "b"]))
    with pytest.raises(UserError, match="--labels: .*non-numbers"):
        _parse_labels(str(tmp_path / "l.npy"), 2)
    np.save(tmp_path / "l.npy", np.array([3, 1]))
    assert _parse_labels(str(tmp_path / "l.npy"), 2) == [3, 1]


def test_fid_of_one_image_names_the_file(tmp_path):
    path = _npz(tmp_path / "one.npz", arr_0=np.zeros((1, 28, 28, 1), np.uint8))
    code, err = run(["fid", path, "--quiet"])
    assert_one_line_error(code, err, "one.npz", "at least 2")


def test_a_folder_reference_is_recomputed_when_a_file_inside_changes(tmp_path):
    from epsscale.metrics.features import _dataset_key

    sub = tmp_path / "ref" / "sub"
    sub.mkdir(parents=True)
    (sub / "a.png").write_bytes(b"1")
    first = _dataset_key(str(tmp_path / "ref"))
    assert _dataset_key(str(tmp_path / "ref")) == first
    (sub / "a.png").write_bytes(b"22")  # same name, new content: the folder's own stat is unchanged
    assert _dataset_key(str(tmp_path / "ref")) != first
    (sub / "b.png").write_bytes(b"1")
    assert len({first, _dataset_key(str(tmp_path / "ref"))}) == 2


def test_a_work_dir_that_is_not_one_is_refused_and_left_alone(tiny, tmp_path):
    base = ["sample", "--model", tiny, "--steps", "2", "--seeds", "0-3", "--batch", "2", "--quiet"]
    # It would hold the output (it is deleted at the end).
    (tmp_path / "w").mkdir()
    code, err = run(base + ["--out", tmp_path / "w" / "o.npz", "--work-dir", tmp_path / "w"])
    assert_one_line_error(code, err, "would hold the output")
    code, err = run(base + ["--out", tmp_path / "o.npz", "--work-dir", tmp_path])
    assert_one_line_error(code, err, "would hold the output")
    # It holds someone else's files.
    (tmp_path / "w" / "precious.txt").write_text("keep")
    code, err = run(base + ["--out", tmp_path / "o.npz", "--work-dir", tmp_path / "w"])
    assert_one_line_error(code, err, "did not write", "precious.txt")
    assert (tmp_path / "w" / "precious.txt").read_text() == "keep"
    # Its manifest is unreadable, so its batches cannot be matched to this run.
    work = tmp_path / "o.npz.parts"
    work.mkdir()
    np.savez(work / "seeds-000000-000001.npz", seeds=np.array([0, 1]), images=np.zeros((2, 8, 8, 1), np.uint8), labels=np.zeros(0, np.int64))
    (work / "run.json").write_text("garbage")
    code, err = run(base + ["--out", tmp_path / "o.npz"])
    assert_one_line_error(code, err, "run.json", "unreadable")
    (work / "run.json").unlink()
    code, err = run(base + ["--out", tmp_path / "o.npz"])
    assert_one_line_error(code, err, "no run.json")
    assert not (tmp_path / "o.npz").exists()
    # An empty directory is fine, and is removed with the run's files at the end.
    (tmp_path / "empty").mkdir()
    code, err = run(base + ["--out", tmp_path / "o.npz", "--work-dir", tmp_path / "empty"])
    assert code == 0, err
    assert (tmp_path / "o.npz").exists() and not (tmp_path / "empty").exists()


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--method", "norm", "--search", "grid"], "--search does not apply to --method norm"),
        (["--method", "norm", "--lo", "0.9", "--fid-num", "10"], "--lo, --fid-num do not apply"),
        (["--method", "fid", "--search", "grid", "--kind", "linear"], "--kind does not apply to --method fid --search grid"),
        (["--method", "fid", "--kind", "per_sigma"], "--kind per_sigma is for --method norm"),
        (["--method", "fid", "--search", "parabola", "--points", "9"], "--points does not apply to --method fid --search parabola"),
        (["--method", "fid", "--search", "grid", "--spacing", "0.02"], "--spacing does not apply to --method fid --search grid"),
        (["--method", "fid", "--search", "grid", "--step", "0.02"], "--steps"),  # no such option; the hint names the likely one
        (["--spacing", "20"], "did you mean --steps"),
        (["--eps-scale", "1.01"], "chooses lambda"),
    ],
)
def test_calibrate_refuses_options_its_method_ignores(extra, needle, tmp_path):
    code, err = run(["calibrate", *extra, "--out", tmp_path / "l.json"])
    assert_one_line_error(code, err, needle)
    assert not list(tmp_path.iterdir())

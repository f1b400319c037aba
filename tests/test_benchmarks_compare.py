"""benchmarks/compare.py's bookkeeping: which model each method samples, its tuned knob, and the table
read back from the cache (no sampling here)."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compare():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("compare_bench", ROOT / "benchmarks" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_each_method_samples_its_own_model(compare):
    assert compare.model_of("ES + DCW") == "main"
    assert compare.model_of("IP + ES") == "ip"
    assert compare.model_of("control + ES") == "control"
    tuned = {"ES": 1.01, "DCW": 0.02, "IP + ES": 1.005, "control + ES": 0.995}
    assert compare.knobs_of("ES + DCW", tuned) == {"ES": 1.01, "DCW": 0.02}
    assert compare.knobs_of("IP + ES", tuned) == {"ES": 1.005}
    assert compare.knobs_of("control + ES", tuned) == {"ES": 0.995}
    assert compare.knobs_of("control", tuned) == {} == compare.knobs_of("baseline", tuned)
    # Every ES-type knob grid holds the neutral b = 1; the other knobs' grids their neutral values.
    for m in ("ES", "IP + ES", "control + ES"):
        assert 1.0 in compare.knob_grid(m, 20, 5)
    assert compare.knob_grid("DCW", 20, 3)[0] == 0.0


def fake_weights(path: Path, content: bytes) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(content)
    return path


def test_the_table_reads_each_model_at_its_own_tuned_b(compare, tmp_path):
    args = argparse.Namespace(model="fmnist", ip_model=str(fake_weights(tmp_path / "ip", b"ip")),
                              control_model=str(fake_weights(tmp_path / "ft", b"ft")), tune_points=3, tune_num=10, num=20,
                              samplers="ddpm", steps="20")
    ids = compare.model_ids(args)
    assert set(ids) == {"main", "ip", "control"} and len(set(ids.values())) == 3
    cache = {}

    def put(model, knobs, fid, tuning=False):
        tail = "|10|1000000|fashion-mnist-train" if tuning else "|20|0|fashion-mnist-test"
        cache[compare.cache_key(ids[model], "ddpm", 20, knobs) + tail] = {"fid": fid, "per_image": 0.01}

    for model, fids in (("main", (30.0, 20.0, 25.0)), ("ip", (17.0, 18.0, 19.0)), ("control", (22.0, 23.0, 21.0))):
        for b, fid in zip(compare.knob_grid("ES", 20, 3), fids):
            put(model, {"ES": b}, fid, tuning=True)
    b1, b2, b3 = compare.knob_grid("ES", 20, 3)
    assert b1 == 1.0 and b2 < 1 < b3
    put("main", {}, 40.0)
    put("main", {"ES": b2}, 39.0)
    put("ip", {}, 30.0)
    put("control", {}, 36.0)
    put("control", {"ES": b3}, 35.0)
    rows = {r[0]: r for r in compare.rows(cache, "ddpm", 20, args)}
    assert set(rows) == {"baseline", "ES", "IP", "IP + ES", "control", "control + ES"}
    # Tuned values at an end of a grid carry a dagger; the neutral b = 1 never does.
    assert rows["ES"][1] == f"b = {b2:g}†" and rows["IP + ES"][1] == "b = 1" and rows["control + ES"][1] == f"b = {b3:g}†"
    assert rows["ES"][2] == 39.0
    # IP + ES tuned to the neutral b = 1 is IP's plan: its row reads IP's sample.
    assert rows["IP + ES"][2] == rows["IP"][2] == 30.0 and rows["IP + ES"][3] == "-25.0%"
    assert rows["IP"][3] == "-25.0%" and rows["control"][3] == "-10.0%"
    text = compare.report(cache, args)
    assert f"| control + ES | b = {b3:g}† | 35.00 | -12.5% |" in text and "† the best value is at an end" in text
    assert f"| IP + ES | b = {b2:g}: 18.0, **b = 1: 17.0**, b = {b3:g}: 19.0 |" in text


def test_a_knob_at_its_neutral_value_shares_the_baseline_key(compare):
    base = compare.cache_key("main-x", "ddim", 20, {})
    for knob, value in compare.NEUTRAL.items():
        assert compare.cache_key("main-x", "ddim", 20, {knob: value}) == base
        assert value in compare.knob_grid(knob, 20, 5)
    assert compare.cache_key("main-x", "ddim", 20, {"ES": 1.0, "DCW": 0.02}) == base + "DCW=0.02"
    assert compare.cache_key("main-x", "ddim", 20, {"ES": 1.005}) != base


def test_two_processes_sharing_a_cache_keep_each_others_points(compare, tmp_path):
    from _common import add_to_json_cache  # the cache of compare.py and quality.py

    path = tmp_path / "cache.json"
    seen_by_a = add_to_json_cache(path, "ddim|x", {"fid": 1.0})  # process a, then process b: b never read a's entry
    seen_by_b = add_to_json_cache(path, "ddpm|y", {"fid": 2.0})
    assert seen_by_a == {"ddim|x": {"fid": 1.0}}
    assert json.loads(path.read_text()) == seen_by_b == {"ddim|x": {"fid": 1.0}, "ddpm|y": {"fid": 2.0}}


def test_the_committed_ip_twins_are_fine_tunes_of_the_shipped_model_that_differ_only_in_gamma(compare):
    from safetensors.torch import load_file

    from epsscale.models.pretrained import SHIPPED

    twins = {name: json.loads((ROOT / "benchmarks" / "ip_model" / f"{name}.json").read_text()) for name in ("model", "control")}
    shipped = json.loads(Path(SHIPPED["fmnist"]).with_suffix(".json").read_text())
    for name, gamma in (("model", 0.1), ("control", 0.0)):
        cfg = twins[name]
        assert cfg["flags"] == shipped["flags"] and cfg["schedule"] == shipped["schedule"]
        assert cfg["training"]["input_perturbation"] == gamma
        assert cfg["training"]["steps_done"] == 14400 and cfg["training"]["lr"] == 1e-4
    weights = {n: load_file(str(ROOT / "benchmarks" / "ip_model" / f"{n}.safetensors")) for n in ("model", "control")}
    weights["shipped"] = load_file(str(Path(SHIPPED["fmnist"]).with_suffix(".safetensors")))
    assert weights["model"].keys() == weights["control"].keys() == weights["shipped"].keys()
    for a, b in (("model", "control"), ("model", "shipped"), ("control", "shipped")):
        assert any(not weights[a][k].equal(weights[b][k]) for k in weights[a]), (a, b)
    args = argparse.Namespace(model="fmnist", ip_model=str(ROOT / "benchmarks" / "ip_model" / "model"),
                              control_model=str(ROOT / "benchmarks" / "ip_model" / "control"))
    assert len(set(compare.model_ids(args).values())) == 3

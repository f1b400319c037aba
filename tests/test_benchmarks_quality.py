"""benchmarks/quality.py's bookkeeping: which grids count as tuned, and the report written into RESULTS.md."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_grid(tune_dir: Path, sampler: str, steps: int, points, grid: str | None = None) -> None:
    tune_dir.mkdir(parents=True, exist_ok=True)
    key = {"sampler": sampler, "steps": steps, "num": 500, **({"grid": grid} if grid else {})}
    d = {"format": "epsscale.fid_search/1", "key": key, "points": [list(p) for p in points]}
    (tune_dir / f"{sampler}_{grid or ''}_{steps}_500.json").write_text(json.dumps(d))


def some_results(quality, tune_dir: Path, ref: str) -> dict:
    """Tuning grids in ``tune_dir`` and a cache of held-out results: DDIM 20 tuned and evaluated,
    DDIM 100 still tuning, Heun 20 on the demo's grid (evaluated at lambda = 1 only) and from sigma 25."""
    write_grid(tune_dir, "ddim", 20, [(0.99, 236.3), (1.0, 218.4), (1.01, 212.9), (1.02, 223.1)])
    write_grid(tune_dir, "ddim", 100, [(0.99, 184.8), (1.0, 169.8)])
    write_grid(tune_dir, "heun", 20, [(1.0, 181.6), (1.005, 178.7), (1.01, 178.8)])
    write_grid(tune_dir, "heun", 20, [(1.0, 144.9), (1.005, 143.9), (1.01, 146.8)], grid="karras25")
    return {
        quality.point_key("ddim", quality.grid_label("ddim"), 20, 1.0, 5000, 0, ref): {"fid": 200.0},
        quality.point_key("ddim", quality.grid_label("ddim"), 20, 1.01, 5000, 0, ref): {"fid": 190.0},
        quality.point_key("heun", "karras", 20, 1.0, 5000, 0, ref): {"fid": 180.0},
        quality.point_key("heun", "karras25", 20, 1.0, 5000, 0, ref): {"fid": 150.0},
        quality.point_key("heun", "karras25", 20, 1.005, 5000, 0, ref): {"fid": 147.0},
    }


def test_grid_labels_keep_the_demo_keys_and_mark_a_moved_karras_top(quality):
    from epsscale.models.pretrained import shipped_discretisation

    top = shipped_discretisation("euler")[1]  # the shipped config's measured start (40)
    assert top is not None and top != 25.0
    assert quality.grid_label("euler") == quality.grid_label("euler", top) == "karras"
    assert quality.grid_label("heun", 25.0) == "karras25"
    assert quality.discretisation("heun", 25.0) == ("karras", 25.0)
    # The VP samplers' grids have no Karras top to move.
    assert quality.grid_label("ddim", 25.0) == shipped_discretisation("ddim")[0]
    assert quality.discretisation("ddpm", 25.0) == quality.discretisation("ddpm")


def test_a_grid_whose_minimum_is_at_an_end_is_unfinished(quality, tmp_path):
    write_grid(tmp_path, "ddim", 100, [(0.99, 184.8), (0.995, 176.0), (1.0, 169.8)])
    write_grid(tmp_path, "ddim", 20, [(0.99, 236.3), (1.0, 218.4), (1.01, 212.9), (1.02, 223.1)])
    grids = quality.tuned(tmp_path)
    assert grids[("ddim", quality.grid_label("ddim"), 100)][0] is None
    assert grids[("ddim", quality.grid_label("ddim"), 20)][0] == 1.01


def test_a_grid_killed_before_its_first_pass_is_unfinished(quality, tmp_path):
    # Three of the seven starting points, with the minimum inside them by chance: not a result yet.
    write_grid(tmp_path, "ddpm", 50, [(0.99, 17.41), (0.995, 17.40), (1.0, 18.04)])
    # Finished, after growing two spacings below the start (0.98 and 0.985 are not starting points).
    write_grid(tmp_path, "ddpm", 20, [(0.98, 49.0), (0.985, 48.0), *[(0.99 + 0.005 * i, 48.5 + i) for i in range(7)]])
    start = quality.TUNE_START  # (0.99, 1.02, 7)
    grids = quality.tuned(tmp_path, start)
    assert grids[("ddpm", quality.grid_label("ddpm"), 50)][0] is None
    assert grids[("ddpm", quality.grid_label("ddpm"), 20)][0] == 0.985
    assert quality.tuned(tmp_path)[("ddpm", quality.grid_label("ddpm"), 50)][0] == 0.995
    cache = {}
    assert "| ddpm | 50 | 50 | tuning unfinished | not run | not run |  |" in quality.report(cache, tmp_path, 2000, 0, "fashion-mnist-test", None, start)


def test_report_rows_and_change(quality, tmp_path):
    ref = "fashion-mnist-test"
    cache = some_results(quality, tmp_path, ref)
    text = quality.report(cache, tmp_path, 5000, 0, ref, None)
    assert "| ddim | 20 | 20 | 1.01 | 200.00 | 190.00 | -5.0% |" in text
    assert "| ddim | 100 | 100 | tuning unfinished | not run | not run |  |" in text
    assert "**212.90**" in text
    assert "| heun | 20 | 39 | 1.005 | 180.00 | not run |  |" in text
    assert "| heun (karras25) | 20 | 39 | 1.005 | 150.00 | 147.00 | -2.0% |" in text
    # The demo's grid comes first, the moved one after it.
    assert text.index("| heun | 20 | 39") < text.index("| heun (karras25) | 20 | 39")


def test_write_tables_replaces_only_between_markers(quality, tmp_path):
    f = tmp_path / "RESULTS.md"
    f.write_text(f"intro\n{quality.TABLES_BEGIN}\nold table\n{quality.TABLES_END}\n\nReading: kept\n")
    quality.write_tables(f, "| new | table |\n")
    assert f.read_text() == f"intro\n{quality.TABLES_BEGIN}\n| new | table |\n{quality.TABLES_END}\n\nReading: kept\n"


def test_write_tables_without_markers_is_an_error_and_leaves_the_file(quality, tmp_path):
    f = tmp_path / "RESULTS.md"
    f.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="markers"):
        quality.write_tables(f, "| new |")
    assert f.read_text() == "no markers here\n"


def test_summary_is_steps_by_sampler_on_the_demo_grids_only(quality, tmp_path):
    ref = "fashion-mnist-test"
    cache = some_results(quality, tmp_path, ref)
    text = quality.summary(cache, tmp_path, 5000, 0, ref)
    assert "| steps | ddim | heun |" in text
    assert "| 20 | -5.0% (1.01) | not evaluated (b = 1.005) |" in text
    assert "| 100 | tuning unfinished | not run |" in text
    assert "heun takes 39, 199 network evaluations at 20, 100 steps." in text
    # The moved Karras start (karras25) is the RESULTS.md table's business, not the summary's.
    assert "-2.0%" not in text


def test_write_tables_takes_other_markers(quality, tmp_path):
    f = tmp_path / "README.md"
    f.write_text(f"a\n{quality.SUMMARY_BEGIN}\nold\n{quality.SUMMARY_END}\nb\n{quality.TABLES_BEGIN}\nx\n{quality.TABLES_END}\n")
    quality.write_tables(f, "new", quality.SUMMARY_BEGIN, quality.SUMMARY_END)
    assert f.read_text() == f"a\n{quality.SUMMARY_BEGIN}\nnew\n{quality.SUMMARY_END}\nb\n{quality.TABLES_BEGIN}\nx\n{quality.TABLES_END}\n"


def between(text: str, begin: str, end: str) -> str:
    return text.partition(begin)[2].partition(end)[0].strip()


def test_committed_readme_and_results_match_the_committed_caches(quality):
    # Both documents are written by `quality.py --report --write-results --write-readme`; this fails when
    # a cache changed without rerunning that, or when someone edited the generated text by hand.
    cache = quality.load_cache(ROOT / "benchmarks" / "quality_cache.json")
    tune_dir = ROOT / "benchmarks" / "quality_tune"
    ref = "fashion-mnist-test"
    num = 2000  # the held-out size of the committed grid (RESULTS.md, "Quality": `--report --num 2000`)
    readme = (ROOT / "README.md").read_text()
    assert between(readme, quality.SUMMARY_BEGIN, quality.SUMMARY_END) == quality.summary(cache, tune_dir, num, 0, ref, quality.TUNE_START).strip()
    results = between((ROOT / "benchmarks" / "RESULTS.md").read_text(), quality.TABLES_BEGIN, quality.TABLES_END)
    tables = quality.report(cache, tune_dir, num, 0, ref, None, quality.TUNE_START).strip()
    assert results == (tables if tables == quality.NOTHING_YET else f"{tables}\n\n![quality](quality.png)")


def test_an_empty_grid_reports_that_nothing_was_measured(quality, tmp_path):
    # A newly shipped model starts with no caches: both documents say so instead of drawing empty tables.
    assert quality.report({}, tmp_path / "none", 5000, 0, "fashion-mnist-test", tmp_path / "q.png") == quality.NOTHING_YET
    assert quality.summary({}, tmp_path / "none", 2000, 0, "fashion-mnist-test") == quality.NOTHING_YET
    assert not (tmp_path / "q.png").exists()


def test_committed_cuda_tables_match_the_committed_cuda_caches(quality):
    # The GPU run's tables (`quality.py --report --device cuda --write-results`) against its own caches.
    mark = lambda m: m.replace("--report", "--report --device cuda")  # noqa: E731
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    cache_file = ROOT / "benchmarks" / "quality_cache_cuda.json"
    if not cache_file.exists():
        # No GPU run on this model yet: then RESULTS.md must not show one either.
        assert mark(quality.TABLES_BEGIN) not in text
        return
    results = between(text, mark(quality.TABLES_BEGIN), mark(quality.TABLES_END))
    cache = quality.load_cache(cache_file)
    tables = quality.report(cache, ROOT / "benchmarks" / "quality_tune_cuda", 5000, 0, "fashion-mnist-test", None).strip()
    assert "| heun | 50 | 99 |" in tables
    assert results == f"{tables}\n\n![quality](quality_cuda.png)"


def test_another_devices_report_never_overwrites_the_cpu_tables(quality, tmp_path):
    import subprocess
    import sys

    f = tmp_path / "RESULTS.md"
    text = f"{quality.TABLES_BEGIN}\ncpu tables\n{quality.TABLES_END}\n"
    f.write_text(text)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--report", "--plot", "", "--tune-dir", str(tmp_path / "tune"), "--cache", str(tmp_path / "c.json")]
    r = subprocess.run(cmd + ["--device", "cuda", "--write-results", str(f)], capture_output=True, text=True)
    assert r.returncode != 0 and "--report --device cuda: begin" in r.stderr
    assert f.read_text() == text
    f.write_text(text + f"{quality.TABLES_BEGIN.replace('--report', '--report --device cuda')}\n{quality.TABLES_END.replace('--report', '--report --device cuda')}\n")
    r = subprocess.run(cmd + ["--device", "cuda", "--write-results", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # Empty caches: the device's own block says that nothing was measured; the CPU block is untouched.
    assert f.read_text().startswith(text) and quality.NOTHING_YET in f.read_text().partition(text)[2]

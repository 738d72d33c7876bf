"""Each pipeline benchmark runs in --quick mode: the figures it prints are the ones its JSON holds, every
repetition it ran is recorded, and what it measures is what it claims (a rerun trains nothing, int8 keeps the
float model's accuracy). Timings themselves are never asserted: they belong to the benchmarks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MACHINE_KEYS = {"cpu", "cores", "memory_gb", "python", "versions"}


def _run(name: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), "--quick", "--out", str(out), *extra],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"wrote {out}" in run.stdout and "goal" in run.stdout
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == name and doc["quick"] is True
    assert set(doc["machine"]) >= MACHINE_KEYS and doc["machine"]["cores"] >= 1
    assert isinstance(doc["meets_goal"], bool)
    doc["_stdout"] = run.stdout
    return doc


def _repetitions(doc: dict, keys: set[str]) -> None:
    """Every configuration ran ``repetitions`` times, each timing recorded, and the quoted median is one of them."""
    assert set(doc["seconds"]) == keys
    for key, times in doc["seconds"].items():
        assert len(times) == doc["repetitions"] and all(t > 0 for t in times)
        assert doc["median_seconds"][key] in times


def test_inference_quick(tmp_path):
    doc = _run("inference", tmp_path, "--runs", "30")
    labels = list(doc["results"])
    assert labels[0].startswith("float32 LiteRT") and labels[1].startswith("int8 LiteRT")
    assert labels[2] == "float32 Keras (tf.function, not comparable)"  # Keras is a labelled row, not the baseline
    float_case, int8_case, keras_case = doc["results"].values()
    for case in (float_case, int8_case, keras_case):
        assert 0.5 < case["accuracy"] <= 1 and case["batch1_ms"] > 0 and case["batch32_ms"] > 0
    assert abs(float_case["accuracy"] - int8_case["accuracy"]) <= 0.03  # int8 keeps the float model's accuracy
    assert abs(keras_case["accuracy"] - float_case["accuracy"]) <= 0.005  # the same float model, served two ways
    assert f"{doc['speedup_batch32']:.2f}x at batch 32" in doc["_stdout"]


@pytest.mark.slow
def test_fanout_quick(tmp_path):
    doc = _run("fanout", tmp_path, "--models", "1")
    _repetitions(doc, {"1", "2"})
    assert f"speedup 2 vs 1 worker: {doc['speedup']:.2f}x" in doc["_stdout"]
    # The stages' CPU (measured in the workers) is part of the whole tree's (measured around it), never all of it.
    for runs in doc["cpu_seconds"].values():
        assert all(0 < r["stages"] < r["total"] for r in runs)
        for r in runs:  # the sampled split by process: the command, its server and its workers, within the total
            assert {"command", "prefect server", "workers"} <= {k for k, v in r["by_process"].items() if v > 0}
            assert sum(r["by_process"].values()) <= r["total"] * 1.02 + 0.5
    assert 0 < doc["cpu_outside_stages_share"] < 1
    assert f"CPU outside the stages' work, 2 workers: {doc['cpu_outside_stages_share']:.1%}" in doc["_stdout"]


@pytest.mark.slow
def test_noop_quick(tmp_path):
    doc = _run("noop", tmp_path)
    # Whatever the timing, a rerun with nothing changed must not retrain anything.
    assert doc["artifacts_rewritten"] == [] and doc["dvc_status_clean"] is True
    assert len(doc["rerun_seconds"]) >= 1 and doc["median_rerun_seconds"] in doc["rerun_seconds"]
    assert doc["share_of_first"] < 1  # the first run trains; a rerun only checks
    assert f"rerun / first: {doc['share_of_first']:.1%}" in doc["_stdout"]


@pytest.mark.slow
def test_orchestration_quick(tmp_path):
    doc = _run("orchestration", tmp_path)
    _repetitions(doc, {"flow", "direct"})
    assert f"flow / direct: {doc['ratio']:.3f}" in doc["_stdout"]


@pytest.mark.slow
def test_scale_quick(tmp_path):
    doc = _run("scale", tmp_path, "--sizes", "1", "2")
    assert [r["models"] for r in doc["results"]] == [1, 2]
    for r in doc["results"]:
        assert r["seconds"] > 0 and r["peak_process_rss_mb"] > 100  # a TensorFlow process, measured
        assert r["peak_rss_mb"] >= r["peak_process_rss_mb"]


def test_all_times_each_script_it_runs(tmp_path):
    out = tmp_path / "all.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "all.py"), "--quick", "--only", "inference",
                          "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "all" and doc["scripts"] == ["inference"] and doc["quick"] is True
    assert 0 < doc["seconds"]["inference"] <= doc["total_seconds"]
    assert json.loads((tmp_path / "quick-inference.json").read_text())["benchmark"] == "inference"


def test_a_quick_run_never_replaces_the_full_runs_results(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import _common
    finally:
        sys.path.remove(str(REPO / "bench"))
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    full = _common.write_results("fanout", {"quick": False, "speedup": 1.5})
    quick = _common.write_results("fanout", {"quick": True, "speedup": 1.0})
    assert (full.name, quick.name) == ("fanout.json", "quick-fanout.json")
    assert json.loads(full.read_text())["speedup"] == 1.5


def test_compare_gives_the_after_side_the_before_sides_work(tmp_path, monkeypatch):
    """The overlay bench/compare.py puts on the after side: an earlier params.yaml parses, timing only batch 1."""
    import yaml

    sys.path.insert(0, str(REPO / "bench"))
    try:
        import _common
        import compare
    finally:
        sys.path.remove(str(REPO / "bench"))
    from shrinkfleet.config import ConfigError, parse_params

    earlier = yaml.safe_load((REPO / "params.yaml").read_text())
    earlier["run"].pop("worker_max_models")
    earlier["run"]["worker_max_stages"] = 50  # the key as the earlier schema spelt it
    with pytest.raises(ConfigError, match="worker_max_stages"):
        parse_params(earlier)
    monkeypatch.setenv(_common.OVERLAY_ENV, json.dumps(compare.LIKE_FOR_LIKE))
    project = _common.make_project(tmp_path / "p", earlier, dvc=False)
    written = yaml.safe_load((project / "params.yaml").read_text())
    assert "worker_max_stages" not in written["run"] and written["run"]["workers"] == earlier["run"]["workers"]
    fleet = parse_params(written)
    assert fleet.evaluate.batch_sizes == [1]
    assert fleet.evaluate.latency_runs == earlier["evaluate"]["latency_runs"]  # the rest of evaluate: kept
    assert earlier["run"]["worker_max_stages"] == 50  # the caller's params: not edited


def test_compare_judges_each_round_against_its_own_pair():
    """The verdict's ratio is the median of the rounds' after / before, each pair run minutes apart: one round
    whose machine slowed between its two sides does not decide it, as it decides the ratio of the medians."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import compare
    finally:
        sys.path.remove(str(REPO / "bench"))
    figures = {"before": [{"t_s": 30.0}, {"t_s": 30.0}, {"t_s": 40.0}],
               "after": [{"t_s": 31.0}, {"t_s": 45.0}, {"t_s": 41.0}]}  # round 2: the machine slowed for after
    assert compare.paired_ratio(figures, "t_s") == pytest.approx(31 / 30)  # the ratio of medians: 41 / 30
    figures["before"][0]["t_s"] = 0.0
    assert compare.paired_ratio(figures, "t_s") is None

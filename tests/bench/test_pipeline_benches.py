"""Each pipeline benchmark runs in --quick mode and writes valid JSON with the keys the README quotes."""

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
    return doc


def test_inference_quick(tmp_path):
    doc = _run("inference", tmp_path, "--runs", "30")
    float_case, int8_case = doc["results"].values()
    for case in (float_case, int8_case):
        assert 0.5 < case["accuracy"] <= 1 and case["batch1_ms"] > 0 and case["batch32_ms"] > 0
    assert doc["speedup_batch1"] == pytest.approx(float_case["batch1_ms"] / int8_case["batch1_ms"])


@pytest.mark.slow
def test_fanout_quick(tmp_path):
    doc = _run("fanout", tmp_path, "--models", "1")
    assert set(doc["median_seconds"]) == {"1", "2"} and all(v > 0 for v in doc["median_seconds"].values())
    assert doc["speedup"] == pytest.approx(doc["median_seconds"]["1"] / doc["median_seconds"]["2"])


@pytest.mark.slow
def test_noop_quick(tmp_path):
    doc = _run("noop", tmp_path)
    # Whatever the timing, a rerun with nothing changed must not retrain anything.
    assert doc["artifacts_rewritten"] == [] and doc["dvc_status_clean"] is True
    assert doc["median_rerun_seconds"] > 0 and doc["share_of_first"] == pytest.approx(
        doc["median_rerun_seconds"] / doc["first_seconds"])


@pytest.mark.slow
def test_orchestration_quick(tmp_path):
    doc = _run("orchestration", tmp_path)
    assert doc["ratio"] == pytest.approx(doc["median_seconds"]["flow"] / doc["median_seconds"]["direct"])


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

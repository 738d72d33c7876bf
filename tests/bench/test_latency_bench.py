"""The latency benchmark script runs end to end in --quick mode and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VARIANTS = ("float32", "int8", "channel_pruned", "channel_pruned_int8")


@pytest.mark.slow
def test_quick_latency_benchmark_writes_every_variant(tmp_path, mnist_dir):
    out = tmp_path / "latency.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "latency.py"), "--quick", "--mnist", str(mnist_dir),
                          "--runs", "200", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(out.read_text())
    assert doc["quick"] is True and doc["test_samples"] == 300 and doc["threads"] == 1
    lenet = doc["models"]["lenet5"]
    v = lenet["variants"]
    assert tuple(v) == VARIANTS
    assert v["float32"]["macs"] == v["int8"]["macs"] == 28 * 28 * 6 * 25 + 14 * 14 * 16 * 6 * 25 + 7 * 7 * 16 * 120 \
        + 120 * 84 + 84 * 10  # LeNet-5 with 'same' convolutions, counted from the graph
    assert 0.35 < v["channel_pruned"]["macs"] / v["float32"]["macs"] < 0.65  # "about half"
    assert v["channel_pruned"]["bytes"] < v["float32"]["bytes"] and v["int8"]["bytes"] < v["float32"]["bytes"] / 3
    assert v["channel_pruned_int8"]["bytes"] < v["int8"]["bytes"]
    for name, m in v.items():
        assert 0 < m["batch1_ms"] < m["batch32_ms"], name
        assert m["accuracy"] > 0.3, name  # one epoch on 1,200 images, far above chance
    for key in ("int8_vs_float32_tflite_batch32", "channel_pruned_vs_float32_tflite_batch32",
                "channel_pruned_int8_vs_float32_tflite_batch32", "channel_pruned_drop_pts"):
        assert isinstance(doc[key], float), key
    assert "channel_pruned_int8 vs float32 TFLite at batch 32" in run.stdout and f"wrote {out}" in run.stdout


def test_fewer_than_200_timed_calls_is_refused(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "bench" / "latency.py"), "--runs", "50",
                          "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--runs must be at least 200" in run.stderr
    assert not (tmp_path / "x.json").exists()

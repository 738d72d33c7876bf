"""The compression benchmark script runs end to end in --quick mode and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_benchmark_writes_results(tmp_path, mnist_dir):
    out = tmp_path / "compression.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "compression.py"), "--quick", "--mnist", str(mnist_dir),
                          "--out", str(out), "--models", "LeNet-300-100"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(out.read_text())
    assert doc["quick"] is True and doc["data"]["test"] == 300
    (result,) = doc["results"]
    assert result["model"] == "LeNet-300-100"
    assert 1_000_000 < result["float32_bytes"] < 1_100_000  # 266,200 float32 weights, as in the paper
    assert 1 <= len(result["trials"]) <= 2
    for trial in result["trials"]:
        assert trial["coded_bytes"] < trial["flatbuffer_bytes"] and trial["ratio"] > 10
    assert "LeNet-300-100" in run.stdout and f"wrote {out}" in run.stdout

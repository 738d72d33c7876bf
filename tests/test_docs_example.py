"""docs/your-own-fleet.md, "Your own fleet: a complete example", run as written: its setup, its params.yaml,
its commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_PARAMS, make_project

pytestmark = pytest.mark.slow
PAGE = REPO / "docs" / "your-own-fleet.md"


def block(name: str) -> str:
    """The fenced code block right after ``<!-- example:<name> -->`` in the page."""
    text = PAGE.read_text()
    match = re.search(rf"<!-- example:{name} -->\n```\w*\n(.*?)\n```", text, re.S)
    assert match, f"{PAGE.relative_to(REPO)} has no example:{name} block"
    return match.group(1)


def bash(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # as after `source .venv/bin/activate`
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_the_own_fleet_example_runs_as_written(tmp_path):
    project = make_project(tmp_path / "clone", TINY_PARAMS)  # a clone: the code, git, DVC
    setup = bash(block("setup"), project)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert (project / "models" / "in" / "photos.keras").is_file()
    (project / "params.yaml").write_text(block("params") + "\n")

    run = bash(block("run"), project)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "✓ churn-mlp: ran prepare, teacher, prune, compress, evaluate (first run)" in out
    assert "✓ photos-mine: ran prepare, teacher, distill, prune, compress, evaluate (first run)" in out
    assert "dvc.yaml rewritten from params.yaml" in run.stderr
    status = out[out.index("Production (alias production)"):]
    assert "churn-mlp" in status and "photos-mine" in status
    # the served table model's answer for two raw rows: class probabilities that sum to one
    rows = re.findall(r"\[\s*([0-9.e-]+)\s+([0-9.e-]+)\s*\]", out.split("Production (alias production)")[1])
    assert len(rows) == 2, out
    assert all(abs(float(a) + float(b) - 1) < 1e-4 for a, b in rows)
    assert float(rows[0][1]) > float(rows[1][1])  # a basic plan spending 40 churns before a max plan at 70
    report = (project / "reports" / "fleet.md").read_text()
    assert "**photos-mine** prune left" in report and "batch_normalization (BatchNormalization)" in report

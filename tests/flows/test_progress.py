"""Progress reaches the caller through the callback it passes to run_fleet, from inside the Prefect flow run."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import TINY_PARAMS, make_project

pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys
from pathlib import Path
from flows.fleet import run_fleet

root = Path(sys.argv[1])
events = []
summary = run_fleet(root / "params.yaml", root, use_dvc=False, on_event=events.append)
(root / "events.json").write_text(json.dumps({"events": events, "status": {m: r["status"] for m, r in
                                                                          summary["models"].items()}}))
"""


def test_every_stage_event_goes_to_the_callback_and_none_is_printed(tmp_path):
    params = copy.deepcopy(TINY_PARAMS)
    del params["models"]["cancer-mlp"]
    params["recipes"] = {"pruned-float32": {"steps": ["float32"]}}  # one recipe: the events are the point
    root = make_project(tmp_path / "p", params, dvc=False)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "PATH": os.environ["PATH"],
           "HOME": os.environ.get("HOME", str(tmp_path)), "PREFECT_HOME": str(tmp_path / "prefect")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(root)], cwd=root, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads((root / "events.json").read_text())
    assert doc["status"] == {"digits-mlp": "ok"}
    ran = [(e["stage"], e["target"], e["status"]) for e in doc["events"] if e["status"] == "ran"]
    assert ran == [("prepare", "digits", "ran"), *[(s, "digits-mlp", "ran") for s in
                                                   ("teacher", "distill", "prune", "compress", "evaluate")]]
    assert any(e["stage"] == "registry" and e["target"] == "digits-mlp" for e in doc["events"])
    assert "digits-mlp               teacher" not in out.stdout  # the printed form, used only without a callback

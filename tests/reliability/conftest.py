"""Shared by the reliability tests: a small fleet, runs in the background, workspace snapshots."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY_PARAMS

# The tiny fleet with two recipes (one .tflite conversion, one clustering) and a gate every
# variant passes, so each model has a production version whose alias a failure must not move.
RELIABLE = copy.deepcopy(TINY_PARAMS)
RELIABLE["recipes"] = {k: v for k, v in RELIABLE["recipes"].items() if k in ("pruned-int8", "pruned-clustered")}
RELIABLE["run"].update({"retries": 2, "retry_delay_seconds": 0})
RELIABLE["gate"] = {"max_accuracy_drop": 0.9}
STABLE_METRICS = ("accuracy", "size_bytes", "coded_bytes", "sparsity", "params")


@pytest.fixture
def reliable_params() -> dict:
    return copy.deepcopy(RELIABLE)


def one_model(params: dict, model: str = "cancer-mlp") -> dict:
    """``params`` with only ``model`` (and its dataset) in the fleet."""
    params = copy.deepcopy(params)
    params["models"] = {model: params["models"][model]}
    dataset = params["models"][model]["dataset"]
    params["datasets"] = {dataset: params["datasets"][dataset]}
    return params


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a ``shrinkfleet`` child: this one's, without servers a shell may point at."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env.update(extra)
    return env


def start_run(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``shrinkfleet run`` in the background, in its own process group (so a test can SIGKILL all of it)."""
    exe = Path(sys.executable).with_name("shrinkfleet")
    return subprocess.Popen([str(exe), "run", *args], cwd=project, env=env or cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out, errs = proc.communicate()
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n{out}\n{errs}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def client(project: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")


def fleet_runs(project: Path) -> list:
    """The project's fleet (parent) runs, newest first."""
    c = client(project)
    exp = c.get_experiment_by_name("shrinkfleet/tiny")
    return c.search_runs([exp.experiment_id], filter_string="tags.`shrinkfleet.kind` = 'fleet'",
                         order_by=["attributes.start_time DESC"])


def model_runs(project: Path, fleet_run_id: str) -> dict[str, object]:
    """The model runs under one fleet run, by model name."""
    c = client(project)
    exp = c.get_experiment_by_name("shrinkfleet/tiny")
    runs = c.search_runs([exp.experiment_id], filter_string="tags.`shrinkfleet.kind` = 'model'", max_results=500)
    return {r.data.tags["shrinkfleet.model"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == fleet_run_id}


def stages_ran(run) -> set[str]:
    return {k.rsplit(".", 1)[1] for k, v in run.data.tags.items() if k.startswith("shrinkfleet.stage.") and v == "ran"}


def production_version(project: Path, model: str) -> str:
    return str(client(project).get_model_version_by_alias(model, "production").version)


def stable_metrics(project: Path, model: str) -> dict[str, dict[str, float]]:
    """Per variant, the metrics that do not depend on timing (everything but latency)."""
    doc = json.loads((project / "metrics" / f"{model}.json").read_text())
    return {v: {k: m[k] for k in STABLE_METRICS if k in m} for v, m in doc["variants"].items()}


def dvc_status(project: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out or "{}")

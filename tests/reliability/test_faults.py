"""Transient faults are retried, a member failing for good does not stop the fleet, secrets never leak.

One clean run of the two-model fleet is the reference; a second project runs the same fleet
with injected transient faults (``SHRINKFLEET_FAULTS``) and fake credentials in its
environment; the reference project then re-runs with a permanent fault in one member.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shrinkfleet import faults
from tests.conftest import make_project, shrinkfleet_cmd
from tests.reliability.conftest import (
    RELIABLE,
    client,
    fleet_runs,
    model_runs,
    production_version,
    stable_metrics,
    stages_ran,
)

pytestmark = pytest.mark.slow

TRANSIENT = "prepare@digits=1,teacher@digits-mlp=2,compress@cancer-mlp=1,evaluate=1"
# What a team's environment holds; none of it may appear in any output.
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID7Q2X9ZL",
    "AWS_SECRET_ACCESS_KEY": "fake/Secret+Key/9f8e7d6c5b4a39281706f5e4d3c2b1a0",
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-pw-5c1e2b7a",
    "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-0d9c8b7a",
    "PREFECT_API_KEY": "pnu_fakeprefectkey1234567890abcdefghij",
}


def run(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return shrinkfleet_cmd("run", *args, cwd=project, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    project = make_project(tmp_path_factory.mktemp("reference") / "p", RELIABLE)
    result = run(project)
    assert result.returncode == 0, result.stdout + result.stderr
    return project, result


@pytest.fixture(scope="module")
def faulty(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, Path]:
    """The same fleet with transient faults, fake credentials and its own Prefect home (searched too)."""
    base = tmp_path_factory.mktemp("faulty")
    project = make_project(base / "p", RELIABLE)
    prefect_home = base / "prefect-home"
    result = run(project, **{faults.ENV: TRANSIENT, "PREFECT_HOME": str(prefect_home), **SECRETS})
    return project, result, prefect_home


def test_transient_faults_are_retried_to_the_same_result(reference, faulty):
    ref_project, _ = reference
    project, result, _ = faulty
    assert result.returncode == 0, result.stdout + result.stderr
    # every faulted stage failed as often as asked, then ran once more and succeeded
    state = project / ".shrinkfleet" / "faults"
    attempts = {p.name.removesuffix(".attempts"): int(p.read_text()) for p in state.glob("*.attempts")}
    assert attempts == {"prepare@digits": 2, "teacher@digits-mlp": 3, "compress@cancer-mlp": 2,
                        "evaluate@digits-mlp": 2, "evaluate@cancer-mlp": 2}
    assert "injected transient failure" in result.stdout + result.stderr  # retries are visible to the user
    for model in RELIABLE["models"]:
        assert stable_metrics(project, model) == stable_metrics(ref_project, model), model
    runs = model_runs(project, fleet_runs(project)[0].info.run_id)
    assert {m: r.info.status for m, r in runs.items()} == {"digits-mlp": "FINISHED", "cancer-mlp": "FINISHED"}


def test_retries_exhausted_fail_only_that_member(tmp_path):
    params = yaml.safe_load(yaml.safe_dump(RELIABLE))
    params["run"]["retries"] = 1
    params["models"] = {"cancer-mlp": params["models"]["cancer-mlp"]}
    project = make_project(tmp_path / "p", params)
    result = run(project, "--no-dvc", **{faults.ENV: "prepare=5"})
    assert result.returncode == 1
    assert "cancer-mlp" in result.stdout and "prepare failed" in result.stdout
    assert "injected transient failure 2 of 5" in result.stdout  # one try plus one retry, then it gave up
    assert (project / ".shrinkfleet" / "faults" / "prepare@cancer.attempts").read_text() == "2"


def test_secrets_never_appear_in_logs_mlflow_or_reports(faulty):
    project, result, prefect_home = faulty
    assert result.returncode == 0, result.stdout + result.stderr
    haystacks = {"stdout": result.stdout.encode(), "stderr": result.stderr.encode()}
    searched = 0
    for folder in (project, prefect_home):
        for path in folder.rglob("*"):
            if path.is_file() and ".git" not in path.relative_to(folder).parts[:1]:
                haystacks[str(path)] = path.read_bytes()
                searched += 1
    assert (project / "mlflow.db").is_file() and (project / "reports" / "fleet.html").is_file()
    assert searched > 50  # the store, artifacts, reports, DVC files and Prefect's database were read
    # what MLflow holds, read back through its API (params, tags of every run)
    c = client(project)
    for exp in c.search_experiments():
        for r in c.search_runs([exp.experiment_id], max_results=1000):
            haystacks[f"mlflow run {r.info.run_id}"] = repr((r.data.params, r.data.tags)).encode()
    for name, secret in SECRETS.items():
        leaks = [where for where, data in haystacks.items() if secret.encode() in data]
        assert not leaks, f"{name} leaked into {leaks}"


def test_a_member_failing_for_good_does_not_stop_the_fleet(reference):
    project, _ = reference
    before = {m: production_version(project, m) for m in RELIABLE["models"]}
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prune"]["epochs"] = 1  # both members re-run prune, compress and evaluate
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run(project, **{faults.ENV: "compress@cancer-mlp=fail"})
    assert result.returncode == 1
    assert "cancer-mlp" in result.stdout and "compress failed" in result.stdout
    assert "PermanentFault" in result.stdout
    assert "injected permanent failure" in result.stdout
    report = (project / "reports" / "fleet.md").read_text()
    failed_section = report.split("## Failed", 1)[1]
    assert "cancer-mlp" in failed_section and "compress" in failed_section
    # the other member went all the way; the failed one kept its production version
    runs = model_runs(project, fleet_runs(project)[0].info.run_id)
    assert runs["digits-mlp"].info.status == "FINISHED"
    assert {"prune", "compress", "evaluate"} <= stages_ran(runs["digits-mlp"])
    assert runs["cancer-mlp"].info.status == "FAILED"
    assert runs["cancer-mlp"].data.tags["shrinkfleet.failed_stage"] == "compress"
    assert production_version(project, "cancer-mlp") == before["cancer-mlp"]
    # a permanent fault is not retried (run.retries is 2)
    assert (project / ".shrinkfleet" / "faults" / "compress@cancer-mlp.attempts").read_text() == "1"
    # DVC agrees: only the failed member's compress and evaluate are out of date
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, capture_output=True,
                            text=True, check=True).stdout
    assert set(yaml.safe_load(status or "{}")) == {"compress-cancer-mlp", "evaluate-cancer-mlp"}

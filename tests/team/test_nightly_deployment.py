"""The nightly deployment for real: `prefect server start`, a process work pool and its worker on loopback.

prefect.yaml is deployed with `prefect deploy` into a project made by ``make_project``; the
server's scheduler fills in the cron's next runs, and the earliest of them is made due now,
as the scheduler does when its time comes. The worker picks it up and runs a one-model fleet.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, TINY_PARAMS, make_project, shrinkfleet_cmd
from tests.servers import free_port, http_ok, serve, wait_until

pytestmark = pytest.mark.slow

PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "shrinkfleet"
DEPLOYMENT = "shrinkfleet-fleet/shrinkfleet-nightly"


def quick_params(models: tuple[str, ...]) -> dict:
    """TINY_PARAMS cut down to ``models``, fewer epochs and two recipes: a fleet in about a minute."""
    params = yaml.safe_load(yaml.safe_dump(TINY_PARAMS))
    params["models"] = {m: params["models"][m] for m in models}
    params["teacher"]["epochs"] = params["distill"]["epochs"] = 2
    params["prune"]["epochs"] = 1
    params["recipes"] = {k: params["recipes"][k] for k in ("pruned-float32", "pruned-int8")}
    return params


def _server_env(home: Path) -> dict[str, str]:
    return {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO"}


@contextlib.contextmanager
def prefect_server_for_schedules(tmp: Path) -> Iterator[str]:
    """`prefect server start` (SQLite under a temporary PREFECT_HOME) on a free loopback port; yields its API URL."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _server_env(tmp / "prefect-home")
    with serve([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], tmp / "prefect-server.log",
               lambda: http_ok(f"{api}/health"), "prefect server", env=env, timeout=120):
        yield api


@contextlib.contextmanager
def prefect_client(api: str) -> Iterator:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


def _scheduled_runs(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                                 sort=FlowRunSort.EXPECTED_START_TIME_ASC)
    return [r for r in runs if r.state and r.state.is_scheduled()]


def _fleet_runs(project: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    exp = client.get_experiment_by_name("shrinkfleet/tiny")
    return client.search_runs([exp.experiment_id], filter_string="tags.`shrinkfleet.kind` = 'fleet'",
                              order_by=["attributes.start_time ASC"])


def _variants_of(project: Path, fleet_run_id: str, model: str) -> set[str]:
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    exp = client.get_experiment_by_name("shrinkfleet/tiny")
    (model_run,) = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`shrinkfleet.kind` = 'model' and tags.`mlflow.parentRunId` = '{fleet_run_id}'")
    assert model_run.data.tags["shrinkfleet.model"] == model
    variants = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`shrinkfleet.kind` = 'variant' and tags.`mlflow.parentRunId` = '{model_run.info.run_id}'")
    return {r.data.tags["shrinkfleet.variant"] for r in variants}


def _model_metrics(project: Path, fleet_run_id: str) -> dict[str, set[str]]:
    """``{model: metric names}`` of the model runs under a fleet run, and each one's variants' metrics checked."""
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    exp = client.get_experiment_by_name("shrinkfleet/tiny")
    out = {}
    for model_run in client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`shrinkfleet.kind` = 'model' and tags.`mlflow.parentRunId` = '{fleet_run_id}'"):
        variants = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{model_run.info.run_id}'")
        out[model_run.data.tags["shrinkfleet.model"]] = set.intersection(*(set(v.data.metrics) for v in variants))
    return out


def _wait_completed(client, flow_run_id, log: Path, timeout: float = 300) -> None:
    """Wait for a flow run to end; fail with the log tail unless it COMPLETED (and never leave it running)."""
    try:
        wait_until(lambda: client.read_flow_run(flow_run_id).state.is_final(), timeout, "the fleet run")
    finally:
        state = client.read_flow_run(flow_run_id).state
        if not state.is_final():  # the flow-run process must not outlive the test
            from prefect.states import Cancelling

            client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
            time.sleep(5)
    state = client.read_flow_run(flow_run_id).state
    assert state.is_completed(), f"{state.name}: {state.message}\n{_tail(log)}"


def _make_due(client, flow_run) -> None:
    """The schedule's time comes: a scheduled run becomes due now, as the scheduler does at its time."""
    from prefect.states import Scheduled

    client.set_flow_run_state(flow_run.id, Scheduled(scheduled_time=dt.datetime.now(dt.UTC)), force=True)


def _stage_workers(project: Path, fleet_run_id: str) -> dict[str, str]:
    """``{stage: worker}`` of the one model run under a fleet run (tags ``shrinkfleet.worker.<stage>``)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    exp = client.get_experiment_by_name("shrinkfleet/tiny")
    (model_run,) = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`shrinkfleet.kind` = 'model' and tags.`mlflow.parentRunId` = '{fleet_run_id}'")
    prefix = "shrinkfleet.worker."
    return {k.removeprefix(prefix): v for k, v in model_run.data.tags.items() if k.startswith(prefix)}


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def test_nightly_deployment_is_scheduled_run_by_a_worker_and_tagged_schedule(tmp_path):
    params = quick_params(("digits-mlp",))
    params["run"]["workers"] = 1  # not the flow's default: the deployment run must read it from params.yaml
    project = make_project(tmp_path / "project", params)
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep_spec,) = spec["deployments"]
    dep_spec["parameters"]["models"] = ["digits-mlp"]
    (project / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    client_env = {**_server_env(tmp_path / "client-home"), "PREFECT_WORKER_QUERY_SECONDS": "2"}

    with prefect_server_for_schedules(tmp_path) as api:
        env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **client_env,
               "PREFECT_API_URL": api, "SHRINKFLEET_ROOT": str(project)}
        subprocess.run([PREFECT, "work-pool", "create", POOL, "--type", "process"], env=env, check=True,
                       capture_output=True, text=True)
        before = dt.datetime.now(dt.UTC)
        deployed = subprocess.run([PREFECT, "--no-prompt", "deploy", "-n", "shrinkfleet-nightly"], cwd=project,
                                  env=env, capture_output=True, text=True, timeout=180)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr

        with prefect_client(api) as client:
            deployment = client.read_deployment_by_name(DEPLOYMENT)
            assert deployment.work_pool_name == POOL
            assert deployment.parameters == {"params_file": "params.yaml", "root": ".", "models": ["digits-mlp"]}
            (sched,) = deployment.schedules
            assert (sched.schedule.cron, sched.schedule.timezone) == ("0 2 * * *", "UTC")

            # The scheduler fills in the next runs: every one at 02:00 UTC, a day apart, the first one next.
            wait_until(lambda: len(_scheduled_runs(client, deployment.id)) >= 3, 60, "scheduled runs")
            runs = _scheduled_runs(client, deployment.id)
            times = [r.expected_start_time.astimezone(dt.UTC) for r in runs]
            assert all(r.auto_scheduled for r in runs)
            assert all((t.hour, t.minute, t.second) == (2, 0, 0) for t in times), times
            assert all(b - a == dt.timedelta(days=1) for a, b in itertools.pairwise(times)), times
            assert before < times[0] <= before + dt.timedelta(days=1)

            # The schedule's time comes: the earliest run is due now, with the deployment's parameters.
            due = runs[0]
            assert due.parameters == deployment.parameters
            _make_due(client, due)

            worker_log = tmp_path / "prefect-worker.log"
            with serve([PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--limit", "1"],
                       worker_log, lambda: bool(client.read_workers_for_work_pool(POOL)), "prefect worker",
                       env=env, timeout=90, unset=("MLFLOW_TRACKING_URI",)):
                _wait_completed(client, due.id, worker_log)
                # The same deployment run by hand, as `prefect deployment run` does it.
                started = subprocess.run([PREFECT, "deployment", "run", DEPLOYMENT], env=env, capture_output=True,
                                         text=True, timeout=60)
                assert started.returncode == 0, started.stdout + started.stderr
                (by_hand_id,) = re.findall(r"UUID: ([0-9a-f-]{36})", started.stdout)
                _wait_completed(client, by_hand_id, worker_log)

            # `shrinkfleet schedule` will not replace the deployment prefect.yaml made.
            clash = shrinkfleet_cmd("schedule", "--cron", "0 3 * * *", "--name", "shrinkfleet-nightly",
                                    cwd=project, env={"PREFECT_API_URL": api}, timeout=120)
            assert clash.returncode == 2, clash.stdout + clash.stderr
            assert ("deployment shrinkfleet-fleet/shrinkfleet-nightly exists and was not created by `shrinkfleet "
                    "schedule` (entrypoint flows/fleet.py:fleet_flow, work pool shrinkfleet") in clash.stderr
            assert client.read_deployment_by_name(DEPLOYMENT).schedules[0].schedule.cron == "0 2 * * *"

        scheduled, by_hand = _fleet_runs(project)
        tags = scheduled.data.tags
        assert tags["trigger"] == "schedule"
        assert tags["prefect_flow_run_id"] == str(due.id)
        assert tags["prefect_deployment_id"] == str(deployment.id)
        assert (tags["shrinkfleet.engine"], tags["shrinkfleet.workers"]) == ("process", "1")
        assert len(set(_stage_workers(project, scheduled.info.run_id).values())) == 1  # one worker process
        assert _variants_of(project, scheduled.info.run_id, "digits-mlp") == {
            "teacher", "student", "pruned", "pruned-float32", "pruned-int8"}
        assert {"accuracy", "size_bytes", "coded_bytes"} <= _model_metrics(project, scheduled.info.run_id)["digits-mlp"]
        assert by_hand.data.tags["trigger"] == "deployment"
        assert by_hand.data.tags["prefect_flow_run_id"] == by_hand_id
        assert {"accuracy", "size_bytes"} <= _model_metrics(project, by_hand.info.run_id)["digits-mlp"]

        # The same fleet started by hand against the same server says manual.
        manual = shrinkfleet_cmd("run", "--models", "digits-mlp", cwd=project, env={"PREFECT_API_URL": api},
                                 timeout=300)
        assert manual.returncode == 0, manual.stdout + manual.stderr
        runs = _fleet_runs(project)
        assert len(runs) == 3
        assert runs[2].data.tags["trigger"] == "manual"
        assert runs[2].data.tags["prefect_deployment_id"] == ""


def test_shrinkfleet_schedule_serves_the_fleet_on_the_cron_and_its_runs_complete(tmp_path):
    from prefect.exceptions import ObjectNotFound

    project = make_project(tmp_path / "project", quick_params(("digits-mlp",)), dvc=False)
    exe = str(Path(sys.executable).with_name("shrinkfleet"))
    served = "shrinkfleet-fleet/shrinkfleet-schedule"  # the default name: not prefect.yaml's
    with prefect_server_for_schedules(tmp_path) as api, prefect_client(api) as client:

        def deployed() -> bool:
            try:
                return bool(client.read_deployment_by_name(served).schedules)
            except ObjectNotFound:
                return False

        env = {**_server_env(tmp_path / "client-home"), "PREFECT_API_URL": api}
        log = tmp_path / "schedule.log"
        with serve([exe, "schedule", "--cron", "30 1 * * *", "--timezone", "Europe/Berlin", "--models", "digits-mlp",
                    "--root", str(project)], log, deployed, "shrinkfleet schedule", env=env, cwd=tmp_path,
                   timeout=120, unset=("MLFLOW_TRACKING_URI",)):
            deployment = client.read_deployment_by_name(served)
            assert deployment.parameters == {"params_file": str(project / "params.yaml"), "root": str(project),
                                             "models": ["digits-mlp"]}
            assert "served-by-shrinkfleet" in deployment.tags
            wait_until(lambda: len(_scheduled_runs(client, deployment.id)) >= 3, 60, "scheduled runs")
            runs = _scheduled_runs(client, deployment.id)
            local = [r.expected_start_time.astimezone(ZoneInfo("Europe/Berlin")) for r in runs]
            # 01:30 Berlin time every night, whatever the UTC offset of the day (CET or CEST)
            assert all((t.hour, t.minute) == (1, 30) for t in local), local
            assert [t.date() for t in local] == [local[0].date() + dt.timedelta(days=i) for i in range(len(local))]
            assert all(r.auto_scheduled and r.parameters == deployment.parameters for r in runs)

            # Its time comes: this process runs it (the flow shipped to a subprocess) to completion.
            _make_due(client, runs[0])
            _wait_completed(client, runs[0].id, log)

    (fleet_run,) = _fleet_runs(project)
    assert fleet_run.data.tags["trigger"] == "schedule"
    assert fleet_run.data.tags["prefect_flow_run_id"] == str(runs[0].id)
    assert fleet_run.data.tags["prefect_deployment_id"] == str(deployment.id)
    assert _variants_of(project, fleet_run.info.run_id, "digits-mlp") == {
        "teacher", "student", "pruned", "pruned-float32", "pruned-int8"}
    assert {"accuracy", "size_bytes", "coded_bytes"} <= _model_metrics(project, fleet_run.info.run_id)["digits-mlp"]

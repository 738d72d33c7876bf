"""Schedules and engines, without servers: bad input stops before anything starts; prefect.yaml agrees with the flow."""

from __future__ import annotations

import datetime as dt
import importlib.util
import inspect
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml
from typer.testing import CliRunner

from flows.fleet import detect_trigger, fleet_flow, resolve_run
from shrinkfleet.cli import app, validate_schedule
from shrinkfleet.config import ConfigError, RunConfig
from tests.conftest import REPO

runner = CliRunner()


def _write(tmp_path: Path, params: dict) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path


@pytest.fixture
def no_serve(monkeypatch) -> list:
    """Record calls to ``fleet_flow.serve`` instead of starting anything."""
    calls: list = []
    monkeypatch.setattr(fleet_flow, "serve", lambda *a, **kw: calls.append(kw))
    return calls


def _output(result) -> str:
    return result.output + (result.stderr if result.stderr_bytes is not None else "")


@pytest.mark.parametrize("cron", ["0 2 * *", "61 2 * * *", "0 25 * * *", "every night", "H 2 * * *"])
def test_schedule_refuses_a_bad_cron_naming_the_option(tmp_path, tiny_params, no_serve, monkeypatch, cron):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens; never contacted
    result = runner.invoke(app, ["schedule", "--cron", cron, "--root", str(_write(tmp_path, tiny_params))])
    assert result.exit_code == 2, _output(result)
    assert "--cron" in _output(result)
    assert no_serve == []


@pytest.mark.parametrize("timezone", ["Mars/Olympus_Mons", "CEST", "utc+2"])
def test_schedule_refuses_a_bad_timezone_naming_the_option(tmp_path, tiny_params, no_serve, monkeypatch, timezone):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    result = runner.invoke(app, ["schedule", "--cron", "0 2 * * *", "--timezone", timezone,
                                 "--root", str(_write(tmp_path, tiny_params))])
    assert result.exit_code == 2, _output(result)
    out = _output(result)
    assert "--timezone" in out and timezone in out
    assert no_serve == []


def test_schedule_needs_a_prefect_server(tmp_path, tiny_params, no_serve, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = runner.invoke(app, ["schedule", "--cron", "0 2 * * *", "--root", str(_write(tmp_path, tiny_params))])
    assert result.exit_code == 2, _output(result)
    assert "PREFECT_API_URL" in _output(result)
    assert no_serve == []


def test_schedule_refuses_an_unknown_model(tmp_path, tiny_params, no_serve, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    result = runner.invoke(app, ["schedule", "--cron", "0 2 * * *", "--models", "nope",
                                 "--root", str(_write(tmp_path, tiny_params))])
    assert result.exit_code == 2
    assert "nope" in _output(result)
    assert no_serve == []


def test_schedule_serves_the_fleet_flow_with_the_cron_and_parameters(tmp_path, tiny_params, no_serve, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    root = _write(tmp_path, tiny_params)
    result = runner.invoke(app, ["schedule", "--cron", "30 1 * * 1-5", "--timezone", "Europe/Berlin",
                                 "--models", "digits-mlp", "--root", str(root)])
    assert result.exit_code == 0, _output(result)
    (call,) = no_serve
    (sched,) = call["schedules"]
    assert (sched.cron, sched.timezone) == ("30 1 * * 1-5", "Europe/Berlin")
    assert call["parameters"] == {"params_file": str(root.resolve() / "params.yaml"), "root": str(root.resolve()),
                                  "models": ["digits-mlp"]}
    assert set(call["parameters"]) <= set(inspect.signature(fleet_flow.fn).parameters)


def test_prefect_yaml_declares_the_nightly_deployment_of_the_fleet_flow():
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = [d for d in doc["deployments"] if d["name"] == "shrinkfleet-nightly"]

    # the entrypoint is the fleet flow itself
    path, _, attr = dep["entrypoint"].partition(":")
    spec = importlib.util.spec_from_file_location("entry_check", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    flow = getattr(module, attr)
    assert flow.name == fleet_flow.name
    # every parameter is one the flow takes, with a value its signature accepts
    signature = inspect.signature(flow.fn)
    assert set(dep["parameters"]) <= set(signature.parameters)
    assert signature.bind_partial(**dep["parameters"])
    assert (REPO / dep["parameters"]["params_file"]).is_file()
    # a valid cron in a valid time zone, on a process work pool's queue
    (sched,) = dep["schedules"]
    cron = validate_schedule(sched["cron"], sched["timezone"])
    assert cron.cron == "0 2 * * *" and cron.timezone == "UTC" and sched["active"] is True
    assert dep["work_pool"]["name"] == "shrinkfleet"
    # each run starts in the project folder
    (step,) = doc["pull"]
    assert "prefect.deployments.steps.set_working_directory" in step
    assert step["prefect.deployments.steps.set_working_directory"]["directory"]


def test_validate_schedule_accepts_a_cron_in_a_time_zone():
    cron = validate_schedule("0 2 * * *", "America/New_York")
    assert cron.timezone == "America/New_York"
    # 02:00 in New York is 07:00 UTC in January (EST)
    assert dt.datetime(2026, 1, 5, 2, 0, tzinfo=ZoneInfo(cron.timezone)).astimezone(dt.UTC).hour == 7


def test_a_dask_address_implies_the_dask_engine():
    run = resolve_run(RunConfig(), dask_address="tcp://127.0.0.1:8786")
    assert (run.engine, run.dask_address) == ("dask", "tcp://127.0.0.1:8786")
    assert resolve_run(RunConfig(), workers=3).model_dump() == {**RunConfig().model_dump(), "workers": 3}


@pytest.mark.parametrize(("kwargs", "key"), [({"engine": "ray"}, "run.engine"),
                                             ({"dask_address": "127.0.0.1:8786"}, "run.dask_address"),
                                             ({"workers": 0}, "run.workers")])
def test_resolve_run_names_the_bad_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        resolve_run(RunConfig(), **kwargs)


@pytest.mark.parametrize(("args", "option"), [(["--engine", "ray"], "--engine"),
                                              (["--dask-address", "localhost"], "--dask-address")])
def test_run_refuses_a_bad_engine_before_any_work(tmp_path, tiny_params, args, option):
    root = _write(tmp_path, tiny_params)
    result = runner.invoke(app, ["run", "--root", str(root), *args])
    assert result.exit_code == 2, _output(result)
    assert option in _output(result)
    assert not (root / "mlflow.db").exists() and not (root / "data").exists()


def test_params_yaml_keeps_the_process_pool_by_default():
    run = yaml.safe_load((REPO / "params.yaml").read_text())["run"]
    assert RunConfig.model_validate(run).engine == "process"
    assert run["dask_address"] is None


def test_a_flow_called_directly_is_manual_unless_told():
    assert detect_trigger() == "manual"
    assert detect_trigger("backfill") == "backfill"


@pytest.mark.parametrize(("deployment_id", "auto_scheduled", "expected"), [
    ("5f0c1a52-1111-4d2e-9a55-0b7f6c9f1e11", True, "schedule"),     # the scheduler created it
    ("5f0c1a52-1111-4d2e-9a55-0b7f6c9f1e11", False, "deployment"),  # prefect deployment run, UI, automation
    (None, False, "manual"),                                         # the flow called directly
])
def test_trigger_follows_the_flow_runs_origin(monkeypatch, deployment_id, auto_scheduled, expected):
    from types import SimpleNamespace

    from prefect.context import FlowRunContext

    run = SimpleNamespace(deployment_id=deployment_id, auto_scheduled=auto_scheduled)
    monkeypatch.setattr(FlowRunContext, "get", classmethod(lambda cls: SimpleNamespace(flow_run=run)))
    assert detect_trigger() == expected
    assert detect_trigger("backfill") == "backfill"


def test_task_runner_follows_the_engine():
    from prefect.task_runners import ProcessPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.fleet import task_runner

    pool = task_runner(RunConfig(workers=3))
    assert pool == ProcessPoolTaskRunner(max_workers=3)  # (Prefect compares pools by their size)
    local = task_runner(RunConfig(engine="dask", workers=3))
    assert isinstance(local, DaskTaskRunner) and local.address is None
    # processes with one thread each: TensorFlow's state is per process
    assert local.cluster_kwargs == {"n_workers": 3, "threads_per_worker": 1, "processes": True}
    remote = task_runner(RunConfig(engine="dask", dask_address="tcp://10.0.0.5:8786"))
    assert remote.address == "tcp://10.0.0.5:8786"

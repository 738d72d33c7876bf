"""The fleet flow: every model of params.yaml through prepare > teacher > distill > prune >
compress (recipes) > evaluate, in parallel worker processes, then tracked in MLflow and reported.

Stages are Prefect tasks (retried on transient failures; training ones tagged ``gpu``)
that DVC skips when up to date and records when they ran. TensorFlow keeps global state
per process, so tasks run in a process pool (``run.workers`` processes), never threads.
A model whose stage fails for good stops there; the others go on, and the run reports
which model failed at which stage.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ProcessPoolTaskRunner

from shrinkfleet import remote, report, tracking, versioning
from shrinkfleet.config import ConfigError, load_params, select_models
from shrinkfleet.datasets import DatasetError
from shrinkfleet.workspace import Workspace
from tasks import register
from tasks.compress import compress_task
from tasks.distill import distill_task
from tasks.evaluate import evaluate_task
from tasks.prepare import prepare_task
from tasks.prune import prune_task
from tasks.teacher import teacher_task

MODEL_TASKS = (
    ("teacher", teacher_task),
    ("distill", distill_task),
    ("prune", prune_task),
    ("compress", compress_task),
    ("evaluate", evaluate_task),
)
STAGE_NAMES = ("prepare", *(name for name, _ in MODEL_TASKS))

# The CLI sets this to draw progress; a deployment run falls back to printing.
progress_hook: Callable[[dict[str, Any]], None] | None = None


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry unless the failure is a deterministic input error (bad config or data, wrong shapes)."""
    try:
        state.result()
    except (ConfigError, DatasetError, ValueError, TypeError, KeyError):
        return False
    except Exception:
        return True
    return True


def _emit(event: dict[str, Any]) -> None:
    if progress_hook is not None:
        progress_hook(event)
        return
    status = event["status"]
    extra = f" ({event['seconds']:.1f}s)" if "seconds" in event else ""
    detail = f": {event['error']}" if event.get("error") else ""
    print(f"{event['target']:<24} {event['stage']:<9} {status}{extra}{detail}")


def _outcome(future: PrefectFuture) -> tuple[str, Any]:
    """``("ok", result)``, ``("failed", error text)`` or ``("not-run", reason)`` of a finished future."""
    try:
        value = future.result(raise_on_failure=False)
    except Exception as exc:
        return "not-run", str(exc)
    if isinstance(value, BaseException):
        return "failed", f"{type(value).__name__}: {value}"
    state = future.state
    if state.is_completed() and isinstance(value, dict):
        return "ok", value
    if state.name == "NotReady" or state.is_pending():
        return "not-run", "an earlier stage failed"
    return "failed", str(state.message or state.name)


@flow(name="shrinkfleet-fleet", log_prints=True, task_runner=ProcessPoolTaskRunner(max_workers=2))
def fleet_flow(
    params_file: str = "params.yaml",
    root: str = ".",
    models: list[str] | None = None,
    force: bool = False,
    use_dvc: bool = True,
    trigger: str = "manual",
) -> dict[str, Any]:
    """Compress every selected fleet member, track every variant, write the fleet report."""
    from prefect.runtime import flow_run

    root_p = Path(root).resolve()
    params_p = Path(params_file)
    params_p = (params_p if params_p.is_absolute() else root_p / params_p).resolve()
    fleet = load_params(params_p)
    names = select_models(fleet.model_names(), models)
    ws = Workspace(root_p)
    use_dvc = use_dvc and versioning.is_dvc_repo(root_p) and params_p == (root_p / "params.yaml").resolve()
    opts = {"retries": fleet.run.retries, "retry_delay_seconds": fleet.run.retry_delay_seconds,
            "retry_condition_fn": _transient}
    common = {"root": str(root_p), "params_file": str(params_p), "use_dvc": use_dvc, "force": force}

    storage = remote.activate(fleet.storage)  # S3 endpoint for MLflow's artifact client; None = local storage
    experiment_id = tracking.setup(root_p, fleet.fleet, artifact_root=storage.mlflow_url if storage else None)
    tags = {
        "git_sha": tracking.git_sha(root_p),
        "trigger": trigger,
        "prefect_flow_run_id": str(flow_run.id or ""),
        "shrinkfleet.models": ",".join(names),
        "shrinkfleet.dvc": str(use_dvc),
    }
    started = dt.datetime.now(dt.UTC)
    results: dict[str, dict[str, Any]] = {m: {"status": "running", "stages": {}} for m in names}
    with tracking.fleet_run(experiment_id, tags) as parent_run_id:
        datasets = fleet.datasets_in_use(names)
        users = {ds: [m for m in names if fleet.models[m].dataset == ds] for ds in datasets}
        skip = _skippable(root_p, datasets, names, fleet) if use_dvc and not force else set()
        owner: dict[Any, tuple[str | None, str]] = {}
        futures: list[PrefectFuture] = []
        prep: dict[str, PrefectFuture | None] = {}
        for ds in datasets:
            if f"prepare@{ds}" in skip:
                prep[ds] = None
                for m in users[ds]:
                    results[m]["stages"]["prepare"] = "skipped"
                _emit({"stage": "prepare", "target": ds, "status": "skipped", "seconds": 0.0})
                continue
            prep[ds] = prepare_task.with_options(**opts).submit(dataset=ds, **common)
            owner[prep[ds].task_run_id] = (None, ds)
            futures.append(prep[ds])
        for m in names:
            prev = prep[fleet.models[m].dataset]
            for stage, task in MODEL_TASKS:
                if f"{stage}@{m}" in skip:
                    results[m]["stages"][stage] = "skipped"
                    _emit({"stage": stage, "target": m, "status": "skipped", "seconds": 0.0})
                    continue
                prev = task.with_options(**opts).submit(model=m, wait_for=[prev] if prev else [], **common)
                owner[prev.task_run_id] = (m, stage)
                futures.append(prev)

        def finish(model: str) -> None:
            """Track a model whose every stage is done; a tracking error fails that model only."""
            try:
                out = register.record(ws, fleet.resolve(model), results[model]["stages"], use_dvc, trigger,
                                      tags["git_sha"])
                results[model].update(out, status="ok")
                _emit_registry(model, out["registry"])
            except Exception as exc:  # (one model's tracking must not stop the fleet)
                results[model].update(status="failed", failed_stage="track", error=f"{type(exc).__name__}: {exc}")
                _emit({"stage": "track", "target": model, "status": "failed", "error": str(exc)})

        for m in names:
            if all(results[m]["stages"].get(s) == "skipped" for s in STAGE_NAMES):
                finish(m)

        for future in as_completed(futures):
            model, stage_or_ds = owner[future.task_run_id]
            kind, value = _outcome(future)
            affected = users[stage_or_ds] if model is None else [model]
            stage = "prepare" if model is None else stage_or_ds
            target = stage_or_ds if model is None else model
            if kind == "ok":
                for m in affected:
                    results[m]["stages"][stage] = value["status"]
                _emit({"stage": stage, "target": target, "status": value["status"], "seconds": value["seconds"]})
                if stage == "evaluate":
                    finish(model)
            elif kind == "failed":
                for m in affected:
                    results[m].update(status="failed", failed_stage=stage, error=value)
                _emit({"stage": stage, "target": target, "status": "failed", "error": value})
            # "not-run": downstream of a failure, already reported through the failed stage.

        for r in results.values():
            if r["status"] == "running":  # cannot happen unless a future vanished; never report it as done
                r.update(status="failed", failed_stage="flow", error="did not finish")
        failures = {m: f"{r['failed_stage']} failed: {r['error']}" for m, r in results.items()
                    if r["status"] == "failed"}
        for m in failures:
            tracking.log_failed_model(m, results[m]["failed_stage"], results[m]["error"])
        docs = report.load_metrics(ws, [m for m in names if results[m]["status"] == "ok"])
        path = report.write_report(ws, docs, failures, {
            "fleet": fleet.fleet,
            "started": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "git": tags["git_sha"],
            "trigger": trigger,
            "models": f"{len(names) - len(failures)} of {len(names)} finished",
            "MLflow run": parent_run_id,
        }, outcomes={m: results[m] for m in docs}, trends=report.trends_from_mlflow(experiment_id, names))
        import mlflow

        mlflow.log_artifacts(str(path.parent), artifact_path="report")
        mlflow.log_metrics({"models_ok": len(names) - len(failures), "models_failed": len(failures)})
        if failures:
            mlflow.set_tag("shrinkfleet.failed_models", ",".join(failures))
    return {"models": results, "report": str(path), "parent_run_id": parent_run_id, "use_dvc": use_dvc}


def _skippable(root: Path, datasets: list[str], names: list[str], fleet: Any) -> set[str]:
    """Stages that need no task at all: DVC reports them and every stage upstream up to date.

    One DVC pass in the flow process; a stage with a stale upstream is submitted and decides
    for itself once its upstream has been re-run and committed.
    """
    stages = [f"prepare@{ds}" for ds in datasets] + [f"{s}@{m}" for m in names for s, _ in MODEL_TASKS]
    clean = versioning.up_to_date(root, stages)
    skip = {f"prepare@{ds}" for ds in datasets if f"prepare@{ds}" in clean}
    for m in names:
        upstream_ok = f"prepare@{fleet.models[m].dataset}" in skip
        for stage, _ in MODEL_TASKS:
            upstream_ok = upstream_ok and f"{stage}@{m}" in clean
            if upstream_ok:
                skip.add(f"{stage}@{m}")
    return skip


def _emit_registry(model: str, reg: dict[str, Any] | None) -> None:
    if reg is None:
        return
    version = f" v{reg['version']}" if reg["version"] else ""
    status = "promoted" if reg["promoted"] else "kept"
    _emit({"stage": "registry", "target": model, "status": f"{status}{version}", "error": reg["reason"]})


def run_fleet(
    params_file: Path,
    root: Path,
    models: list[str] | None = None,
    force: bool = False,
    use_dvc: bool = True,
    trigger: str = "manual",
    workers: int | None = None,
) -> dict[str, Any]:
    """Run the fleet flow with the worker count from params.yaml (or ``workers``)."""
    from flows.server import prefect_api

    fleet = load_params(params_file)
    n = workers or fleet.run.workers
    with prefect_api():
        configured = fleet_flow.with_options(task_runner=ProcessPoolTaskRunner(max_workers=n))
        return configured(params_file=str(params_file), root=str(root), models=models, force=force,
                          use_dvc=use_dvc, trigger=trigger)

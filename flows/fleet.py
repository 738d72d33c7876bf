"""The fleet flow: every model of params.yaml through prepare > teacher > distill > prune >
compress (recipes) > evaluate, in parallel worker processes, then tracked in MLflow and reported.

Stages are Prefect tasks (retried on transient failures; training ones tagged ``gpu``)
that DVC skips when up to date and records when they ran. TensorFlow keeps global state
per process, so tasks run in worker processes, never threads: a local process pool of
``run.workers`` processes (``run.engine: process``), or a Dask cluster through prefect-dask
(``run.engine: dask``), either an existing one (``run.dask_address``) or a local one of
``run.workers`` processes with one thread each. The flow builds that task runner itself from
params.yaml and its parameters, so a deployment run (which calls ``fleet_flow`` directly) and
``shrinkfleet run`` execute the same way. Every stage result names the worker that ran it.
A model whose stage fails for good stops there; the others go on, and the run reports
which model failed at which stage.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from shrinkfleet import locks, remote, report, storage, tracking, versioning
from shrinkfleet.config import ConfigError, RunConfig, load_params, select_models
from shrinkfleet.workspace import Workspace
from tasks import register
from tasks.common import is_transient
from tasks.stages import compress_task, distill_task, evaluate_task, prepare_task, prune_task, teacher_task

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
ENGINES = ("process", "dask")


def resolve_run(run: RunConfig, workers: int | None = None, engine: str | None = None,
                dask_address: str | None = None) -> RunConfig:
    """``run:`` of params.yaml with the command line's (or deployment's) overrides, validated again.

    A Dask address alone implies ``engine: dask``.

    Raises:
        ConfigError: naming ``run.<key>`` when an override is not allowed.
    """
    from pydantic import ValidationError

    updates: dict[str, Any] = {}
    if workers is not None:
        updates["workers"] = workers
    if dask_address is not None:
        updates["dask_address"] = dask_address
        updates["engine"] = "dask"
    if engine is not None:
        updates["engine"] = engine
    try:
        return RunConfig.model_validate({**run.model_dump(), **updates})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ").replace("Input should be", "must be")
        raise ConfigError(f"run.{key}: {msg}") from None


def task_runner(run: RunConfig) -> TaskRunner:
    """The task runner ``run:`` asks for; every worker is a process with one stage at a time."""
    if run.engine == "dask":
        from prefect_dask import DaskTaskRunner

        if run.dask_address:
            return DaskTaskRunner(address=run.dask_address)
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
            "n_workers": run.workers, "threads_per_worker": 1, "processes": True})
    return ProcessPoolTaskRunner(max_workers=run.workers)


def detect_trigger(explicit: str | None = None) -> str:
    """What started this flow run, as recorded in the MLflow tag ``trigger``.

    ``explicit`` (``shrinkfleet run --trigger``, or a ``trigger`` parameter) wins. Otherwise:
    ``schedule`` for a deployment run that Prefect's scheduler created from the deployment's
    schedule (the flow run's ``auto_scheduled`` flag), ``deployment`` for any other run of a
    deployment (``prefect deployment run``, the UI's Run button, an automation), and ``manual``
    for a flow called directly.
    """
    if explicit:
        return explicit
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx else None
    if run is None or run.deployment_id is None:
        return "manual"
    return "schedule" if run.auto_scheduled else "deployment"


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry unless :func:`tasks.common.is_transient` says the error is permanent."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return True


def _emit(event: dict[str, Any]) -> None:
    if progress_hook is not None:
        progress_hook(event)
        return
    status = event["status"]
    extra = f" ({event['seconds']:.1f}s)" if "seconds" in event else ""
    extra += f" on {event['worker']}" if event.get("worker") else ""
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


# The flow's own task runner only carries the flow; stages go to the runner built from
# params.yaml inside the run (see ``task_runner``), which a decorator argument could not read.
@flow(name="shrinkfleet-fleet", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def fleet_flow(
    params_file: str = "params.yaml",
    root: str = ".",
    models: list[str] | None = None,
    force: bool = False,
    use_dvc: bool = True,
    trigger: str | None = None,
    workers: int | None = None,
    engine: Literal["process", "dask"] | None = None,
    dask_address: str | None = None,
    if_busy: Literal["wait", "refuse"] = "wait",
) -> dict[str, Any]:
    """Compress every selected fleet member, track every variant, write the fleet report.

    Args:
        params_file: the fleet definition, relative to ``root`` unless absolute.
        root: the project folder (dvc.yaml, artifacts, ``mlflow.db`` when no tracking server).
        models: fleet members to run (default: all).
        trigger: recorded as the MLflow tag ``trigger``; None detects it (see ``detect_trigger``):
            ``schedule``, ``deployment`` or ``manual``.
        workers, engine, dask_address: override ``run.workers``, ``run.engine`` and
            ``run.dask_address`` of params.yaml (a Dask address implies the dask engine).
        if_busy: another run holds this workspace: ``wait`` for it, or ``refuse`` (raises
            :class:`shrinkfleet.locks.WorkspaceBusy`). See :mod:`shrinkfleet.locks`.
    """
    root_p = Path(root).resolve()
    params_p = Path(params_file)
    params_p = (params_p if params_p.is_absolute() else root_p / params_p).resolve()
    fleet = load_params(params_p)
    names = select_models(fleet.model_names(), models)
    run_cfg = resolve_run(fleet.run, workers, engine, dask_address)
    trigger = detect_trigger(trigger)
    ws = Workspace(root_p)
    use_dvc = use_dvc and versioning.is_dvc_repo(root_p) and params_p == (root_p / "params.yaml").resolve()
    opts = {"retries": fleet.run.retries, "retry_delay_seconds": fleet.run.retry_delay_seconds,
            "retry_condition_fn": _transient}
    common = {"root": str(root_p), "params_file": str(params_p), "use_dvc": use_dvc, "force": force}

    with locks.run_lock(root_p, if_busy, on_wait=_waiting):
        return _locked_run(root_p, params_p, fleet, names, run_cfg, trigger, ws, use_dvc, opts, common, force)


def _notice(text: str) -> None:
    """A line the user should see whatever the log level (the CLI prints it; a deployment run logs it)."""
    if progress_hook is not None:
        progress_hook({"stage": "notice", "target": "", "status": text})
    else:
        print(text)


def _waiting(info: dict[str, Any]) -> None:
    _notice(f"waiting: {locks.describe(info)} holds this workspace; this run starts when it ends")


def _recover(root: Path, experiment_id: str) -> None:
    """Clean up after a run that was killed or crashed here (under the run lock: none is alive)."""
    ws = Workspace(root)
    for line in storage.sweep_stale([root / "data" / "prepared", root / "models", root / "metrics", ws.reports]):
        _notice(f"recovered: {line}")
    for run_id in tracking.close_stale_runs(experiment_id, root):
        _notice(f"recovered: MLflow run {run_id} was left RUNNING by a run that died; marked KILLED")


def _locked_run(root_p: Path, params_p: Path, fleet: Any, names: list[str], run_cfg: RunConfig, trigger: str,
                ws: Workspace, use_dvc: bool, opts: dict[str, Any], common: dict[str, Any],
                force: bool) -> dict[str, Any]:
    """The fleet run proper, while this process holds the workspace's run lock."""
    from prefect.runtime import deployment, flow_run

    location = remote.activate(fleet.storage)  # S3 endpoint for MLflow's artifact client; None = local storage
    experiment_id = tracking.setup(root_p, fleet.fleet, artifact_root=location.mlflow_url if location else None)
    _recover(root_p, experiment_id)
    tags = {
        "git_sha": tracking.git_sha(root_p),
        "trigger": trigger,
        "prefect_flow_run_id": str(flow_run.id or ""),
        "shrinkfleet.prefect": "flow run" if flow_run.id else "none (nothing to run)",
        "prefect_deployment_id": str(deployment.id or ""),
        "shrinkfleet.engine": run_cfg.engine,
        "shrinkfleet.workers": str(run_cfg.workers),
        "shrinkfleet.dask_address": run_cfg.dask_address or "",
        "shrinkfleet.models": ",".join(names),
        "shrinkfleet.dvc": str(use_dvc),
        **tracking.workspace_tags(root_p),
    }
    started = dt.datetime.now(dt.UTC)
    results: dict[str, dict[str, Any]] = {m: {"status": "running", "stages": {}, "workers": {}} for m in names}
    with tracking.fleet_run(experiment_id, tags) as parent_run_id, task_runner(run_cfg) as runner:
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
            prep[ds] = runner.submit(prepare_task.with_options(**opts), {"dataset": ds, **common})
            owner[prep[ds].task_run_id] = (None, ds)
            futures.append(prep[ds])
        for m in names:
            prev = prep[fleet.models[m].dataset]
            for stage, task in MODEL_TASKS:
                if f"{stage}@{m}" in skip:
                    results[m]["stages"][stage] = "skipped"
                    _emit({"stage": stage, "target": m, "status": "skipped", "seconds": 0.0})
                    continue
                prev = runner.submit(task.with_options(**opts), {"model": m, **common},
                                     wait_for=[prev] if prev else [])
                owner[prev.task_run_id] = (m, stage)
                futures.append(prev)

        def finish(model: str) -> None:
            """Track a model whose every stage is done; a tracking error fails that model only."""
            try:
                out = register.record(ws, fleet.resolve(model), results[model]["stages"], use_dvc, trigger,
                                      tags["git_sha"])
                results[model].update(out, status="ok")
                _tag_workers(out["run_id"], results[model]["workers"])
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
                    results[m]["workers"][stage] = value.get("worker", "")
                _emit({"stage": stage, "target": target, "status": value["status"], "seconds": value["seconds"],
                       "worker": value.get("worker", "")})
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
    return {"models": results, "report": str(path), "parent_run_id": parent_run_id, "use_dvc": use_dvc,
            "trigger": trigger, "engine": run_cfg.engine}


def _tag_workers(run_id: str, workers: dict[str, str]) -> None:
    """Tag the model's MLflow run with the worker of each stage that ran (``shrinkfleet.worker.<stage>``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for stage, worker in workers.items():
        if worker:
            client.set_tag(run_id, f"shrinkfleet.worker.{stage}", worker)


# (state key, stages up to date) of the last DVC status pass of this process.
_last_status: tuple[tuple, set[str]] | None = None


def _state_key(root: Path) -> tuple:
    """Changes when anything DVC's status depends on might have: the pipeline, lock and params files."""
    def stat(p: Path) -> tuple:
        try:
            st = p.stat()
        except FileNotFoundError:
            return (0, 0)
        return (st.st_mtime_ns, st.st_size)

    return (str(root), *(stat(root / f) for f in ("dvc.yaml", "dvc.lock", "params.yaml")), time.monotonic() // 60)


def _skippable(root: Path, datasets: list[str], names: list[str], fleet: Any) -> set[str]:
    """Stages that need no task at all: DVC reports them and every stage upstream up to date.

    One DVC pass in the flow process; a stage with a stale upstream is submitted and decides
    for itself once its upstream has been re-run and committed. :func:`run_fleet` asks the
    same just before the flow starts; that answer is reused when the pipeline, lock and
    params files are unchanged and it is under a minute old.
    """
    global _last_status
    stages = [f"prepare@{ds}" for ds in datasets] + [f"{s}@{m}" for m in names for s, _ in MODEL_TASKS]
    key = _state_key(root)
    if _last_status is not None and _last_status[0] == key:  # asked a moment ago (run_fleet), nothing changed since
        clean = _last_status[1] & set(stages)
    else:
        clean = versioning.up_to_date(root, stages)
        _last_status = (key, clean)
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


def nothing_to_run(params_file: Path, root: Path, models: list[str] | None = None) -> bool:
    """Whether DVC reports every stage of the selected models up to date (one DVC pass, ~0.5 s)."""
    root = root.resolve()
    if not versioning.is_dvc_repo(root) or params_file.resolve() != (root / "params.yaml").resolve():
        return False
    fleet = load_params(params_file)
    names = select_models(fleet.model_names(), models)
    datasets = fleet.datasets_in_use(names)
    return len(_skippable(root, datasets, names, fleet)) == len(datasets) + len(names) * len(MODEL_TASKS)


def run_fleet(
    params_file: Path,
    root: Path,
    models: list[str] | None = None,
    force: bool = False,
    use_dvc: bool = True,
    trigger: str = "manual",
    workers: int | None = None,
    engine: str | None = None,
    dask_address: str | None = None,
    if_busy: str = "wait",
) -> dict[str, Any]:
    """Run the fleet flow on the configured Prefect API (or a temporary one), overriding ``run:``.

    With no Prefect API configured and every stage up to date, there is no task to
    orchestrate: the flow's function runs without starting a temporary Prefect server (7 s of
    a night where nothing changed). It tracks, gates and reports as usual; its MLflow run is
    tagged ``shrinkfleet.prefect=none (nothing to run)``. With ``PREFECT_API_URL`` set, every
    run is a Prefect flow run.
    """
    from flows.server import configured_api, prefect_api

    kwargs = {"params_file": str(params_file), "root": str(root), "models": models, "force": force,
              "use_dvc": use_dvc, "trigger": trigger, "workers": workers, "engine": engine,
              "dask_address": dask_address, "if_busy": if_busy}
    if not configured_api() and use_dvc and not force and nothing_to_run(params_file, root, models):
        return fleet_flow.fn(**kwargs)
    with prefect_api():
        return fleet_flow(**kwargs)

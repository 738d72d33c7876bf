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

import contextlib
import contextvars
import datetime as dt
import heapq
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Self

from prefect import flow
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from shrinkfleet import locks, pipeline, remote, report, storage, tracking, versioning
from shrinkfleet import registration as register
from shrinkfleet.config import ConfigError, RunConfig, load_params, load_snapshot, select_models
from shrinkfleet.pipeline import stage_name
from shrinkfleet.workspace import Workspace
from tasks.common import is_transient
from tasks.stages import TASKS, preload

log = logging.getLogger("shrinkfleet")

MODEL_TASKS = tuple((kind, TASKS[kind]) for kind in pipeline.MODEL_STAGE_KINDS)
STAGE_NAMES = pipeline.STAGE_KINDS

# Where this run's progress events go: the callback given to run_fleet (the CLI draws bars with
# it), for the duration of that call only; a deployment run has none and prints them.
_on_event: contextvars.ContextVar[Callable[[dict[str, Any]], None] | None] = contextvars.ContextVar(
    "shrinkfleet_on_event", default=None)
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
    return WorkerPool(max_workers=run.workers, max_stages_per_worker=run.worker_max_stages)


class FullPool(ProcessPoolExecutor):
    """A process pool that starts all its workers with the first task and replaces each one that exits.

    Python 3.11's pool starts a worker per submitted task only while none is idle, so the
    second worker of a fleet began loading TensorFlow only once the first had work queued
    behind it; and with ``max_tasks_per_child`` it may skip replacing a worker that exited
    while another one is idle (python/cpython#115634). Keeping the pool full avoids both.
    """

    def _adjust_process_count(self) -> None:
        self._idle_worker_semaphore.acquire(blocking=False)  # (the count of idle workers goes unused)
        if self._shutdown_thread or self._broken:
            return
        while len(self._processes) < self._max_workers:
            self._spawn_process()

    def terminate(self) -> None:
        """Stop every worker now, whatever it is doing (a pool nobody will use: no wait for their imports)."""
        for process in list(self._processes.values()):
            process.terminate()
        self.shutdown(wait=True, cancel_futures=True)


class WorkerPool(ProcessPoolTaskRunner):
    """Prefect's process pool task runner on a :class:`FullPool` whose workers are replaced every N stages.

    TensorFlow keeps some memory from every model a process has built (about 15 MB per tiny
    model measured, whatever ``clear_session`` and ``gc`` do), so a worker that trained a
    hundred models holds twice what it held after five. ``max_stages_per_worker``
    (``run.worker_max_stages``) bounds that: the worker exits after that many stages and a
    fresh one takes its place (a few seconds to load TensorFlow again); 0 never replaces one.
    Every worker loads TensorFlow and the stage modules as it starts (:func:`tasks.stages.preload`).
    """

    def __init__(self, max_workers: int, max_stages_per_worker: int = 0):
        super().__init__(max_workers=max_workers, initializer=preload)
        self.max_stages_per_worker = max_stages_per_worker

    def duplicate(self) -> Self:
        return type(self)(max_workers=self._max_workers, max_stages_per_worker=self.max_stages_per_worker)

    def __enter__(self) -> Self:
        super().__enter__()
        # Prefect builds a plain pool (no worker started yet); the same pool, kept full and recycling.
        plain = self._executor
        self._executor = FullPool(max_workers=self._max_workers, mp_context=plain._mp_context,
                                  initializer=plain._initializer, initargs=plain._initargs,
                                  max_tasks_per_child=self.max_stages_per_worker or None)
        plain.shutdown(wait=False)
        return self

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        with settings_by_reference():
            return super().submit(*args, **kwargs)

    def start_workers(self) -> None:
        """Start every worker now (each loads TensorFlow as it starts) instead of with the first stage.

        The call that does it counts as one of the first worker's ``max_stages_per_worker``.
        """
        self._executor.submit(os.getpid)

    def fits(self, run: RunConfig) -> bool:
        """Whether this is the pool ``run:`` asks for."""
        return (run.engine == "process" and run.workers == self._max_workers
                and run.worker_max_stages == self.max_stages_per_worker)

    def discard(self) -> None:
        """Stop a pool no flow will use, without waiting for its workers to finish loading TensorFlow."""
        if isinstance(self._executor, FullPool):
            self._executor.terminate()
        self.__exit__(None, None, None)


_by_reference = threading.Lock()


@contextlib.contextmanager
def settings_by_reference() -> Iterator[None]:
    """Within this block Prefect hands a task's settings to a worker as the Settings object itself.

    Prefect's process pool serializes the settings context for every task it submits: a
    ``model_dump`` of the whole settings tree (about 30 ms here), which the worker then
    validates back into a ``Settings`` model, reading the environment and .env sources again
    (about 90 ms). Five tasks per model, a hundred models: over a minute of CPU. The worker
    runs on this machine, so the object itself is pickled instead (under 1 ms each way);
    Prefect's ``hydrated_context`` accepts it as the ``settings`` field as it is. Only
    :class:`WorkerPool` submissions use this; everything else serializes as Prefect does.
    """
    from prefect.context import SettingsContext

    def serialize(self: SettingsContext, include_secrets: bool = True) -> dict[str, Any]:
        return {"profile": self.profile, "settings": self.settings}

    with _by_reference:
        original = SettingsContext.serialize
        SettingsContext.serialize = serialize
        try:
            yield
        finally:
            SettingsContext.serialize = original


# A worker pool started ahead of the flow (see :func:`start_workers_early`).
_early_pool: WorkerPool | None = None


def start_workers_early(run: RunConfig) -> None:
    """Start the process pool ``run`` asks for now; the next flow run with the same ``run:`` takes it.

    :func:`run_fleet` calls this before it waits for the temporary Prefect server, so the
    workers start and load TensorFlow (about 6 s each on 2 cores) while the server comes up
    and the flow sets MLflow up, instead of after. Only for ``engine: process``.
    """
    global _early_pool
    if run.engine != "process" or _early_pool is not None:
        return
    _early_pool = WorkerPool(max_workers=run.workers, max_stages_per_worker=run.worker_max_stages).__enter__()
    _early_pool.start_workers()


def discard_early_workers() -> None:
    """Stop a pool :func:`start_workers_early` started that no flow took."""
    global _early_pool
    if _early_pool is not None:
        _early_pool.discard()
        _early_pool = None


@contextlib.contextmanager
def _stage_runner(run: RunConfig) -> Iterator[TaskRunner]:
    """The started task runner the stages go to: the pool started early for this ``run:``, or a new one."""
    global _early_pool
    early, _early_pool = _early_pool, None
    if early is not None and early.fits(run):
        try:  # (already started)
            yield early
        finally:
            early.__exit__(None, None, None)
        return
    if early is not None:
        early.discard()
    with task_runner(run) as runner:
        yield runner


def parallel_workers(run: RunConfig) -> int | None:
    """How many stages run at once: ``run.workers``, or None (unknown) on an existing Dask cluster."""
    return None if run.engine == "dask" and run.dask_address else run.workers


def in_flight_limit(run: RunConfig) -> int | None:
    """How many stage tasks the flow hands the task runner at once: one per worker, plus one queued.

    The queued one is what a worker takes the moment its stage ends, instead of idling while
    the flow hears of the end and submits the next stage: a round trip of about 0.1 s, and as
    long as tracking a model takes when one has just finished (the loop tracks between two
    stages). None (no limit) for an existing Dask cluster, whose size the cluster decides and
    whose scheduler queues what it cannot start yet.
    """
    workers = parallel_workers(run)
    return None if workers is None else workers + 1


class Dispatcher:
    """Hands the task runner a stage only once its upstream has finished, at most ``limit`` at a time.

    Why not submit the whole fleet up front with ``wait_for``: Prefect's process pool resolves
    ``wait_for`` in one thread per worker, each blocking on one upstream in submission order,
    so a fleet submitted model by model ran one model's chain after another (2 workers were
    1.13x faster than 1 on 8 models). Here a stage is queued when its upstream finishes and the
    queue hands out the stage with the smallest key first (the flow uses the model furthest
    along, then fleet order), so every worker has work and models finish early, their
    tracking in the flow process overlapping the others' training. With more than one worker
    the upstream future still goes to ``wait_for`` (already done, it returns at once), so
    Prefect records the edge; with one, Prefect would warn of a deadlock that cannot happen.
    ``workers`` is how many run at once (None: unknown, an existing Dask cluster).
    """

    def __init__(self, runner: TaskRunner, limit: int | None, workers: int | None = None):
        self.runner, self.limit, self.workers = runner, limit, workers
        self._ready: list[tuple[Any, int, Any, dict[str, Any], Any, PrefectFuture | None]] = []
        self._in_flight: dict[PrefectFuture, Any] = {}
        self._seq = 0

    def add(self, key: Any, task: Any, parameters: dict[str, Any], owner: Any,
            upstream: PrefectFuture | None = None) -> None:
        """Queue ``task(**parameters)``; ``owner`` comes back with its future from :meth:`next_done`."""
        self._seq += 1
        heapq.heappush(self._ready, (key, self._seq, task, parameters, owner, upstream))

    def pump(self) -> None:
        """Submit queued stages while a worker is free."""
        while self._ready and (self.limit is None or len(self._in_flight) < self.limit):
            _, _, task, parameters, owner, upstream = heapq.heappop(self._ready)
            # (With one worker Prefect warns that a tagged task waiting on another may deadlock; it cannot here.)
            wait_for = [upstream] if upstream and (self.workers or 2) > 1 else []
            future = self.runner.submit(task, parameters, wait_for=wait_for)
            self._in_flight[future] = owner

    def busy(self) -> bool:
        return bool(self._in_flight or self._ready)

    def next_done(self) -> tuple[PrefectFuture, Any]:
        """Block until a submitted stage finishes; its future and owner."""
        if not self._in_flight:
            self.pump()
        finished = as_completed(list(self._in_flight))
        try:
            future = next(finished)
        finally:
            finished.close()
        return future, self._in_flight.pop(future)


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
    if (on_event := _on_event.get()) is not None:
        on_event(event)
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
    snapshot = load_snapshot(params_p)  # read once: every stage of this run gets this, never the file
    fleet = snapshot.fleet
    names = select_models(fleet.model_names(), models)
    run_cfg = resolve_run(fleet.run, workers, engine, dask_address)
    trigger = detect_trigger(trigger)
    ws = Workspace(root_p)
    use_dvc = use_dvc and versioning.is_dvc_repo(root_p) and params_p == (root_p / "params.yaml").resolve()
    opts = {"retries": fleet.run.retries, "retry_delay_seconds": fleet.run.retry_delay_seconds,
            "retry_condition_fn": _transient}
    common = {"root": str(root_p), "config": snapshot, "use_dvc": use_dvc, "force": force}

    with locks.run_lock(root_p, if_busy, on_wait=_waiting):
        return _locked_run(root_p, params_p, fleet, names, run_cfg, trigger, ws, use_dvc, opts, common, force)


def gpu_limit_exists() -> bool:
    """Whether the Prefect API of this run holds a concurrency limit on the tag ``gpu``.

    The training stages carry the tag ``gpu`` so that such a limit (``GPU_SLOTS`` of the worker
    entry point, or ``prefect concurrency-limit create gpu N``) bounds how many train at once. A
    tagged task asks the server for slots as it starts, limit or not; without a limit that
    request only costs a database transaction, which on SQLite sometimes failed with "database is
    locked" and a 503 the worker retried two seconds later (measured: 1.6 to 2.5 s lost on about
    one task in seven). So the stages are tagged for a run only when the limit exists when the run
    starts (a run's temporary server never has one); a limit created during a run applies from
    the next run on.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_concurrency_limit_by_tag("gpu")
        except ObjectNotFound:
            return False
    return True


def _notice(text: str) -> None:
    """A line the user should see whatever the log level (the CLI prints it; a deployment run logs it)."""
    if (on_event := _on_event.get()) is not None:
        on_event({"stage": "notice", "target": "", "status": text})
    else:
        print(text)


def _waiting(info: dict[str, Any]) -> None:
    _notice(f"waiting: {locks.describe(info)} holds this workspace; this run starts when it ends")


def _locked_run(root_p: Path, params_p: Path, fleet: Any, names: list[str], run_cfg: RunConfig, trigger: str,
                ws: Workspace, use_dvc: bool, opts: dict[str, Any], common: dict[str, Any],
                force: bool) -> dict[str, Any]:
    """The fleet run proper, while this process holds the workspace's run lock."""
    from prefect.runtime import deployment, flow_run

    location = remote.activate(fleet.storage)  # S3 endpoint for MLflow's artifact client; None = local storage
    if flow_run.id and not gpu_limit_exists():
        opts = {**opts, "tags": set()}  # no limit to honour: no slot to ask the server for, stage by stage
    ws_dirs = [root_p / "data" / "prepared", root_p / "models", root_p / "metrics", ws.reports]
    for line in storage.sweep_stale(ws_dirs):  # before any stage writes there
        _notice(f"recovered: {line}")
    if use_dvc:  # the stage graph DVC checks and records is the one params.yaml describes now
        changed = pipeline.sync(root_p, fleet)
        if changed:
            _notice(f"dvc.yaml: rewritten from {params_p.name} ({pipeline.summary(changed)})")
    started = dt.datetime.now(dt.UTC)
    results: dict[str, dict[str, Any]] = {m: {"status": "running", "stages": {}, "workers": {}} for m in names}
    with contextlib.ExitStack() as stack:
        runner = stack.enter_context(_stage_runner(run_cfg))
        datasets = fleet.datasets_in_use(names)
        users = {ds: [m for m in names if fleet.models[m].dataset == ds] for ds in datasets}
        skip, reasons = _plan(root_p, datasets, names, fleet) if use_dvc and not force else (set(), {})
        for m in names:
            results[m]["reason"] = ("--force" if force else "DVC off" if not use_dvc else reasons.get(m, ""))
        order = {m: i for i, m in enumerate(names)}
        # Each model's stages still to run, in order (only a prefix of a chain is ever skipped).
        chains: dict[str, list[tuple[str, Any]]] = {}
        for m in names:
            chains[m] = []
            kinds = pipeline.model_kinds(fleet, m)
            for stage, task in MODEL_TASKS:
                if stage not in kinds:  # (distill, for a model with student: null)
                    results[m]["stages"][stage] = "none"
                    _emit({"stage": stage, "target": m, "status": "none", "seconds": 0.0})
                elif stage_name(stage, m) in skip:
                    results[m]["stages"][stage] = "skipped"
                    _emit({"stage": stage, "target": m, "status": "skipped", "seconds": 0.0})
                else:
                    chains[m].append((stage, task))
        dispatch = Dispatcher(runner, in_flight_limit(run_cfg), parallel_workers(run_cfg))

        def next_stage(model: str, upstream: PrefectFuture | None) -> None:
            """Queue the model's next stage after ``upstream``, or track the model when none is left."""
            if not chains[model]:
                finished.append(model)
                return
            stage, task = chains[model].pop(0)
            depth = 1 + len(MODEL_TASKS) - len(chains[model])
            dispatch.add((-depth, order[model]), task.with_options(**opts), {"model": model, **common},
                         owner=(model, stage), upstream=upstream)

        finished: list[str] = []
        stage_cpu = 0.0  # CPU seconds the stages' work took in the workers, each stage once
        for ds in datasets:
            if stage_name("prepare", ds) in skip:
                for m in users[ds]:
                    results[m]["stages"]["prepare"] = "skipped"
                _emit({"stage": "prepare", "target": ds, "status": "skipped", "seconds": 0.0})
                for m in users[ds]:
                    next_stage(m, None)
            else:
                dispatch.add((-1, 0), TASKS["prepare"].with_options(**opts), {"dataset": ds, **common},
                             owner=(None, ds))
        # The first stages start (and the workers load TensorFlow) while MLflow is set up.
        dispatch.pump()
        experiment_id = tracking.setup(root_p, fleet.fleet, artifact_root=location.mlflow_url if location else None)
        for run_id in tracking.close_stale_runs(experiment_id, root_p):
            _notice(f"recovered: MLflow run {run_id} was left RUNNING by a run that died; marked KILLED")
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
            "shrinkfleet.config_digest": common["config"].digest,
            **tracking.workspace_tags(root_p),
        }
        parent_run_id = stack.enter_context(tracking.fleet_run(experiment_id, tags))
        import mlflow

        # The settings every stage of this run used, every default filled in (its digest is the tag above).
        mlflow.log_text(common["config"].to_json(), "config/params.resolved.json")
        # A thread of its own draws each finished model's plots (about 0.7 s for two), so this loop
        # goes on handing out stages meanwhile instead of leaving a worker without one.
        plotter = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="shrinkfleet-plots"))

        def finish(model: str) -> None:
            """Track a model whose every stage is done; a tracking error fails that model only."""
            try:
                out = register.record(ws, fleet.resolve(model), results[model]["stages"], use_dvc, trigger,
                                      tags["git_sha"])
                results[model].update(out, status="ok")
                _tag_model_run(out["run_id"], results[model]["workers"], results[model]["reason"])
                _emit_registry(model, out["registry"])
            except Exception as exc:  # (one model's tracking must not stop the fleet)
                results[model].update(status="failed", failed_stage="track", error=f"{type(exc).__name__}: {exc}")
                _emit({"stage": "track", "target": model, "status": "failed", "error": str(exc)})
                return
            # Its plots are drawn now, while the workers train the others; the report at the end reuses them.
            plotter.submit(_draw_model_plots, ws, model)

        while finished or dispatch.busy():
            # Models with nothing left to run are tracked while the workers train the next ones.
            while finished:
                finish(finished.pop(0))
            if not dispatch.busy():
                break
            future, (model, stage_or_ds) = dispatch.next_done()
            kind, value = _outcome(future)
            affected = users[stage_or_ds] if model is None else [model]
            stage = "prepare" if model is None else stage_or_ds
            target = stage_or_ds if model is None else model
            if kind == "ok":
                stage_cpu += float(value.get("cpu_seconds", 0.0))
                for m in affected:
                    results[m]["stages"][stage] = value["status"]
                    results[m]["workers"][stage] = value.get("worker", "")
                _emit({"stage": stage, "target": target, "status": value["status"], "seconds": value["seconds"],
                       "worker": value.get("worker", "")})
                for m in affected:
                    next_stage(m, future)
            else:  # a model whose stage failed for good stops there; its later stages are never submitted
                for m in affected:
                    results[m].update(status="failed", failed_stage=stage, error=value)
                _emit({"stage": stage, "target": target, "status": "failed", "error": value})
            dispatch.pump()

        for r in results.values():
            if r["status"] == "running":  # cannot happen unless a future vanished; never report it as done
                r.update(status="failed", failed_stage="flow", error="did not finish")
        failures = {m: f"{r['failed_stage']} failed: {r['error']}" for m, r in results.items()
                    if r["status"] == "failed"}
        for m in failures:
            tracking.log_failed_model(m, results[m]["failed_stage"], results[m]["error"])
        plotter.shutdown(wait=True)  # (pyplot is not for two threads at once)
        docs = report.load_metrics(ws, [m for m in names if results[m]["status"] == "ok"])
        path = report.write_report(ws, docs, failures, {
            "fleet": fleet.fleet,
            "started": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "git": tags["git_sha"],
            "trigger": trigger,
            "models": f"{len(names) - len(failures)} of {len(names)} finished",
            "MLflow run": parent_run_id,
        }, outcomes={m: results[m] for m in docs}, trends=report.trends_from_mlflow(experiment_id, names))

        mlflow.log_artifacts(str(path.parent), artifact_path="report")
        mlflow.log_metrics({"models_ok": len(names) - len(failures), "models_failed": len(failures),
                            "stage_cpu_seconds": stage_cpu})
        if failures:
            mlflow.set_tag("shrinkfleet.failed_models", ",".join(failures))
    return {"models": results, "report": str(path), "parent_run_id": parent_run_id, "use_dvc": use_dvc,
            "trigger": trigger, "engine": run_cfg.engine}


def _draw_model_plots(ws: Workspace, model: str) -> None:
    """A finished model's plots, ahead of the report (which draws them itself, and says why, if this could not)."""
    try:
        report.model_plots(ws, model, report.load_metrics(ws, [model])[model])
    except Exception as exc:  # (the report draws it again, and says there what went wrong)
        log.debug("%s: plots not drawn ahead of the report: %s: %s", model, type(exc).__name__, exc)


def _tag_model_run(run_id: str, workers: dict[str, str], reason: str) -> None:
    """Tag the model's MLflow run with why its stages ran (``shrinkfleet.reason``, empty when none
    did) and the worker of each stage that ran (``shrinkfleet.worker.<stage>``)."""
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    tags = [RunTag("shrinkfleet.reason", reason)]
    tags += [RunTag(f"shrinkfleet.worker.{stage}", worker) for stage, worker in workers.items() if worker]
    MlflowClient().log_batch(run_id, tags=tags)


# (state key, DVC's status of every stage) of the last DVC status pass of this process.
_last_status: tuple[tuple, dict[str, list[Any]]] | None = None


def _state_key(root: Path) -> tuple:
    """Changes when anything DVC's status depends on might have: the pipeline, lock and params files."""
    def stat(p: Path) -> tuple:
        try:
            st = p.stat()
        except FileNotFoundError:
            return (0, 0)
        return (st.st_mtime_ns, st.st_size)

    return (str(root), *(stat(root / f) for f in ("dvc.yaml", "dvc.lock", "params.yaml")), time.monotonic() // 60)


def _plan(root: Path, datasets: list[str], names: list[str], fleet: Any) -> tuple[set[str], dict[str, str]]:
    """Stages that need no task at all, and why each model that has work has it.

    A stage is skipped when DVC reports it and every stage upstream up to date. A model's
    reason is what DVC says changed for the first stage of its chain (its dataset's
    ``prepare`` included) that is not skipped: the cause of everything after it.

    One DVC pass in the flow process; a stage with a stale upstream is submitted and decides
    for itself once its upstream has been re-run and committed. :func:`run_fleet` asks the
    same just before the flow starts; that answer is reused when the pipeline, lock and
    params files are unchanged and it is under a minute old.
    """
    global _last_status
    key = _state_key(root)
    if _last_status is not None and _last_status[0] == key:  # asked a moment ago (run_fleet), nothing changed since
        changed = _last_status[1]
    else:
        changed = versioning.pipeline_status(root)
        _last_status = (key, changed)
    skip = {stage_name("prepare", ds) for ds in datasets if stage_name("prepare", ds) not in changed}
    reasons: dict[str, str] = {}
    for m in names:
        chain = [stage_name("prepare", fleet.models[m].dataset),
                 *(stage_name(s, m) for s in pipeline.model_kinds(fleet, m))]
        upstream_ok = True
        for stage in chain:
            upstream_ok = upstream_ok and stage not in changed
            if upstream_ok:
                skip.add(stage)
            elif m not in reasons:
                reasons[m] = versioning.describe_change(root, stage, changed.get(stage, []))
    return skip, reasons


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
    if pipeline.changes(root, fleet):  # dvc.yaml is behind params.yaml: the run rewrites it, then decides
        return False
    skip, _ = _plan(root, datasets, names, fleet)
    return len(skip) == len(datasets) + sum(len(pipeline.model_kinds(fleet, m)) for m in names)


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
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the fleet flow on the configured Prefect API (or a temporary one), overriding ``run:``.

    ``on_event`` receives every progress event of this run (``{"stage", "target", "status", ...}``:
    a stage ran, was skipped or failed; ``stage: notice`` for a line to show; ``stage: registry``
    for what the gate did); without it, events are printed.

    With no Prefect API configured and every stage up to date, there is no task to
    orchestrate: the flow's function runs without starting a temporary Prefect server (7 s of
    a night where nothing changed). It tracks, gates and reports as usual; its MLflow run is
    tagged ``shrinkfleet.prefect=none (nothing to run)``. With ``PREFECT_API_URL`` set, every
    run is a Prefect flow run.
    """

    kwargs = {"params_file": str(params_file), "root": str(root), "models": models, "force": force,
              "use_dvc": use_dvc, "trigger": trigger, "workers": workers, "engine": engine,
              "dask_address": dask_address, "if_busy": if_busy}
    token = _on_event.set(on_event)
    try:
        return _run_fleet(params_file, root, models, use_dvc, force, workers, engine, dask_address, kwargs)
    finally:
        _on_event.reset(token)


def _run_fleet(params_file: Path, root: Path, models: list[str] | None, use_dvc: bool, force: bool,
               workers: int | None, engine: str | None, dask_address: str | None, kwargs: dict[str, Any]
               ) -> dict[str, Any]:
    from flows.server import discard_early, prefect_api

    if not needs_prefect_run(params_file, root, models, use_dvc, force):
        discard_early()
        return fleet_flow.fn(**kwargs)
    try:
        try:
            start_workers_early(resolve_run(load_params(params_file).run, workers, engine, dask_address))
        except ConfigError as exc:  # (a bad ``run:`` is the flow's to report, naming the key)
            log.debug("workers not started early: %s", exc)
        with prefect_api():
            return fleet_flow(**kwargs)
    finally:
        discard_early_workers()


def needs_prefect_run(params_file: Path, root: Path, models: list[str] | None, use_dvc: bool, force: bool) -> bool:
    """Whether :func:`run_fleet` runs a Prefect flow: a Prefect API is configured, or some stage has to run."""
    from flows.server import configured_api

    return bool(configured_api()) or not use_dvc or force or not nothing_to_run(params_file, root, models)


def launch_server_early(params_file: Path, root: Path, models: list[str] | None, use_dvc: bool,
                        force: bool) -> None:
    """Start the run's temporary Prefect server in the background now if the run will need one.

    ``shrinkfleet run --no-dvc`` (or ``--force``) calls this before checking its inputs, so the
    server's start-up (about 6 s) overlaps that work. With DVC, whether anything is to run is
    DVC's answer (kept for :func:`run_fleet`, see :func:`_plan`). Any error here is left
    for the checks that follow to report.
    """
    from flows.server import configured_api, launch_early

    try:
        if not configured_api() and needs_prefect_run(params_file, root, models, use_dvc, force):
            launch_early()
    except Exception as exc:  # (a broken project is reported by preflight, with its cause)
        log.debug("no early Prefect server: %s: %s", type(exc).__name__, exc)

"""The fleet flow: every model of params.yaml through prepare > teacher > distill > prune >
compress (recipes) > evaluate, in parallel worker processes, then tracked in MLflow and reported.

The flow submits a ``prepare`` task per dataset, then one ``model`` task per model
(:func:`tasks.stages.model_task`) as soon as its dataset is ready; a model task runs that
model's stages in order as nested Prefect tasks (retried on transient failures; training ones
tagged ``gpu``) that DVC skips when up to date and records when they ran. TensorFlow keeps
global state per process, so tasks run in worker processes, never threads, through Prefect's
own task runners: ``ProcessPoolTaskRunner`` of ``run.workers`` processes (``run.engine:
process``), or prefect-dask's ``DaskTaskRunner`` (``run.engine: dask``) on an existing cluster
(``run.dask_address``) or a local one of ``run.workers`` processes with one thread each. The
runner spreads the models over its workers; the flow only tracks each model in MLflow as its
task ends, while the workers train the others. The flow builds the task runner itself from
params.yaml and its parameters, so a deployment run (which calls ``fleet_flow`` directly) and
``shrinkfleet run`` execute the same way. Every stage result names the worker that ran it. A
model whose stage fails for good stops there; the others go on, and the run reports which
model failed at which stage.
"""

import contextlib
import contextvars
import datetime as dt
import json
import logging
import os
import queue
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.futures import PrefectFuture
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from shrinkfleet import durations, locks, pipeline, remote, report, runlog, storage, times, tracking, versioning
from shrinkfleet import registration as register
from shrinkfleet.config import ConfigError, RunConfig, Snapshot, load_params, load_snapshot, select_models
from shrinkfleet.pipeline import stage_name
from shrinkfleet.workspace import Workspace
from tasks.stages import TASKS, StageFailed, model_task, preload, stage_options, worker_task

log = logging.getLogger("shrinkfleet")

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
    """The task runner ``run:`` asks for: Prefect's own, every worker a process running one model at a time.

    ``engine: process`` is Prefect's ``ProcessPoolTaskRunner`` of ``run.workers`` processes, each
    loading TensorFlow and the stage modules as it starts (:func:`tasks.stages.preload`);
    ``engine: dask`` is prefect-dask's ``DaskTaskRunner`` on the cluster at ``run.dask_address``, or
    on a local cluster of ``run.workers`` processes with one thread each.
    """
    if run.engine == "dask":
        from prefect_dask import DaskTaskRunner

        if run.dask_address:
            return DaskTaskRunner(address=run.dask_address)
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
            "n_workers": run.workers, "threads_per_worker": 1, "processes": True})
    return ProcessPoolTaskRunner(max_workers=run.workers, initializer=preload)


def parallel_workers(run: RunConfig) -> int:
    """How many workers the run's task runner has (an existing Dask cluster's size is its own: 1 assumed)."""
    return 1 if run.engine == "dask" and run.dask_address else run.workers


def models_per_pool(run: RunConfig) -> int | None:
    """How many model tasks one process pool takes before a fresh pool replaces it; None: no limit.

    TensorFlow keeps some memory from every model a process has built (about 15 MB per tiny
    model measured, whatever ``clear_session`` and ``gc`` do), so a worker that trained a hundred
    models holds twice what it held after five. Prefect's process pool keeps its workers for its
    whole life, so after ``run.workers`` x ``run.worker_max_models`` models the flow lets the
    pool finish and starts a fresh one (a few seconds to load TensorFlow again). A Dask cluster
    manages its own workers' memory (``distributed.worker.memory``), so it has no such limit.
    """
    if run.engine != "process" or not run.worker_max_models:
        return None
    return run.workers * run.worker_max_models


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


def _emit(event: dict[str, Any]) -> None:
    if (on_event := _on_event.get()) is not None:
        on_event(event)
        return
    status = event["status"]
    extra = f" ({event['seconds']:.1f}s)" if "seconds" in event else ""
    extra += f" on {event['worker']}" if event.get("worker") else ""
    detail = f": {event['error']}" if event.get("error") else ""
    print(f"{event['target']:<24} {event['stage']:<9} {status}{extra}{detail}")


def _outcome(future: PrefectFuture) -> tuple[bool, Any]:
    """``(True, result)`` of a task that completed, or ``(False, (stage or None, error, stages done))``."""
    try:
        value = future.result(raise_on_failure=False)
    except Exception as exc:  # the task never ran to an end (its worker process died, say)
        return False, (None, f"{type(exc).__name__}: {exc}", {})
    if isinstance(value, StageFailed):
        return False, (value.stage, value.error, value.done)
    if isinstance(value, BaseException):
        return False, (None, f"{type(value).__name__}: {value}", {})
    state = future.state
    if state.is_completed() and isinstance(value, dict):
        return True, value
    return False, (None, str(state.message or state.name), {})


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
    names = select_models(snapshot.fleet.model_names(), models)
    run_cfg = resolve_run(snapshot.fleet.run, workers, engine, dask_address)
    use_dvc = use_dvc and versioning.is_dvc_repo(root_p) and params_p == (root_p / "params.yaml").resolve()
    with locks.run_lock(root_p, if_busy, on_wait=_waiting):
        return FleetRun(root_p, snapshot, names, run_cfg, detect_trigger(trigger), use_dvc, force).run()


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


class Runners:
    """The run's task runners, one at a time: a fresh one once the current one took its share of models.

    See :func:`models_per_pool`. Nothing starts until the first task is submitted.
    """

    def __init__(self, run_cfg: RunConfig):
        self.run_cfg, self.quota = run_cfg, models_per_pool(run_cfg)
        self.current: TaskRunner | None = None
        self.models = 0
        self.pending: set[PrefectFuture] = set()  # unfinished futures of the current runner

    def submit(self, task: Any, parameters: dict[str, Any], model: bool,
               wait_for: list[PrefectFuture] | None = None) -> PrefectFuture | None:
        """Submit a task; None (not submitted) for a model while the current runner is full and busy."""
        if model and self.current is not None and self.quota and self.models >= self.quota:
            if self.pending:
                return None
            self.close()
        if self.current is None:
            self.current, self.models = task_runner(self.run_cfg).__enter__(), 0
        future = self.current.submit(task, parameters, wait_for=wait_for or [])
        self.models += model
        self.pending.add(future)
        return future

    def finished(self, future: PrefectFuture) -> None:
        self.pending.discard(future)

    def close(self) -> None:
        if self.current is not None:
            runner, self.current = self.current, None
            runner.__exit__(None, None, None)


class ProgressFile:
    """The run's progress file: a JSON line per stage a worker finished (see :func:`tasks.stages.model_task`)."""

    def __init__(self, root: Path):
        folder = root / ".shrinkfleet" / "progress"
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.jsonl"):  # left by a run that died: this run holds the workspace's lock
            stale.unlink(missing_ok=True)
        self.path = folder / f"{os.getpid()}-{time.time_ns()}.jsonl"
        self._offset = 0

    def read(self) -> list[dict[str, Any]]:
        """The events written since the last call (complete lines only)."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


POLL_SECONDS = 0.5  # how often the flow reads the progress file while it waits for a task to end


class FleetRun:
    """One fleet run in the flow process, while it holds the workspace's run lock.

    It plans what must run (one DVC pass), submits a ``prepare`` task per dataset and then one
    :func:`tasks.stages.model_task` per model whose dataset is ready, and tracks each model in
    MLflow as soon as its task ends, while the workers train the next ones. A model whose stage
    fails for good stops there; the others go on.
    """

    def __init__(self, root: Path, snapshot: Snapshot, names: list[str], run_cfg: RunConfig, trigger: str,
                 use_dvc: bool, force: bool):
        self.root, self.snapshot, self.fleet, self.names = root, snapshot, snapshot.fleet, names
        self.run_cfg, self.trigger, self.use_dvc, self.force = run_cfg, trigger, use_dvc, force
        self.ws = Workspace(root)
        self.common = {"root": str(root), "config": snapshot, "use_dvc": use_dvc, "force": force}
        self.results: dict[str, dict[str, Any]] = {
            m: {"status": "running", "stages": {}, "workers": {}} for m in names}
        self.stage_cpu = 0.0  # CPU seconds the stages' work took in the workers, each stage once
        self.told: set[tuple[str, str]] = set()  # (model, stage) events already emitted
        self.devices: dict[str, str] = {}  # worker -> the GPUs it sees, or CPU
        self.users: dict[str, list[str]] = {}  # dataset -> the selected models that read it, in fleet order
        self.history = durations.load(root)  # last runs' stage seconds: the longest models start first
        self.ran: dict[str, dict[str, float]] = {}  # model -> stage -> seconds, the stages this run ran
        for m in names:
            self.users.setdefault(self.fleet.models[m].dataset, []).append(m)

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        from prefect.runtime import flow_run

        location = remote.activate(self.fleet.storage)  # S3 endpoint for MLflow's artifact client; None = local
        ws_dirs = [self.root / "data" / "prepared", self.root / "models", self.root / "metrics", self.ws.reports]
        for line in storage.sweep_stale(ws_dirs):  # before any stage writes there
            _notice(f"recovered: {line}")
        if self.use_dvc:  # the stage graph DVC checks and records is the one params.yaml describes now
            changed = pipeline.sync(self.root, self.fleet)
            if changed:
                _notice(f"dvc.yaml: rewritten from {self.snapshot.path.name} ({pipeline.summary(changed)})")
        self.gpu = bool(flow_run.id) and gpu_limit_exists()  # no limit to honour: no slot to ask for
        started = dt.datetime.now(dt.UTC)
        chains, to_prepare = self._plan()
        pools, progress = Runners(self.run_cfg), ProgressFile(self.root)
        with contextlib.ExitStack() as stack:
            stack.callback(progress.remove)
            stack.callback(pools.close)
            done: queue.SimpleQueue[PrefectFuture] = queue.SimpleQueue()
            owners: dict[PrefectFuture, tuple[str, str]] = {}  # future -> ("prepare", dataset) | ("model", name)
            prepared: dict[str, PrefectFuture | None] = {ds: None for ds in self.fleet.datasets_in_use(self.names)
                                                          if ds not in to_prepare}
            if to_prepare or any(chains.values()):  # every worker starts now and loads TensorFlow
                for n in range(parallel_workers(self.run_cfg)):
                    future = pools.submit(worker_task, {"n": n}, model=False)
                    owners[future] = ("worker", str(n))
                    future.add_done_callback(done.put)
            for ds in to_prepare:
                future = pools.submit(TASKS["prepare"].with_options(**stage_options(self.fleet.run, gpu=False)),
                                      {"dataset": ds, **self.common}, model=False)
                owners[future] = ("prepare", ds)
                future.add_done_callback(done.put)
            # The first stages start (and the workers load TensorFlow) while MLflow is set up.
            experiment_id, parent_run_id, tags = self._start_tracking(stack, location)
            # A thread of its own draws each finished model's plots (about 0.7 s for two), so this loop
            # goes on handing out models meanwhile.
            plotter = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="shrinkfleet-plots"))
            ready = [m for m in self.names if self.fleet.models[m].dataset in prepared]
            while True:
                ready = self._submit_ready(ready, chains, prepared, pools, owners, done, progress)
                for m in [m for m in ready if not chains[m]]:  # nothing to run: tracked now
                    ready.remove(m)
                    self._finish(m, tags, plotter)
                if not owners:
                    break
                try:
                    future = done.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    self._told(progress.read())
                    continue
                pools.finished(future)
                kind, target = owners.pop(future)
                self._told(progress.read())
                ok, value = _outcome(future)
                if kind == "worker":
                    if ok:
                        self.devices[value["worker"]] = ",".join(value["gpus"]) or "CPU"
                elif kind == "prepare":
                    ready += self._prepared(target, ok, value, future, prepared)
                elif self._model_ended(target, ok, value):
                    self._finish(target, tags, plotter)
            plotter.shutdown(wait=True)  # (pyplot is not for two threads at once)
            try:
                durations.save(self.root, self.ran)
            except OSError as e:  # only tomorrow's order depends on it
                _notice(f"stage durations not saved ({durations.path(self.root)}): {e}")
            path = self._report(experiment_id, parent_run_id, tags, started)
        return {"models": self.results, "report": str(path), "parent_run_id": parent_run_id,
                "use_dvc": self.use_dvc, "trigger": self.trigger, "engine": self.run_cfg.engine}

    def _plan(self) -> tuple[dict[str, list[str]], list[str]]:
        """Each model's stages still to run, in order, and the datasets to prepare; the rest is reported skipped."""
        datasets = self.fleet.datasets_in_use(self.names)
        skip, reasons = (_plan(self.root, datasets, self.names, self.fleet) if self.use_dvc and not self.force
                         else (set(), {}))
        chains: dict[str, list[str]] = {}
        for m in self.names:
            self.results[m]["reason"] = ("--force" if self.force else "DVC off" if not self.use_dvc
                                         else reasons.get(m, ""))
            chains[m] = []
            kinds = pipeline.model_kinds(self.fleet, m)
            for stage in pipeline.MODEL_STAGE_KINDS:
                if stage not in kinds:  # (distill, for a model with student: null)
                    self._stage_event(m, stage, "none")
                elif stage_name(stage, m) in skip:
                    self._stage_event(m, stage, "skipped")
                else:
                    chains[m].append(stage)
        to_prepare = [ds for ds in datasets if stage_name("prepare", ds) not in skip]
        for ds in datasets:
            if ds not in to_prepare:
                for m in self.users[ds]:
                    self.results[m]["stages"]["prepare"] = "skipped"
                _emit({"stage": "prepare", "target": ds, "status": "skipped", "seconds": 0.0})
        return chains, to_prepare

    def _stage_event(self, model: str, stage: str, status: str, seconds: float = 0.0, worker: str = "") -> None:
        self.results[model]["stages"][stage] = status
        if status == "ran":
            self.ran.setdefault(model, {})[stage] = seconds
        if worker:
            self.results[model]["workers"][stage] = worker
        self.told.add((model, stage))
        event = {"stage": stage, "target": model, "status": status, "seconds": seconds}
        _emit({**event, "worker": worker} if worker else event)

    def _told(self, events: list[dict[str, Any]]) -> None:
        """Emit the stage events the workers wrote to the progress file."""
        for e in events:
            if (e["model"], e["stage"]) not in self.told and e["model"] in self.results:
                self._stage_event(e["model"], e["stage"], e["status"], e["seconds"], e.get("worker", ""))

    def _submit_ready(self, ready: list[str], chains: dict[str, list[str]], prepared: dict[str, Any],
                      pools: Runners, owners: dict, done: queue.SimpleQueue, progress: ProgressFile) -> list[str]:
        """Submit the model task of every ready model the pools take now, longest first; the models left waiting."""
        left = []
        for m in durations.longest_first(ready, chains, self.history):
            if not chains[m]:
                left.append(m)
                continue
            upstream = prepared[self.fleet.models[m].dataset]
            params = {"model": m, "stages": chains[m], **self.common, "gpu": self.gpu, "progress": str(progress.path)}
            future = pools.submit(model_task, params, model=True, wait_for=[upstream] if upstream else None)
            if future is None:  # this pool took its share: the next one takes the rest
                left.append(m)
                continue
            owners[future] = ("model", m)
            future.add_done_callback(done.put)
        return left

    def _prepared(self, ds: str, ok: bool, value: Any, future: PrefectFuture,
                  prepared: dict[str, PrefectFuture | None]) -> list[str]:
        """A dataset's prepare task ended: its models, now ready (none when it failed)."""
        users = self.users[ds]
        if ok:
            self.stage_cpu += float(value.get("cpu_seconds", 0.0))
            for m in users:
                self.results[m]["stages"]["prepare"] = value["status"]
                self.results[m]["workers"]["prepare"] = value.get("worker", "")
            _emit({"stage": "prepare", "target": ds, "status": value["status"], "seconds": value["seconds"],
                   "worker": value.get("worker", "")})
            prepared[ds] = future
            return users
        _, error, _ = value
        for m in users:  # its models stop there; none of their stages is submitted
            self.results[m].update(status="failed", failed_stage="prepare", error=error)
        _emit({"stage": "prepare", "target": ds, "status": "failed", "error": error})
        return []

    def _model_ended(self, model: str, ok: bool, value: Any) -> bool:
        """Record a model task's end; whether every stage finished (the model is then tracked)."""
        stages = value if ok else value[2]
        for stage, result in stages.items():
            self.stage_cpu += float(result.get("cpu_seconds", 0.0))
            if (model, stage) not in self.told:  # (a progress line lost, say on a worker without the folder)
                self._stage_event(model, stage, result["status"], result["seconds"], result.get("worker", ""))
        if ok:
            return True
        stage, error, _ = value
        if stage is None:  # the task itself failed: blame the first stage that did not finish
            stage = next((s for s in pipeline.model_kinds(self.fleet, model)
                          if self.results[model]["stages"].get(s) not in ("ran", "skipped", "none")), "flow")
        self.results[model].update(status="failed", failed_stage=stage, error=error)
        _emit({"stage": stage, "target": model, "status": "failed", "error": error})
        return False

    # ------------------------------------------------------------------ tracking and the report

    def _start_tracking(self, stack: contextlib.ExitStack, location: Any) -> tuple[str, str, dict[str, str]]:
        """The fleet's MLflow experiment and this run's parent run (open until the stack closes), with its tags."""
        from prefect.runtime import deployment, flow_run

        experiment_id = tracking.setup(self.root, self.fleet.fleet,
                                       artifact_root=location.mlflow_url if location else None)
        for run_id in tracking.close_stale_runs(experiment_id, self.root):
            _notice(f"recovered: MLflow run {run_id} was left RUNNING by a run that died; marked KILLED")
        tags = {
            "git_sha": tracking.git_sha(self.root),
            "trigger": self.trigger,
            "prefect_flow_run_id": str(flow_run.id or ""),
            "shrinkfleet.prefect": "flow run" if flow_run.id else "none (nothing to run)",
            "prefect_deployment_id": str(deployment.id or ""),
            "shrinkfleet.engine": self.run_cfg.engine,
            "shrinkfleet.workers": str(self.run_cfg.workers),
            "shrinkfleet.dask_address": self.run_cfg.dask_address or "",
            "shrinkfleet.models": ",".join(self.names),
            "shrinkfleet.dvc": str(self.use_dvc),
            "shrinkfleet.config_digest": self.snapshot.digest,
            **tracking.workspace_tags(self.root),
        }
        parent_run_id = stack.enter_context(tracking.fleet_run(experiment_id, tags))
        import mlflow

        # The settings every stage of this run used, every default filled in (its digest is the tag above).
        mlflow.log_text(self.snapshot.to_json(), "config/params.resolved.json")
        return experiment_id, parent_run_id, tags

    def _finish(self, model: str, tags: dict[str, str], plotter: ThreadPoolExecutor) -> None:
        """Track a model whose every stage is done; a tracking error fails that model only."""
        result = self.results[model]
        try:
            out = register.record(self.ws, self.fleet.resolve(model), result["stages"], self.use_dvc, self.trigger,
                                  tags["git_sha"])
            result.update(out, status="ok")
            _tag_model_run(out["run_id"], result["workers"], result["reason"])
            _emit_registry(model, out["registry"])
        except Exception as exc:  # (one model's tracking must not stop the fleet)
            result.update(status="failed", failed_stage="track", error=f"{type(exc).__name__}: {exc}")
            _emit({"stage": "track", "target": model, "status": "failed", "error": str(exc)})
            return
        # What production serves now (the report and plots mark it), read once, here, after the move.
        result["served"] = report.served_variants([model]).get(model)
        # Its plots are drawn now, while the workers train the others; the report at the end reuses them.
        plotter.submit(_draw_model_plots, self.ws, model, result["served"], self.fleet.resolve(model).gate.model_dump(),
                       self.fleet.report.pareto_x)

    def _report(self, experiment_id: str, parent_run_id: str, tags: dict[str, str], started: dt.datetime) -> Path:
        import mlflow

        results, names = self.results, self.names
        for r in results.values():
            if r["status"] == "running":  # cannot happen unless a future vanished; never report it as done
                r.update(status="failed", failed_stage="flow", error="did not finish")
        failures = {m: f"{r['failed_stage']} failed: {r['error']}" for m, r in results.items()
                    if r["status"] == "failed"}
        for m in failures:
            tracking.log_failed_model(m, results[m]["failed_stage"], results[m]["error"])
        docs = report.load_metrics(self.ws, [m for m in names if results[m]["status"] == "ok"])
        header = {
            "fleet": self.fleet.fleet,
            "started": times.shown(started),
            "git": tags["git_sha"],
            "trigger": self.trigger,
            "models": f"{len(names) - len(failures)} of {len(names)} finished",
            "MLflow run": parent_run_id,
        }
        if os.environ.get(runlog.LOG_ENV):  # (a CLI run; see shrinkfleet.runlog)
            header["run log"] = f"{os.environ[runlog.LOG_ENV]} (the libraries' warnings and notes)"
        path = report.write_report(self.ws, docs, failures, header, outcomes={m: results[m] for m in docs},
                                   trends=report.trends_from_mlflow(experiment_id, names),
                                   served={m: results[m]["served"] for m in docs if results[m].get("served")},
                                   gates={m: self.fleet.resolve(m).gate.model_dump() for m in docs},
                                   moves=_manual_moves(names), pareto_x=self.fleet.report.pareto_x)
        mlflow.log_artifacts(str(path.parent), artifact_path="report")
        if self.devices:  # (the workers that answered at the start: "host:pid=GPU:0" or "host:pid=CPU")
            mlflow.set_tag("shrinkfleet.worker_devices", " ".join(f"{w}={d}" for w, d in sorted(self.devices.items())))
        mlflow.log_metrics({"models_ok": len(names) - len(failures), "models_failed": len(failures),
                            "stage_cpu_seconds": self.stage_cpu})
        if failures:
            mlflow.set_tag("shrinkfleet.failed_models", ",".join(failures))
        return path


def _manual_moves(names: list[str]) -> Any:
    """The registry's manual promotes and rollbacks, for the trend plots (None if the registry cannot say)."""
    try:
        return report.moves_from_registry(names)
    except Exception as exc:  # (a report without those lines beats no report)
        log.debug("manual registry moves not read: %s: %s", type(exc).__name__, exc)
        return None


def _draw_model_plots(ws: Workspace, model: str, served: dict[str, Any] | None = None,
                      gate: dict[str, Any] | None = None, pareto_x: str = "coded_bytes") -> None:
    """A finished model's plots, ahead of the report (which draws them itself, and says why, if this could not)."""
    try:
        report.model_plots(ws, model, report.load_metrics(ws, [model])[model], served, gate, pareto_x=pareto_x)
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
        return _run_fleet(params_file, root, models, use_dvc, force, kwargs)
    finally:
        _on_event.reset(token)


def _run_fleet(params_file: Path, root: Path, models: list[str] | None, use_dvc: bool, force: bool,
               kwargs: dict[str, Any]) -> dict[str, Any]:
    from flows.server import discard_early, prefect_api

    if not needs_prefect_run(params_file, root, models, use_dvc, force):
        discard_early()
        return fleet_flow.fn(**kwargs)
    if locks.holds(root):
        _set_up_tracking(params_file, root)
    with prefect_api():
        return fleet_flow(**kwargs)


def _set_up_tracking(params_file: Path, root: Path) -> None:
    """Create the fleet's MLflow store and experiment now, while the temporary Prefect server starts.

    A first run's SQLite store takes about 2 s of CPU to create; done here, in a process that
    would otherwise wait for the server, it does not compete with the workers loading TensorFlow
    once the flow starts (the flow's own :func:`tracking.setup` then finds everything in place).
    Only a process holding the workspace's run lock does this (the CLI), so two runs never
    create the same store at once. A failure is left for the flow to meet and report.
    """
    try:
        fleet = load_params(params_file)
        location = remote.activate(fleet.storage)
        tracking.setup(root, fleet.fleet, artifact_root=location.mlflow_url if location else None)
    except Exception as exc:  # (the flow sets up tracking itself and reports the cause)
        log.debug("MLflow not set up ahead of the flow: %s: %s", type(exc).__name__, exc)


def needs_prefect_run(params_file: Path, root: Path, models: list[str] | None, use_dvc: bool, force: bool) -> bool:
    """Whether :func:`run_fleet` runs a Prefect flow: a Prefect API is configured, or some stage has to run."""
    from flows.server import configured_api

    return bool(configured_api()) or not use_dvc or force or not nothing_to_run(params_file, root, models)

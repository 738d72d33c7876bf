"""The Prefect task of every stage, and of every model, importable without TensorFlow.

The flow process only submits tasks, tracks and reports; it never trains. It submits a
``prepare`` task per dataset and then one :func:`model_task` per model, which runs that model's
stages in order as nested Prefect tasks in the worker that took it: Prefect's own task runners
(``ProcessPoolTaskRunner``, ``DaskTaskRunner``) spread the models over the workers, and a model
never waits for the flow between two of its stages. Each task imports its stage module
(TensorFlow, TFMOT, LiteRT) when it runs, in the worker process, so the flow process starts in
a few seconds instead of loading TensorFlow for nothing.

Every stage task: retried on transient failures (:func:`retry_if_transient`, the count from
``run.retries``), skipped when DVC reports the stage up to date (see
:func:`tasks.common.execute`), never cached by Prefect (DVC decides what is up to date). The
training stages carry the ``gpu`` tag, so a Prefect tag concurrency limit on ``gpu`` bounds how
many train at once; the flow drops the tag for a run whose API has no such limit (see
``flows.fleet.gpu_limit_exists``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from shrinkfleet.config import RunConfig, Snapshot
from shrinkfleet.pipeline import STAGE_KINDS
from tasks.common import execute, is_transient

GPU = ["gpu"]
STAGE_MODULES = STAGE_KINDS  # tasks.<kind> runs each kind of shrinkfleet.pipeline.KINDS
log = logging.getLogger("shrinkfleet")


def preload() -> None:
    """A worker process's initializer: load TensorFlow, TFMOT, LiteRT and every stage module now.

    The flow's process pool (``ProcessPoolTaskRunner(initializer=preload)``) runs this once in each
    worker as it starts, so the worker's few seconds of imports overlap the flow's MLflow set-up
    and the dataset's preparation instead of delaying the first training stage it receives. An
    import that fails is left for the stage that needs it to report, with its cause.
    """
    try:
        for stage in STAGE_MODULES:
            importlib.import_module(f"tasks.{stage}")
        from shrinkfleet.tfenv import quiet_native_stderr, tfmot

        tfmot()
        with quiet_native_stderr():
            import ai_edge_litert.interpreter  # noqa: F401
    except Exception as exc:  # (reported by the stage that needs it)
        log.debug("preloading the stage modules failed: %s", exc)


def _run(stage: str, target: str, root: str, config: Snapshot, use_dvc: bool, force: bool) -> dict:
    try:
        module = importlib.import_module(f"tasks.{stage}")
        return execute(stage, target, root, config, module.run, use_dvc, force)
    except Exception as exc:
        _say_retry(stage, target, exc)
        raise


def _say_retry(stage: str, target: str, exc: Exception) -> None:
    """Tell the user (a WARNING on the console and in Prefect) that a failed attempt will be retried."""
    from prefect.context import TaskRunContext
    from prefect.logging import get_run_logger

    ctx = TaskRunContext.get()
    if ctx is None or not is_transient(exc):
        return
    attempt, retries = ctx.task_run.run_count, ctx.task.retries or 0
    if attempt <= retries:
        get_run_logger().warning("%s@%s: attempt %d of %d failed (%s: %s); retrying", stage, target, attempt,
                                 retries + 1, type(exc).__name__, exc)


@task(name="prepare", task_run_name="prepare-{dataset}", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def prepare_task(dataset: str, root: str, config: Snapshot, use_dvc: bool = True, force: bool = False) -> dict:
    """Prepare one dataset unless DVC reports it up to date."""
    return _run("prepare", dataset, root, config, use_dvc, force)


@task(name="teacher", task_run_name="teacher-{model}", tags=GPU, retries=2, retry_delay_seconds=5,
      cache_policy=NO_CACHE)
def teacher_task(model: str, root: str, config: Snapshot, use_dvc: bool = True, force: bool = False) -> dict:
    """Train one model's teacher unless DVC reports it up to date."""
    return _run("teacher", model, root, config, use_dvc, force)


@task(name="distill", task_run_name="distill-{model}", tags=GPU, retries=2, retry_delay_seconds=5,
      cache_policy=NO_CACHE)
def distill_task(model: str, root: str, config: Snapshot, use_dvc: bool = True, force: bool = False) -> dict:
    """Distil one model's student unless DVC reports it up to date."""
    return _run("distill", model, root, config, use_dvc, force)


@task(name="prune", task_run_name="prune-{model}", tags=GPU, retries=2, retry_delay_seconds=5,
      cache_policy=NO_CACHE)
def prune_task(model: str, root: str, config: Snapshot, use_dvc: bool = True, force: bool = False) -> dict:
    """Prune one model's student unless DVC reports it up to date."""
    return _run("prune", model, root, config, use_dvc, force)


@task(name="compress", task_run_name="compress-{model}", tags=GPU, retries=2, retry_delay_seconds=5,
      cache_policy=NO_CACHE)
def compress_task(model: str, root: str, config: Snapshot, use_dvc: bool = True, force: bool = False) -> dict:
    """Run one model's recipes unless DVC reports them up to date."""
    return _run("compress", model, root, config, use_dvc, force)


@task(name="evaluate", task_run_name="evaluate-{model}", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def evaluate_task(model: str, root: str, config: Snapshot, use_dvc: bool = True, force: bool = False) -> dict:
    """Measure every variant of one model unless DVC reports it up to date."""
    return _run("evaluate", model, root, config, use_dvc, force)


class StageFailed(Exception):
    """A model's stage failed for good (its retries spent); the model's later stages did not run.

    ``stage`` is the stage kind, ``error`` its error as ``Type: message``, ``done`` the results of
    the stages that finished before it.
    """

    def __init__(self, stage: str, error: str, done: dict[str, dict[str, Any]]):
        super().__init__(f"{stage} failed: {error}")
        self.stage, self.error, self.done = stage, error, done

    def __reduce__(self) -> tuple:  # (pickled back to the flow process with its fields)
        return type(self), (self.stage, self.error, self.done)


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn`` of every stage: retry only what :func:`tasks.common.is_transient` allows."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return True


def stage_options(run: RunConfig, gpu: bool = True) -> dict[str, Any]:
    """The Prefect options every stage task of a run gets (``task.with_options(**...)``).

    ``run.retries`` retries, ``run.retry_delay_seconds`` apart, of the failures
    :func:`tasks.common.is_transient` allows; without ``gpu``, none of the training stages'
    ``gpu`` tags (see :func:`flows.fleet.gpu_limit_exists`).
    """
    opts: dict[str, Any] = {"retries": run.retries, "retry_delay_seconds": run.retry_delay_seconds,
                            "retry_condition_fn": retry_if_transient}
    if not gpu:
        opts["tags"] = set()
    return opts


def _tell(progress: str | None, event: dict[str, Any]) -> None:
    """Append one stage event to the run's progress file (one ``write`` of one line, so lines never interleave)."""
    if progress is None:
        return
    line = json.dumps(event, default=str) + "\n"
    fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@task(name="worker", task_run_name="worker-{n}", cache_policy=NO_CACHE)
def worker_task(n: int) -> dict[str, Any]:
    """Which worker this is and the GPUs it sees (memory growth on); the flow records them.

    The flow submits one per worker as the run starts, before the datasets' prepare tasks:
    a process pool starts a worker process per task submitted while none is idle, so every
    worker starts (and loads TensorFlow, :func:`preload`) at once instead of the second one
    only once the first has prepared the data. A worker busy loading may leave two of them to
    one worker; the flow then records the devices of the workers that answered.
    """
    from shrinkfleet.tfenv import configure_devices
    from tasks.common import worker_id

    return {"worker": worker_id(), "gpus": configure_devices()}


@task(name="model", task_run_name="model-{model}", cache_policy=NO_CACHE)
def model_task(model: str, stages: list[str], root: str, config: Snapshot, use_dvc: bool = True,
               force: bool = False, gpu: bool = True, progress: str | None = None) -> dict[str, dict[str, Any]]:
    """Run one model's ``stages`` in order, each a nested Prefect task of this one, in this worker.

    Each stage has the options of :func:`stage_options` (the retries of the run's ``run:``
    settings in ``config``; the ``gpu`` tag when it trains and ``gpu`` is true). Every finished
    stage's result is appended to ``progress`` (a JSON-lines file the flow reads for its
    progress events).

    Returns:
        Every stage's result, by stage kind.

    Raises:
        StageFailed: a stage failed for good; the later ones did not run.
    """
    opts = stage_options(config.fleet.run, gpu)
    done: dict[str, dict[str, Any]] = {}
    for stage in stages:
        try:
            result = TASKS[stage].with_options(**opts)(model=model, root=root, config=config, use_dvc=use_dvc,
                                                      force=force)
        except Exception as exc:
            raise StageFailed(stage, f"{type(exc).__name__}: {exc}", done) from exc
        done[stage] = result
        _tell(progress, {"model": model, "stage": stage, "status": result["status"], "seconds": result["seconds"],
                         "worker": result.get("worker", "")})
    return done


# The task of every stage kind, in the registry's order (see shrinkfleet.pipeline.KINDS).
TASKS = {"prepare": prepare_task, "teacher": teacher_task, "distill": distill_task, "prune": prune_task,
         "compress": compress_task, "evaluate": evaluate_task}
if tuple(TASKS) != STAGE_KINDS:  # pragma: no cover (a stage kind added to the registry without its task)
    raise ImportError(f"tasks.stages defines tasks for {tuple(TASKS)}; shrinkfleet.pipeline.KINDS has {STAGE_KINDS}")

"""The Prefect task of every stage, importable without TensorFlow.

The flow process only submits tasks, tracks and reports; it never trains. Each task
imports its stage module (TensorFlow, TFMOT, LiteRT) when it runs, in the worker process
that runs it, so the flow process starts in a few seconds instead of loading TensorFlow
for nothing (which a rerun with every stage up to date would otherwise pay for).

Every task: retried on transient failures (the flow sets the count from ``run.retries``),
skipped when DVC reports the stage up to date (see :func:`tasks.common.execute`), never
cached by Prefect (DVC decides what is up to date). The training stages carry the ``gpu``
tag, so a Prefect tag concurrency limit on ``gpu`` bounds how many train at once; the flow
drops the tag for a run whose API has no such limit (see ``flows.fleet.gpu_limit_exists``).
"""

from __future__ import annotations

import importlib
import logging

from prefect import task
from prefect.cache_policies import NO_CACHE

from shrinkfleet.config import Snapshot
from shrinkfleet.pipeline import STAGE_KINDS
from tasks.common import execute, is_transient

GPU = ["gpu"]
STAGE_MODULES = STAGE_KINDS  # tasks.<kind> runs each kind of shrinkfleet.pipeline.KINDS
log = logging.getLogger("shrinkfleet")


def preload() -> None:
    """A worker process's initializer: load TensorFlow, TFMOT, LiteRT and every stage module now.

    A worker starts before it has a stage to run (see ``flows.fleet.WorkerPool``), so its few
    seconds of imports overlap the flow's set-up and the first stage, instead of delaying
    the first training stage each worker receives. An import that fails is left for the
    stage that needs it to report, with its cause.
    """
    try:
        reuse_tls_context()
    except Exception as exc:  # (a saving only: Prefect works without it)
        log.debug("Prefect clients keep their own TLS contexts: %s", exc)
    try:
        for stage in STAGE_MODULES:
            importlib.import_module(f"tasks.{stage}")
        from shrinkfleet.tfenv import quiet_native_stderr, tfmot

        tfmot()
        with quiet_native_stderr():
            import ai_edge_litert.interpreter  # noqa: F401
    except Exception as exc:  # (reported by the stage that needs it)
        log.debug("preloading the stage modules failed: %s", exc)


def reuse_tls_context() -> None:
    """Let every Prefect API client of this process share one TLS context per CA file.

    Prefect's client reads the CA bundle into a new ``ssl.SSLContext`` each time one is made,
    and its task engine makes two per task: 0.11 s of CPU per stage in a worker, measured (4.7
    of 75 s on 8 small models with one worker). One context per CA file serves every request
    the same way (httpx itself recommends sharing one). Only the name ``ssl`` inside Prefect's
    client module is replaced; the rest of the process keeps the standard library's function.
    """
    import functools
    import types

    import prefect.client.orchestration as orchestration

    if isinstance(orchestration.ssl, types.ModuleType):
        shared = types.SimpleNamespace(**{k: getattr(orchestration.ssl, k) for k in dir(orchestration.ssl)
                                          if not k.startswith("__")})
        shared.create_default_context = functools.lru_cache(maxsize=8)(orchestration.ssl.create_default_context)
        orchestration.ssl = shared


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


# The task of every stage kind, in the registry's order (see shrinkfleet.pipeline.KINDS).
TASKS = {"prepare": prepare_task, "teacher": teacher_task, "distill": distill_task, "prune": prune_task,
         "compress": compress_task, "evaluate": evaluate_task}
if tuple(TASKS) != STAGE_KINDS:  # pragma: no cover (a stage kind added to the registry without its task)
    raise ImportError(f"tasks.stages defines tasks for {tuple(TASKS)}; shrinkfleet.pipeline.KINDS has {STAGE_KINDS}")

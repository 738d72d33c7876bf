"""What every stage task shares: loading the fleet, the DVC skip/commit around the work."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shrinkfleet import faults, versioning
from shrinkfleet.config import ConfigError, FleetConfig, Snapshot, load_snapshot
from shrinkfleet.pipeline import stage_name
from shrinkfleet.workspace import Workspace

log = logging.getLogger("shrinkfleet")


@dataclass(frozen=True)
class StageContext:
    """Everything a stage function needs: the fleet definition and the artifact layout."""

    fleet: FleetConfig
    ws: Workspace
    params_file: Path

    @property
    def base_dir(self) -> Path:
        """Folder that relative dataset paths in params.yaml are relative to."""
        return self.params_file.parent


def context(root: str | Path, config: Snapshot | str | Path | None = None) -> StageContext:
    """A stage's context from the run's :class:`~shrinkfleet.config.Snapshot` (a flow run), or from
    a params file read now (``shrinkfleet stage``, which ``dvc repro`` calls; default root/params.yaml)."""
    root = Path(root).resolve()
    if not isinstance(config, Snapshot):
        config = load_snapshot(Path(config) if config else root / "params.yaml")
    return StageContext(fleet=config.fleet, ws=Workspace(root), params_file=config.path)


def worker_id() -> str:
    """Who runs this stage: the Dask worker's address inside a Dask worker, else ``host:pid``."""
    if "distributed" in sys.modules:  # a process-pool worker never loads Dask: do not import it there
        from distributed import get_worker

        try:
            return get_worker().address
        except ValueError:  # not inside a Dask worker
            pass
    return f"{socket.gethostname()}:{os.getpid()}"


# Failures of the machine or the network, not of the stage's inputs or code: retried by
# ``run.retries``. Named by class, matched through the exception's class hierarchy, so the
# flow process need not import TensorFlow, httpx or botocore to decide.
TRANSIENT_CLASSES = frozenset({
    "tensorflow.python.framework.errors_impl.ResourceExhaustedError",  # out of (GPU) memory
    "tensorflow.python.framework.errors_impl.UnavailableError",
    "tensorflow.python.framework.errors_impl.AbortedError",
    "tensorflow.python.framework.errors_impl.DeadlineExceededError",
    "tensorflow.python.framework.errors_impl.InternalError",  # e.g. a CUDA call that failed
    "httpx.TransportError",  # Prefect's client: connection refused, reset, timed out
    "botocore.exceptions.ConnectionError",  # S3: endpoint unreachable, connection closed
    "botocore.exceptions.ConnectionClosedError",
    "botocore.exceptions.ReadTimeoutError",
    "sqlite3.OperationalError",  # "database is locked" under concurrent writers
})
# OSErrors that a retry cannot change: the same file is still missing, still not allowed.
PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: an allow-list of failures that can pass on their own.

    Transient: an :class:`OSError` (connection errors, timeouts, a full disk, a lost network
    mount) other than a missing or forbidden path, :class:`MemoryError`, the classes of
    :data:`TRANSIENT_CLASSES` (TensorFlow's resource exhaustion, unreachable servers), and the
    faults injected as transient (:class:`shrinkfleet.faults.InjectedFault`). Anything else is a
    bad input or a bug: it fails at once, with its traceback in the log, instead of running the
    stage again to the same end.
    """
    from shrinkfleet.datasets import DatasetError

    if isinstance(exc, (ConfigError, DatasetError, faults.PermanentFault, *PERMANENT_OS_ERRORS)):
        return False
    if isinstance(exc, (OSError, MemoryError, faults.InjectedFault)):
        return True
    return any(f"{c.__module__}.{c.__qualname__}" in TRANSIENT_CLASSES for c in type(exc).__mro__)


def execute(
    stage: str,
    target: str,
    root: str,
    config: Snapshot,
    fn: Callable[[StageContext, str], dict[str, Any]],
    use_dvc: bool,
    force: bool,
) -> dict[str, Any]:
    """Run ``fn`` for one stage target unless DVC reports it up to date; then record it.

    ``config`` is the run's snapshot of params.yaml. When the file on disk no longer holds what the
    run read (edited during the run), the stage runs with the snapshot's settings and is neither
    skipped nor recorded in DVC: ``dvc.lock`` would otherwise record settings it never used, and
    the next run checks it again against the edited file.

    Returns:
        ``{"stage", "target", "status": "ran" | "skipped", "seconds", "cpu_seconds" (of the work, when it
        ran), "worker", **fn's summary}``.
    """
    ctx = context(root, config)
    dvc_stage = stage_name(stage, target)
    start = time.perf_counter()
    if use_dvc and not config.file_unchanged():
        log.warning("%s changed since this run read it: %s runs with the settings the run started with, "
                    "and is not recorded in DVC (the next run checks it against the edited file)",
                    config.path.name, dvc_stage)
        use_dvc = False
    if use_dvc and not force and versioning.is_up_to_date(ctx.ws.root, dvc_stage):
        log.info("%s is up to date (DVC): skipped", dvc_stage)
        return {"stage": stage, "target": target, "status": "skipped", "seconds": time.perf_counter() - start,
                "worker": worker_id()}
    from shrinkfleet.tfenv import quiet_native_stderr

    # TensorFlow/LiteRT's C++ notes (cuInit on CPU hosts, XNNPACK) are replayed only on failure.
    cpu = time.process_time()
    with quiet_native_stderr(), faults.stage(stage, target, ctx.ws.root):
        summary = fn(ctx, target)
    cpu = time.process_time() - cpu  # this worker process's CPU (every thread) while the stage worked
    if use_dvc:
        versioning.commit(ctx.ws.root, dvc_stage)
    seconds = time.perf_counter() - start
    log.info("%s finished in %.1fs", dvc_stage, seconds)
    return {"stage": stage, "target": target, "status": "ran", "seconds": seconds, "cpu_seconds": cpu,
            "worker": worker_id(), **summary}

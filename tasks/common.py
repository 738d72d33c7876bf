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
from shrinkfleet.config import ConfigError, FleetConfig, load_params
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


def context(root: str | Path, params_file: str | Path | None = None) -> StageContext:
    root = Path(root).resolve()
    params = Path(params_file).resolve() if params_file else root / "params.yaml"
    return StageContext(fleet=load_params(params), ws=Workspace(root), params_file=params)


def worker_id() -> str:
    """Who runs this stage: the Dask worker's address inside a Dask worker, else ``host:pid``."""
    if "distributed" in sys.modules:  # a process-pool worker never loads Dask: do not import it there
        from distributed import get_worker

        try:
            return get_worker().address
        except ValueError:  # not inside a Dask worker
            pass
    return f"{socket.gethostname()}:{os.getpid()}"


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: not a deterministic input error (bad config or data, wrong shapes) nor a permanent fault."""
    from shrinkfleet.datasets import DatasetError

    return not isinstance(exc, (ConfigError, DatasetError, ValueError, TypeError, KeyError, faults.PermanentFault))


def execute(
    stage: str,
    target: str,
    root: str,
    params_file: str,
    fn: Callable[[StageContext, str], dict[str, Any]],
    use_dvc: bool,
    force: bool,
) -> dict[str, Any]:
    """Run ``fn`` for one stage target unless DVC reports it up to date; then record it.

    Returns:
        ``{"stage", "target", "status": "ran" | "skipped", "seconds", "worker", **fn's summary}``.
    """
    ctx = context(root, params_file)
    dvc_stage = stage_name(stage, target)
    start = time.perf_counter()
    if use_dvc and not force and versioning.is_up_to_date(ctx.ws.root, dvc_stage):
        log.info("%s is up to date (DVC): skipped", dvc_stage)
        return {"stage": stage, "target": target, "status": "skipped", "seconds": time.perf_counter() - start,
                "worker": worker_id()}
    from shrinkfleet.tfenv import quiet_native_stderr

    # TensorFlow/LiteRT's C++ notes (cuInit on CPU hosts, XNNPACK) are replayed only on failure.
    with quiet_native_stderr(), faults.stage(stage, target, ctx.ws.root):
        summary = fn(ctx, target)
    if use_dvc:
        versioning.commit(ctx.ws.root, dvc_stage)
    seconds = time.perf_counter() - start
    log.info("%s finished in %.1fs", dvc_stage, seconds)
    return {"stage": stage, "target": target, "status": "ran", "seconds": seconds, "worker": worker_id(), **summary}

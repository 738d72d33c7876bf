"""One fleet run per workspace at a time, and alias moves one at a time per registry.

``<project>/.shrinkfleet/run.lock`` is held (``flock``) for the whole of a fleet run. A second
run on the same workspace either waits for it (the default: a manual run started during the
nightly one runs after it) or, with ``--if-busy refuse``, stops at once with exit code 3,
naming the holder. The kernel releases the lock when its process dies, even by SIGKILL, so a
crashed run never leaves the workspace locked; the holder's pid, host and start time in the
file are only for the message.

Registry alias moves (gate promotion, ``promote``, ``rollback``) read the current
``production`` version, move the alias and record the move; :func:`registry_lock` makes that
sequence atomic between processes on this host that use the same tracking store, so the
recorded history is an unbroken chain (each move's "from" is the previous move's "to").
Machines sharing one MLflow server are not serialised by it: schedule them apart.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

IF_BUSY = ("wait", "refuse")

# Project roots whose run lock this process holds: the CLI takes it before starting Prefect,
# and the flow (which also runs without the CLI, from a deployment) must not take it twice.
_held: set[Path] = set()


class WorkspaceBusy(RuntimeError):
    """Another fleet run holds the workspace and ``--if-busy refuse`` was asked for."""


def lock_path(root: Path) -> Path:
    return root / ".shrinkfleet" / "run.lock"


def holder(root: Path) -> dict:
    """Who holds (or last held) the workspace's run lock: pid, host, started, command; ``{}`` if unknown."""
    try:
        return json.loads(lock_path(root).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe(info: dict) -> str:
    if not info:
        return "another shrinkfleet run"
    return (f"the run of pid {info.get('pid')} on {info.get('host')}, started {info.get('started')} "
            f"({info.get('command', '')})")


@contextlib.contextmanager
def run_lock(root: Path, if_busy: str = "wait",
             on_wait: Callable[[dict], None] | None = None) -> Iterator[None]:
    """Hold the workspace's run lock for the body.

    Args:
        if_busy: ``wait`` blocks until the holder finishes; ``refuse`` raises at once.
        on_wait: called with the holder's info before blocking (to tell the user why).

    Raises:
        WorkspaceBusy: ``refuse`` and another run holds the lock; the message names it.
    """
    root = root.resolve()
    if root in _held:  # this process already holds it (the CLI, around the flow)
        yield
        return
    if if_busy not in IF_BUSY:
        raise ValueError(f"if_busy must be one of {', '.join(IF_BUSY)}, not {if_busy!r}")
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    # "a" never truncates the holder's info before the lock is ours.
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = holder(root)
            if if_busy == "refuse":
                raise WorkspaceBusy(f"{root} is busy: {describe(info)} holds it; wait for it to finish, "
                                    "or run with --if-busy wait to queue behind it") from None
            if on_wait is not None:
                on_wait(info)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
        }))
        fh.flush()
        _held.add(root)
        try:
            yield
        finally:
            _held.discard(root)
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def registry_lock(tracking_uri: str, timeout: float = 600.0) -> Iterator[None]:
    """Serialise alias moves on one tracking store among this host's processes.

    Raises:
        TimeoutError: another process held it for ``timeout`` seconds (a hung move).
    """
    digest = hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"shrinkfleet-registry-{digest}.lock"
    with open(path, "a+") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the registry lock {path} was held for over {timeout:.0f}s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

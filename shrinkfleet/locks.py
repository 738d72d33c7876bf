"""One fleet run per workspace at a time, and alias moves one at a time per registry.

A fleet run holds an exclusive ``flock`` on the project folder for its whole length. A second
run on the same workspace either waits for it (the default: a manual run started during the
nightly one runs after it) or, with ``--if-busy refuse``, stops at once with exit code 3,
naming the holder (its pid, command and start time, read from ``/proc/locks``). The kernel
releases the lock when its process dies, even by SIGKILL, so a crashed run never leaves the
workspace locked. It is a lock between processes of one host: two machines sharing a
workspace over NFS are not serialised by it.

Registry alias moves (gate promotion, ``promote``, ``rollback``) read the current
``production`` version, move the alias and record the move; :func:`registry_lock` makes that
sequence atomic between processes on this host that use the same tracking store, so the
recorded history is an unbroken chain (each move's "from" is the previous move's "to").
Machines sharing one MLflow server are not serialised by it: schedule them apart.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

IF_BUSY = ("wait", "refuse")

# Project roots whose run lock this process holds: the CLI takes it before starting Prefect,
# and the flow (which also runs without the CLI, from a deployment) must not take it twice.
_held: set[Path] = set()


def holds(root: Path) -> bool:
    """Whether this process holds ``root``'s run lock (see :func:`run_lock`)."""
    return root.resolve() in _held


class WorkspaceBusy(RuntimeError):
    """Another fleet run holds the workspace and ``--if-busy refuse`` was asked for."""


def holder(root: Path) -> dict:
    """Who holds the workspace's run lock (pid, host, started, command), from ``/proc/locks``; else ``{}``."""
    try:
        st = os.stat(root)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return {}
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 17925 fe:00:2147422 0 EOF"; waiting requests are marked "->"
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == key:
            pid = int(parts[4])
            info: dict = {"pid": pid, "host": socket.gethostname()}
            with contextlib.suppress(OSError):
                argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
                if len(argv) > 1 and "python" in Path(argv[0]).name:  # a console script: python <script> args
                    argv = argv[1:]
                info["command"] = " ".join([Path(argv[0]).name, *argv[1:]])[:300]
            with contextlib.suppress(OSError, subprocess.CalledProcessError):
                info["started"] = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True,
                                                 text=True, check=True).stdout.strip()
            return info
    return {}


def describe(info: dict) -> str:
    if not info:
        return "another shrinkfleet run"
    started = f", started {info['started']}" if info.get("started") else ""
    command = f" ({info['command']})" if info.get("command") else ""
    return f"the run of pid {info['pid']} on {info['host']}{started}{command}"


@contextlib.contextmanager
def run_lock(root: Path, if_busy: str = "wait",
             on_wait: Callable[[dict], None] | None = None) -> Iterator[None]:
    """Hold the workspace's run lock for the body: an exclusive ``flock`` on the project folder itself.

    Locking the folder writes nothing into it, so a run stopped before its work leaves the
    project untouched.

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
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)  # not inherited by worker processes (PEP 446)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = holder(root)
            if if_busy == "refuse":
                raise WorkspaceBusy(f"{root} is busy: {describe(info)} holds it; wait for it to finish, "
                                    "or run with --if-busy wait to queue behind it") from None
            if on_wait is not None:
                on_wait(info)
            fcntl.flock(fd, fcntl.LOCK_EX)
        _held.add(root)
        try:
            yield
        finally:
            _held.discard(root)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


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

"""Crash-safe writes: every artifact appears complete or not at all.

Stages write into a temporary sibling and rename it over the target, so a run killed
mid-write never leaves a half-written model or dataset for DVC to record.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from shrinkfleet import faults


def _umask_mode(directory: bool) -> int:
    # mkstemp/mkdtemp create owner-only files; artifacts should get the usual permissions.
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


@contextlib.contextmanager
def atomic_path(target: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; rename it over ``target`` on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix or target.suffix}",
                                    dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, _umask_mode(directory=False))
        faults.before_rename(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; swap it in for ``target`` on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, _umask_mode(directory=True))
    try:
        yield tmp
        faults.before_rename(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def file_md5(path: Path) -> str:
    """The md5 DVC 3 records for a file: the plain md5 of its bytes (a content address, not security)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sweep_stale(folders: list[Path]) -> list[str]:
    """Clean what a killed run left under ``folders``; returns what it did, one line per path.

    Call it only while holding the workspace's run lock (no writer is alive). A temporary
    file or folder (``.<name>.<random>.tmp...``) is deleted: its rename never happened, so
    the artifact it was for is still the previous complete one, or absent. A ``.<name>.old``
    folder whose ``<name>`` is missing is the previous complete artifact of an interrupted
    folder swap (:func:`atomic_dir`) and is put back; otherwise it is deleted.
    """
    done = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob(".*"), key=lambda p: len(p.parts), reverse=True):
            name = path.name
            if name.endswith(".old") and path.is_dir():
                live = path.with_name(name[1:-len(".old")])
                if not live.exists():
                    os.replace(path, live)
                    done.append(f"restored {live} from an interrupted swap")
                    continue
            elif ".tmp" not in name:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            done.append(f"removed {path}")
    return done

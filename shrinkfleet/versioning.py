"""DVC bookkeeping for stages that Prefect runs: skip what is up to date, record what ran.

Prefect *executes* stages; DVC *records* them. Before a stage runs, DVC's status for
``<stage>-<target>`` (see :mod:`shrinkfleet.pipeline`) says whether its deps, params and outs still match ``dvc.lock``;
after it ran, ``dvc commit`` records it, so ``dvc status`` is clean after a run and
``dvc repro`` agrees with what Prefect did. Worker processes serialise their DVC calls
through a file lock, because each call rewrites ``dvc.lock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
# DVC announces every dvc.lock update at INFO; the flow reports stages itself.
logging.getLogger("dvc").setLevel(logging.WARNING)


def is_dvc_repo(root: Path) -> bool:
    """Whether ``root`` is a DVC project (``dvc init`` was run); shrinkfleet writes its dvc.yaml itself."""
    return (root / ".dvc").is_dir()


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    lock_dir = root / ".dvc" / "tmp"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / "shrinkfleet.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _repo(root: Path) -> Iterator[Any]:
    from dvc.repo import Repo

    # DVC resolves stage targets (``teacher-m``) against the working directory, not the repo
    # root: a Dask worker started elsewhere (or `--root` from another folder) would find
    # another dvc.yaml, or none. Run every DVC call from the project folder.
    with _locked(root), contextlib.chdir(root):
        no_progress_bars()  # (opening the repo may wait for DVC's own lock)
        repo = Repo(str(root))
        # DVC's own logger set-up runs inside Repo(); quiet it afterwards.
        logging.getLogger("dvc").setLevel(logging.WARNING)
        no_progress_bars()
        try:
            yield repo
        finally:
            repo.close()


def no_progress_bars() -> None:
    """Turn off DVC's progress bars ("Collecting files and computing hashes", "Waiting to acquire lock").

    DVC draws a bar only when its ``dvc.progress`` logger would show ERROR records (that is how
    ``dvc -q`` hides them); above that level it draws none. ``--verbose`` keeps them.
    """
    from shrinkfleet.runlog import verbose

    if not verbose():
        logging.getLogger("dvc.progress").setLevel(logging.CRITICAL + 1)


def stage_status(root: Path, stage: str) -> dict[str, Any]:
    """DVC's status of one stage: ``{}`` when it is up to date, else what changed."""
    with _repo(root) as repo:
        return repo.status(targets=[stage])


def pipeline_status(root: Path) -> dict[str, list[Any]]:
    """DVC's status of every stage, asked in one pass (one repo, one lock): ``{stage: what changed}``.

    A stage missing from the answer is up to date. DVC parses dvc.yaml and dvc.lock once for
    the whole pipeline, but again for every target it is given (2.5 s against 0.5 s for a
    two-model fleet), so callers pick their stages from this.
    """
    with _repo(root) as repo:
        return repo.status()


def describe_change(root: Path, stage: str, status: list[Any]) -> str:
    """Why DVC would run ``stage``, in a few words: ``data/raw/nightly.npz changed``,
    ``params models.x.prune changed``, ``code tasks/prune.py changed``, ``first run``.

    ``status`` is the stage's entry in :func:`pipeline_status`. Code is a ``.py`` dependency;
    a parameter names its key; an output that was deleted or edited by hand is named too.
    """
    if not lock_entry(root, stage):
        return "first run"
    code, params, data, outs, other = [], [], [], [], []
    for entry in status:
        if entry == "changed command":
            other.append(_command_change(root, stage))
            continue
        if not isinstance(entry, dict):
            other.append(str(entry))
            continue
        for path, change in (entry.get("changed deps") or {}).items():
            if isinstance(change, dict):  # a params file: {key: new | modified | deleted}
                params += list(change)
            elif path.endswith(".py"):
                code.append(path)
            else:
                data.append(path)
        for path, change in (entry.get("changed outs") or {}).items():
            outs.append(f"{path} {'missing' if change in ('deleted', 'not in cache') else change}")
    parts = [f"{', '.join(data)} changed"] if data else []
    parts += [f"params {', '.join(params)} changed"] if params else []
    parts += [f"code {', '.join(code)} changed"] if code else []
    return "; ".join(parts + outs + other) or "changed"


def _command_change(root: Path, stage: str) -> str:
    """What differs between the recorded command and dvc.yaml's (a scikit-learn upgrade, most often)."""
    import shlex

    import yaml

    old = str(lock_entry(root, stage).get("cmd", ""))
    try:
        new = str((yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]).get("cmd", ""))
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return "command changed"

    def version(cmd: str) -> str | None:
        words = shlex.split(cmd)
        return words[words.index("--sklearn-version") + 1] if "--sklearn-version" in words[:-1] else None

    if version(old) != version(new) and version(new):
        return f"scikit-learn {version(old) or '?'} -> {version(new)}"
    return "command changed"


def is_up_to_date(root: Path, stage: str) -> bool:
    """Whether DVC reports one stage up to date (its deps, params and outs match dvc.lock)."""
    return not stage_status(root, stage)


def commit(root: Path, stage: str) -> None:
    """Record a stage that ran outside ``dvc repro`` (hashes its deps and outs into dvc.lock, outs into the cache)."""
    with _repo(root) as repo:
        repo.commit(stage, force=True)


def lock_entry(root: Path, stage: str) -> dict[str, Any]:
    """The stage's entry in dvc.lock (deps/outs with md5), or ``{}``."""
    lock = root / "dvc.lock"
    try:
        st = lock.stat()
    except FileNotFoundError:
        return {}
    return _lock_stages(str(lock), st.st_mtime_ns, st.st_size).get(stage, {})


@functools.lru_cache(maxsize=4)
def _lock_stages(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """dvc.lock's stages, parsed once per version of the file (the C loader when PyYAML has it)."""
    import yaml

    with open(path) as fh:
        data = (yaml.load(fh, Loader=yaml.CSafeLoader) if hasattr(yaml, "CSafeLoader") else yaml.safe_load(fh)) or {}
    return data.get("stages", {})


def out_hashes(root: Path, stage: str) -> dict[str, str]:
    """``{path: md5}`` of a stage's recorded outputs (directories end in ``.dir``)."""
    return {o["path"]: o.get("md5", "") for o in lock_entry(root, stage).get("outs", [])}


def repo(root: Path) -> contextlib.AbstractContextManager[Any]:
    """The project's DVC repo, opened under the same lock as the stage bookkeeping (for push/pull/config)."""
    return _repo(root)

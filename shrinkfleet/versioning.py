"""DVC bookkeeping for stages that Prefect runs: skip what is up to date, record what ran.

Prefect *executes* stages; DVC *records* them. Before a stage runs, DVC's status for
``<stage>@<target>`` says whether its deps, params and outs still match ``dvc.lock``;
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
    return (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()


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

    # DVC resolves stage targets (``teacher@m``) against the working directory, not the repo
    # root: a Dask worker started elsewhere (or `--root` from another folder) would find
    # another dvc.yaml, or none. Run every DVC call from the project folder.
    with _locked(root), contextlib.chdir(root):
        repo = Repo(str(root))
        # DVC's own logger set-up runs inside Repo(); quiet it afterwards.
        logging.getLogger("dvc").setLevel(logging.WARNING)
        try:
            yield repo
        finally:
            repo.close()


def missing_params(root: Path, raw: dict[str, Any]) -> list[str]:
    """Parameter keys dvc.yaml's stages read that params.yaml lacks (DVC refuses to run them).

    The schema fills absent sections with defaults, but DVC tracks the keys themselves, so a
    section a stage lists must be written out (``search: {}`` takes the defaults).
    """
    import re

    import yaml

    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return []
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    missing: dict[str, None] = {}
    for stage in stages.values():
        body = stage.get("do", stage)
        source = re.fullmatch(r"\$\{(\w+)\}", str(stage.get("foreach", "")))
        keys = list((raw.get(source.group(1)) or {}).keys()) if source else [None]
        for key in keys:
            for param in body.get("params", []):
                if not isinstance(param, str):
                    continue
                path = param.replace("${key}", str(key)) if key is not None else param
                node: Any = raw
                for part in path.split("."):
                    if not isinstance(node, dict) or part not in node:
                        missing[path] = None
                        break
                    node = node[part]
    return list(missing)


def stage_status(root: Path, stage: str) -> dict[str, Any]:
    """DVC's status of one stage: ``{}`` when it is up to date, else what changed."""
    with _repo(root) as repo:
        return repo.status(targets=[stage])


def up_to_date(root: Path, stages: list[str]) -> set[str]:
    """Which of ``stages`` DVC reports up to date, asked in one pass (one repo, one lock).

    It asks for the status of the whole pipeline and picks ``stages`` from it: DVC parses
    dvc.yaml and dvc.lock once for that, but again for every target it is given (2.5 s
    against 0.5 s for a two-model fleet).
    """
    with _repo(root) as repo:
        changed = repo.status()
    return {s for s in stages if s not in changed}


def is_up_to_date(root: Path, stage: str) -> bool:
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

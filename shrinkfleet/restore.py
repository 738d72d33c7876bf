"""Bring back the exact bytes of a registered version from DVC's content-addressed store.

A registry version records ``{path: md5}`` for its prepared dataset (a DVC ``.dir``
listing) and for every artifact of its lineage (teacher, student, pruned, the variant).
DVC keeps every committed version of every output in its cache under that md5, so the
files can be restored byte for byte long after the workspace moved on: from the local
cache, or from the default DVC remote when the local cache lacks them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from shrinkfleet.storage import atomic_path, file_md5


class RestoreError(RuntimeError):
    """An object is in neither the local DVC cache nor the remote; the message says which."""


class _Store:
    def __init__(self, root: Path):
        from dvc.repo import Repo

        self.repo = Repo(str(root))
        self.cache = self.repo.cache.local

    def fetch(self, md5: str) -> Path:
        """Path of the cached object ``md5``, pulled from the default remote if needed."""
        local = Path(self.cache.oid_to_path(md5))
        if local.is_file():
            return local
        try:
            remote = self.repo.cloud.get_remote_odb(None)
        except Exception as exc:  # no remote configured, or it cannot be reached
            raise RestoreError(
                f"object {md5} is not in the local DVC cache ({local}) and no DVC remote can supply it: {exc}"
            ) from None
        remote_path = remote.oid_to_path(md5)
        if not remote.fs.exists(remote_path):
            raise RestoreError(f"object {md5} is in neither the local DVC cache nor the remote {remote.path}")
        local.parent.mkdir(parents=True, exist_ok=True)
        remote.fs.get_file(remote_path, str(local))
        return local

    def close(self) -> None:
        self.repo.close()


def restore(root: Path, outs: dict[str, str], out_dir: Path) -> list[tuple[str, str]]:
    """Copy every recorded output into ``out_dir`` (same relative paths) and verify its md5.

    Returns:
        ``(relative path, md5)`` of every restored file.

    Raises:
        RestoreError: an object is missing from cache and remote, or a copy's md5 differs.
    """
    store = _Store(root)
    restored: list[tuple[str, str]] = []
    try:
        for path, md5 in sorted(outs.items()):
            if md5.endswith(".dir"):
                listing = json.loads(store.fetch(md5).read_text())
                files = [(f"{path}/{entry['relpath']}", entry["md5"]) for entry in listing]
            else:
                files = [(path, md5)]
            for rel, want in files:
                target = out_dir / rel
                with atomic_path(target) as tmp:
                    shutil.copyfile(store.fetch(want), tmp)
                    got = file_md5(tmp)
                    if got != want:
                        raise RestoreError(f"{rel}: restored bytes have md5 {got}, recorded {want}")
                restored.append((rel, want))
    finally:
        store.close()
    return restored

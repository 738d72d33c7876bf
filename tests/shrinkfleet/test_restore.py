"""Restore by content address from a real DVC cache (no MLflow, no training)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from shrinkfleet.restore import RestoreError, restore
from shrinkfleet.storage import file_md5


@pytest.fixture
def dvc_repo(tmp_path):
    root = tmp_path / "repo"
    (root / "d").mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "d" / "a.bin").write_bytes(b"first" * 1000)
    (root / "d" / "b.txt").write_text("second\n")
    (root / "f.bin").write_bytes(bytes(range(256)) * 10)
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "d", "f.bin"], cwd=root, check=True)
    return root


def _recorded(root):
    return {p: yaml.safe_load((root / f"{p}.dvc").read_text())["outs"][0]["md5"] for p in ("d", "f.bin")}


def test_restore_gives_byte_identical_files_after_the_workspace_changed(dvc_repo, tmp_path):
    outs = _recorded(dvc_repo)
    originals = {p: (dvc_repo / p).read_bytes() for p in ("d/a.bin", "d/b.txt", "f.bin")}
    (dvc_repo / "f.bin").write_bytes(b"changed later")  # the workspace moved on
    files = restore(dvc_repo, outs, tmp_path / "out")
    assert sorted(rel for rel, _ in files) == ["d/a.bin", "d/b.txt", "f.bin"]
    for rel, data in originals.items():
        assert (tmp_path / "out" / rel).read_bytes() == data
    assert file_md5(tmp_path / "out" / "f.bin") == outs["f.bin"]


def test_missing_object_names_it(dvc_repo, tmp_path):
    with pytest.raises(RestoreError, match="object 0123456789abcdef0123456789abcdef is not in the local DVC cache"):
        restore(dvc_repo, {"gone.bin": "0123456789abcdef0123456789abcdef"}, tmp_path / "out")
    assert not (tmp_path / "out" / "gone.bin").exists()

"""Nothing a run reads can run code: YAML is loaded safely, and no pickle is loaded from a path a user did not name.

The one pickle format shrinkfleet reads is CIFAR-10's (a dataset path the user names in
params.yaml), through an unpickler that refuses every global but numpy's array constructors.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, make_project, shrinkfleet_cmd
from tests.reliability.conftest import RELIABLE, one_model


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_yaml_tag_in_params_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    project = make_project(tmp_path / "p", one_model(RELIABLE))
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("fleet: tiny", f"fleet: !!python/object/apply:os.system "
                                                                     f"['touch {marker}']"))
    result = shrinkfleet_cmd("run", cwd=project)
    assert result.returncode == 2
    assert "not valid YAML" in result.stderr and "python/object/apply" in result.stderr
    assert not marker.exists()
    assert not (project / "mlflow.db").exists()


def test_a_poisoned_pickle_in_a_named_dataset_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    project = make_project(tmp_path / "p", one_model(RELIABLE))
    tarball = project / "data" / "raw" / "cifar.tar.gz"
    tarball.parent.mkdir(parents=True)
    clean = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 0, 1]}
    with tarfile.open(tarball, "w:gz") as tar:
        for name, obj in (("data_batch_1", {**clean, b"data": _Payload(marker)}), ("test_batch", clean),
                          ("batches.meta", {b"label_names": [b"a", b"b"]})):
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    params = (project / "params.yaml").read_text().replace(
        "    source: sklearn\n    name: breast_cancer", "    source: cifar10\n    path: data/raw/cifar.tar.gz")
    assert "cifar10" in params
    (project / "params.yaml").write_text(params)
    result = shrinkfleet_cmd("run", cwd=project)
    assert result.returncode == 2
    assert "refusing to load" in result.stderr and "system" in result.stderr
    assert not marker.exists()


# Calls that can run code from what they read: (module or object name, function) pairs.
UNSAFE = {("pickle", "load"), ("pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
          ("dill", "load"), ("joblib", "load"), ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
          ("torch", "load"), ("marshal", "loads")}
SAFE_LOADERS = {"SafeLoader", "CSafeLoader", "UniqueKeyLoader"}


def _unsafe_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        # yaml.load is fine with the project's duplicate-refusing SafeLoader (checked below)
        safe_loader = any(kw.arg == "Loader" and (getattr(kw.value, "id", "") or getattr(kw.value, "attr", ""))
                          in SAFE_LOADERS for kw in node.keywords)
        if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                and (func.value.id, func.attr) in UNSAFE and not safe_loader):
            found.append(f"{path.relative_to(REPO)}:{node.lineno} {func.value.id}.{func.attr}")
        for kw in node.keywords:
            value = kw.value.value if isinstance(kw.value, ast.Constant) else None
            if (kw.arg == "allow_pickle" and value is not False) or (kw.arg == "safe_mode" and value is not True):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {kw.arg}=")
    return found


@pytest.mark.parametrize("package", ["shrinkfleet", "tasks", "flows"])
def test_no_code_path_unpickles_or_loads_yaml_unsafely(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files
    assert [hit for f in files for hit in _unsafe_calls(f)] == []
    from shrinkfleet.config import UniqueKeyLoader

    assert issubclass(UniqueKeyLoader, yaml.SafeLoader)
    # the CIFAR reader is the only unpickler, and it is the restricted one
    unpicklers = [f.name for f in files if "Unpickler" in f.read_text()]
    assert unpicklers == (["datasets.py"] if package == "shrinkfleet" else [])
    assert "class _ArrayUnpickler(pickle.Unpickler)" in (REPO / "shrinkfleet" / "datasets.py").read_text()

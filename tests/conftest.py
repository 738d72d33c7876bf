"""Shared fixtures: tiny fleets, throw-away project folders, the shared datasets."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# The real MNIST test set lives beside the project (../shared/datasets); SHRINKFLEET_MNIST_DIR overrides.
SHARED_MNIST = Path(os.environ.get("SHRINKFLEET_MNIST_DIR", REPO.parent / "shared" / "datasets" / "mnist-t10k"))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

# Importing Prefect configures logging with dictConfig, which closes every handler already on the root
# logger. absl's handler (added when TensorFlow is imported) closes its stream when that is not the
# process's sys.stderr: under pytest, the capture file of whatever test imported TensorFlow first, so a
# later test that imports Prefect in-process broke pytest's capture ("I/O operation on closed file").
# A user's process never has this (its absl stream is sys.stderr); the tests import Prefect first.
import prefect.main  # noqa: E402, F401  (prefect itself loads lazily: prefect.main sets logging up)

# Small enough to train in seconds, big enough that every technique has something to do.
TINY_PARAMS: dict = {
    "fleet": "tiny",
    "seed": 7,
    "run": {"workers": 2, "retries": 0, "retry_delay_seconds": 0},
    "data": {"val_fraction": 0.15, "test_fraction": 0.2},
    "teacher": {"epochs": 4, "batch_size": 64, "learning_rate": 0.003, "patience": 0},
    "distill": {"temperature": 4.0, "alpha": 0.1, "epochs": 4, "batch_size": 64, "learning_rate": 0.005,
                "patience": 0},
    "prune": {"target_sparsity": 0.5, "initial_sparsity": 0.0, "epochs": 2, "batch_size": 64,
              "learning_rate": 0.001, "frequency": 5, "power": 3.0, "end_fraction": 0.75},
    "quantize": {"representative_samples": 50},
    "cluster": {"clusters": 8, "epochs": 1},
    "qat": {"epochs": 1},
    "recipes": {
        "pruned-float32": {"steps": ["float32"]},
        "pruned-int8": {"steps": ["int8"]},
        "pruned-clustered": {"steps": ["cluster", "float32"]},
        "pruned-pcqat": {"steps": ["cluster", "pcqat", "int8"]},
    },
    "search": {"enabled": False},
    "evaluate": {"latency_runs": 5, "latency_warmup": 1},
    "datasets": {
        "digits": {"source": "sklearn", "name": "digits"},
        "cancer": {"source": "sklearn", "name": "breast_cancer"},
    },
    "models": {
        "digits-mlp": {
            "dataset": "digits",
            "teacher": {"arch": "mlp", "hidden": [32]},
            "student": {"arch": "mlp", "hidden": [8]},
            "distill": {}, "prune": {}, "quantize": {},
        },
        "cancer-mlp": {
            "dataset": "cancer",
            "teacher": {"arch": "mlp", "hidden": [16]},
            "student": {"arch": "mlp", "hidden": [4]},
            "distill": {}, "prune": {"target_sparsity": 0.4}, "quantize": {},
        },
    },
}


@contextlib.contextmanager
def mlflow_env_restored() -> Iterator[None]:
    """Undo what in-process MLflow calls put in os.environ (``set_tracking_uri`` and ``set_experiment``
    export MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_ID), so no later test's subprocess inherits them.

    Module-scoped fixtures that call MLflow need it too: they are set up before the per-test
    guard saves the environment, so that guard alone would keep their values for good.
    """
    saved = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
            if key not in saved:
                del os.environ[key]
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _no_leaked_mlflow_env():
    with mlflow_env_restored():
        yield


@pytest.fixture
def tiny_params() -> dict:
    """A deep copy of the two-model tiny fleet, free to edit."""
    return copy.deepcopy(TINY_PARAMS)


def dvc_init(path: Path) -> None:
    """What ``dvc init -q && dvc config core.analytics false`` does, in this process: the same files
    (.dvc/config, .dvc/.gitignore, .dvcignore, staged in git) without two interpreters starting DVC."""
    from dvc.repo import Repo

    with Repo.init(path) as repo, repo.config.edit() as conf:
        conf["core"]["analytics"] = False


def make_project(path: Path, params: dict, dvc: bool = True) -> Path:
    """A project folder as a user has it: code the DVC stages depend on, params.yaml, git + DVC, and the
    dvc.yaml `shrinkfleet sync` writes for it."""
    path.mkdir(parents=True, exist_ok=True)
    for folder in ("shrinkfleet", "tasks", "flows"):
        shutil.copytree(REPO / folder, path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if dvc:
        from shrinkfleet import pipeline
        from shrinkfleet.config import parse_params

        pipeline.sync(path, parse_params(params))  # what `shrinkfleet sync` writes
        subprocess.run(["git", "init", "-q"], cwd=path, check=True)
        dvc_init(path)
    return path


@pytest.fixture
def project(tmp_path: Path, tiny_params: dict) -> Path:
    """A fresh git + DVC project holding the tiny fleet."""
    return make_project(tmp_path / "project", tiny_params)


@pytest.fixture
def mnist_dir() -> Path:
    if not SHARED_MNIST.is_dir():
        pytest.skip(f"{SHARED_MNIST} is absent (it ships with the project's shared data, not with a clone)")
    return SHARED_MNIST


def shrinkfleet_cmd(*args: str, cwd: Path, env: dict | None = None, timeout: int = 900,
                    prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the installed ``shrinkfleet`` console script as a user would (``prefix``: a command it runs under)."""
    exe = Path(sys.executable).with_name("shrinkfleet")
    # A test's own servers are passed in ``env``; ones configured in the calling shell are not used.
    full_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    full_env.update(env or {})
    return subprocess.run([*prefix, str(exe), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def without_root_privileges() -> tuple[str, ...]:
    """A command prefix under which permission bits hold for this process, root or not.

    Root writes through permission bits (CAP_DAC_OVERRIDE), and CI runs the suite as root. In a
    new user namespace (``unshare --user``) the same user keeps its files but loses that
    capability over them, so a folder made read-only is read-only again. Not root: no prefix.
    """
    if os.geteuid() != 0:
        return ()
    probe = subprocess.run(["unshare", "--user", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"running as root and cannot drop the privilege (unshare --user: {probe.stderr.strip()})")
    return ("unshare", "--user")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow (end-to-end) test files first. ``make test`` hands whole files to two processes in
    collection order; a long file collected last would run alone at the end while the other
    process idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # (a stable sort)

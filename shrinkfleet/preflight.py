"""Checks run before a fleet run does any work: bad input stops here, with every problem listed.

Each check returns messages (empty when all is well) and writes nothing: not a file, not a
temporary probe (its creation and removal would change the folder's mtime), not MLflow's
database, not ``.dvc/config``. The CLI prints them together and exits with code 2, before
MLflow, DVC or Prefect is touched.

What is checked: every gate's latency batch size is one that evaluate times
(:func:`gate_problems`), every dataset in use is loaded and checked (:func:`dataset_problems`), every
model of yours is loaded or built and checked against its prepared data
(:func:`model_problems`), the folders a run writes into are writable
(:func:`unwritable_outputs`), an MLflow server named by ``MLFLOW_TRACKING_URI`` answers
(:func:`tracking_problems`) and, with remote storage, boto3 finds credentials
(:func:`storage_problems`).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

from shrinkfleet.config import ConfigError, FleetConfig, resolve_path

PROBE_TIMEOUT_S = 5.0
# Folders a run writes into (see shrinkfleet.workspace), with what goes there.
OUTPUTS: tuple[tuple[str, str], ...] = (
    (".", "dvc.lock, mlflow.db and the output folders"),
    ("data/prepared", "prepared datasets"),
    ("models", "models and their variants"),
    ("metrics", "metrics"),
    ("reports", "the fleet report"),
    ("mlartifacts", "MLflow artifacts"),
    (".dvc/cache", "DVC's cache"),
)


def dataset_problems(fleet: FleetConfig, base_dir: Path, models: list[str]) -> list[str]:
    """Load every file-based dataset the models use and run its content checks, as the prepare stage will.

    Costs one full read of each file: about 0.1 s for MNIST's t10k set (10,000 images,
    gz), a few seconds for the whole CIFAR-10 tarball. scikit-learn's bundled sets are
    not loaded (they ship with the library and cannot be corrupt).
    """
    from shrinkfleet.datasets import DatasetError, load_raw

    problems = []
    for name in fleet.datasets_in_use(models):
        spec = fleet.datasets[name]
        if spec.source == "sklearn":
            continue
        path = resolve_path(spec.path, base_dir)
        if not path.exists():
            problems.append(f"datasets.{name}.path: {path} does not exist")
            continue
        try:
            load_raw(spec, base_dir)
        except DatasetError as exc:  # names the file and what is wrong
            problems.append(f"datasets.{name}: {exc}")
        except (OSError, EOFError, ValueError, zlib.error) as exc:  # whatever a loader lets through
            problems.append(f"datasets.{name}: {path}: cannot read ({type(exc).__name__}: {exc})")
    return problems


def model_problems(fleet: FleetConfig, base_dir: Path, root: Path, models: list[str]) -> list[str]:
    """Load or build every model of yours (``pretrained``, ``application``, ``custom``) and check it fits its data.

    The data's shape and classes come from preparing the dataset in memory (what the
    prepare stage will write): a pretrained model must take that input and give one output
    per class, an application must accept that input (MobileNetV2 refuses images under
    32x32) and its options, a builder must import, run and return a functional model of the
    right output size. Nothing is trained. Loads TensorFlow only when the fleet has such a
    model (a few seconds); a dataset that does not load is left to :func:`dataset_problems`.
    """
    from shrinkfleet.config import ApplicationArch, CustomArch, PretrainedArch

    mine = (PretrainedArch, ApplicationArch, CustomArch)
    wanted = [m for m in models if isinstance(fleet.models[m].teacher, mine)
              or isinstance(fleet.models[m].student, mine)]
    if not wanted:
        return []
    from shrinkfleet import zoo
    from shrinkfleet.datasets import DatasetError, load_raw, prepare

    shapes: dict[str, Any] = {}
    problems = []
    for m in wanted:
        spec = fleet.models[m]
        ds = fleet.datasets[spec.dataset]
        if spec.dataset not in shapes:
            try:
                shapes[spec.dataset] = prepare(load_raw(ds, base_dir), fleet.data, fleet.seed, limit=ds.limit,
                                               limit_test=ds.limit_test, features=ds.features,
                                               impute=getattr(ds, "impute", None))
            except (DatasetError, OSError, ValueError):  # reported by dataset_problems, with its cause
                shapes[spec.dataset] = None
        data = shapes[spec.dataset]
        if data is None:
            continue
        for role, arch in (("teacher", spec.teacher), ("student", spec.student)):
            if not isinstance(arch, mine):
                continue
            where = f"models.{m}.{role}"
            try:
                if isinstance(arch, PretrainedArch):
                    model = zoo.load_pretrained(arch, base_dir, root)
                else:
                    model = zoo.build(arch, data.input_shape, data.num_classes, name=role, root=root)
                zoo.check_fits(model, data.input_shape, data.num_classes, arch.arch)
            except zoo.ArchError as exc:
                problems.append(f"{where}: {exc}")
            finally:
                from shrinkfleet.tfenv import keras

                keras.backend.clear_session()
    return problems


def unwritable_outputs(root: Path, environ: dict[str, str] | None = None) -> list[str]:
    """Output folders under ``root`` that a run could not write into, each named with the reason.

    A folder that does not exist yet is judged by its nearest existing parent. The check is
    ``os.access`` plus the file type, never a trial write: as root, permission bits do not
    stop writes, but a path that is a file where a folder belongs, a read-only mount or an
    immutable folder still do, and those are what ``os.access`` reports. With the default
    MLflow store, ``mlflow.db`` itself must be writable too.
    """
    env = os.environ if environ is None else environ
    problems: list[str] = []
    seen: set[Path] = set()
    for rel, what in OUTPUTS:
        target = (root / rel).resolve() if rel != "." else root
        path = target
        while not path.exists() and path != path.parent:
            path = path.parent
        if path in seen:
            continue
        seen.add(path)
        shown = _rel(path, root)
        if not path.is_dir():
            problems.append(f"{shown}: is a file, not a folder; a run writes {what} into {_rel(target, root)}/")
        elif not os.access(path, os.W_OK | os.X_OK):
            problems.append(f"{shown}: folder is not writable; a run writes {what} into {_rel(target, root)}/")
    db = root / "mlflow.db"
    if not env.get("MLFLOW_TRACKING_URI") and db.exists() and not os.access(db, os.W_OK):
        problems.append(f"{_rel(db, root)}: not writable; MLflow records every run in it")
    return problems


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) if path != root else str(root)
    except ValueError:
        return str(path)


def tracking_problems(environ: dict[str, str] | None = None, timeout: float = PROBE_TIMEOUT_S) -> list[str]:
    """Whether the MLflow server in ``MLFLOW_TRACKING_URI`` (http/https) answers, asked once.

    ``GET <uri>/health`` with a short timeout and no retry: MLflow's own client retries for
    minutes before giving up, mid-run. Any HTTP response, even an error status, means the
    server is reachable (older servers or a proxy path may not serve /health). Other URIs
    (sqlite, file, databricks) are not probed.
    """
    env = os.environ if environ is None else environ
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return []
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return []
    except urllib.error.HTTPError:
        return []
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return [f"MLFLOW_TRACKING_URI={uri}: no MLflow server answers ({reason}, asked once with a "
                f"{timeout:g} s timeout); start it, or unset MLFLOW_TRACKING_URI to use the project's mlflow.db"]


def storage_problems(fleet: FleetConfig) -> list[str]:
    """With remote storage configured: the setting's problems, or missing credentials (nothing is written)."""
    from shrinkfleet import remote

    try:
        loc = remote.location(fleet.storage)
        if loc is not None:
            remote.check_credentials(loc)
    except (ConfigError, remote.RemoteError) as exc:
        return [f"remote storage: {exc}"]
    return []


def gate_problems(fleet: FleetConfig, models: list[str]) -> list[str]:
    """A gate whose latency limit or objective reads a batch size that evaluate does not time."""
    problems = []
    for name in models:
        cfg = fleet.resolve(name)
        if cfg.gate.latency_batch not in cfg.evaluate.batch_sizes:
            where = f"models.{name}.gate" if "latency_batch" in (fleet.models[name].gate or {}) else "gate"
            problems.append(f"{where}.latency_batch: {cfg.gate.latency_batch} is not one of evaluate.batch_sizes "
                            f"{cfg.evaluate.batch_sizes}; add it there or choose one of them")
    return problems


def all_problems(fleet: FleetConfig, params: Path, root: Path, models: list[str]) -> list[str]:
    """Every check above, in order: gates, datasets, output folders, MLflow server, remote storage."""
    problems: list[str] = gate_problems(fleet, models)
    problems += dataset_problems(fleet, params.parent, models)
    problems += model_problems(fleet, params.parent, root, models)
    problems += unwritable_outputs(root)
    problems += tracking_problems()
    problems += storage_problems(fleet)
    problems += fault_problems()
    return problems


def fault_problems(environ: dict[str, str] | None = None) -> list[str]:
    """A malformed ``SHRINKFLEET_FAULTS`` (test-only fault injection, see :mod:`shrinkfleet.faults`)."""
    from shrinkfleet import faults

    try:
        faults.parse((os.environ if environ is None else environ).get(faults.ENV, ""))
    except ValueError as exc:
        return [str(exc)]
    return []

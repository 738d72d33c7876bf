"""MLflow layout: experiment per fleet, parent run per fleet run, child per model, nested per variant.

    experiment  shrinkfleet/<fleet>
    └── run     fleet-<UTC time>          tags: git sha, trigger, Prefect flow-run id
        └── run <model>                   params: every resolved setting; input: dataset
            └── run <model>/<variant>     params: its recipe's settings; metrics; artifact;
                                          tags: parent variant's run id, DVC md5s

With no ``MLFLOW_TRACKING_URI`` the store is ``sqlite:///<root>/mlflow.db`` and artifacts go
to ``<root>/mlartifacts``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from shrinkfleet.config import ResolvedModel
from shrinkfleet.metrics import variant_metrics

log = logging.getLogger(__name__)
# MLflow's store announces schema creation/migration at INFO on every new database.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)

TAG = "shrinkfleet"
# Which resolved sections belong to a variant's recipe, by the technique that made it; a
# .tflite variant adds the exact settings of its own recipe steps (step.<i>.<name>.<key>).
_CHAIN_SECTIONS = {
    "teacher": ("dataset", "split", "teacher_arch", "teacher"),
    "student": ("student_arch", "distill"),
    "pruned": ("prune",),
    "tflite": ("quantize",),
}


def tracking_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store in the project."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def setup(root: Path, fleet_name: str, artifact_root: str | None = None) -> str:
    """Point MLflow at the project's store and return the fleet's experiment id (created if new).

    Args:
        artifact_root: where a *new* experiment keeps its artifacts when the store is the
            embedded SQLite one (``s3://<bucket>/<prefix>/mlflow`` with remote storage; the
            experiment's folder is ``<artifact_root>/<fleet>``). An MLflow server decides
            that itself, and an existing experiment keeps its own.
    """
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    name = f"shrinkfleet/{fleet_name}"
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        experiment_id = exp.experiment_id
    else:
        location = None
        if uri.startswith("sqlite:") and artifact_root:
            location = f"{artifact_root.rstrip('/')}/{fleet_name}"
        elif uri.startswith("sqlite:") and not os.environ.get("MLFLOW_DEFAULT_ARTIFACT_ROOT"):
            location = (root / "mlartifacts").resolve().as_uri()
        experiment_id = client.create_experiment(name, artifact_location=location)
    # Nested runs take the active experiment, not their parent's: make it the fleet's.
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_sha(root: Path) -> str:
    """The project's current commit (``+dirty`` when the tree has changes), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextlib.contextmanager
def fleet_run(experiment_id: str, tags: dict[str, str]) -> Iterator[str]:
    """The parent run of one fleet run; yields its run id. Ends FAILED if the body raises."""
    name = "fleet-" + dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags={f"{TAG}.kind": "fleet", **tags}) as run:
        yield run.info.run_id


def _dataset_input(name: str, path: Path, digest: str) -> Any:
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "source can be interpreted in multiple ways"
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        source = resolve_dataset_source(str(path.resolve()))
    # MLflow keeps a 36-character digest; the full SHA-256 goes in a tag.
    return MetaDataset(source=source, name=name, digest=digest.removeprefix("sha256:")[:32])


def _params_for(cfg: ResolvedModel, sections: tuple[str, ...]) -> dict[str, Any]:
    flat = cfg.flat_params()
    return {k: v for k, v in flat.items() if k.split(".", 1)[0] in sections or k in ("seed", "dataset")}


def _chain(variant: str, doc: dict[str, Any]) -> list[str]:
    """Variant names from the teacher down to ``variant``."""
    chain, name = [], variant
    while name is not None:
        chain.append(name)
        name = doc["variants"][name]["parent"]
    return chain[::-1]


@dataclass
class LoggedModel:
    """Run ids of one model's child run and variant runs, and the candidate's pyfunc URI."""

    run_id: str
    variant_run_ids: dict[str, str]
    model_uri: str | None = None


def log_model(
    root: Path,
    cfg: ResolvedModel,
    doc: dict[str, Any],
    stages: dict[str, str],
    dvc_hashes: dict[str, str],
    dataset_dir: Path,
    gate_verdicts: dict[str, str] | None = None,
    serve: str | None = None,
) -> LoggedModel:
    """Log one finished model (child run) and each of its variants (nested runs).

    Args:
        doc: the model's metrics document (``metrics/<model>.json``).
        stages: stage name -> ``ran`` | ``skipped`` for this fleet run.
        dvc_hashes: artifact path (relative to root) -> DVC md5, from dvc.lock.
        dataset_dir: the prepared dataset's folder (logged as the run's input).
        gate_verdicts: variant -> gate verdict, tagged on each variant run.
        serve: the variant to also log as a servable pyfunc (the gate's candidate).
    """
    client = MlflowClient()
    dataset = _dataset_input(cfg.dataset_name, dataset_dir, doc["dataset_digest"])
    common_tags = {f"{TAG}.model": cfg.name, f"{TAG}.dataset_digest": doc["dataset_digest"]}
    with mlflow.start_run(run_name=cfg.name, nested=True,
                          tags={**common_tags, f"{TAG}.kind": "model",
                                **{f"{TAG}.stage.{s}": st for s, st in stages.items()}}) as model_run:
        mlflow.log_params(cfg.flat_params())
        mlflow.log_input(dataset, context="training")
        run_ids: dict[str, str] = {}
        model_uri = None
        for variant, v in doc["variants"].items():
            sections: tuple[str, ...] = ()
            for step in _chain(variant, doc):
                key = step if step in _CHAIN_SECTIONS else "tflite"
                sections += _CHAIN_SECTIONS[key]
            artifact = root / v["path"]
            tags = {
                **common_tags,
                f"{TAG}.kind": "variant",
                f"{TAG}.variant": variant,
                f"{TAG}.format": v["format"],
                f"{TAG}.recipe": v["recipe"],
                f"{TAG}.parent_variant": v["parent"] or "",
                f"{TAG}.parent_run_id": run_ids.get(v["parent"] or "", ""),
                f"{TAG}.artifact": v["path"],
            }
            md5 = _artifact_md5(v["path"], dvc_hashes)
            if md5:
                tags["dvc.md5"] = md5
            if gate_verdicts and variant in gate_verdicts:
                tags[f"{TAG}.gate"] = gate_verdicts[variant][:4000]
            if v.get("skipped"):  # layers a technique left as they are, and why
                tags[f"{TAG}.skipped_layers"] = json.dumps(v["skipped"], sort_keys=True)[:4900]
            with mlflow.start_run(run_name=f"{cfg.name}/{variant}", nested=True, tags=tags) as vrun:
                steps = {f"step.{k}.{key}": val for k, conf in (v.get("settings") or {}).items()
                         for key, val in conf.items()}
                params = {"variant": variant, "recipe": v["recipe"][:6000], **_params_for(cfg, sections), **steps}
                # Params and metrics in one batch: one write to the store instead of two.
                now = int(time.time() * 1000)
                client.log_batch(vrun.info.run_id, metrics=[Metric(m, float(v[m]), now, 0) for m in variant_metrics(v)],
                                 params=[Param(k, str(val)) for k, val in params.items()])
                mlflow.log_input(dataset, context="evaluation")
                if artifact.is_file():
                    mlflow.log_artifact(str(artifact), artifact_path="model")
                if variant == serve:
                    model_uri = log_pyfunc(artifact, dataset_dir / "meta.json", v.get("output", "logits"))
                run_ids[variant] = vrun.info.run_id
        if doc.get("not_applicable"):
            mlflow.set_tag(f"{TAG}.not_applicable", json.dumps(doc["not_applicable"], sort_keys=True)[:4900])
        mlflow.log_dict(doc, "metrics.json")
        return LoggedModel(model_run.info.run_id, run_ids, model_uri)


def serving_meta(meta_path: Path, output: str = "logits") -> dict[str, Any]:
    """What the served model needs to know: the dataset's meta.json, plus what the model outputs."""
    meta = json.loads(meta_path.read_text())
    return {**meta, "output": output} if output != "logits" else meta


def log_pyfunc(tflite: Path, meta_path: Path, output: str = "logits") -> str:
    """Log a ``.tflite`` as the servable pyfunc of ``serving_model.py`` in the active run; returns its URI.

    ``output`` is what the model ends in (``logits``, ``probabilities``, ``sigmoid``): the
    served model turns it into class probabilities.
    """
    import tempfile
    from importlib.metadata import version

    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    meta = serving_meta(meta_path, output)
    shape = (-1,) if meta.get("task") == "regression" else (-1, int(meta["num_classes"]))
    signature = ModelSignature(inputs=_input_schema(meta), outputs=Schema([TensorSpec(np.dtype(np.float32), shape)]))
    with tempfile.TemporaryDirectory(prefix="shrinkfleet-pyfunc-") as tmp:
        preprocessing = Path(tmp) / "preprocessing.json"
        preprocessing.write_text(json.dumps(meta, indent=2, sort_keys=True))
        from shrinkfleet.runlog import stderr_to_log

        with stderr_to_log("mlflow"):  # (its "Downloading artifacts" bar, when the setting leaves it on)
            info = mlflow.pyfunc.log_model(
                name="pyfunc",
                python_model=str(Path(__file__).with_name("serving_model.py")),
                artifacts={"tflite": str(tflite), "preprocessing": str(preprocessing)},
                signature=signature,
                # Pinned explicitly: MLflow's inference would import the whole training stack.
                pip_requirements=[f"mlflow=={version('mlflow')}", f"numpy=={version('numpy')}",
                                  f"ai-edge-litert=={version('ai-edge-litert')}"],
            )
    return info.model_uri


def _input_schema(meta: dict[str, Any]) -> Any:
    """What the served model takes: a table's raw columns by name, images as uint8, else flat raw features."""
    import numpy as np
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    if "columns" in meta:  # a table
        def col_type(dtype: str) -> str:
            return ("long" if dtype.startswith(("int", "uint")) else "double" if dtype.startswith("float")
                    else "boolean" if dtype == "bool" else "string")

        return Schema([ColSpec(col_type(meta["raw_dtypes"][c]), c) for c in meta["columns"]])
    if meta.get("source") == "images":
        return Schema([TensorSpec(np.dtype(np.uint8), (-1, *meta["raw_input_shape"]))])
    n_in = int(np.prod(meta.get("raw_input_shape", meta["input_shape"])))  # raw features, before selection
    return Schema([TensorSpec(np.dtype(np.float32), (-1, n_in))])


def workspace_tags(root: Path) -> dict[str, str]:
    """Tags naming the process and workspace of a fleet run, for :func:`close_stale_runs`."""
    return {f"{TAG}.root": str(root.resolve()), f"{TAG}.host": socket.gethostname(), f"{TAG}.pid": str(os.getpid())}


def close_stale_runs(experiment_id: str, root: Path) -> list[str]:
    """Mark KILLED the runs a killed fleet run on this workspace left RUNNING; returns their ids.

    Call it while holding the workspace's run lock: then no other fleet run of this
    workspace is alive, so every RUNNING fleet run of this root and host is a dead one, and
    so is every RUNNING run nested under it. Runs of other workspaces or hosts sharing the
    tracking server are left alone.
    """
    client = MlflowClient()
    running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    by_id = {r.info.run_id: r for r in running}
    tags_match = {f"{TAG}.root": str(root.resolve()), f"{TAG}.host": socket.gethostname()}
    stale: list[str] = []
    for run in running:
        top, seen = run, set()
        while (parent := top.data.tags.get("mlflow.parentRunId")) and parent not in seen:
            seen.add(parent)
            try:
                top = by_id.get(parent) or client.get_run(parent)
            except MlflowException:  # parent deleted: judge by what we have
                break
        if all(top.data.tags.get(k) == v for k, v in tags_match.items()):
            stale.append(run.info.run_id)
    for run_id in stale:
        client.set_tag(run_id, f"{TAG}.closed_by", "a later run found its process gone (killed or crashed)")
        client.set_terminated(run_id, status="KILLED")
        log.warning("MLflow run %s was left RUNNING by a run that died; marked KILLED", run_id)
    return stale


def log_failed_model(name: str, stage: str, error: str) -> str:
    """A child run, marked FAILED, that says which stage failed and why."""
    with mlflow.start_run(run_name=name, nested=True,
                          tags={f"{TAG}.model": name, f"{TAG}.kind": "model", f"{TAG}.failed_stage": stage,
                                f"{TAG}.error": error[:4000]}) as run:
        run_id = run.info.run_id
    MlflowClient().set_terminated(run_id, status="FAILED")
    return run_id


def _artifact_md5(path: str, dvc_hashes: dict[str, str]) -> str:
    """The DVC md5 recorded for an artifact, or for the folder that holds it."""
    if path in dvc_hashes:
        return dvc_hashes[path]
    parent = str(Path(path).parent)
    return dvc_hashes.get(parent, "")

"""track + gate + register: log one finished model to MLflow, gate its variants, promote the best.

Runs in the flow's process (it nests runs under the fleet's MLflow run), after the
model's evaluate stage, whether the stages ran or were skipped as up to date.
"""

from __future__ import annotations

import json
import time
from typing import Any

import mlflow
from mlflow.entities import Metric, RunTag

from shrinkfleet import gate, registry, report, tracking, versioning
from shrinkfleet.config import ResolvedModel
from shrinkfleet.metrics import variant_metrics
from shrinkfleet.pipeline import MODEL_STAGE_KINDS, stage_name
from shrinkfleet.storage import file_md5
from shrinkfleet.workspace import Workspace

MODEL_STAGES = MODEL_STAGE_KINDS


def dvc_outs(ws: Workspace, cfg: ResolvedModel, use_dvc: bool) -> dict[str, str]:
    """``{path: md5}`` of the model's DVC-recorded outputs and its prepared dataset."""
    if not use_dvc:
        return {}
    hashes: dict[str, str] = {}
    for stage in MODEL_STAGES:
        hashes.update(versioning.out_hashes(ws.root, stage_name(stage, cfg.name)))
    hashes.update(versioning.out_hashes(ws.root, stage_name("prepare", cfg.dataset_name)))
    return hashes


def _chain(doc: dict[str, Any], variant: str) -> list[str]:
    chain, name = [], variant
    while name:
        chain.append(name)
        name = doc["variants"][name]["parent"]
    return chain[::-1]


def version_tags(
    ws: Workspace, cfg: ResolvedModel, doc: dict[str, Any], variant: str, logged: tracking.LoggedModel,
    hashes: dict[str, str], fleet_run_id: str, git_sha: str,
) -> dict[str, str]:
    """What a registry version carries: metrics, recipe, git sha, DVC hashes and run ids of its lineage."""
    v = doc["variants"][variant]
    t = registry.T
    tags = {
        f"{t}.model": cfg.name,
        f"{t}.recipe": v["recipe"],
        f"{t}.git_sha": git_sha,
        f"{t}.dataset": cfg.dataset_name,
        f"{t}.dataset_digest": doc["dataset_digest"],
        f"{t}.gate_config": json.dumps(cfg.gate.model_dump()),
        f"{t}.run.fleet": fleet_run_id,
        f"{t}.run.model": logged.run_id,
    }
    for name in _chain(doc, variant):
        tags[f"{t}.run.{name}"] = logged.variant_run_ids[name]
    for metric in variant_metrics(v):  # the metrics of the model's task and its batch sizes
            tags[f"{t}.metric.{metric}"] = repr(float(v[metric]))
    # Content addresses for `shrinkfleet restore`: the dataset folder (DVC .dir hash) and each
    # artifact of the chain as a file md5 (what DVC's cache stores it under).
    outs = {}
    dataset_path = str(ws.prepared(cfg.dataset_name).relative_to(ws.root))
    if dataset_path in hashes:
        outs[dataset_path] = hashes[dataset_path]
    for name in _chain(doc, variant):
        path = doc["variants"][name]["path"]
        outs[path] = file_md5(ws.root / path)
    tags[f"{t}.dvc_outs"] = json.dumps(outs, sort_keys=True)
    return tags


def record(ws: Workspace, cfg: ResolvedModel, stages: dict[str, str], use_dvc: bool, trigger: str,
           git_sha: str) -> dict[str, Any]:
    """Track the model and its variants, gate them, and register/promote the candidate.

    Returns:
        ``{"run_id", "gate": {variant: verdict}, "registry": Registration as dict | None}``.
    """
    doc = report.load_metrics(ws, [cfg.name])[cfg.name]
    decision = gate.decide(doc["variants"], cfg.gate)
    verdicts = {name: decision.verdict(name) for name in doc["variants"]}
    hashes = dvc_outs(ws, cfg, use_dvc)
    candidate = decision.candidate if cfg.gate.promote else None
    tflite = ws.root / doc["variants"][candidate]["path"] if candidate else None
    preprocessing = (tracking.serving_meta(ws.prepared(cfg.dataset_name) / "meta.json",
                                           doc["variants"][candidate].get("output", "logits"))
                     if candidate else None)
    # A servable pyfunc is logged only for content the registry lacks: on a night with nothing
    # changed the candidate is the production version's bytes, and its pyfunc exists already.
    serve = candidate
    if candidate and registry.has_content(cfg.name, registry.content_hash(tflite, preprocessing)):
        serve = None
    logged = tracking.log_model(ws.root, cfg, doc, stages, hashes, ws.prepared(cfg.dataset_name),
                                gate_verdicts=verdicts, serve=serve)
    reg = None
    if cfg.gate.promote:
        tags = {} if serve is None else version_tags(
            ws, cfg, doc, candidate, logged, hashes, mlflow.active_run().info.run_id, git_sha)
        registration = registry.consider(
            cfg.name, candidate, verdicts, tflite=tflite, preprocessing=preprocessing,
            model_uri=logged.model_uri, version_tags=tags, trigger=trigger,
        )
        reg = registration.to_dict()
        log_production(cfg.name, logged.run_id)
    return {"run_id": logged.run_id, "gate": verdicts, "registry": reg}


def log_production(model: str, model_run_id: str) -> None:
    """Put what ``production`` serves after this run on the model's run: the report's trend lines.

    Metrics ``production_<metric>`` (accuracy, coded_bytes, size_bytes, ...) and the tag
    ``shrinkfleet.production_version``; nothing when no version is in production.
    """
    version = registry.production(model)
    if version is None:
        return
    prefix, now = f"{registry.T}.metric.", int(time.time() * 1000)
    metrics = [Metric(f"production_{key.removeprefix(prefix)}", float(value), now, 0)
               for key, value in version.tags.items() if key.startswith(prefix)]
    # One write to the store for all of them (one per metric before).
    mlflow.MlflowClient().log_batch(model_run_id, metrics=metrics,
                                    tags=[RunTag(f"{tracking.TAG}.production_version", str(version.version))])



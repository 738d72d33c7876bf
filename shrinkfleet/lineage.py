"""Lineage of a registry version: dataset -> teacher -> student -> pruned -> variant -> version.

Every link is read back from MLflow (so every id printed resolves), together with the git
sha, the DVC hashes and the settings that differ from shrinkfleet's defaults.
"""

from __future__ import annotations

import json
from typing import Any

from mlflow.tracking import MlflowClient

from shrinkfleet import config, registry

T = registry.T


def default_params(teacher_arch: str, student_arch: str) -> dict[str, str]:
    """shrinkfleet's defaults in the flat ``section.key`` form the model runs log."""
    archs = {"mlp": config.MlpArch, "cnn": config.CnnArch}  # the others have no defaults to differ from
    sections: dict[str, Any] = {
        "split": config.SplitConfig(), "teacher": config.TrainConfig(), "distill": config.DistillConfig(),
        "prune": config.PruneConfig(), "quantize": config.QuantizeConfig(), "evaluate": config.EvaluateConfig(),
    }
    for section, arch in (("teacher_arch", teacher_arch), ("student_arch", student_arch)):
        if arch in archs:
            sections[section] = archs[arch]()
    out = {"seed": str(config.FleetConfig.model_fields["seed"].default)}
    for name, section in sections.items():
        for key, value in section.model_dump().items():
            out[f"{name}.{key}"] = str(value)
    return out


def lineage(model: str, ref: str | None = None) -> dict[str, Any]:
    """The full chain of one version (``ref``: ``@alias``, ``:N``, ``N``; default production)."""
    client = MlflowClient()
    mv = registry.get_version(model, ref)
    tags = mv.tags
    outs = json.loads(tags.get(f"{T}.dvc_outs", "{}"))
    dataset_path = next((p for p in outs if p.startswith("data/prepared/")), None)
    chain: list[dict[str, Any]] = []
    variant = tags.get(f"{T}.variant")
    while variant:
        run_id = tags.get(f"{T}.run.{variant}")
        if not run_id:
            raise registry.RegistryError(f"{model} v{mv.version}: no run id recorded for {variant}")
        run = client.get_run(run_id)  # raises if the id does not resolve
        path = run.data.tags.get(f"{T}.artifact", "")
        chain.append({
            "variant": variant,
            "run_id": run_id,
            "recipe": run.data.tags.get(f"{T}.recipe", ""),
            "artifact": path,
            "dvc_md5": outs.get(path, ""),
            "accuracy": run.data.metrics.get("accuracy"),
            "mae": run.data.metrics.get("mae"),  # regression models
            "size_bytes": run.data.metrics.get("size_bytes"),
        })
        variant = run.data.tags.get(f"{T}.parent_variant") or None
    chain.reverse()
    model_run = client.get_run(tags[f"{T}.run.model"])
    params = model_run.data.params
    defaults = default_params(params.get("teacher_arch.arch", "mlp"), params.get("student_arch.arch", "mlp"))
    changed = {k: v for k, v in sorted(params.items()) if k in defaults and defaults[k] != v}
    fleet_run = client.get_run(tags[f"{T}.run.fleet"])
    aliases = list(getattr(mv, "aliases", []) or [])
    return {
        "model": model,
        "version": str(mv.version),
        "aliases": aliases,
        "content_sha256": tags.get(f"{T}.content_sha256", ""),
        "git_sha": tags.get(f"{T}.git_sha", ""),
        "dataset": {
            "name": tags.get(f"{T}.dataset", ""),
            "digest": tags.get(f"{T}.dataset_digest", ""),
            "path": dataset_path or "",
            "dvc_md5": outs.get(dataset_path, "") if dataset_path else "",
        },
        "chain": chain,
        "fleet_run": {"run_id": fleet_run.info.run_id, "trigger": fleet_run.data.tags.get("trigger", ""),
                      "prefect_flow_run_id": fleet_run.data.tags.get("prefect_flow_run_id", "")},
        "model_run_id": model_run.info.run_id,
        "params_changed_from_defaults": changed,
        "dvc_outs": outs,
    }

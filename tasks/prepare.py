"""prepare: load a dataset from its source, split, normalise, write data/prepared/<name>/."""

from __future__ import annotations

from typing import Any

from shrinkfleet.config import FeatureConfig
from shrinkfleet.datasets import DatasetError, load_raw, prepare, save_prepared
from tasks.common import StageContext


def run(ctx: StageContext, dataset: str) -> dict[str, Any]:
    """Prepare one dataset of the fleet (the function ``dvc repro`` and Prefect both call)."""
    spec = ctx.fleet.datasets[dataset]
    raw = load_raw(spec, ctx.base_dir)
    if raw.kind == "image" and spec.features != FeatureConfig():
        raise DatasetError(f"datasets.{dataset}.features: feature selection applies to tabular data; "
                           f"{dataset} holds images")
    prepared = prepare(raw, ctx.fleet.data, ctx.fleet.seed, limit=spec.limit, limit_test=spec.limit_test,
                       features=spec.features, impute=getattr(spec, "impute", None))
    prepared.meta["source"] = spec.source  # the served model's input follows it (see tracking.log_pyfunc)
    save_prepared(prepared, ctx.ws.prepared(dataset))
    return {"digest": prepared.meta["digest"], "samples": prepared.meta["samples"]}

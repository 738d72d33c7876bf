"""prepare: load a dataset from its source, split, normalise, write data/prepared/<name>/."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from shrinkfleet.config import FeatureConfig
from shrinkfleet.datasets import DatasetError, load_raw, prepare, save_prepared
from tasks.common import StageContext, execute


def run(ctx: StageContext, dataset: str) -> dict[str, Any]:
    """Prepare one dataset of the fleet (the function ``dvc repro`` and Prefect both call)."""
    spec = ctx.fleet.datasets[dataset]
    raw = load_raw(spec, ctx.base_dir)
    if raw.kind == "image" and spec.features != FeatureConfig():
        raise DatasetError(f"datasets.{dataset}.features: feature selection applies to tabular data; "
                           f"{dataset} holds images")
    prepared = prepare(raw, ctx.fleet.data, ctx.fleet.seed, limit=spec.limit, limit_test=spec.limit_test,
                       features=spec.features)
    save_prepared(prepared, ctx.ws.prepared(dataset))
    return {"digest": prepared.meta["digest"], "samples": prepared.meta["samples"]}


@task(name="prepare", task_run_name="prepare-{dataset}", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def prepare_task(dataset: str, root: str, params_file: str, use_dvc: bool = True, force: bool = False) -> dict:
    """Prepare one dataset unless DVC reports it up to date."""
    return execute("prepare", dataset, root, params_file, run, use_dvc, force)

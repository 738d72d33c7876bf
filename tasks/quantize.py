"""quantize: convert the pruned student to TFLite float32, float16, dynamic-range and int8."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from shrinkfleet import zoo
from shrinkfleet.config import QuantizeConfig
from shrinkfleet.datasets import Prepared, load_prepared
from shrinkfleet.evaluation import to_tflite
from shrinkfleet.storage import atomic_dir
from shrinkfleet.tfenv import keras, reset
from tasks.common import StageContext, execute


def representative_samples(data: Prepared, n: int, seed: int) -> np.ndarray:
    """``n`` train samples (seeded, without replacement) that calibrate int8 ranges."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(data.train), size=min(n, len(data.train)), replace=False)
    return data.train.x[np.sort(idx)]


def quantize(model: keras.Model, cfg: QuantizeConfig, data: Prepared, seed: int) -> dict[str, bytes]:
    """One TFLite flatbuffer per configured mode, keyed by mode."""
    rep = representative_samples(data, cfg.representative_samples, seed)
    return {mode: to_tflite(model, mode, rep if mode == "int8" else None) for mode in cfg.modes}


def run(ctx: StageContext, model_name: str) -> dict[str, Any]:
    """Write models/<model>/variants/pruned-<mode>.tflite per mode, and manifest.json naming each one's parent."""
    cfg = ctx.fleet.resolve(model_name)
    reset(cfg.seed)
    data = load_prepared(ctx.ws.prepared(cfg.dataset_name))
    pruned = zoo.load(ctx.ws.keras(model_name, "pruned"))
    flatbuffers = quantize(pruned, cfg.quantize, data, cfg.seed)
    manifest = {}
    with atomic_dir(ctx.ws.variants_dir(model_name)) as tmp:
        for mode, content in flatbuffers.items():
            name = f"pruned-{mode}"
            (tmp / f"{name}.tflite").write_bytes(content)
            manifest[name] = {"file": f"{name}.tflite", "parent": "pruned", "technique": "quantize", "mode": mode}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {"bytes": {mode: len(c) for mode, c in flatbuffers.items()}}


@task(name="quantize", task_run_name="quantize-{model}", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def quantize_task(model: str, root: str, params_file: str, use_dvc: bool = True, force: bool = False) -> dict:
    """Convert one model's pruned student unless DVC reports it up to date."""
    return execute("quantize", model, root, params_file, run, use_dvc, force)

"""evaluate: measure every variant of one model and write metrics/<model>.json.

For each variant (teacher, student, pruned, every .tflite): ``accuracy`` on the test
split, ``accuracy_drop`` vs the teacher (both fractions, 0.01 = one point),
``size_bytes`` (TFLite flatbuffer; Keras variants as their float32 conversion),
``gzip_bytes``, ``compression_ratio`` (teacher bytes / variant bytes), ``sparsity``
(zero share of the stored Dense/Conv weights), ``params`` and single-sample latency
``latency_ms_p50`` / ``latency_ms_p95``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shrinkfleet import coding, zoo
from shrinkfleet import evaluation as ev
from shrinkfleet.config import ResolvedModel
from shrinkfleet.datasets import Prepared, load_prepared
from shrinkfleet.metrics import METRICS, pareto_front
from shrinkfleet.storage import atomic_write_text
from shrinkfleet.tfenv import keras, reset
from shrinkfleet.workspace import KERAS_VARIANTS
from tasks.common import StageContext

METRIC_NAMES = METRICS
CODED = ("coded_bytes", "huffman_bytes", "range_bytes", "zlib_bytes", "zstd_bytes", "bits_per_nonzero")
KERAS_PARENTS = {"teacher": None, "student": "teacher", "pruned": "student"}


def recipes(cfg: ResolvedModel) -> dict[str, str]:
    """Human-readable recipe of each Keras variant (the chain of techniques that made it)."""
    d, p = cfg.distill, cfg.prune
    return {
        "teacher": "train",
        "student": f"distill(T={d.temperature:g}, alpha={d.alpha:g})",
        "pruned": f"distill(T={d.temperature:g}, alpha={d.alpha:g}) > prune({p.target_sparsity:g})",
    }


def measure_keras(model: keras.Model, data: Prepared, runs: int, warmup: int) -> dict[str, float]:
    """Metrics of a Keras variant (size measured on its float32 flatbuffer)."""
    traced = ev.inference_function(model)  # one trace for the conversion, the latency and the accuracy
    content = ev.to_tflite(model, "float32", traced=traced)
    call = ev.keras_caller(model, traced)
    lat = ev.latency(call, data.test.x, runs, warmup)
    coded = coding.measure(content)
    return {
        **{k: coded[k] for k in CODED},
        "runtime": "tf.function",
        "accuracy": ev.accuracy_of(call, data.test.x, data.test.y),
        "size_bytes": len(content),
        "gzip_bytes": ev.gzip_size(content),
        "sparsity": ev.kernel_sparsity(model),
        "params": int(model.count_params()),
        "latency_ms_p50": lat.p50_ms,
        "latency_ms_p95": lat.p95_ms,
    }


def measure_tflite(path: Path, data: Prepared, runs: int, warmup: int, coded: Path | None = None) -> dict[str, float]:
    """Metrics of a ``.tflite`` variant, run through LiteRT.

    Raises:
        RuntimeError: the coded blob does not decode to the exact flatbuffer.
    """
    model = ev.TFLiteModel.from_path(path)
    sizes = coding.measure(model.content)
    if coded is not None:
        blob = coded.read_bytes()
        if coding.decode(blob) != model.content:
            raise RuntimeError(f"{coded}: does not decode to {path.name} byte for byte")
        sizes["coded_bytes"] = len(blob)
    acc = ev.accuracy_of(model.predict, data.test.x, data.test.y)
    lat = ev.latency(model, data.test.x, runs, warmup)
    return {
        **{k: sizes[k] for k in CODED},
        "runtime": model.runtime,
        "accuracy": acc,
        "size_bytes": len(model.content),
        "gzip_bytes": ev.gzip_size(model.content),
        "sparsity": ev.tflite_sparsity(model),
        "latency_ms_p50": lat.p50_ms,
        "latency_ms_p95": lat.p95_ms,
    }


def evaluate(ctx: StageContext, model_name: str) -> dict[str, Any]:
    """Measure every variant of one model; returns the metrics document."""
    cfg = ctx.fleet.resolve(model_name)
    reset(cfg.seed)
    data = load_prepared(ctx.ws.prepared(cfg.dataset_name))
    runs, warmup = cfg.evaluate.latency_runs, cfg.evaluate.latency_warmup
    recipe = recipes(cfg)
    variants: dict[str, dict[str, Any]] = {}
    for name in KERAS_VARIANTS:
        path = ctx.ws.keras(model_name, name)
        m = measure_keras(zoo.load(path), data, runs, warmup)
        variants[name] = {"format": "keras", "path": _rel(path, ctx), "parent": KERAS_PARENTS[name],
                          "recipe": recipe[name], **m}
    vdir = ctx.ws.variants_dir(model_name)
    manifest = json.loads((vdir / "manifest.json").read_text())
    for name, entry in manifest.items():
        parent = variants[entry["parent"]]
        coded = vdir / entry["coded"] if entry.get("coded") else None
        m = measure_tflite(vdir / entry["file"], data, runs, warmup, coded)
        variants[name] = {"format": "tflite", "path": _rel(vdir / entry["file"], ctx), "parent": entry["parent"],
                          "recipe": " > ".join([parent["recipe"], *entry["steps"]]), "params": parent["params"],
                          "search": entry.get("search"), "settings": entry.get("settings", {}), **m}
    teacher, student = variants["teacher"], variants["student"]
    for v in variants.values():
        v["accuracy_drop"] = teacher["accuracy"] - v["accuracy"]
        v["compression_ratio"] = teacher["size_bytes"] / v["size_bytes"]
        v["coded_ratio"] = teacher["size_bytes"] / v["coded_bytes"]
        v["student_ratio"] = student["size_bytes"] / v["coded_bytes"]
    front = pareto_front({n: (v["accuracy"], v["coded_bytes"]) for n, v in variants.items()})
    return {
        "model": model_name,
        "dataset": cfg.dataset_name,
        "dataset_digest": data.meta["digest"],
        "test_samples": len(data.test),
        "teacher_bytes": teacher["size_bytes"],
        "pareto_front": front,
        "variants": {name: {**{k: v[k] for k in ("format", "path", "parent", "recipe", "runtime", *METRIC_NAMES)},
                            "pareto": name in front, "search": v.get("search"), "settings": v.get("settings", {})}
                     for name, v in variants.items()},
    }


def _rel(path: Path, ctx: StageContext) -> str:
    return str(path.relative_to(ctx.ws.root))


def run(ctx: StageContext, model_name: str) -> dict[str, Any]:
    """Evaluate one model and write metrics/<model>.json atomically."""
    doc = evaluate(ctx, model_name)
    atomic_write_text(ctx.ws.metrics(model_name), json.dumps(doc, indent=2) + "\n")
    best = max(doc["variants"].items(), key=lambda kv: kv[1]["compression_ratio"])
    return {"variants": len(doc["variants"]), "smallest": best[0], "ratio": best[1]["compression_ratio"]}

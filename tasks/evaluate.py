"""evaluate: measure every variant of one model and write metrics/<model>.json.

For each variant (teacher, student, pruned, every .tflite): ``accuracy`` on the test
split, ``accuracy_drop`` vs the teacher (both fractions, 0.01 = one point), or for a
regression model ``mae``, ``rmse`` and ``r2`` in the label's own units (predictions scaled
back from the standardised targets; int8 outputs dequantized first) and ``error_increase``
(MAE vs the teacher's, a fraction of it),
``size_bytes`` (TFLite flatbuffer; Keras variants as their float32 conversion),
``gzip_bytes``, ``compression_ratio`` (teacher bytes / variant bytes), ``sparsity``
(zero share of the stored Dense/Conv weights), ``params``, ``macs`` (multiply-accumulates per
example, counted from the Keras graph; a ``.tflite`` variant has its Keras parent's, or what
its recipe's ``channels`` step left) and latency.

Latency is always LiteRT's, with ``evaluate.threads`` interpreter threads: a ``.tflite``
variant runs as it is, a Keras variant (teacher, student, pruned) as its float32 TFLite
conversion, so every row compares the same runtime. Per batch size N of
``evaluate.batch_sizes``: ``latency_ms_p50_b<N>`` and ``speedup_vs_float32_b<N>``, the latter
against the float32 conversion of the Keras model the variant comes from (1.0 for that Keras
variant itself). ``latency_ms_p50`` / ``latency_ms_p95`` are batch 1's. Keras (tf.function)
timings are not measured: they add the Python call overhead of TensorFlow (about 0.9 ms),
which no served flatbuffer pays.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from shrinkfleet import coding, training, zoo
from shrinkfleet import evaluation as ev
from shrinkfleet.config import EvaluateConfig, PretrainedArch, ResolvedModel
from shrinkfleet.datasets import Prepared, load_prepared
from shrinkfleet.macs import count_macs
from shrinkfleet.metrics import batch_metric_names, metric_names, pareto_front
from shrinkfleet.metrics import quality as quality_of
from shrinkfleet.storage import atomic_write_text
from shrinkfleet.techniques import skipped_layers
from shrinkfleet.tfenv import keras, reset
from tasks.common import StageContext

CODED = ("coded_bytes", "huffman_bytes", "range_bytes", "zlib_bytes", "zstd_bytes", "bits_per_nonzero")
def keras_parents(cfg: ResolvedModel) -> dict[str, str | None]:
    """The parent of each Keras variant in the chain (the pruned model's: the student, or the teacher)."""
    return {"teacher": None, "student": "teacher", "pruned": cfg.base}


def recipes(cfg: ResolvedModel) -> dict[str, str]:
    """Human-readable recipe of each Keras variant (the chain of techniques that made it)."""
    d, p = cfg.distill, cfg.prune
    teacher = "pretrained" if isinstance(cfg.teacher_arch, PretrainedArch) else "train"
    student = ("pretrained" if isinstance(cfg.student_arch, PretrainedArch)
               else f"distill(T={d.temperature:g}, alpha={d.alpha:g})")
    prune = "prune(2:4)" if p.pattern == "2:4" else f"prune({p.target_sparsity:g})"
    return {"teacher": teacher, "student": student,
            "pruned": f"{teacher} > {prune}" if cfg.student_arch is None else f"{student} > {prune}"}


def quality(predict: Any, data: Prepared, kind: str) -> dict[str, float]:
    """How good ``predict``'s outputs are on the test split: accuracy, or MAE, RMSE and R^2 in label units."""
    out = np.asarray(predict(data.test.x), dtype=np.float64)
    if data.task != "regression":
        return {"accuracy": float(np.mean(training.as_logits(out, kind).argmax(axis=1) == data.test.y))}
    target = data.meta["target"]
    pred = out[:, 0] * target["std"] + target["mean"]
    true = data.test.y.astype(np.float64) * target["std"] + target["mean"]
    err = pred - true
    total = float(np.sum((true - true.mean()) ** 2))
    return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2))),
            "r2": 1.0 - float(np.sum(err ** 2)) / total if total > 0 else 0.0}


def speed(content: bytes, data: Prepared, ecfg: EvaluateConfig) -> tuple[dict[str, Any], str]:
    """LiteRT latency metrics of a flatbuffer at every batch size of ``ecfg``, and its kernels."""
    lats, runtime = ev.tflite_latencies(content, data.test.x, ecfg.batch_sizes, ecfg.latency_runs,
                                        ecfg.latency_warmup, ecfg.threads)
    return {"latency_ms_p50": lats[1].p50_ms, "latency_ms_p95": lats[1].p95_ms,
            **{f"latency_ms_p50_b{b}": lat.p50_ms for b, lat in lats.items()}}, runtime


def speedups(v: dict[str, Any], baseline: dict[str, Any], batch_sizes: list[int]) -> dict[str, float]:
    """``speedup_vs_float32_b<N>``: the baseline's median latency over the variant's, per batch size."""
    return {f"speedup_vs_float32_b{b}": baseline[f"latency_ms_p50_b{b}"] / v[f"latency_ms_p50_b{b}"]
            for b in batch_sizes}


def macs_of(model: keras.Model) -> int | None:
    """The model's multiply-accumulates per example, or None when its graph has an open dimension."""
    try:
        return count_macs(model)
    except ValueError:
        return None


def variant_macs(settings: dict[str, Any], parent_macs: int | None) -> int | None:
    """MACs of a ``.tflite`` variant: what its last ``channels`` step left, else its Keras parent's.

    Conversion, clustering, QAT and magnitude pruning change how each MAC is computed (or zero
    some weights), not how many the graph performs; only channel pruning removes them.
    """
    steps = sorted(((int(key.split(".", 1)[0]), value) for key, value in settings.items()
                    if key.split(".", 1)[0].isdigit() and isinstance(value, dict)), key=lambda kv: kv[0])
    after = [value["macs_after"] for _, value in steps if "macs_after" in value]
    return int(after[-1]) if after else parent_macs


def measure_keras(model: keras.Model, data: Prepared, ecfg: EvaluateConfig) -> dict[str, Any]:
    """Metrics of a Keras variant (size and latency measured on its float32 flatbuffer, with LiteRT)."""
    traced = ev.inference_function(model)  # one trace for the conversion and the accuracy
    content = ev.to_tflite(model, "float32", traced=traced)
    call = ev.keras_caller(model, traced)
    lat, runtime = speed(content, data, ecfg)
    coded = coding.measure(content)
    kind = zoo.output_kind(model)
    return {
        **{k: coded[k] for k in CODED},
        "runtime": f"litert-float32 ({runtime})",
        "output": kind,
        **quality(call, data, kind),
        "size_bytes": len(content),
        "gzip_bytes": ev.gzip_size(content),
        "sparsity": ev.kernel_sparsity(model),
        "params": int(model.count_params()),
        "macs": macs_of(model),
        **lat,
        **{f"speedup_vs_float32_b{b}": 1.0 for b in ecfg.batch_sizes},
    }


def measure_tflite(path: Path, data: Prepared, ecfg: EvaluateConfig, coded: Path | None = None,
                   kind: str = "logits") -> dict[str, Any]:
    """Metrics of a ``.tflite`` variant, run through LiteRT (``speedup_vs_float32_b<N>`` is the caller's).

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
    scores = quality(model.predict, data, kind)
    lat, runtime = speed(model.content, data, ecfg)
    return {
        **{k: sizes[k] for k in CODED},
        "runtime": runtime,
        "output": kind,
        **scores,
        "size_bytes": len(model.content),
        "gzip_bytes": ev.gzip_size(model.content),
        "sparsity": ev.tflite_sparsity(model),
        **lat,
    }


def evaluate(ctx: StageContext, model_name: str) -> dict[str, Any]:
    """Measure every variant of one model; returns the metrics document."""
    cfg = ctx.fleet.resolve(model_name)
    reset(cfg.seed)
    data = load_prepared(ctx.ws.prepared(cfg.dataset_name))
    ecfg = cfg.evaluate
    recipe = recipes(cfg)
    parents = keras_parents(cfg)
    variants: dict[str, dict[str, Any]] = {}
    models: dict[str, keras.Model] = {}
    for name in cfg.keras_variants:
        path = ctx.ws.keras(model_name, name)
        models[name] = zoo.load(path, cfg.user_modules, ctx.ws.root)
        m = measure_keras(models[name], data, ecfg)
        skipped = {"prune": skipped_layers(models[cfg.base], "prune")} if name == "pruned" else {}
        variants[name] = {"format": "keras", "path": _rel(path, ctx), "parent": parents[name],
                          "recipe": recipe[name], "skipped": {k: v for k, v in skipped.items() if v}, **m}
    vdir = ctx.ws.variants_dir(model_name)
    manifest = json.loads((vdir / "manifest.json").read_text())
    not_applicable = {name: entry["not_applicable"] for name, entry in manifest.items() if "not_applicable" in entry}
    for name, entry in manifest.items():
        if name in not_applicable:
            continue
        parent = variants[entry["parent"]]
        coded = vdir / entry["coded"] if entry.get("coded") else None
        m = measure_tflite(vdir / entry["file"], data, ecfg, coded, kind=parent["output"])
        m.update(speedups(m, parent, ecfg.batch_sizes))
        variants[name] = {"format": "tflite", "path": _rel(vdir / entry["file"], ctx), "parent": entry["parent"],
                          "recipe": " > ".join([parent["recipe"], *entry["steps"]]), "params": parent["params"],
                          "macs": variant_macs(entry.get("settings", {}), parent["macs"]),
                          "search": entry.get("search"), "settings": entry.get("settings", {}),
                          "skipped": entry.get("skipped", {}), **m}
    teacher = variants["teacher"]
    student = variants.get("student", teacher)  # no student: ratios against the model compression started from
    for v in variants.values():
        if data.task == "regression":
            v["error_increase"] = (v["mae"] - teacher["mae"]) / teacher["mae"] if teacher["mae"] > 0 else 0.0
        else:
            v["accuracy_drop"] = teacher["accuracy"] - v["accuracy"]
        v["compression_ratio"] = teacher["size_bytes"] / v["size_bytes"]
        v["coded_ratio"] = teacher["size_bytes"] / v["coded_bytes"]
        v["student_ratio"] = student["size_bytes"] / v["coded_bytes"]
    front = pareto_front({n: (quality_of(v), v["coded_bytes"]) for n, v in variants.items()})
    return {
        "model": model_name,
        "dataset": cfg.dataset_name,
        "dataset_digest": data.meta["digest"],
        "test_samples": len(data.test),
        "teacher_bytes": teacher["size_bytes"],
        "pareto_front": front,
        "task": data.task,
        "variants": {name: {**{k: v[k] for k in ("format", "path", "parent", "recipe", "runtime", "output",
                                                  *metric_names(data.task), "macs",
                                                  *batch_metric_names(ecfg.batch_sizes))},
                            "pareto": name in front, "search": v.get("search"), "settings": v.get("settings", {}),
                            "skipped": v.get("skipped", {})}
                     for name, v in variants.items()},
        "not_applicable": not_applicable,
    }


def _rel(path: Path, ctx: StageContext) -> str:
    return str(path.relative_to(ctx.ws.root))


def run(ctx: StageContext, model_name: str) -> dict[str, Any]:
    """Evaluate one model and write metrics/<model>.json atomically."""
    doc = evaluate(ctx, model_name)
    atomic_write_text(ctx.ws.metrics(model_name), json.dumps(doc, indent=2) + "\n")
    best = max(doc["variants"].items(), key=lambda kv: kv[1]["compression_ratio"])
    return {"variants": len(doc["variants"]), "smallest": best[0], "ratio": best[1]["compression_ratio"]}

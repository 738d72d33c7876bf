"""The names of every variant's metrics, and the Pareto front over them (no TensorFlow import)."""

from __future__ import annotations

from typing import Any

# What a variant's predictions are judged by, per task: accuracy and its drop against the teacher
# (fractions), or the mean absolute error, RMSE and R^2 in the label's own units and the MAE's
# increase against the teacher's (a fraction of it).
TASK_METRICS = {
    "classification": ("accuracy", "accuracy_drop"),
    "regression": ("mae", "rmse", "r2", "error_increase"),
}
# Every variant's size and speed metrics, whatever the task.
SIZE_METRICS = (
    "size_bytes", "gzip_bytes", "compression_ratio",
    "coded_bytes", "coded_ratio", "student_ratio", "bits_per_nonzero",
    "huffman_bytes", "range_bytes", "zlib_bytes", "zstd_bytes",
    "sparsity", "params", "latency_ms_p50", "latency_ms_p95",
)
# Multiply-accumulates per example, counted from the Keras graph a variant comes from.
COST_METRICS = ("macs",)
# Per batch size N of evaluate.batch_sizes: median LiteRT latency and the speed-up against the
# float32 TFLite conversion of the Keras model the variant comes from, same run, same threads.
PER_BATCH = ("latency_ms_p50_b", "speedup_vs_float32_b")
# Every variant's metrics, as written to metrics/<model>.json and logged to MLflow (a variant has
# those of its task, and the per-batch ones of its batch sizes: see variant_metrics).
METRICS = (*TASK_METRICS["classification"], *TASK_METRICS["regression"], *SIZE_METRICS, *COST_METRICS)


def batch_metric_names(batch_sizes: list[int]) -> tuple[str, ...]:
    """``latency_ms_p50_b<N>`` and ``speedup_vs_float32_b<N>`` for every batch size N."""
    return tuple(f"{prefix}{n}" for n in batch_sizes for prefix in PER_BATCH)


def variant_metrics(v: dict[str, Any]) -> list[str]:
    """The numeric metrics a variant's dict holds: those of :data:`METRICS` and its per-batch ones."""
    per_batch = sorted(k for k in v if k.startswith(PER_BATCH) and k.rsplit("_b", 1)[-1].isdigit())
    return [m for m in METRICS if m in v and v[m] is not None] + per_batch


def metric_names(task: str) -> tuple[str, ...]:
    """The metrics a variant of ``task`` has."""
    return (*TASK_METRICS[task], *SIZE_METRICS)


def quality(v: dict[str, Any]) -> float:
    """How good a variant's predictions are, higher is better: its accuracy, or minus its MAE."""
    return float(v["accuracy"]) if "accuracy" in v else -float(v["mae"])


def loss(v: dict[str, Any]) -> float:
    """How much worse than the teacher a variant is: its accuracy drop, or its MAE increase (fractions)."""
    return float(v["accuracy_drop"]) if "accuracy_drop" in v else float(v["error_increase"])


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names not dominated in (higher quality, fewer bytes), smallest first (quality: see :func:`quality`)."""
    front = [
        n for n, (acc, size) in points.items()
        if not any((a >= acc and s <= size) and (a > acc or s < size) for m, (a, s) in points.items() if m != n)
    ]
    return sorted(front, key=lambda n: points[n][1])

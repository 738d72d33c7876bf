"""The names of every variant's metrics, and the Pareto front over them (no TensorFlow import)."""

from __future__ import annotations

# Every variant's metrics, as written to metrics/<model>.json and logged to MLflow.
METRICS = (
    "accuracy", "accuracy_drop", "size_bytes", "gzip_bytes", "compression_ratio",
    "coded_bytes", "coded_ratio", "student_ratio", "bits_per_nonzero",
    "huffman_bytes", "range_bytes", "zlib_bytes", "zstd_bytes",
    "sparsity", "params", "latency_ms_p50", "latency_ms_p95",
)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names not dominated in (higher accuracy, fewer bytes), smallest first."""
    front = [
        n for n, (acc, size) in points.items()
        if not any((a >= acc and s <= size) and (a > acc or s < size) for m, (a, s) in points.items() if m != n)
    ]
    return sorted(front, key=lambda n: points[n][1])

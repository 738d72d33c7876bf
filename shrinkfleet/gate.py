"""The promotion gate: which variants may go to production, and which one is the candidate.

Only deployable ``.tflite`` variants are candidates (the registered model runs them with
LiteRT). A variant fails the gate when any limit is exceeded; the failure says which limit
and by how much, so the report can explain why nothing was promoted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shrinkfleet.config import GateConfig
from shrinkfleet.metrics import quality


@dataclass(frozen=True)
class GateFailure:
    metric: str
    value: float
    limit: float

    def __str__(self) -> str:
        if self.metric == "accuracy_drop":
            return f"accuracy_drop {self.value * 100:.2f} > {self.limit * 100:.2f} pts"
        if self.metric == "error_increase":
            return f"error_increase {self.value * 100:+.1f}% > {self.limit * 100:.1f}% of the teacher's MAE"
        if self.metric in ("size_bytes", "macs"):
            return f"{self.metric} {self.value:,.0f} > {self.limit:,.0f}"
        if self.metric.startswith("latency_ms_p50_b"):
            batch = self.metric.rsplit("_b", 1)[1]
            return f"latency_ms_p50 at batch {batch} {self.value:.3f} > {self.limit:.3f} ms"
        return f"{self.metric} {self.value:.3f} > {self.limit:.3f}"


def latency_metric(gate: GateConfig) -> str:
    """The metric the gate's latency limit and objective read: ``latency_ms_p50_b<latency_batch>``."""
    return f"latency_ms_p50_b{gate.latency_batch}"


def _value(metrics: dict[str, Any], metric: str, gate: GateConfig) -> float:
    if metric not in metrics:
        if metric.startswith("latency_ms_p50_b"):
            raise ValueError(f"gate.latency_batch is {gate.latency_batch}, but the variants were not timed at "
                             f"batch {gate.latency_batch}: add it to evaluate.batch_sizes")
        raise ValueError(f"the variant has no {metric} metric (evaluate again with this version of shrinkfleet)")
    value = metrics[metric]
    return float("inf") if value is None else float(value)  # (macs unknown: over any limit)


def check(metrics: dict[str, Any], gate: GateConfig) -> list[GateFailure]:
    """Every limit of ``gate`` that the variant's metrics exceed (empty = it passes).

    A classification variant is bounded by ``max_accuracy_drop``, a regression one by
    ``max_error_increase`` (its MAE against the teacher's); both by size, MACs and by the
    LiteRT latency at batch size ``gate.latency_batch``.

    Raises:
        ValueError: a limit reads a metric the variant lacks (a latency batch size not timed).
    """
    quality = ({"error_increase": gate.max_error_increase} if "error_increase" in metrics
               else {"accuracy_drop": gate.max_accuracy_drop})
    limits = {
        **quality,
        "size_bytes": gate.max_size_bytes,
        "macs": gate.max_macs,
        latency_metric(gate): gate.max_latency_ms_p50,
    }
    values = {metric: _value(metrics, metric, gate) for metric, limit in limits.items() if limit is not None}
    return [
        GateFailure(metric, values[metric], float(limit))
        for metric, limit in limits.items()
        if limit is not None and values[metric] > float(limit) + 1e-12
    ]


@dataclass(frozen=True)
class Decision:
    """The gate's verdict on one model's variants."""

    candidate: str | None
    failures: dict[str, list[GateFailure]]  # variant -> failed limits ([] = passed)

    def verdict(self, variant: str) -> str:
        if variant not in self.failures:
            return "not a candidate"
        fails = self.failures[variant]
        return "pass" if not fails else "fail: " + "; ".join(str(f) for f in fails)


def decide(variants: dict[str, dict[str, Any]], gate: GateConfig) -> Decision:
    """Gate every ``.tflite`` variant and pick the best passing one by ``gate.objective``.

    The ``latency_ms_p50`` objective is the latency at batch size ``gate.latency_batch``.
    Ties break towards better predictions (higher accuracy, lower MAE), then smaller size, then
    name (deterministic). The ``accuracy`` objective means the lowest MAE for a regression model.
    """
    failures = {name: check(v, gate) for name, v in variants.items() if v["format"] == "tflite"}
    passing = [name for name, fails in failures.items() if not fails]
    if not passing:
        return Decision(None, failures)
    def key(name: str) -> tuple:
        v = variants[name]
        objective = latency_metric(gate) if gate.objective == "latency_ms_p50" else gate.objective
        first = -quality(v) if objective == "accuracy" else _value(v, objective, gate)
        return (first, -quality(v), float(v["size_bytes"]), name)

    return Decision(min(passing, key=key), failures)

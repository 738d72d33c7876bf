"""The promotion gate on fixed metrics: who passes, who fails by how much, who is chosen."""

from __future__ import annotations

import pytest

from shrinkfleet.config import GateConfig
from shrinkfleet.gate import check, decide


def _v(fmt: str, acc: float, drop: float, size: int, lat: float) -> dict:
    return {"format": fmt, "accuracy": acc, "accuracy_drop": drop, "size_bytes": size, "latency_ms_p50": lat}


VARIANTS = {
    "teacher": _v("keras", 0.97, 0.0, 50_000, 1.0),
    "pruned-float32": _v("tflite", 0.96, 0.01, 20_000, 0.010),
    "pruned-float16": _v("tflite", 0.955, 0.015, 12_000, 0.012),
    "pruned-int8": _v("tflite", 0.93, 0.04, 9_000, 0.030),
}


def test_only_tflite_variants_are_candidates_and_the_smallest_passing_wins():
    d = decide(VARIANTS, GateConfig(max_accuracy_drop=0.02))
    assert d.candidate == "pruned-float16"
    assert d.verdict("teacher") == "not a candidate"
    assert d.verdict("pruned-float16") == "pass"
    assert d.verdict("pruned-int8") == "fail: accuracy_drop 4.00 > 2.00 pts"


@pytest.mark.parametrize(
    ("objective", "expected"),
    [("size_bytes", "pruned-int8"), ("accuracy", "pruned-float32"), ("latency_ms_p50", "pruned-float32")],
)
def test_objective_chooses_among_passing(objective, expected):
    assert decide(VARIANTS, GateConfig(max_accuracy_drop=0.05, objective=objective)).candidate == expected


def test_nothing_passes_means_no_candidate_and_every_reason():
    d = decide(VARIANTS, GateConfig(max_accuracy_drop=0.0, max_size_bytes=1000, max_latency_ms_p50=0.001))
    assert d.candidate is None
    text = d.verdict("pruned-int8")
    assert "accuracy_drop 4.00 > 0.00 pts" in text and "size_bytes 9,000 > 1,000" in text
    assert "latency_ms_p50 0.030 > 0.001" in text


def test_limits_are_inclusive():
    assert check(VARIANTS["pruned-int8"], GateConfig(max_accuracy_drop=0.04, max_size_bytes=9_000)) == []


def test_ties_break_towards_accuracy():
    tied = {"a": _v("tflite", 0.90, 0.0, 100, 1.0), "b": _v("tflite", 0.95, 0.0, 100, 1.0)}
    assert decide(tied, GateConfig()).candidate == "b"

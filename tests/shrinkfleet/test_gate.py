"""The promotion gate on fixed metrics: who passes, who fails by how much, who is chosen."""

from __future__ import annotations

import pytest

from shrinkfleet.config import GateConfig
from shrinkfleet.gate import check, decide


def _v(fmt: str, acc: float, drop: float, size: int, lat: float, lat32: float = 1.0, macs: int = 1000) -> dict:
    return {"format": fmt, "accuracy": acc, "accuracy_drop": drop, "size_bytes": size, "latency_ms_p50": lat,
            "latency_ms_p50_b1": lat, "latency_ms_p50_b32": lat32, "macs": macs}


VARIANTS = {
    "teacher": _v("keras", 0.97, 0.0, 50_000, 1.0),
    "pruned-float32": _v("tflite", 0.96, 0.01, 20_000, 0.010, lat32=0.30, macs=5_000),
    "pruned-float16": _v("tflite", 0.955, 0.015, 12_000, 0.012, lat32=0.32, macs=5_000),
    "pruned-int8": _v("tflite", 0.93, 0.04, 9_000, 0.030, lat32=0.20, macs=2_000),
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
    assert "latency_ms_p50 at batch 1 0.030 > 0.001 ms" in text


def test_latency_limit_and_objective_use_the_configured_batch_and_say_which():
    gate = GateConfig(max_accuracy_drop=0.05, max_latency_ms_p50=0.31, latency_batch=32, objective="latency_ms_p50")
    d = decide(VARIANTS, gate)
    assert d.verdict("pruned-float16") == "fail: latency_ms_p50 at batch 32 0.320 > 0.310 ms"
    assert d.candidate == "pruned-int8"  # fastest at batch 32, though the slowest at batch 1


def test_latency_batch_that_was_not_timed_is_a_clear_error():
    untimed = {k: v for k, v in VARIANTS["pruned-int8"].items() if k != "latency_ms_p50_b32"}
    with pytest.raises(ValueError, match=r"latency_batch is 32.*evaluate.batch_sizes"):
        check(untimed, GateConfig(max_latency_ms_p50=1.0, latency_batch=32))


def test_a_variant_over_max_macs_is_refused():
    d = decide(VARIANTS, GateConfig(max_accuracy_drop=0.05, max_macs=4_000))
    assert d.verdict("pruned-float32") == "fail: macs 5,000 > 4,000"
    assert d.verdict("pruned-int8") == "pass" and d.candidate == "pruned-int8"


def test_unknown_macs_fail_a_macs_limit():
    assert [f.metric for f in check({**VARIANTS["pruned-int8"], "macs": None}, GateConfig(max_macs=10**9))] == ["macs"]


def test_macs_objective_picks_the_fewest_not_the_smallest():
    variants = {"small": _v("tflite", 0.95, 0.0, 100, 1.0, macs=9_000),
                "light": _v("tflite", 0.95, 0.0, 900, 1.0, macs=3_000)}
    assert decide(variants, GateConfig()).candidate == "small"
    assert decide(variants, GateConfig(objective="macs")).candidate == "light"

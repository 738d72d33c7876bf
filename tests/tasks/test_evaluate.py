"""The evaluate stage, driven through `shrinkfleet run`: fair LiteRT latency per batch size, speed-ups, MACs."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import make_project, shrinkfleet_cmd

pytestmark = pytest.mark.slow


def test_every_variant_has_litert_latency_per_batch_speedup_and_macs(tmp_path, tiny_params):
    params = {**tiny_params, "models": {"digits-mlp": tiny_params["models"]["digits-mlp"]},
              "recipes": {"pruned-float32": {"steps": ["float32"]}, "pruned-int8": {"steps": ["int8"]},
                          "narrow-int8": {"steps": [{"channels": {"keep": 0.5, "epochs": 1}}, "int8"]}},
              "evaluate": {"latency_runs": 20, "latency_warmup": 2, "batch_sizes": [32], "threads": 1},
              "gate": {"max_accuracy_drop": 1.0}}  # a candidate is registered whatever the tiny model's accuracy
    project = make_project(tmp_path / "project", params)
    run = shrinkfleet_cmd("run", cwd=project)
    assert run.returncode == 0, run.stdout + run.stderr

    doc = json.loads((project / "metrics" / "digits-mlp.json").read_text())
    variants = doc["variants"]
    assert set(variants) == {"teacher", "student", "pruned", "pruned-float32", "pruned-int8", "narrow-int8"}
    for name, v in variants.items():
        for key in ("latency_ms_p50_b1", "latency_ms_p50_b32", "speedup_vs_float32_b1", "speedup_vs_float32_b32"):
            assert v[key] > 0, (name, key)
        assert v["latency_ms_p50"] == v["latency_ms_p50_b1"]  # one runtime in every row: LiteRT
        assert v["runtime"] in ("xnnpack", "builtin") or v["runtime"].startswith("litert-float32"), name
    # the 8-unit student has fewer MACs than the 32-unit teacher; a .tflite variant has its parent's
    assert variants["student"]["macs"] == 64 * 8 + 8 * 10 < variants["teacher"]["macs"] == 64 * 32 + 32 * 10
    assert variants["pruned-int8"]["macs"] == variants["pruned"]["macs"] == variants["student"]["macs"]
    assert variants["narrow-int8"]["macs"] == 64 * 4 + 4 * 10  # half the student's 8 units removed
    # every .tflite variant's speed-up is its baseline's latency over its own (no bound on timings: they
    # vary with the machine's load, and a test that fails under load is a bug)
    for name in ("pruned-float32", "pruned-int8"):
        expected = variants["pruned"]["latency_ms_p50_b32"] / variants[name]["latency_ms_p50_b32"]
        assert variants[name]["speedup_vs_float32_b32"] == pytest.approx(expected), name
    assert variants["pruned"]["speedup_vs_float32_b32"] == 1.0
    expected = variants["pruned"]["latency_ms_p50_b32"] / variants["pruned-int8"]["latency_ms_p50_b32"]
    assert variants["pruned-int8"]["speedup_vs_float32_b32"] == pytest.approx(expected)

    # MLflow has the same figures on every variant's run; the registered candidate's tags have them too
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    exp = client.get_experiment_by_name("shrinkfleet/tiny")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`shrinkfleet.kind` = 'variant'")
    assert {r.data.tags["mlflow.runName"].rsplit("/", 1)[-1] for r in runs} >= set(variants)
    for r in runs:
        assert {"macs", "latency_ms_p50_b1", "latency_ms_p50_b32", "speedup_vs_float32_b32"} <= set(r.data.metrics)
    (mv,) = client.search_model_versions("name = 'digits-mlp'")
    (registered,) = [v for v in variants.values() if v["recipe"] == mv.tags["shrinkfleet.recipe"]]
    assert float(mv.tags["shrinkfleet.metric.latency_ms_p50_b32"]) == pytest.approx(registered["latency_ms_p50_b32"])
    assert float(mv.tags["shrinkfleet.metric.macs"]) == registered["macs"]

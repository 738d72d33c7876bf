"""End to end, as a user runs it: the CLI, a real temporary Prefect server, DVC and MLflow on disk."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import make_project, shrinkfleet_cmd

METRICS = ("accuracy", "accuracy_drop", "size_bytes", "gzip_bytes", "compression_ratio", "sparsity", "params",
           "latency_ms_p50", "coded_bytes", "coded_ratio", "bits_per_nonzero")
VARIANTS = {"teacher", "student", "pruned", "pruned-float32", "pruned-int8", "pruned-clustered", "pruned-pcqat"}

pytestmark = pytest.mark.slow


def _client(project: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")


def _runs(project: Path, kind: str) -> list:
    client = _client(project)
    exp = client.get_experiment_by_name("shrinkfleet/tiny")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`shrinkfleet.kind` = '{kind}'",
                              order_by=["attributes.start_time DESC"], max_results=500)
    return runs


def _dvc_status(project: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out or "{}")


def _stages_ran(project: Path, fleet_run_id: str) -> dict[str, set[str]]:
    """Per model, the stages that ran (not skipped) in one fleet run, as recorded in MLflow."""
    ran = {}
    for run in _runs(project, "model"):
        if run.data.tags.get("mlflow.parentRunId") == fleet_run_id:
            ran[run.data.tags["shrinkfleet.model"]] = {
                k.rsplit(".", 1)[1] for k, v in run.data.tags.items()
                if k.startswith("shrinkfleet.stage.") and v == "ran"
            }
    return ran


def test_fleet_runs_tracks_records_and_reruns_nothing(project):
    first = shrinkfleet_cmd("run", cwd=project)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Fleet variants" in first.stdout and "pruned-int8" in first.stdout

    # MLflow: one parent, a child per model, a nested run per variant with every metric
    (parent,) = _runs(project, "fleet")
    assert parent.data.tags["trigger"] == "manual"
    assert parent.data.tags["prefect_flow_run_id"] and parent.data.tags["git_sha"]
    # The settings every stage used, as the run read them once: their digest, and the settings themselves.
    from shrinkfleet.config import load_snapshot

    snapshot = load_snapshot(project / "params.yaml")
    assert parent.data.tags["shrinkfleet.config_digest"] == snapshot.digest
    recorded = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id,
                                                   artifact_path="config/params.resolved.json",
                                                   tracking_uri=f"sqlite:///{project}/mlflow.db")
    assert json.loads(Path(recorded).read_text()) == json.loads(snapshot.to_json())
    children = [r for r in _runs(project, "model") if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    assert sorted(r.data.tags["shrinkfleet.model"] for r in children) == ["cancer-mlp", "digits-mlp"]
    for child in children:
        model = child.data.tags["shrinkfleet.model"]
        assert child.inputs.dataset_inputs, "dataset not logged with log_input"
        variants = [r for r in _runs(project, "variant") if r.data.tags["mlflow.parentRunId"] == child.info.run_id]
        assert {r.data.tags["shrinkfleet.variant"] for r in variants} == VARIANTS
        by_name = {r.data.tags["shrinkfleet.variant"]: r for r in variants}
        for run in variants:
            assert set(METRICS) <= set(run.data.metrics), run.data.tags["shrinkfleet.variant"]
            parent_variant = run.data.tags["shrinkfleet.parent_variant"]
            if parent_variant:  # lineage: the parent's run id resolves to the parent variant's run
                assert run.data.tags["shrinkfleet.parent_run_id"] == by_name[parent_variant].info.run_id
            assert run.data.tags.get("dvc.md5"), "artifact's DVC hash missing"
        int8 = by_name["pruned-int8"].data.metrics
        teacher = by_name["teacher"].data.metrics
        assert int8["size_bytes"] < teacher["size_bytes"]
        assert int8["compression_ratio"] == pytest.approx(teacher["size_bytes"] / int8["size_bytes"])
        assert by_name["pruned"].data.metrics["sparsity"] == pytest.approx(
            0.5 if model == "digits-mlp" else 0.4, abs=0.01)
        assert by_name["pruned-int8"].data.params["quantize.representative_samples"]
        assert by_name["pruned-clustered"].data.params["step.0.cluster.clusters"] == "8"

    # metrics file, report and DVC agree
    doc = json.loads((project / "metrics" / "digits-mlp.json").read_text())
    assert set(doc["variants"]) == VARIANTS and doc["dataset_digest"].startswith("sha256:")
    rows = [line.split("|")[1:3] for line in (project / "reports" / "fleet.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| model ")]
    report_text = (project / "reports" / "fleet.md").read_text()
    assert "## Pareto fronts (accuracy vs coded bytes)" in report_text
    assert doc["pareto_front"] and all(doc["variants"][n]["pareto"] for n in doc["pareto_front"])
    assert sorted((m.strip(), v.strip().removesuffix(" (production)").removesuffix(" *")) for m, v in rows) == sorted(
        (m, v) for m in ("digits-mlp", "cancer-mlp") for v in VARIANTS)
    # The served variant of each member with a production version is marked, once, on a .tflite row.
    served = sorted(m.strip() for m, v in rows if v.strip().endswith("(production)"))
    promoted = sorted(m for m in ("digits-mlp", "cancer-mlp") if re.search(rf"✓ {m}:.*; production v\d", first.stdout))
    assert served == promoted and promoted  # (the tiny fleet's default gate passes something)
    assert all(v.strip().startswith("pruned-") for m, v in rows if v.strip().endswith("(production)"))
    assert (project / "reports" / "plots" / "digits-mlp-pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _dvc_status(project) == {}
    # what each stage took, for the next run's order (longest model first)
    history = json.loads((project / ".shrinkfleet" / "durations.json").read_text())
    stages = {"teacher", "distill", "prune", "compress", "evaluate"}
    assert {m: set(h) for m, h in history.items()} == {"digits-mlp": stages, "cancer-mlp": stages}
    assert all(seconds > 0 for h in history.values() for seconds in h.values())

    # a rerun with nothing changed trains nothing
    stamps = {p: p.stat().st_mtime_ns for p in (project / "models").rglob("*.keras")}
    second = shrinkfleet_cmd("run", cwd=project)
    assert second.returncode == 0, second.stdout + second.stderr
    latest = _runs(project, "fleet")[0]
    assert _stages_ran(project, latest.info.run_id) == {"digits-mlp": set(), "cancer-mlp": set()}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # one model's prune edit re-runs only that model's prune and what follows
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["models"]["cancer-mlp"]["prune"]["target_sparsity"] = 0.6
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    history["cancer-mlp"]["prune"] = 12345.0  # a figure tonight's prune must replace
    (project / ".shrinkfleet" / "durations.json").write_text(json.dumps(history))
    third = shrinkfleet_cmd("run", cwd=project)
    assert third.returncode == 0, third.stdout + third.stderr
    latest = _runs(project, "fleet")[0]
    assert _stages_ran(project, latest.info.run_id) == {
        "digits-mlp": set(), "cancer-mlp": {"prune", "compress", "evaluate"}}
    doc = json.loads((project / "metrics" / "cancer-mlp.json").read_text())
    assert doc["variants"]["pruned"]["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert _dvc_status(project) == {}
    # the stages that ran again have tonight's figures; the skipped ones keep the first night's
    latest_history = json.loads((project / ".shrinkfleet" / "durations.json").read_text())
    assert latest_history["digits-mlp"] == history["digits-mlp"]
    assert latest_history["cancer-mlp"]["teacher"] == history["cancer-mlp"]["teacher"]
    assert 0 < latest_history["cancer-mlp"]["prune"] < 12345.0


def test_dvc_repro_alone_reproduces_a_model_and_the_flow_agrees(tmp_path, tiny_params):
    del tiny_params["models"]["digits-mlp"]
    project = make_project(tmp_path / "p", tiny_params)
    env = {"PATH": f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}"}
    repro = subprocess.run([sys.executable, "-m", "dvc", "repro", "evaluate-cancer-mlp"], cwd=project,
                           capture_output=True, text=True, env={**__import__("os").environ, **env})
    assert repro.returncode == 0, repro.stdout + repro.stderr
    doc = json.loads((project / "metrics" / "cancer-mlp.json").read_text())
    assert set(doc["variants"]) == VARIANTS
    # what dvc repro recorded, the Prefect flow accepts as up to date: it trains nothing
    run = shrinkfleet_cmd("run", cwd=project)
    assert run.returncode == 0, run.stdout + run.stderr
    latest = _runs(project, "fleet")[0]
    assert _stages_ran(project, latest.info.run_id) == {"cancer-mlp": set()}


def test_a_failing_model_does_not_stop_the_fleet(tmp_path, tiny_params):
    # A fault preflight cannot see: the threshold is judged on the train split's variances,
    # known only once prepare has split the data (a NaN dataset would stop the run before work).
    tiny_params["datasets"]["cancer"]["features"] = {"variance_threshold": 1e9}
    tiny_params["recipes"] = {"pruned-int8": tiny_params["recipes"]["pruned-int8"]}  # the other member's route only
    project = make_project(tmp_path / "p", tiny_params)
    result = shrinkfleet_cmd("run", cwd=project)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cancer-mlp" in result.stdout and "prepare failed" in result.stdout
    assert "variance_threshold 1000000000.0 drops all 30 features" in result.stdout
    assert (project / "metrics" / "digits-mlp.json").is_file()
    assert not (project / "metrics" / "cancer-mlp.json").exists()
    report = (project / "reports" / "fleet.md").read_text()
    assert "## Failed" in report and "cancer-mlp" in report
    failed = [r for r in _runs(project, "model") if r.data.tags["shrinkfleet.model"] == "cancer-mlp"]
    assert failed and failed[0].info.status == "FAILED"
    assert failed[0].data.tags["shrinkfleet.failed_stage"] == "prepare"

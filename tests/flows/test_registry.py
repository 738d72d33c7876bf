"""Nightly operations end to end: gate, registry versions, rollback, lineage, restore, serving.

One project lives through a sequence of nights, as a user's would; each step asserts what
the registry, the history and the files must look like afterwards.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from shrinkfleet import report
from tests.conftest import make_project, mlflow_env_restored, shrinkfleet_cmd

pytestmark = pytest.mark.slow
MODEL = "digits-mlp"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def nightly(tmp_path_factory):
    """A one-model project and helpers to run it, edit it and read its registry."""
    from tests.conftest import TINY_PARAMS

    params = json.loads(json.dumps(TINY_PARAMS))
    del params["models"]["cancer-mlp"]
    params["gate"] = {"max_accuracy_drop": 1.0}  # tiny models: accept any drop, test the mechanics
    # Two .tflite recipes for the gate to choose from; clustering's training adds nothing the registry reads.
    params["recipes"] = {k: params["recipes"][k] for k in ("pruned-float32", "pruned-int8")}
    project = make_project(tmp_path_factory.mktemp("nightly") / "p", params)
    uri = f"sqlite:///{project}/mlflow.db"

    class Night:
        root = project

        def run(self, *args: str, code: int = 0) -> str:
            r = shrinkfleet_cmd(*args, cwd=project)
            assert r.returncode == code, r.stdout + r.stderr
            return r.stdout

        def edit(self, fn) -> None:
            p = yaml.safe_load((project / "params.yaml").read_text())
            fn(p)
            (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))

        def versions(self) -> list:
            return sorted(MlflowClient().search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))

        def production(self) -> str:
            return str(MlflowClient().get_model_version_by_alias(MODEL, "production").version)

    # set_tracking_uri exports MLFLOW_TRACKING_URI: a worker started by a later test would inherit it.
    with mlflow_env_restored():
        mlflow.set_tracking_uri(uri)
        yield Night()
        mlflow.set_tracking_uri("")


def test_01_first_night_registers_and_promotes(nightly):
    out = nightly.run("run")
    assert [v.version for v in nightly.versions()] in ([1], ["1"])
    assert nightly.production() == "1"
    v1 = nightly.versions()[0]
    for tag in ("shrinkfleet.git_sha", "shrinkfleet.dataset_digest", "shrinkfleet.dvc_outs", "shrinkfleet.recipe",
                "shrinkfleet.run.teacher", "shrinkfleet.run.student", "shrinkfleet.run.pruned",
                "shrinkfleet.metric.accuracy", "shrinkfleet.content_sha256"):
        assert v1.tags.get(tag), tag
    assert "promoted to v1" in (nightly.root / "reports" / "fleet.md").read_text()
    assert "production v1" in out
    served = [line for line in out.splitlines() if "◆" in line and "Pareto" not in line]
    assert len(served) == 1 and v1.tags["shrinkfleet.variant"] in served[0]  # the run table marks what is served


def test_02_no_change_creates_no_version(nightly):
    out = nightly.run("run")
    assert len(nightly.versions()) == 1 and nightly.production() == "1"
    assert "unchanged: production v1 has the same content" in out


def test_03_pyfunc_predicts_the_same_classes_as_the_tflite(nightly):
    from shrinkfleet.datasets import load_sklearn
    from shrinkfleet.evaluation import TFLiteModel

    v1 = nightly.versions()[0]
    raw = load_sklearn("digits").x[:200]  # raw pixel values 0..16, as a caller has them
    served = mlflow.pyfunc.load_model(f"models:/{MODEL}@production")
    probs = served.predict(raw.reshape(len(raw), -1).astype(np.float32))
    assert probs.shape == (200, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    tflite = nightly.root / next(p for p in json.loads(v1.tags["shrinkfleet.dvc_outs"]) if p.endswith(".tflite"))
    direct = TFLiteModel.from_path(tflite).predict((raw / 16.0).astype(np.float32))
    assert (probs.argmax(axis=1) == direct.argmax(axis=1)).all()


def test_04_changed_param_makes_a_second_version(nightly):
    nightly.edit(lambda p: p["models"][MODEL]["prune"].update(target_sparsity=0.7))
    nightly.run("run")
    assert len(nightly.versions()) == 2 and nightly.production() == "2"
    history = nightly.run("history", MODEL)
    assert "v1" in history and "v2" in history and history.count("promote") >= 2


def test_04b_report_rebuilds_from_mlflow_with_trends(nightly):
    import pandas as pd

    run_md = (nightly.root / "reports" / "fleet.md").read_text()
    out = nightly.run("report", "--since", "1d", "--model", MODEL)
    assert (nightly.root / "reports" / "fleet.md").read_text() == run_md  # the run's own report is left alone
    rebuilt = next((nightly.root / "reports").glob("rebuilt-*/fleet.md")).read_text()
    # The same report as the run's: the gate's column, the registry section, production marked and explained.
    for text in (run_md, rebuilt):
        assert re.search(r"\|\s*gate\s*\|", text) and "## Registry (alias `production`)" in text
        row = next(line for line in text.splitlines() if "(production)" in line and line.startswith(f"| {MODEL}"))
        assert "pass" in row
        assert f"- **{MODEL}**: " in text and "production v2 serves" in text
    served_row = next(line for line in out.splitlines() if "◆" in line and "production serves" not in line)
    assert "pass" in served_row and "production v2 serves" in out and "rebuilt-" in out
    for stale in (nightly.root / "reports").rglob("*.*"):
        stale.unlink()
    out = nightly.run("report", "--since", "1d", "--model", MODEL, "--out", "reports")
    assert "pruned-int8" in out and "fleet.html" in out and "replacing the last run's report" in out
    trends = pd.read_csv(nightly.root / "reports" / "trends.csv")
    assert trends["version"].tolist() == [1, 1, 2]  # what production served after each of the three nights
    for kind in ("pareto", "waterfall", "trend"):
        assert (nightly.root / "reports" / "plots" / f"{MODEL}-{kind}.png").read_bytes()[:4] == b"\x89PNG"
    # The run itself logged its report (Markdown, HTML, plots) to the fleet's parent run.
    client = MlflowClient()
    fleet_run = client.search_runs([client.get_experiment_by_name("shrinkfleet/tiny").experiment_id],
                                   "tags.`shrinkfleet.kind` = 'fleet'", order_by=["attributes.start_time DESC"])[0]
    logged = {f.path for f in client.list_artifacts(fleet_run.info.run_id, "report")}
    assert {"report/fleet.md", "report/fleet.html", "report/plots"} <= logged
    nightly.run("report", "--since", "7y", code=2)  # a bad window is refused before any work


def test_04c_report_pareto_x_puts_the_macs_read_from_mlflow_on_the_plot(nightly):
    """report.pareto_x is read by `shrinkfleet report` (no stage depends on it) and needs the MACs from MLflow."""
    nightly.edit(lambda p: p.setdefault("report", {}).update(pareto_x="macs"))
    try:
        nightly.run("report", "--since", "1d", "--model", MODEL, "--out", "reports/macs")
        rebuilt = (nightly.root / "reports" / "macs" / "fleet.md").read_text()
        assert f"**{MODEL}**: accuracy vs MACs" in rebuilt  # the plot's caption (the table's front stays bytes')
        assert f"**{MODEL}**: accuracy vs coded bytes" in (nightly.root / "reports" / "fleet.md").read_text()
        assert (nightly.root / "reports" / "macs" / "plots" / f"{MODEL}-pareto.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        nightly.edit(lambda p: p.pop("report"))  # (the tiny fleet has no report: section of its own)


def test_05_lineage_links_resolve(nightly):
    info = json.loads(nightly.run("lineage", f"{MODEL}@production", "--json"))
    assert info["version"] == "2" and "production" in info["aliases"]
    names = [s["variant"] for s in info["chain"]]
    assert names[:3] == ["teacher", "student", "pruned"] and names[3].startswith("pruned-")
    client = MlflowClient()
    for step in info["chain"]:
        run = client.get_run(step["run_id"])
        assert run.data.tags["shrinkfleet.variant"] == step["variant"]
        assert step["dvc_md5"] == _md5(nightly.root / step["artifact"])
    assert client.get_run(info["fleet_run"]["run_id"]).data.tags["shrinkfleet.kind"] == "fleet"
    metrics = json.loads((nightly.root / "metrics" / f"{MODEL}.json").read_text())
    assert info["dataset"]["digest"] == metrics["dataset_digest"]
    lock = yaml.safe_load((nightly.root / "dvc.lock").read_text())
    (out,) = lock["stages"]["prepare-digits"]["outs"]
    assert info["dataset"]["dvc_md5"] == out["md5"]
    assert info["params_changed_from_defaults"]["prune.target_sparsity"] == "0.7"
    text = " ".join(nightly.run("lineage", f"{MODEL}:1").split())  # (the lines wrap at the console's width)
    assert f"{MODEL} v1" in text and "digest sha256:" in text


def test_06_restore_an_earlier_version_byte_for_byte(nightly, tmp_path):
    v1 = nightly.versions()[0]
    recorded = json.loads(v1.tags["shrinkfleet.dvc_outs"])
    nightly.run("restore", f"{MODEL}:1", "-o", str(tmp_path / "v1"))
    pruned = f"models/{MODEL}/pruned.keras"
    assert _md5(tmp_path / "v1" / pruned) == recorded[pruned]
    assert recorded[pruned] != _md5(nightly.root / pruned)  # v2 changed the workspace's copy
    for path, md5 in recorded.items():
        if md5.endswith(".dir"):
            assert {p.name for p in (tmp_path / "v1" / path).iterdir()} >= {"train.npz", "meta.json"}
            restored_meta = (tmp_path / "v1" / path / "meta.json").read_bytes()
            assert restored_meta == (nightly.root / path / "meta.json").read_bytes()
        else:
            assert _md5(tmp_path / "v1" / path) == md5, path


def test_07_rollback_moves_production_and_is_recorded(nightly):
    out = nightly.run("rollback", MODEL, "--reason", "night 4 regressed on real traffic")
    assert "v2 -> v1" in out
    assert nightly.production() == "1"
    history = " ".join(nightly.run("history", MODEL, "--wide").split())  # (the moves' reasons wrap)
    assert "rollback" in history and "night 4 regressed on real traffic" in history
    assert "rolled back" in history


def test_08_nightly_run_does_not_undo_a_rollback(nightly):
    out = nightly.run("run")
    assert nightly.production() == "1" and len(nightly.versions()) == 2
    assert "not promoted again automatically" in out
    # The report says production serves an earlier run's bytes, and the trend plot gets the rollback.
    md = (nightly.root / "reports" / "fleet.md").read_text()
    assert "production v1 serves" in md and "from an earlier run" in md
    assert not any("(production)" in line for line in md.splitlines() if line.startswith(f"| {MODEL}"))
    moves = report.moves_from_registry([MODEL])
    assert moves[["action", "from_version", "to_version"]].values.tolist() == [["rollback", "2", "1"]]


def test_09_rollback_with_no_earlier_version_is_a_clear_error(nightly):
    out = shrinkfleet_cmd("rollback", MODEL, cwd=nightly.root)
    assert out.returncode == 1
    assert "v1 is the first production version; there is no earlier one to roll back to" in out.stderr
    missing = shrinkfleet_cmd("rollback", "ghost", cwd=nightly.root)
    assert missing.returncode == 1 and "ghost: not in the registry" in missing.stderr


def test_10_promote_respects_the_gate_unless_forced(nightly):
    nightly.edit(lambda p: p["gate"].update(max_size_bytes=100))
    refused = shrinkfleet_cmd("promote", MODEL, "2", cwd=nightly.root)
    assert refused.returncode == 1 and "fails the gate (size_bytes" in refused.stderr
    assert nightly.production() == "1"
    nightly.run("promote", MODEL, "2", "--force", "--reason", "hand-checked")
    assert nightly.production() == "2"
    assert "forced past the gate" in nightly.run("history", MODEL)


def test_10b_a_version_the_gate_cannot_check_is_refused(nightly):
    """promote fails closed: a version without the metric the gate bounds is not promoted (unless --force)."""
    client, tag = MlflowClient(), "shrinkfleet.metric.accuracy_drop"
    kept = client.get_model_version(MODEL, "1").tags[tag]
    client.delete_model_version_tag(MODEL, "1", tag)
    try:
        refused = shrinkfleet_cmd("promote", MODEL, "1", cwd=nightly.root)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "no accuracy_drop recorded on v1" in refused.stderr and "cannot check it" in refused.stderr
        assert nightly.production() == "2"
    finally:
        client.set_model_version_tag(MODEL, "1", tag, kept)


def test_11_a_regressed_variant_is_not_promoted(nightly):
    nightly.edit(lambda p: (p["gate"].update(max_size_bytes=None, max_accuracy_drop=0.0),
                            p["models"][MODEL]["prune"].update(target_sparsity=0.9)))
    out = nightly.run("run")
    assert "no variant passed the gate; production stays at v2" in out
    assert nightly.production() == "2" and len(nightly.versions()) == 2
    report = (nightly.root / "reports" / "fleet.md").read_text()
    assert "fail: accuracy_drop" in report


def test_12_status_shows_every_member(nightly):
    out = nightly.run("status")
    row = next(line for line in out.splitlines() if MODEL in line)
    assert f"v{nightly.production()}" in row

"""dvc.yaml written from the fleet: one stage per dataset in use and per model stage, raw inputs as deps."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from shrinkfleet import pipeline, versioning
from shrinkfleet.cli import app
from shrinkfleet.config import load_params, parse_params
from tests.conftest import REPO, make_project

runner = CliRunner()


def test_the_committed_dvc_yaml_is_what_sync_writes_for_params_yaml(monkeypatch):
    committed = (REPO / "dvc.yaml").read_text()
    # The file carries the scikit-learn release it was written under; compare against the same one.
    (version,) = set(re.findall(r"--sklearn-version (\S+)", committed))
    monkeypatch.setattr(pipeline, "sklearn_version", lambda: version)
    assert pipeline.render(load_params(REPO / "params.yaml")) == committed


def test_dvc_yaml_the_prefect_tasks_and_shrinkfleet_stage_derive_from_one_stage_registry(tiny_params):
    """pipeline.KINDS names every kind of stage once: dvc.yaml's stages and commands, the flow's tasks
    and the modules `shrinkfleet stage` runs are those kinds, in that order."""
    import importlib

    from flows.fleet import STAGE_NAMES
    from tasks.stages import TASKS

    fleet = parse_params(tiny_params)
    written = yaml.safe_load(pipeline.render(fleet))["stages"]
    seen = set()
    for name, stage in written.items():
        kind, target = pipeline.split_stage_name(name)
        assert stage["cmd"].split(" --")[0] == f"shrinkfleet stage {kind} {target}", name
        seen.add(kind)
    assert seen == set(pipeline.STAGE_KINDS)
    assert tuple(TASKS) == STAGE_NAMES == pipeline.STAGE_KINDS
    assert {TASKS[k].name for k in TASKS} == set(pipeline.STAGE_KINDS)
    for kind in pipeline.STAGE_KINDS:  # what `shrinkfleet stage <kind>` imports and calls
        assert callable(importlib.import_module(f"tasks.{kind}").run), kind


@pytest.mark.parametrize("spec", [
    {"source": "npz", "path": "data/raw/nightly.npz", "kind": "tabular"},
    {"source": "mnist", "path": "../shared/datasets/mnist-t10k"},
    {"source": "cifar10", "path": "/srv/data/cifar-10-python.tar.gz"},
])
def test_a_raw_file_or_folder_is_a_dependency_of_its_prepare_stage(tiny_params, spec):
    tiny_params["datasets"]["mine"] = spec
    tiny_params["models"]["digits-mlp"]["dataset"] = "mine"
    stages = pipeline.stages(parse_params(tiny_params))
    assert spec["path"] in stages["prepare-mine"]["deps"]
    assert stages["prepare-mine"]["cmd"] == "shrinkfleet stage prepare mine"
    # ...and of nothing else: the model's stages read the prepared data, not the raw file
    assert not [s for name, s in stages.items() if name != "prepare-mine" and spec["path"] in s["deps"]]


def test_a_bundled_set_is_versioned_by_its_scikit_learn_release(tiny_params):
    stages = pipeline.stages(parse_params(tiny_params))
    assert stages["prepare-digits"]["cmd"] == f"shrinkfleet stage prepare digits --sklearn-version " \
                                              f"{pipeline.sklearn_version()}"
    assert stages["prepare-digits"]["deps"] == ["shrinkfleet/datasets.py", "tasks/prepare.py"]


def test_a_dataset_no_model_uses_gets_no_stage(tiny_params):
    tiny_params["datasets"]["wine"] = {"source": "sklearn", "name": "wine"}
    stages = pipeline.stages(parse_params(tiny_params))
    assert sorted(s for s in stages if s.startswith("prepare-")) == ["prepare-cancer", "prepare-digits"]


def test_every_stage_lists_only_the_params_keys_it_reads_and_that_params_yaml_has(tiny_params):
    del tiny_params["search"]
    del tiny_params["models"]["cancer-mlp"]["prune"]
    tiny_params["models"]["digits-mlp"]["gate"] = {"max_accuracy_drop": 0.5}  # read by no stage
    stages = pipeline.stages(parse_params(tiny_params))
    assert stages["prune-cancer-mlp"]["params"] == ["seed", "prune"]
    assert stages["prune-digits-mlp"]["params"] == ["seed", "prune", "models.digits-mlp.prune"]
    assert stages["compress-digits-mlp"]["params"] == [
        "seed", "prune", "cluster", "qat", "quantize", "recipes", "models.digits-mlp.prune",
        "models.digits-mlp.quantize"]
    assert not [p for s in stages.values() for p in s["params"] if "gate" in p or p == "search"]
    assert stages["evaluate-digits-mlp"]["outs"] == [{"metrics/digits-mlp.json": {"cache": False}}]


def test_dvc_accepts_the_written_file_and_names_every_stage(tmp_path, tiny_params):
    del tiny_params["search"]
    del tiny_params["models"]["cancer-mlp"]["prune"]
    project = make_project(tmp_path / "p", tiny_params)
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert set(json.loads(out.stdout)) == set(pipeline.stages(parse_params(tiny_params)))


def test_sync_writes_only_when_the_fleet_changed_and_says_what_changed(tmp_path, tiny_params):
    fleet = parse_params(tiny_params)
    assert pipeline.sync(tmp_path, fleet)[:2] == ["added prepare-cancer", "added prepare-digits"]
    before = (tmp_path / "dvc.yaml").stat().st_mtime_ns
    assert pipeline.sync(tmp_path, fleet) == []
    assert (tmp_path / "dvc.yaml").stat().st_mtime_ns == before
    del tiny_params["models"]["cancer-mlp"]
    tiny_params["models"]["digits-mlp"]["prune"] = {"target_sparsity": 0.6}  # a value: same stages
    assert pipeline.changes(tmp_path, parse_params(tiny_params)) == [
        f"removed {s}-cancer{'-mlp' if s != 'prepare' else ''}" for s in pipeline.STAGE_KINDS]


def test_shrinkfleet_stage_refuses_a_dvc_yaml_behind_params_yaml(project, tiny_params):
    tiny_params["models"]["wine-mlp"] = {"dataset": "digits", "teacher": {"arch": "mlp"}, "student": {"arch": "mlp"}}
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params))
    result = runner.invoke(app, ["stage", "prepare", "digits", "--root", str(project)])
    assert result.exit_code == 2
    assert "dvc.yaml is behind params.yaml (added teacher-wine-mlp" in result.output
    assert "run `shrinkfleet sync`" in result.output
    assert not (project / "data" / "prepared").exists()

    synced = runner.invoke(app, ["sync", "--root", str(project)])
    assert synced.exit_code == 0 and "dvc.yaml rewritten from params.yaml" in synced.output
    assert "teacher-wine-mlp" in yaml.safe_load((project / "dvc.yaml").read_text())["stages"]


def test_shrinkfleet_stage_refuses_another_scikit_learn_release(project):
    result = runner.invoke(app, ["stage", "prepare", "digits", "--sklearn-version", "0.1", "--root", str(project)])
    assert result.exit_code == 2
    assert f"written for scikit-learn 0.1, this environment has {pipeline.sklearn_version()}" in result.output


def _locked(tmp_path, stage: str, cmd: str = "shrinkfleet stage x") -> None:
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {stage: {"cmd": cmd}}}))


@pytest.mark.parametrize(("status", "expected"), [
    ([{"changed deps": {"data/raw/nightly.npz": "modified"}}], "data/raw/nightly.npz changed"),
    ([{"changed deps": {"params.yaml": {"models.m.prune": "modified", "seed": "new"}}}],
     "params models.m.prune, seed changed"),
    ([{"changed deps": {"tasks/prune.py": "modified", "/srv/raw": "modified"}}],
     "/srv/raw changed; code tasks/prune.py changed"),
    ([{"changed outs": {"models/m/pruned.keras": "deleted"}}], "models/m/pruned.keras missing"),
    ([{"changed outs": {"models/m/pruned.keras": "modified"}}], "models/m/pruned.keras modified"),
])
def test_why_a_stage_runs_names_what_changed(tmp_path, status, expected):
    _locked(tmp_path, "prune-m")
    assert versioning.describe_change(tmp_path, "prune-m", status) == expected


def test_a_stage_with_no_record_runs_for_the_first_time(tmp_path):
    assert versioning.describe_change(tmp_path, "prune-m", [{"changed outs": {"x": "deleted"}}]) == "first run"


def test_a_scikit_learn_upgrade_is_named_as_such(tmp_path):
    _locked(tmp_path, "prepare-digits", "shrinkfleet stage prepare digits --sklearn-version 1.8.0")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare-digits": {
        "cmd": "shrinkfleet stage prepare digits --sklearn-version 1.9.1"}}}))
    assert versioning.describe_change(tmp_path, "prepare-digits", ["changed command"]) == \
        "scikit-learn 1.8.0 -> 1.9.1"


def test_a_line_naming_a_long_path_is_printed_whole_off_a_terminal(tmp_path, tiny_params):
    """Off a terminal (cron, CI, a pipe) the console is 80 columns; a path or id in a message is never cut by a
    line break, so logs can be grepped for it (the report's "wrote ..." line once broke inside a path)."""
    from tests.conftest import make_project, shrinkfleet_cmd

    project = make_project(tmp_path / ("a-folder-with-a-long-name-" * 4) / "project", tiny_params)
    assert len(str(project / "dvc.yaml")) > 100
    done = shrinkfleet_cmd("sync", cwd=project, env={"COLUMNS": "80"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{project / 'dvc.yaml'} is up to date with params.yaml\n" in done.stdout

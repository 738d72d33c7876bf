"""The command line: help, validation and bad input stop before any work, without a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from shrinkfleet.cli import app

runner = CliRunner()


def _write(tmp_path: Path, params: dict) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path


def test_help_documents_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "stage", "validate", "report"):
        assert command in result.output
    run_help = runner.invoke(app, ["run", "--help"]).output
    for option in ("--models", "--params", "--force", "--no-dvc", "--workers"):
        assert option in run_help


def test_validate_accepts_the_tiny_fleet(tmp_path, tiny_params):
    result = runner.invoke(app, ["validate", "--root", str(_write(tmp_path, tiny_params))])
    assert result.exit_code == 0, result.output
    assert "is valid: 2 model(s)" in result.output


@pytest.mark.parametrize("command", [["run"], ["validate"], ["stage", "teacher", "digits-mlp"]])
def test_bad_params_exit_2_naming_the_key_before_any_work(tmp_path, tiny_params, command):
    tiny_params["models"]["digits-mlp"]["prune"] = {"target_sparsity": 1.5}
    root = _write(tmp_path, tiny_params)
    result = runner.invoke(app, [*command, "--root", str(root)])
    assert result.exit_code == 2
    assert "models.digits-mlp.prune.target_sparsity: must be less than 1" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml"]  # nothing written


def test_validate_rejects_a_bad_recipe_step_override_naming_the_recipe_and_key(tmp_path, tiny_params):
    tiny_params["recipes"] = {"dc": {"steps": [{"cluster": {"clusterz": 4}}, "float32"]}}
    root = _write(tmp_path, tiny_params)
    result = runner.invoke(app, ["validate", "--root", str(root)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "recipes.dc.steps[0].cluster.clusterz: unknown key" in result.output
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml"]  # nothing written


def test_the_old_worker_key_is_refused_naming_its_replacement(tmp_path, tiny_params):
    tiny_params["run"] = {"worker_max_stages": 50}
    result = runner.invoke(app, ["validate", "--root", str(_write(tmp_path, tiny_params))])
    assert result.exit_code == 2
    assert "worker_max_stages was replaced by worker_max_models" in result.output


def test_unknown_model_is_refused(tmp_path, tiny_params):
    result = runner.invoke(app, ["run", "--models", "digits-mlp,ghost", "--root", str(_write(tmp_path, tiny_params))])
    assert result.exit_code == 2
    assert "--models: ghost not in the fleet (one of: digits-mlp, cancer-mlp)" in result.output


def test_missing_dataset_file_is_caught_before_work(tmp_path, tiny_params):
    tiny_params["datasets"]["mine"] = {"source": "npz", "path": "data/raw/mine.npz"}
    tiny_params["models"]["digits-mlp"]["dataset"] = "mine"
    root = _write(tmp_path, tiny_params)
    result = runner.invoke(app, ["run", "--root", str(root)])
    assert result.exit_code == 2
    assert "datasets.mine.path:" in result.output and "mine.npz does not exist" in result.output
    assert not (root / "mlflow.db").exists()


def test_unknown_stage_and_target(tmp_path, tiny_params):
    root = _write(tmp_path, tiny_params)
    result = runner.invoke(app, ["stage", "cluster", "digits-mlp", "--root", str(root)])
    assert result.exit_code == 2 and "unknown stage 'cluster'" in result.output
    result = runner.invoke(app, ["stage", "teacher", "ghost", "--root", str(root)])
    assert result.exit_code == 2 and "'ghost' is not a model of the fleet" in result.output


def test_report_without_metrics_says_what_to_do(tmp_path, tiny_params):
    result = runner.invoke(app, ["report", "--root", str(_write(tmp_path, tiny_params))])
    assert result.exit_code == 1 and "run `shrinkfleet run` first" in result.output


def test_decode_restores_the_flatbuffer_and_refuses_garbage(tmp_path):
    from shrinkfleet import coding
    from shrinkfleet.evaluation import to_tflite
    from shrinkfleet.tfenv import keras

    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    content = to_tflite(model, "float32")
    (tmp_path / "m.sfc").write_bytes(coding.encode(content))
    result = runner.invoke(app, ["decode", str(tmp_path / "m.sfc"), "-o", str(tmp_path / "m.tflite")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.tflite").read_bytes() == content
    (tmp_path / "bad.sfc").write_bytes(b"garbage!")
    result = runner.invoke(app, ["decode", str(tmp_path / "bad.sfc"), "-o", str(tmp_path / "x.tflite")])
    assert result.exit_code == 2 and "not a shrinkfleet coded model" in result.output
    assert not (tmp_path / "x.tflite").exists()


def _in_a_terminal(cmd: list[str], env: dict[str, str], timeout: float = 120) -> str:
    """What ``cmd`` prints to a pseudo-terminal (Prefect's telemetry notice shows only in one)."""
    import os
    import select
    import subprocess

    master, slave = os.openpty()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the terminal closed: the command ended
                break
            if not chunk:
                break
            out += chunk
    finally:
        proc.wait(timeout)
        os.close(master)
    return out.decode(errors="replace")


def test_no_prefect_analytics_notice_when_analytics_are_off(tmp_path):
    import os
    import sys

    # Prefect keeps quiet on CI machines, which it tells by variables like these.
    ci = {"CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "TRAVIS", "CIRCLECI", "BUILDKITE", "TF_BUILD",
          "CODEBUILD_BUILD_ID", "BITBUCKET_COMMIT", "TEAMCITY_VERSION", "DRONE", "SEMAPHORE", "APPVEYOR", "BUDDY",
          "CI_NAME"}

    def env(home: str) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k not in ci and k != "DO_NOT_TRACK"}
        return {**keep, "PREFECT_HOME": str(tmp_path / home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

    notice = "Prefect collects anonymous usage data"
    # The check can fail: plain Prefect in a terminal prints it, analytics setting or not.
    assert notice in _in_a_terminal([sys.executable, "-c", "import prefect"], env("bare"))
    exe = str(Path(sys.executable).with_name("shrinkfleet"))
    # `schedule` imports Prefect before it checks the cron.
    out = _in_a_terminal([exe, "schedule", "--cron", "not a cron"], env("ours"))
    assert "--cron:" in out
    assert notice not in out


# ----------------------------------------------------------------------------- conventions and 80 columns

LONG = "household-power-forecaster"  # a model name longer than the tiny fleet's
LONG_VARIANT = "pruned-clustered-pcqat-int8"


def _commands() -> list[str]:
    import typer.main

    return sorted(typer.main.get_command(app).commands)


@pytest.mark.parametrize("command", _commands())
def test_help_shows_no_bool_placeholder(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output and "Usage: shrinkfleet " + command in result.output


@pytest.mark.parametrize(("command", "usage"), [
    ("promote", "MODEL VERSION"), ("history", "MODEL"), ("rollback", "MODEL"),
    ("lineage", "MODEL[@ALIAS|:VERSION]"), ("stage", "STAGE TARGET"), ("decode", "FILE.sfc"),
])
def test_usage_lines_name_the_arguments_in_capitals(command, usage):
    usage_line = runner.invoke(app, [command, "--help"]).output.splitlines()[0]
    assert usage_line == f"Usage: shrinkfleet {command} [OPTIONS] {usage}"


def test_version():
    from shrinkfleet import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"shrinkfleet {__version__}"


@pytest.mark.parametrize("command", ["status", "history", "lineage"])
def test_registry_commands_take_params_and_json(command):
    out = runner.invoke(app, [command, "--help"]).output
    assert "--params" in out and "--json" in out


def test_validate_json_lists_the_problems(tmp_path, tiny_params):
    import json

    tiny_params["datasets"]["mine"] = {"source": "npz", "path": "data/raw/mine.npz"}
    tiny_params["models"]["digits-mlp"]["dataset"] = "mine"
    root = _write(tmp_path, tiny_params)
    result = runner.invoke(app, ["validate", "--json", "--root", str(root)])
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["models"] == ["digits-mlp", "cancer-mlp"] and "mine.npz does not exist" in data["problems"][0]
    only = runner.invoke(app, ["validate", "--json", "--models", "cancer-mlp", "--root", str(root)])
    assert only.exit_code == 0 and json.loads(only.stdout) == {
        "params": str((root / "params.yaml").resolve()), "fleet": "tiny", "models": ["cancer-mlp"], "problems": []}


def test_decode_is_documented():
    out = runner.invoke(app, ["decode", "--help"]).output
    assert ".sfc" in out and "--out" in out and "byte-identical" in out


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda p: p["gate"].update(max_acuracy_drop=0.1), "gate.max_acuracy_drop: unknown key (did you mean "
                                                       "'max_accuracy_drop'?)"),
    (lambda p: p["models"]["digits-mlp"]["prune"].update(target_sparsty=0.5),
     "models.digits-mlp.prune.target_sparsty: unknown key (did you mean 'target_sparsity'?)"),
    (lambda p: p.update(recipes={"dc": {"steps": [{"cluster": {"clustrs": 4}}, "float32"]}}),
     "recipes.dc.steps[0].cluster.clustrs: unknown key (did you mean 'clusters'?)"),
])
def test_a_mistyped_params_key_gets_a_suggestion(tmp_path, tiny_params, edit, expected):
    tiny_params.setdefault("gate", {})
    edit(tiny_params)
    result = runner.invoke(app, ["validate", "--root", str(_write(tmp_path, tiny_params))])
    assert result.exit_code == 2 and expected in result.output


def test_a_key_nothing_resembles_gets_the_general_hint(tmp_path, tiny_params):
    tiny_params["gate"] = {"zzzz": 1}
    result = runner.invoke(app, ["validate", "--root", str(_write(tmp_path, tiny_params))])
    assert result.exit_code == 2 and "gate.zzzz: unknown key (check the spelling" in result.output


@pytest.mark.parametrize("command", [["run", "--models", "digts-mlp"], ["status", "--models", "digts-mlp"],
                                     ["history", "digts-mlp"], ["lineage", "digts-mlp"],
                                     ["stage", "teacher", "digts-mlp"], ["report", "--models", "digts-mlp"]])
def test_a_mistyped_model_name_gets_a_suggestion(tmp_path, tiny_params, command):
    result = runner.invoke(app, [*command, "--root", str(_write(tmp_path, tiny_params))])
    assert result.exit_code == 2, result.output
    assert "did you mean 'digits-mlp'?" in result.output and "Traceback" not in result.output


def test_history_of_a_non_member_names_the_fleet(tmp_path, tiny_params):
    result = runner.invoke(app, ["history", "nosuch", "--root", str(_write(tmp_path, tiny_params))])
    assert result.exit_code == 2
    assert "'nosuch' is not a fleet member of params.yaml" in result.output
    assert "digits-mlp, cancer-mlp" in result.output and "did you mean" not in result.output


def test_one_time_format():
    import datetime as dt

    from shrinkfleet import times

    when = dt.datetime(2026, 12, 1, 22, 5, 41, tzinfo=dt.UTC)
    expected = "2026-12-01 22:05 UTC"
    assert times.shown(when) == expected
    assert times.shown(when.timestamp() * 1000) == expected  # MLflow's epoch milliseconds
    assert times.shown("2026-12-01T22:05:41.5+00:00") == expected  # promoted_at tags
    assert times.shown("2026-12-01 22:05:41 UTC") == expected  # the registry's event times
    assert times.shown(dt.datetime(2026, 12, 1, 23, 5, tzinfo=dt.timezone(dt.timedelta(hours=1)))) == expected
    assert times.shown(None) == ""


def _doc(model: str) -> dict:
    """A metrics document: the teacher, a float32 variant, and the front's smallest (LONG_VARIANT)."""
    def v(acc: float, size: int, coded: int, fmt: str = "tflite") -> dict:
        return {"format": fmt, "accuracy": acc, "accuracy_drop": 0.95 - acc, "size_bytes": size,
                "compression_ratio": 12000 / size, "coded_bytes": coded, "coded_ratio": 12000 / coded,
                "sparsity": 0.5, "bits_per_nonzero": 9.0, "latency_ms_p50": 0.01, "recipe": "r"}

    variants = {"teacher": v(0.95, 12000, 11000, "keras"), "pruned-float32": v(0.94, 3000, 1900),
                LONG_VARIANT: v(0.90, 2500, 900)}
    for variant in variants.values():
        variant["pareto"] = True
    return {"model": model, "variants": variants, "pareto_front": ["teacher", "pruned-float32", LONG_VARIANT]}


@pytest.mark.parametrize("width", [80, 200])
@pytest.mark.parametrize("wide", [False, True])
def test_run_table_keeps_names_whole_and_marks_production(width, wide):
    import io

    from rich.console import Console

    from shrinkfleet.cli.common import print_table
    from shrinkfleet.cli.run import summary_rows

    docs = {LONG: _doc(LONG)}
    summary = {"models": {LONG: {"gate": {"pruned-float32": "pass", LONG_VARIANT: "fail: accuracy_drop 5.00 > "
                                          "2.00 pts"}, "registry": {"serving": "pruned-float32"}}}}
    header, rows = summary_rows(docs, summary, wide)
    out = io.StringIO()
    print_table("Fleet variants", header, rows, left=("gate",), wide=wide, group="model",
                out=Console(file=out, width=width))
    lines = out.getvalue().splitlines()
    assert any(LONG in line for line in lines)
    if width > 80:  # one row per variant, its model's name whole in each
        assert all(LONG in line for line in lines if "pruned" in line or "teacher" in line)
    assert any(f"{LONG_VARIANT} *" in line for line in lines)
    served = [line for line in lines if "◆" in line]
    assert len(served) == 1 and "pruned-float32" in served[0]
    assert ("sparsity" in out.getvalue()) is wide and ("2.00 pts" in out.getvalue()) is wide
    if not wide:
        assert max(len(line.rstrip()) for line in lines) <= width


def test_production_off_the_smallest_is_explained():
    from shrinkfleet import report
    from shrinkfleet.config import GateConfig

    doc = _doc(LONG)
    assert report.served_note(doc, LONG_VARIANT, GateConfig()) == ""
    note = report.served_note(doc, "pruned-float32", GateConfig(max_accuracy_drop=0.02))
    assert note == (f"{LONG}: production serves pruned-float32, not the Pareto front's smallest {LONG_VARIANT}: "
                    f"{LONG_VARIANT} fails the gate (accuracy_drop 5.00 > 2.00 pts)")
    note = report.served_note(doc, "pruned-float32", GateConfig(max_accuracy_drop=0.1, objective="accuracy"))
    assert note.endswith("the gate's objective (accuracy) picked pruned-float32")


def _registered(root: Path, model: str) -> None:
    """Two registry versions of ``model``, v1 in production, as a fleet run leaves them (tags only)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from shrinkfleet import tracking
    from tests.conftest import mlflow_env_restored

    with mlflow_env_restored():
        mlflow.set_tracking_uri(tracking.tracking_uri(root))
        client = MlflowClient()
        client.create_registered_model(model)
        exp = client.create_experiment("runs")
        for variant, acc, git, epochs in ((LONG_VARIANT, 0.91, "0123456789abcdef", "2"),
                                          ("pruned-float32", 0.93, "fedcba9876543210+dirty", "3")):
            run = client.create_run(exp)  # (the model run: its parameters are the version's settings)
            for key, value in (("teacher.epochs", epochs), ("prune.target_sparsity", "0.5")):
                client.log_param(run.info.run_id, key, value)
            client.create_model_version(model, source=str(root / "m"), tags={
                "shrinkfleet.variant": variant, "shrinkfleet.metric.accuracy": str(acc),
                "shrinkfleet.metric.size_bytes": "2500", "shrinkfleet.metric.compression_ratio": "4.8",
                "shrinkfleet.metric.coded_bytes": "1234", "shrinkfleet.metric.sparsity": "0.7",
                "shrinkfleet.run.model": run.info.run_id,
                "shrinkfleet.git_sha": git, "shrinkfleet.promoted_at": "2026-12-01T22:05:41+00:00"})
        client.set_registered_model_alias(model, "production", "1")
        mlflow.set_tracking_uri("")


def test_status_and_history_at_80_columns(tmp_path, tiny_params):
    """The real command at COLUMNS=80: names whole, production marked, secondary columns only with --wide."""
    import json

    from tests.conftest import shrinkfleet_cmd

    tiny_params["models"] = {LONG: tiny_params["models"]["digits-mlp"]}
    root = _write(tmp_path, tiny_params)
    _registered(root, LONG)
    env = {"COLUMNS": "80"}
    status = shrinkfleet_cmd("status", cwd=root, env=env)
    assert status.returncode == 0, status.stderr
    row = next(line for line in status.stdout.splitlines() if line.strip().startswith(LONG))
    assert LONG_VARIANT in row and "v1" in row and "91.00" in row
    head = next(line for line in status.stdout.splitlines() if "variant" in line)
    assert "versions" not in head and "2026-12-01 22:05 UTC" not in status.stdout
    assert max(len(line.rstrip()) for line in status.stdout.splitlines()) <= 80
    wide = shrinkfleet_cmd("status", "--wide", cwd=root, env=env)
    assert "versions" in wide.stdout and "2026-12-01 22:05 UTC" in wide.stdout and "01234567" in wide.stdout
    assert "1,234" in row  # (coded bytes)
    assert "70%" in next(line for line in wide.stdout.splitlines() if line.strip().startswith(LONG))  # (sparsity)
    history = shrinkfleet_cmd("history", LONG, cwd=root, env=env)
    assert history.returncode == 0, history.stderr
    rows = [line for line in history.stdout.splitlines() if line.strip()[:2] in ("v1", "v2")]
    assert LONG_VARIANT in rows[0] and "◆ prod" in rows[0] and "pruned-float32" in rows[1]
    assert "1,234" in rows[0] and "70%" in rows[0]
    # What differs between the versions: the git state (v2 was made from a dirty tree) and the settings.
    text = " ".join(history.stdout.split())
    assert ("v2 (vs v1): git fedcba98 dirty (was 01234567); settings: teacher.epochs '2' -> '3'" in text), text
    assert "prune.target_sparsity" not in text
    assert max(len(line.rstrip()) for line in history.stdout.splitlines()) <= 80
    wide_history = " ".join(shrinkfleet_cmd("history", LONG, "--wide", cwd=root, env=env).stdout.split())
    assert "teacher.epochs '2' -> '3'" in wide_history and "fedcba98 dirty" in wide_history
    data = json.loads(shrinkfleet_cmd("status", "--json", cwd=root).stdout)
    assert data == [{"model": LONG, "versions": 2, "production": data[0]["production"]}]
    assert data[0]["production"]["variant"] == LONG_VARIANT and data[0]["production"]["version"] == "1"
    moves = json.loads(shrinkfleet_cmd("history", LONG, "--json", cwd=root).stdout)
    assert [v["variant"] for v in moves["versions"]] == [LONG_VARIANT, "pruned-float32"] and moves["production"] == "1"
    assert [v["git_dirty"] for v in moves["versions"]] == [False, True]
    assert moves["versions"][1]["settings_changed"] == {"teacher.epochs": {"before": "2", "now": "3"}}

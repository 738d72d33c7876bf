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

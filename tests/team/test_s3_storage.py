"""S3 storage end to end: a fleet run on a local S3 server, `shrinkfleet push`, a git clone, `shrinkfleet pull`.

moto in server mode plays MinIO: a real HTTP S3 API on loopback, reached by boto3, DVC
(dvc-s3) and MLflow's artifact client exactly as a team's store would be.
"""

from __future__ import annotations

import copy
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_PARAMS, make_project, shrinkfleet_cmd
from tests.servers import s3_server

pytestmark = pytest.mark.slow
MODEL = "digits-mlp"
BUCKET = "team-nightly"
PREFIX = "fleets/tiny"
KEY_ID = "AKIAFAKEKEYIDNEVERSHOWN"
SECRET = "fakeSecretAccessKeyThatMustNeverBeShown42"


def small_params(**storage) -> dict:
    """TINY_PARAMS with one model and two recipes: seconds per stage on 2 cores."""
    p = copy.deepcopy(TINY_PARAMS)
    del p["models"]["cancer-mlp"], p["datasets"]["cancer"]
    p["recipes"] = {k: p["recipes"][k] for k in ("pruned-int8", "pruned-clustered")}
    p["teacher"]["epochs"] = p["distill"]["epochs"] = 3
    p["gate"] = {"max_accuracy_drop": 1.0}  # tiny models: accept any drop, test the mechanics
    if storage:
        p["storage"] = storage
    return p


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def dvc_tracked_files(root: Path) -> dict[str, str]:
    """``relative path -> md5`` of every file under every output recorded in dvc.lock."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    files: dict[str, str] = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            target = root / out["path"]
            paths = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
            for p in paths:
                files[str(p.relative_to(root))] = _md5(p)
    return files


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", "-c", "user.name=night", "-c", "user.email=night@example.invalid", *args],
                          cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def aws_env(monkeypatch) -> dict[str, str]:
    """Fake credentials in the environment, as a team's CI secret store would put them there."""
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL", "SHRINKFLEET_S3_BUCKET"):
        monkeypatch.delenv(var, raising=False)
    return env


def test_run_push_clone_pull_restores_every_output(tmp_path, aws_env):
    import boto3
    from mlflow.tracking import MlflowClient

    with s3_server(tmp_path / "s3") as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        # The bucket is in params.yaml (committed); the endpoint comes from the environment.
        project = make_project(tmp_path / "project", small_params(s3_bucket=BUCKET, s3_prefix=PREFIX))
        env = {"SHRINKFLEET_S3_ENDPOINT_URL": endpoint}

        run = shrinkfleet_cmd("run", "--models", MODEL, cwd=project, env=env, timeout=600)
        assert run.returncode == 0, run.stdout + run.stderr
        # The run created the bucket and put every MLflow artifact under <prefix>/mlflow.
        assert BUCKET in [b["Name"] for b in s3.list_buckets()["Buckets"]]
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                                Prefix=f"{PREFIX}/mlflow/")
                for o in page.get("Contents", [])]
        assert any(k.endswith("/report/fleet.md") for k in keys), keys
        assert any(k.endswith("/model/pruned-int8.tflite") for k in keys), keys
        assert any("/pyfunc/" in k or "/models/" in k for k in keys), keys
        mlflow_client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
        exp = mlflow_client.get_experiment_by_name("shrinkfleet/tiny")
        assert exp.artifact_location == f"s3://{BUCKET}/{PREFIX}/mlflow/tiny"

        push = shrinkfleet_cmd("push", cwd=project, env=env, timeout=300)
        assert push.returncode == 0, push.stdout + push.stderr
        assert f"s3://{BUCKET}/{PREFIX}/dvc" in push.stdout
        dvc_keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                                    Prefix=f"{PREFIX}/dvc/")
                    for o in page.get("Contents", [])]
        assert dvc_keys, "dvc push sent nothing"

        # What a user commits after a night: code, params, dvc.yaml/dvc.lock, .dvc/config, DVC's .gitignores.
        with (project / ".gitignore").open("a") as fh:  # the local MLflow store is not part of the project
            fh.write("\n/mlflow.db\n/mlartifacts/\n/mlruns/\n/reports/\n__pycache__/\n")
        git("add", "-A", cwd=project)
        git("commit", "-q", "-m", "night 1", cwd=project)
        clone = tmp_path / "clone"
        git("clone", "-q", str(project), str(clone), cwd=tmp_path)
        config = (clone / ".dvc" / "config").read_text()
        assert f"url = s3://{BUCKET}/{PREFIX}/dvc" in config and endpoint in config
        original = dvc_tracked_files(project)
        in_git = {rel for rel in original if (clone / rel).exists()}
        assert in_git == {f"metrics/{MODEL}.json"}, in_git  # DVC metrics are cache: false; the rest is DVC's

        pull = shrinkfleet_cmd("pull", cwd=clone, env=env, timeout=300)
        assert pull.returncode == 0, pull.stdout + pull.stderr

        restored = dvc_tracked_files(clone)
        assert any(p.endswith(".tflite") for p in original) and any(p.startswith("data/prepared/") for p in original)
        assert restored == original
        status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=clone, capture_output=True, text=True)
        assert status.returncode == 0 and "up to date" in status.stdout.lower(), status.stdout + status.stderr

    # The fake credentials were used, but never printed, written or tracked.
    outputs = "".join(r.stdout + r.stderr for r in (run, push, pull))
    written = [(project / "reports" / "fleet.md").read_text(), config, (project / "params.yaml").read_text()]
    for secret in (KEY_ID, SECRET):
        assert secret not in outputs
        assert all(secret not in text for text in written)
    runs = mlflow_client.search_runs([exp.experiment_id], max_results=1000)
    assert len(runs) >= 3
    for r in runs:
        tracked = " ".join([*r.data.params.values(), *r.data.tags.values(), *r.data.params, *r.data.tags])
        assert KEY_ID not in tracked and SECRET not in tracked

"""Remote storage settings: params.yaml's storage: section, its environment overrides, credential checks."""

from __future__ import annotations

import copy

import pytest
import yaml

from shrinkfleet import remote, tracking
from shrinkfleet.config import ConfigError, StorageConfig, load_params, parse_params
from tests.conftest import REPO, TINY_PARAMS, make_project, shrinkfleet_cmd

STORAGE_VARS = ("SHRINKFLEET_S3_BUCKET", "SHRINKFLEET_S3_PREFIX", "SHRINKFLEET_S3_ENDPOINT_URL",
                "SHRINKFLEET_S3_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
                "AWS_DEFAULT_REGION")
FAKE_SECRET = "fakeSecretKeyThatMustNeverBePrinted0123456789"


def _params(**storage) -> dict:
    p = copy.deepcopy(TINY_PARAMS)
    if storage:
        p["storage"] = storage
    return p


@pytest.fixture
def no_aws(monkeypatch, tmp_path):
    """No credentials anywhere boto3 looks: variables, shared files, instance metadata."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_DEFAULT_PROFILE", "AWS_SECURITY_TOKEN", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE", *STORAGE_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_shipped_params_keep_storage_off():
    fleet = load_params(REPO / "params.yaml")
    assert fleet.storage == StorageConfig()
    assert remote.location(fleet.storage, environ={}) is None
    # AWS's own variables alone do not switch remote storage on.
    assert remote.location(fleet.storage, environ={"AWS_ENDPOINT_URL": "http://x:9000"}) is None


def test_params_alone_give_the_location():
    fleet = parse_params(_params(s3_bucket="team-bucket", s3_prefix="/nightly/fleet/",
                                 endpoint_url="http://minio:9000", region="eu-west-1"))
    loc = remote.location(fleet.storage, environ={})
    assert loc == remote.S3Location("team-bucket", "nightly/fleet", "http://minio:9000", "eu-west-1")
    assert loc.dvc_url == "s3://team-bucket/nightly/fleet/dvc"
    assert loc.mlflow_url == "s3://team-bucket/nightly/fleet/mlflow"


@pytest.mark.parametrize(("storage", "env", "expected"), [
    pytest.param({}, {"SHRINKFLEET_S3_BUCKET": "from-env"},
                 remote.S3Location("from-env", "shrinkfleet"), id="bucket-from-env-only"),
    pytest.param({"s3_bucket": "from-params", "s3_prefix": "p"},
                 {"SHRINKFLEET_S3_BUCKET": "from-env", "SHRINKFLEET_S3_PREFIX": "q/r"},
                 remote.S3Location("from-env", "q/r"), id="env-beats-params"),
    pytest.param({"s3_bucket": "bkt"}, {"AWS_ENDPOINT_URL": "http://aws-generic:1"},
                 remote.S3Location("bkt", "shrinkfleet", "http://aws-generic:1"), id="aws-endpoint-fallback"),
    pytest.param({"s3_bucket": "bkt"}, {"AWS_ENDPOINT_URL": "http://aws-generic:1",
                                      "AWS_ENDPOINT_URL_S3": "http://aws-s3:2"},
                 remote.S3Location("bkt", "shrinkfleet", "http://aws-s3:2"), id="aws-s3-endpoint-beats-generic"),
    pytest.param({"s3_bucket": "bkt", "endpoint_url": "http://params:3"}, {"AWS_ENDPOINT_URL": "http://aws:1"},
                 remote.S3Location("bkt", "shrinkfleet", "http://params:3"), id="params-endpoint-beats-aws"),
    pytest.param({"s3_bucket": "bkt", "endpoint_url": "http://params:3"},
                 {"SHRINKFLEET_S3_ENDPOINT_URL": "https://env:4"},
                 remote.S3Location("bkt", "shrinkfleet", "https://env:4"), id="shrinkfleet-endpoint-beats-params"),
    pytest.param({"s3_bucket": "bkt"}, {"AWS_DEFAULT_REGION": "us-west-2", "SHRINKFLEET_S3_REGION": "eu-north-1"},
                 remote.S3Location("bkt", "shrinkfleet", None, "eu-north-1"), id="region-override"),
    pytest.param({"s3_bucket": "bkt"}, {"AWS_DEFAULT_REGION": "us-west-2"},
                 remote.S3Location("bkt", "shrinkfleet"), id="aws-region-left-to-boto3"),
])
def test_environment_overrides(storage, env, expected):
    assert remote.location(StorageConfig(**storage), environ=env) == expected


@pytest.mark.parametrize(("env", "named"), [
    ({"SHRINKFLEET_S3_BUCKET": "Not_A_Bucket"}, "SHRINKFLEET_S3_BUCKET"),
    ({"SHRINKFLEET_S3_BUCKET": "ok-bucket", "SHRINKFLEET_S3_ENDPOINT_URL": "minio:9000"},
     "SHRINKFLEET_S3_ENDPOINT_URL"),
    ({"SHRINKFLEET_S3_BUCKET": "ok-bucket", "AWS_ENDPOINT_URL": "ftp://x"}, "AWS_ENDPOINT_URL"),
])
def test_bad_environment_value_names_the_variable(env, named):
    with pytest.raises(ConfigError) as exc:
        remote.location(StorageConfig(), environ=env)
    assert named in str(exc.value)


@pytest.mark.parametrize(("storage", "key"), [
    ({"s3_bucket": "UPPER"}, "storage.s3_bucket"),
    ({"s3_bucket": "bkt", "endpoint_url": "localhost:9000"}, "storage.endpoint_url"),
    ({"s3_bucket": "bkt", "s3_prefix": "a//b"}, "storage.s3_prefix"),
    ({"s3_bucket": "bkt", "buckett": "x"}, "storage.buckett"),
])
def test_bad_storage_key_names_the_path(storage, key):
    with pytest.raises(ConfigError) as exc:
        parse_params(_params(**storage))
    assert key in str(exc.value)


@pytest.mark.parametrize("key", ["aws_secret_access_key", "aws_access_key_id", "secret_key", "password",
                                 "aws_session_token", "credentials"])
def test_credential_in_storage_is_refused_by_name(key):
    with pytest.raises(ConfigError) as exc:
        parse_params(_params(s3_bucket="bkt", **{key: FAKE_SECRET}))
    msg = str(exc.value)
    assert f"storage.{key}" in msg and "AWS_ACCESS_KEY_ID" in msg
    assert FAKE_SECRET not in msg


def test_credential_at_top_level_is_refused_by_name():
    p = _params()
    p["aws_secret_access_key"] = FAKE_SECRET
    with pytest.raises(ConfigError) as exc:
        parse_params(p)
    assert "aws_secret_access_key" in str(exc.value) and FAKE_SECRET not in str(exc.value)


def test_missing_credentials_name_the_variables(no_aws):
    with pytest.raises(remote.RemoteError) as exc:
        remote.check_credentials(remote.S3Location("bkt", "p", "http://127.0.0.1:9"))
    msg = str(exc.value)
    assert "AWS_ACCESS_KEY_ID" in msg and "AWS_SECRET_ACCESS_KEY" in msg and "AWS_PROFILE" in msg


def test_unknown_profile_is_named(no_aws, monkeypatch):
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(remote.RemoteError) as exc:
        remote.check_credentials(remote.S3Location("bkt", "p"))
    assert "AWS_PROFILE" in str(exc.value) and "no-such-profile" in str(exc.value)


def test_credentials_from_environment_are_accepted(no_aws, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    remote.check_credentials(remote.S3Location("bkt", "p"))  # raises if not found


def test_activate_sets_mlflow_endpoint_only_with_storage(no_aws, monkeypatch):
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    assert remote.activate(StorageConfig()) is None
    import os

    assert "MLFLOW_S3_ENDPOINT_URL" not in os.environ
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    loc = remote.activate(StorageConfig(s3_bucket="bkt", endpoint_url="http://127.0.0.1:9"))
    assert loc is not None and os.environ["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9"


def test_new_sqlite_experiment_puts_artifacts_in_the_bucket(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    exp_id = tracking.setup(tmp_path, "tiny", artifact_root="s3://team-bucket/nightly/mlflow")
    assert MlflowClient().get_experiment(exp_id).artifact_location == "s3://team-bucket/nightly/mlflow/tiny"
    local = tracking.setup(tmp_path, "other")
    assert MlflowClient().get_experiment(local).artifact_location == (tmp_path / "mlartifacts").resolve().as_uri()


def test_cli_refuses_credentials_in_params_before_any_work(tmp_path):
    p = _params(s3_bucket="bkt", aws_secret_access_key=FAKE_SECRET)
    project = make_project(tmp_path / "p", p, dvc=False)
    for cmd in (["run", "--models", "digits-mlp"], ["validate"], ["push"]):
        r = shrinkfleet_cmd(*cmd, cwd=project, timeout=120)
        assert r.returncode == 2, (cmd, r.stdout + r.stderr)
        assert "storage.aws_secret_access_key" in r.stderr
        assert FAKE_SECRET not in r.stdout + r.stderr
    assert not (project / "data").exists() and not (project / "mlflow.db").exists()


def test_cli_without_credentials_stops_before_any_work(tmp_path, no_aws):
    project = make_project(tmp_path / "p", _params(s3_bucket="team-bucket"))
    r = shrinkfleet_cmd("run", "--models", "digits-mlp", cwd=project, timeout=120,
                        env={"SHRINKFLEET_S3_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "AWS_ACCESS_KEY_ID" in r.stderr and "AWS_SECRET_ACCESS_KEY" in r.stderr
    assert not (project / "data").exists() and not (project / "mlflow.db").exists()
    for cmd in ("push", "pull"):
        r = shrinkfleet_cmd(cmd, cwd=project, timeout=120, env={"SHRINKFLEET_S3_ENDPOINT_URL": "http://127.0.0.1:9"})
        assert r.returncode == 2 and "AWS_ACCESS_KEY_ID" in r.stderr, r.stdout + r.stderr


def test_push_without_storage_says_how_to_configure_it(tmp_path, no_aws):
    project = make_project(tmp_path / "p", _params())
    r = shrinkfleet_cmd("push", cwd=project, timeout=120)
    assert r.returncode == 2
    assert "storage.s3_bucket" in r.stderr and "SHRINKFLEET_S3_BUCKET" in r.stderr


def test_shipped_params_document_every_storage_key():
    text = (REPO / "params.yaml").read_text()
    raw = yaml.safe_load(text)
    assert raw["storage"] == {"s3_bucket": None, "s3_prefix": "shrinkfleet", "endpoint_url": None, "region": None}
    block = text.split("\nstorage:", 1)[1].split("\n\n", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.split(":")[0].strip() in raw["storage"]]
    assert len(lines) == 4 and all("#" in ln for ln in lines)

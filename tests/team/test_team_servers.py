"""A fleet run against a team's servers: MLflow and Prefect on PostgreSQL, MLflow artifacts on S3.

Every server is real and on loopback: a throw-away PostgreSQL cluster (databases ``mlflow``
and ``prefect``), moto's S3 server, ``mlflow server`` with proxied S3 artifacts and
``prefect server start``. The run reaches them only through ``MLFLOW_TRACKING_URI`` and
``PREFECT_API_URL``, and holds no S3 credentials: the MLflow server uploads for it.
"""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from tests.conftest import make_project, shrinkfleet_cmd
from tests.servers import mlflow_server, postgres, prefect_server, s3_server
from tests.team.test_s3_storage import KEY_ID, MODEL, SECRET, small_params

pytestmark = pytest.mark.slow
BUCKET = "team-mlflow"


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def test_fleet_run_on_team_servers(tmp_path):
    import boto3
    import psycopg2
    from mlflow.tracking import MlflowClient

    creds = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    with postgres(tmp_path / "pg") as pg, s3_server(tmp_path / "s3") as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                          region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        server_env = {**creds, "MLFLOW_S3_ENDPOINT_URL": endpoint}
        with mlflow_server(tmp_path / "mlflow", backend_store_uri=pg.url("mlflow", "postgresql+psycopg2"),
                           artifacts_destination=f"s3://{BUCKET}/mlflow", env=server_env) as tracking_uri, \
                prefect_server(tmp_path / "prefect", database_url=pg.url("prefect", "postgresql+asyncpg")) as api:
            project = make_project(tmp_path / "project", small_params())
            # The run itself has no S3 credentials at all: proxied artifacts go through the MLflow server.
            env = {"MLFLOW_TRACKING_URI": tracking_uri, "PREFECT_API_URL": api, "AWS_EC2_METADATA_DISABLED": "true",
                   "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}
            saved = {k: os.environ.pop(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if k in os.environ}
            try:
                run = shrinkfleet_cmd("run", "--models", MODEL, "--trigger", "team-test", cwd=project, env=env,
                                      timeout=600)
            finally:
                os.environ.update(saved)
            assert run.returncode == 0, run.stdout + run.stderr
            assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()

            # MLflow server: the fleet run, the model run, one run per variant, metrics, a registered version.
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            exp = client.get_experiment_by_name("shrinkfleet/tiny")
            assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:")
            runs = client.search_runs([exp.experiment_id], max_results=100)
            kinds = {}
            for r in runs:
                assert r.info.status == "FINISHED", (r.info.run_name, r.info.status)
                kinds.setdefault(r.data.tags.get("shrinkfleet.kind"), []).append(r)
            assert len(kinds["fleet"]) == 1 and len(kinds["model"]) == 1
            variants = {r.data.tags["shrinkfleet.variant"]: r for r in kinds["variant"]}
            assert {"teacher", "student", "pruned", "pruned-int8", "pruned-clustered"} <= set(variants)
            assert 0.0 < variants["pruned-int8"].data.metrics["accuracy"] <= 1.0
            assert variants["pruned-int8"].data.metrics["size_bytes"] > 0
            prod = client.get_model_version_by_alias(MODEL, "production")
            assert int(prod.version) == 1 and prod.status == "READY"
            fleet_run = kinds["fleet"][0]
            assert fleet_run.data.tags["trigger"] == "team-test"

            # Its artifacts are in the bucket, under the server's destination.
            keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="mlflow/")
                    for o in page.get("Contents", [])]
            assert any(k.endswith(f"{fleet_run.info.run_id}/artifacts/report/fleet.md") for k in keys), keys
            int8_id = variants["pruned-int8"].info.run_id
            assert any(k.endswith(f"{int8_id}/artifacts/model/pruned-int8.tflite") for k in keys), keys

            # Prefect server: the flow run the MLflow run points at, COMPLETED, with its task runs.
            flow_run_id = fleet_run.data.tags["prefect_flow_run_id"]
            flow_run = _get(f"{api}/flow_runs/{flow_run_id}")
            assert flow_run["state"]["type"] == "COMPLETED"
            assert _get(f"{api}/flows/{flow_run['flow_id']}")["name"] == "shrinkfleet-fleet"
            req = urllib.request.Request(f"{api}/task_runs/filter", method="POST",
                                         headers={"Content-Type": "application/json"},
                                         data=json.dumps({"flow_runs": {"id": {"any_": [flow_run_id]}}}).encode())
            with urllib.request.urlopen(req, timeout=10) as resp:
                task_runs = json.load(resp)
            # A task per worker as the run starts, the dataset's prepare task, the model's task, and its
            # five stages nested in it.
            assert sorted(t["name"] for t in task_runs) == sorted(
                [*(f"worker-{n}" for n in range(2)), "prepare-digits", "model-digits-mlp",
                 *(f"{s}-digits-mlp" for s in ("teacher", "distill", "prune", "compress", "evaluate"))])
            assert all(t["state"]["type"] == "COMPLETED" for t in task_runs)
            # No gpu limit on this server: the training stages ran untagged, asking it for no slots.
            assert not any(t["tags"] for t in task_runs)

        # Both servers kept their state in PostgreSQL, not in a file of their own.
        with psycopg2.connect(host=pg.host, port=pg.port, user=pg.user, dbname="mlflow") as conn, conn.cursor() as cur:
            cur.execute("select count(*) from runs where experiment_id = %s", (int(exp.experiment_id),))
            assert cur.fetchone()[0] == len(runs)
        with psycopg2.connect(host=pg.host, port=pg.port, user=pg.user, dbname="prefect") as conn, conn.cursor() as cur:
            cur.execute("select state_type from flow_run where id = %s", (flow_run_id,))
            assert cur.fetchone()[0] == "COMPLETED"

    # The S3 credentials lived only in the servers' environment.
    assert KEY_ID not in run.stdout + run.stderr and SECRET not in run.stdout + run.stderr
    for r in runs:
        tracked = " ".join([*r.data.params.values(), *r.data.tags.values()])
        assert KEY_ID not in tracked and SECRET not in tracked

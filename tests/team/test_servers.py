"""The loopback servers of tests/servers.py: each comes up, does its job, and is gone afterwards."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.servers import http_ok, mlflow_server, postgres, prefect_server, s3_server

pytestmark = pytest.mark.slow


def test_s3_server_stores_objects(tmp_path, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with s3_server(tmp_path) as endpoint:
        assert endpoint.startswith("http://127.0.0.1:")
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="probe")
        s3.put_object(Bucket="probe", Key="a/b.txt", Body=b"bytes")
        assert s3.get_object(Bucket="probe", Key="a/b.txt")["Body"].read() == b"bytes"
    assert not http_ok(endpoint)


def test_postgres_has_the_team_databases_and_is_removed(tmp_path):
    import psycopg2

    with postgres(tmp_path) as pg:
        for db in ("mlflow", "prefect"):
            with psycopg2.connect(host=pg.host, port=pg.port, user=pg.user, dbname=db) as conn, conn.cursor() as cur:
                cur.execute("select current_database(), inet_server_addr()::text")
                assert cur.fetchone() == (db, "127.0.0.1/32")
        assert pg.url("prefect", "postgresql+asyncpg").startswith("postgresql+asyncpg://postgres@127.0.0.1:")
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(host=pg.host, port=pg.port, user=pg.user, dbname="mlflow", connect_timeout=2)
    assert "database system is shut down" in (tmp_path / "postgres.log").read_text()


def test_prefect_server_on_sqlite_answers_and_stops(tmp_path):
    with prefect_server(tmp_path) as api:
        with urllib.request.urlopen(f"{api}/health", timeout=5) as resp:
            assert json.load(resp) is True
        assert (tmp_path / "prefect-home" / "prefect.db").is_file()
    assert not http_ok(f"{api}/health")


def test_mlflow_server_on_sqlite_answers_and_stops(tmp_path):
    from mlflow.tracking import MlflowClient

    with mlflow_server(tmp_path) as uri:
        exp = MlflowClient(tracking_uri=uri).create_experiment("probe")
        assert MlflowClient(tracking_uri=uri).get_experiment(exp).artifact_location.startswith("mlflow-artifacts:")
    assert not http_ok(f"{uri}/health")

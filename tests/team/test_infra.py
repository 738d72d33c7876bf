"""The team set-up files in infra/ validated as far as this machine allows.

No Docker engine or Kubernetes cluster runs here, so the files are checked against the
schemas their tools use: the Compose specification, Kubernetes' OpenAPI schemas (via
kubernetes-validate), hadolint for the Dockerfile, Prefect's own templating for the
Kubernetes work pool's job template, and ``bash -n`` for the worker's entry point.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
BIN = Path(sys.executable).parent
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests promise to work on


def _compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def test_compose_file_follows_the_compose_specification():
    out = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                          str(INFRA / "docker-compose.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_runs_the_team_services_on_postgres_and_s3():
    services = _compose()["services"]
    assert {"postgres", "minio", "create-bucket", "prefect-server", "mlflow", "worker"} <= set(services)
    prefect_db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.endswith("@postgres:5432/prefect")
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    # psycopg2 named: for a bare postgresql:// SQLAlchemy 2.1 picks psycopg 3, which is not installed
    assert "--backend-store-uri=postgresql+psycopg2://" in mlflow_cmd and "@postgres:5432/mlflow" in mlflow_cmd
    assert "--artifacts-destination=s3://" in mlflow_cmd
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # The init script creates the second database the Prefect server connects to.
    init = (INFRA / "postgres-init.sql").read_text()
    assert re.search(r"CREATE DATABASE prefect\b", init)
    worker = services["worker"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_compose_worker_requests_nvidia_gpus():
    devices = _compose()["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_compose_takes_every_secret_from_the_environment():
    """No password or key is written in the compose file: each is a ${VAR} the .env file provides."""
    text = (INFRA / "docker-compose.yml").read_text()
    secret_keys = ("PASSWORD", "SECRET", "ACCESS_KEY")
    for line in text.splitlines():
        key, _, value = line.strip().partition(":")
        if any(s in key for s in secret_keys) and value.strip():
            assert value.strip().startswith("${"), line
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    example = {line.split("=", 1)[0] for line in (INFRA / ".env.example").read_text().splitlines()
               if "=" in line and not line.startswith("#")}
    assert required and required <= example, required - example
    assert "infra/.env" in (REPO / ".gitignore").read_text().splitlines()


def test_dockerfile_passes_hadolint_and_matches_the_python_version():
    out = subprocess.run([str(BIN / "hadolint"), str(INFRA / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^FROM python:(\d+)\.(\d+)", text, re.M)
    assert base, "the image must start from an official python image"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    low, high = re.findall(r"(\d+)\.(\d+)", requires)
    assert tuple(map(int, low)) <= (int(base[1]), int(base[2])) < tuple(map(int, high)), requires
    assert 'pip install ".[gpu]"' in text
    for path in re.findall(r"^COPY (\S+)", text, re.M):
        assert (REPO / path).exists(), f"COPY {path}: not in the repository"


def test_worker_entrypoint_is_valid_bash():
    out = subprocess.run(["bash", "-n", str(INFRA / "worker-entrypoint.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _k8s_documents() -> list[dict]:
    docs = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def test_kubernetes_manifests_pass_the_api_schemas():
    import kubernetes_validate

    docs = _k8s_documents()
    assert {d["kind"] for d in docs} >= {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_schema_check_rejects_a_broken_manifest():
    """The check above can fail: the same validator refuses a wrong type in the worker Deployment."""
    import kubernetes_validate

    worker = next(d for d in _k8s_documents() if d["kind"] == "Deployment")
    worker["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, K8S_VERSION, strict=True)


def test_kubernetes_worker_runs_on_gpu_nodes_with_secrets_from_a_secret():
    worker = next(d for d in _k8s_documents() if d["kind"] == "Deployment")
    pod = worker["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert {"secretRef": {"name": "shrinkfleet-s3"}} in container["envFrom"]
    config = next(d for d in _k8s_documents() if d["kind"] == "ConfigMap")
    assert not any("SECRET" in k or "ACCESS_KEY" in k for k in config["data"])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomization_builds():
    out = subprocess.run(["kubectl", "kustomize", str(INFRA / "k8s")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(out.stdout) if d}
    assert {"Namespace", "ConfigMap", "Deployment"} <= kinds


def test_kubernetes_work_pool_template_renders_a_valid_gpu_job():
    """What a Kubernetes work pool's worker does with the template: fill it, then create the Job."""
    import kubernetes_validate
    from prefect.utilities.templating import apply_values, find_placeholders

    template = json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())
    variables = template["variables"]["properties"]
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= set(variables), used - set(variables)
    values = {k: v["default"] for k, v in variables.items() if "default" in v}
    values |= {"name": "shrinkfleet-nightly-1", "command": ["prefect", "flow-run", "execute"],
               "env": [{"name": "PREFECT__FLOW_RUN_ID", "value": "x"}], "labels": {"app": "shrinkfleet"}}
    job = apply_values(template["job_configuration"]["job_manifest"], values)
    job["metadata"]["name"] = job["metadata"].pop("generateName") + "abcde"
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1

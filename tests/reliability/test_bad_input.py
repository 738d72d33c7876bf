"""Bad input stops ``shrinkfleet run`` before any work: exit code 2, a message naming the cause, nothing written.

Every case runs the real CLI in a copy of one template project (git + DVC, and an
``mlflow.db`` whose registry already has a model with a ``production`` alias), and compares
a snapshot of the whole folder (every path, its size, mtime and content hash) before and after:
that covers params, the DVC cache and config, MLflow's database and every output folder.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from tests.conftest import TINY_PARAMS, make_project, shrinkfleet_cmd, without_root_privileges
from tests.servers import free_port

REGISTERED = "digits-mlp"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC project of the tiny fleet whose registry has ``digits-mlp`` v1 in production (no training)."""
    from mlflow.tracking import MlflowClient

    root = make_project(tmp_path_factory.mktemp("template") / "project", copy.deepcopy(TINY_PARAMS))
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.create_experiment("shrinkfleet/tiny", artifact_location=(root / "mlartifacts").as_uri())
    run = client.create_run(exp, run_name=REGISTERED, tags={"shrinkfleet.kind": "variant"})
    client.log_text(run.info.run_id, "placeholder flatbuffer\n", "model/model.tflite")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(REGISTERED)
    mv = client.create_model_version(REGISTERED, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(REGISTERED, "production", mv.version)
    return root


@pytest.fixture
def project(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "project", symlinks=True))


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (folders too): type, size, mtime_ns and, for files, a SHA-256 of the bytes."""
    snap: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files, *([""] if folder == str(root) else [])]:
            path = Path(folder, name)
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else ""
            snap[str(path.relative_to(root))] = (st.st_mode >> 12, st.st_size, st.st_mtime_ns, digest)
    return snap


def production_version(project: Path) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}",
                          registry_uri=f"sqlite:///{project / 'mlflow.db'}")
    return str(client.get_model_version_by_alias(REGISTERED, "production").version)


# ----------------------------------------------------------------------------- how each input is broken


def _params(project: Path, edit: Callable[[dict], None]) -> None:
    params = copy.deepcopy(TINY_PARAMS)
    edit(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _use_dataset(project: Path, spec: dict) -> None:
    """Point digits-mlp at a dataset ``mine`` (files under data/raw/, written by the case)."""
    def edit(p: dict) -> None:
        p["datasets"]["mine"] = spec
        p["models"]["digits-mlp"]["dataset"] = "mine"

    _params(project, edit)


def _raw(project: Path) -> Path:
    raw = project / "data" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    return raw


def _idx_gz(path: Path, magic: int, arr: np.ndarray) -> bytes:
    data = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(data, mtime=0))
    return path.read_bytes()


def _mnist(project: Path, images_magic: int = 2051, labels_magic: int = 2049) -> Path:
    folder = _raw(project) / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    _idx_gz(folder / "t10k-images-idx3-ubyte.gz", images_magic, rng.integers(0, 256, (40, 28, 28), dtype=np.uint8))
    _idx_gz(folder / "t10k-labels-idx1-ubyte.gz", labels_magic, (np.arange(40) % 10).astype(np.uint8))
    _use_dataset(project, {"source": "mnist", "path": "data/raw/mnist"})
    return folder


def unknown_key(project: Path) -> None:
    _params(project, lambda p: p["models"]["digits-mlp"]["prune"].update(target_sparsty=0.5))


def wrong_type(project: Path) -> None:
    _params(project, lambda p: p["teacher"].update(epochs="four"))


def sparsity_of_one(project: Path) -> None:
    _params(project, lambda p: p["models"]["cancer-mlp"]["prune"].update(target_sparsity=1.0))


def temperature_zero(project: Path) -> None:
    _params(project, lambda p: p["distill"].update(temperature=0))


def empty_fleet(project: Path) -> None:
    _params(project, lambda p: p.update(models={}))


def duplicate_model_names(project: Path) -> None:
    # models: is the last section, so an indented entry appended to the file belongs to it.
    with (project / "params.yaml").open("a") as f:
        f.write("  digits-mlp: {dataset: cancer, teacher: {arch: mlp}, student: {arch: mlp}, "
                "distill: {}, prune: {}, quantize: {}}\n")


def missing_dataset_file(project: Path) -> None:
    _use_dataset(project, {"source": "npz", "path": "data/raw/mine.npz"})


def truncated_gz(project: Path) -> None:
    images = _mnist(project) / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])


def wrong_idx_magic(project: Path) -> None:
    _mnist(project, labels_magic=2051)


def npz_without_the_arrays(project: Path) -> None:
    np.savez(_raw(project) / "mine.npz", features=np.zeros((10, 3)), target=np.zeros(10))
    _use_dataset(project, {"source": "npz", "path": "data/raw/mine.npz"})


def labels_outside_the_class_range(project: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(_raw(project) / "mine.npz", x_train=rng.normal(size=(30, 4)), y_train=np.arange(30) % 3,
             x_test=rng.normal(size=(6, 4)), y_test=np.array([0, 1, 2, 0, 1, 7]))
    _use_dataset(project, {"source": "npz", "path": "data/raw/mine.npz"})


def nan_features(project: Path) -> None:
    x = np.random.default_rng(0).normal(size=(30, 4))
    x[[3, 7], [0, 2]] = np.nan
    np.savez(_raw(project) / "mine.npz", x=x, y=np.arange(30) % 2)
    _use_dataset(project, {"source": "npz", "path": "data/raw/mine.npz"})


def output_folder_is_a_file(project: Path) -> None:
    # A file where a folder belongs cannot be written into, not even by root (CI runs as root).
    (project / "models").write_text("not a folder\n")


CASES = [
    (unknown_key, "models.digits-mlp.prune.target_sparsty: unknown key"),
    (wrong_type, "teacher.epochs: must be a valid integer"),
    (sparsity_of_one, "models.cancer-mlp.prune.target_sparsity: must be less than 1"),
    (temperature_zero, "distill.temperature: must be greater than 0"),
    (empty_fleet, "models: the fleet is empty"),
    (duplicate_model_names, "models.digits-mlp: duplicate key (line"),
    (missing_dataset_file, "datasets.mine.path: {project}/data/raw/mine.npz does not exist"),
    (truncated_gz, "datasets.mine: {project}/data/raw/mnist/t10k-images-idx3-ubyte.gz: cannot read IDX file: "
                   "truncated or corrupt gzip"),
    (wrong_idx_magic, "datasets.mine: {project}/data/raw/mnist/t10k-labels-idx1-ubyte.gz: wrong IDX magic number "
                      "2051, expected 2049"),
    (npz_without_the_arrays, "datasets.mine: {project}/data/raw/mine.npz: needs arrays x_train/y_train "
                             "(+ x_test/y_test) or x/y; it has ['features', 'target']"),
    (labels_outside_the_class_range, "datasets.mine: {project}/data/raw/mine.npz: test label 7 is outside the training "
                                     "classes 0..2"),
    (nan_features, "datasets.mine: {project}/data/raw/mine.npz: x/y: 2 feature values are NaN or infinite"),
    (output_folder_is_a_file, "models: is a file, not a folder; a run writes models and their variants into models/"),
]


def run_and_check_nothing_written(project: Path, expected: str, env: dict | None = None,
                                  prefix: tuple[str, ...] = ()) -> str:
    before = snapshot(project)
    mark = uuid.uuid4().hex  # inherited by every process the run starts (its temporary Prefect server too)
    result = shrinkfleet_cmd("run", cwd=project, env={"SHRINKFLEET_S3_BUCKET": "", **(env or {}),
                                                      "SHRINKFLEET_TEST_MARK": mark}, prefix=prefix)
    message = result.stderr
    assert result.returncode == 2, result.stdout + message
    assert expected in message, message
    assert "Traceback" not in message
    assert snapshot(project) == before, "the failed run wrote into the project"
    assert not processes_marked(mark), "the failed run left processes running"
    return message


def processes_marked(mark: str) -> list[str]:
    """The command lines of the running processes whose environment holds ``SHRINKFLEET_TEST_MARK=mark``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.environ().get("SHRINKFLEET_TEST_MARK") == mark:
                found.append(" ".join(proc.info["cmdline"] or []))
        except psutil.Error:  # (gone meanwhile, or not ours to read)
            continue
    return found


@pytest.mark.parametrize(("break_input", "expected"), CASES, ids=[case[0].__name__ for case in CASES])
def test_bad_input_exits_2_naming_the_cause_and_writes_nothing(project, break_input, expected):
    break_input(project)
    run_and_check_nothing_written(project, expected.format(project=project))
    if break_input in (duplicate_model_names, nan_features):
        assert production_version(project) == "1"


def test_read_only_output_folder(project):
    """Run without root's power over permission bits (CI runs as root), as any user of a shared machine."""
    prefix = without_root_privileges()
    (project / "metrics").mkdir()
    (project / "metrics").chmod(0o500)
    try:
        run_and_check_nothing_written(project, "metrics: folder is not writable; a run writes metrics into metrics/",
                                      prefix=prefix)
    finally:
        (project / "metrics").chmod(0o700)


def test_missing_s3_credentials(project, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)  # unset, as on a machine that never had them
    endpoint = f"http://127.0.0.1:{free_port()}"
    env = {
        "SHRINKFLEET_S3_BUCKET": "some-bucket", "SHRINKFLEET_S3_ENDPOINT_URL": endpoint,
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-creds"),
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookup (and its timeout) off EC2
    }
    message = run_and_check_nothing_written(
        project, f"remote storage: no S3 credentials for s3://some-bucket/shrinkfleet at {endpoint}", env)
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message and "AWS_PROFILE" in message
    assert "remote" not in (project / ".dvc" / "config").read_text()


def test_unreachable_s3_endpoint_leaves_dvc_config_alone(project, tmp_path):
    """Checked last, after every local check passed; .dvc/config gets the remote only once the bucket answers."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    env = {
        "SHRINKFLEET_S3_BUCKET": "some-bucket", "SHRINKFLEET_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",  # fake: nothing accepts them
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-creds"),
        "AWS_MAX_ATTEMPTS": "1",  # one refused connection is enough here
    }
    run_and_check_nothing_written(project, f"remote storage: cannot reach S3 at {endpoint}", env)
    assert "remote" not in (project / ".dvc" / "config").read_text()


def test_unreachable_mlflow_server(project):
    uri = f"http://127.0.0.1:{free_port()}"
    message = run_and_check_nothing_written(
        project, f"MLFLOW_TRACKING_URI={uri}: no MLflow server answers", {"MLFLOW_TRACKING_URI": uri})
    assert "unset MLFLOW_TRACKING_URI" in message
    assert production_version(project) == "1"


def test_every_problem_is_reported_at_once(project):
    nan_features(project)
    output_folder_is_a_file(project)
    uri = f"http://127.0.0.1:{free_port()}"
    message = run_and_check_nothing_written(project, "cannot start:", {"MLFLOW_TRACKING_URI": uri})
    for cause in ("feature values are NaN", "models: is a file", f"MLFLOW_TRACKING_URI={uri}"):
        assert cause in message


def test_malformed_fault_injection_setting(project):
    message = run_and_check_nothing_written(project, "SHRINKFLEET_FAULTS: 'teacher=sometimes'",
                                            {"SHRINKFLEET_FAULTS": "teacher=sometimes"})
    assert "count, fail, hang or delay:S" in message

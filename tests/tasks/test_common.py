"""What every stage shares: which failures are retried, and the run's one reading of params.yaml."""

from __future__ import annotations

import logging
import sqlite3

import httpx
import pytest
import yaml

from shrinkfleet import faults
from shrinkfleet.config import ConfigError, load_snapshot
from shrinkfleet.datasets import DatasetError
from tasks.common import execute, is_transient


@pytest.mark.parametrize("exc", [
    ConnectionRefusedError("server down"),
    TimeoutError("timed out"),
    OSError(28, "No space left on device"),
    MemoryError(),
    faults.InjectedFault("injected"),
    httpx.ConnectError("connection refused"),
    sqlite3.OperationalError("database is locked"),
], ids=lambda e: type(e).__name__)
def test_failures_of_the_machine_or_network_are_retried(exc):
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    AttributeError("'NoneType' object has no attribute 'shape'"),  # a bug
    RuntimeError("converter failed"),
    ZeroDivisionError(),
    ValueError("shapes (3,) and (4,) not aligned"),
    KeyError("teacher"),
    ConfigError("models.x.prune: bad"),
    DatasetError("data/raw/x.csv: no label column"),
    FileNotFoundError("data/raw/x.csv"),
    PermissionError("models/"),
    faults.PermanentFault("injected"),
], ids=lambda e: type(e).__name__)
def test_bugs_and_bad_inputs_fail_at_once(exc):
    assert not is_transient(exc)


def test_tensorflow_resource_exhaustion_is_retried_and_its_invalid_argument_is_not():
    import tensorflow as tf

    assert is_transient(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor"))
    assert not is_transient(tf.errors.InvalidArgumentError(None, None, "incompatible shapes"))


def test_a_stage_runs_with_the_run_s_snapshot_even_after_params_yaml_is_edited(tmp_path, tiny_params, caplog):
    """The run read params.yaml once; an edit while it runs reaches no stage, and DVC records nothing
    for a stage whose settings no longer match the file (the next run checks it again)."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params))
    snapshot = load_snapshot(params)
    seen = {}

    def stage_fn(ctx, target):
        seen["sparsity"] = ctx.fleet.resolve(target).prune.target_sparsity
        seen["base_dir"] = ctx.base_dir
        return {"done": True}

    before = tiny_params["prune"]["target_sparsity"]
    tiny_params["prune"]["target_sparsity"] = 0.37
    params.write_text(yaml.safe_dump(tiny_params))
    with caplog.at_level(logging.WARNING, logger="shrinkfleet"):
        # use_dvc=True in a folder that is no DVC repository: it works only because DVC is left out.
        out = execute("prune", "digits-mlp", str(tmp_path), snapshot, stage_fn, use_dvc=True, force=False)
    assert out["status"] == "ran" and out["done"] is True
    assert seen == {"sparsity": before, "base_dir": tmp_path.resolve()} and before != 0.37
    assert "params.yaml changed since this run read it: prune-digits-mlp" in caplog.text
    assert "not recorded in DVC" in caplog.text

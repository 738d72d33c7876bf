"""The fleet flow survives what `serve` does to it: pickled and validated again in a fresh process.

With ``from __future__ import annotations`` in flows/fleet.py, its ``Literal[...]`` parameters
arrived as strings the new process could not resolve, and every served run failed before any
work ("`Fleet_FlowModel` is not fully defined"). tests/team/test_nightly_deployment.py runs a
served schedule to completion; this is the fast check of the same cause.
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

# What Prefect's runner does for every run `serve` starts: the flow object, cloudpickled, to a spawned process.
PICKLE = """
import sys, cloudpickle, flows.fleet as fleet
sys.stdout.buffer.write(cloudpickle.dumps(fleet.fleet_flow))
"""
VALIDATE = """
import sys, cloudpickle
flow = cloudpickle.loads(sys.stdin.buffer.read())
print(flow.validate_parameters({"params_file": "p.yaml", "models": ["a"], "engine": "dask", "if_busy": "refuse"}))
"""


def test_flow_parameters_validate_after_the_flow_is_shipped_by_value(tmp_path):
    blob = subprocess.run([sys.executable, "-c", PICKLE], cwd=REPO, capture_output=True, check=True).stdout
    out = subprocess.run([sys.executable, "-c", VALIDATE], cwd=tmp_path, input=blob, capture_output=True)
    assert out.returncode == 0, out.stderr.decode()
    assert "'engine': 'dask'" in out.stdout.decode() and "'models': ['a']" in out.stdout.decode()

"""GPU slots on a real Prefect server: the worker entry point sets them, the `gpu` tag obeys them.

No GPU is needed: the limit is on Prefect's side. With the `gpu` tag limited to one slot,
two models on two worker processes never train at the same time; that is exactly what a
one-GPU worker needs.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import make_project, shrinkfleet_cmd
from tests.servers import prefect_server, serve

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _client_call(api: str, fn):
    """Run ``fn(client)`` against the server at ``api`` with Prefect's async client."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            return await fn(client)

    with temporary_settings({PREFECT_API_URL: api}):
        return asyncio.run(go())


def test_worker_entrypoint_creates_the_pool_and_the_gpu_limit(tmp_path):
    with prefect_server(tmp_path) as api:
        env = {"PREFECT_API_URL": api, "SHRINKFLEET_POOL": "gpu-test", "GPU_SLOTS": "2",
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PREFECT_HOME": str(tmp_path / "home")}

        def ready() -> bool:
            try:
                pool = _client_call(api, lambda c: c.read_work_pool("gpu-test"))
                limit = _client_call(api, lambda c: c.read_concurrency_limit_by_tag("gpu"))
            except Exception:
                return False
            # (and the line saying so printed: the script prints it after creating the limit)
            log = tmp_path / "worker.log"
            return (pool is not None and limit is not None and log.exists()
                    and "training task(s) at once" in log.read_text())

        with serve(["bash", str(REPO / "infra" / "worker-entrypoint.sh")], tmp_path / "worker.log", ready,
                   "worker entry point", env=env, cwd=tmp_path, timeout=120):
            pool = _client_call(api, lambda c: c.read_work_pool("gpu-test"))
            limit = _client_call(api, lambda c: c.read_concurrency_limit_by_tag("gpu"))
        assert pool.type == "process"
        assert limit.concurrency_limit == 2
        log = (tmp_path / "worker.log").read_text()
        assert "at most 2 training task(s) at once (tag gpu)" in log


def test_one_gpu_slot_means_one_training_task_at_a_time(tmp_path, tiny_params):
    tiny_params["recipes"] = {"pruned-int8": {"steps": ["int8"]}}
    project = make_project(tmp_path / "p", tiny_params, dvc=False)
    # A waiting task asks again after this many seconds (Prefect's default is 30).
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.fleet import gpu_limit_exists

    with prefect_server(tmp_path, env={"PREFECT_SERVER_TASKS_TAG_CONCURRENCY_SLOT_WAIT_SECONDS": "1"}) as api:
        # What a run asks once, as it starts: it tags its training stages gpu only when the limit exists
        # (tests/team/test_team_servers.py checks the untagged task runs of a run without one).
        with temporary_settings({PREFECT_API_URL: api}):
            assert gpu_limit_exists() is False
        _client_call(api, lambda c: c.create_concurrency_limit(tag="gpu", concurrency_limit=1))
        with temporary_settings({PREFECT_API_URL: api}):
            assert gpu_limit_exists() is True
        result = shrinkfleet_cmd("run", "--no-dvc", "--workers", "2", cwd=project, env={"PREFECT_API_URL": api})
        assert result.returncode == 0, result.stdout + result.stderr

        async def task_runs(client):
            return await client.read_task_runs()

        runs = _client_call(api, task_runs)
    training = sorted((r.start_time, r.end_time, r.name) for r in runs if "gpu" in r.tags)
    assert len(training) == 8  # teacher, distill, prune, compress for each of the two models
    assert all(r.state.is_completed() for r in runs)
    for (_, end, name), (start, _, nxt) in itertools.pairwise(training):
        assert end <= start, f"{name} and {nxt} trained at the same time with one gpu slot"

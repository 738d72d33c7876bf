"""How the flow hands stages to its workers: the dispatch queue, the worker pool, the temporary API."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import threading
import time
import uuid

import pytest
from prefect.futures import PrefectConcurrentFuture

import flows.fleet as fleet_module
from flows.fleet import Dispatcher, FullPool, in_flight_limit
from shrinkfleet.config import RunConfig


class FakeRunner:
    """Records what is submitted; the test finishes the futures by hand."""

    def __init__(self):
        self.submitted: list[tuple[str, list]] = []
        self.futures: dict[str, cf.Future] = {}

    def submit(self, task, parameters, wait_for=None):
        inner = cf.Future()
        self.submitted.append((parameters["name"], list(wait_for or [])))
        self.futures[parameters["name"]] = inner
        return PrefectConcurrentFuture(task_run_id=uuid.uuid4(), wrapped_future=inner)


def test_dispatch_keeps_at_most_one_stage_per_worker_and_the_furthest_model_first():
    runner = FakeRunner()
    d = Dispatcher(runner, limit=2)
    for key, name in [((-2, 0), "teacher-a"), ((-2, 1), "teacher-b"), ((-3, 1), "distill-b"), ((-1, 0), "prep")]:
        d.add(key, task=None, parameters={"name": name}, owner=name)
    d.pump()
    assert [n for n, _ in runner.submitted] == ["distill-b", "teacher-a"]  # smallest keys, no more than 2

    runner.futures["teacher-a"].set_result({"status": "ran"})
    future, owner = d.next_done()
    assert owner == "teacher-a"
    d.add((-3, 0), task=None, parameters={"name": "distill-a"}, owner="distill-a", upstream=future)
    d.pump()
    assert [n for n, _ in runner.submitted][2:] == ["distill-a"]  # deeper than teacher-b: goes first
    assert runner.submitted[2][1] == [future]  # the finished upstream is still its wait_for
    assert d.busy()


def test_one_worker_gets_no_wait_for_and_an_existing_dask_cluster_no_limit():
    runner = FakeRunner()
    d = Dispatcher(runner, limit=2, workers=1)
    d.add((0,), task=None, parameters={"name": "a"}, owner="a")
    d.pump()
    runner.futures["a"].set_result({})
    up, _ = d.next_done()
    d.add((0,), task=None, parameters={"name": "b"}, owner="b", upstream=up)
    d.pump()
    assert runner.submitted[-1] == ("b", [])
    assert in_flight_limit(RunConfig(workers=3)) == 4  # one queued: a worker never waits for the flow
    assert in_flight_limit(RunConfig(engine="dask", dask_address="tcp://10.0.0.5:8786")) is None


def _pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_worker_pool_starts_full_and_replaces_workers_after_their_quota():
    with FullPool(max_workers=2, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=2) as pool:
        first = pool.submit(_pid_after, 0.0)
        first.result(timeout=120)
        assert len(pool._processes) == 2  # both workers started with the first task
        pids = [f.result(timeout=120) for f in [pool.submit(_pid_after, 0.02) for _ in range(9)]]
    # 10 tasks, 2 per worker: at least 5 different processes, and every task finished.
    assert len(pids) == 9 and len(set(pids) | {first.result()}) >= 5


def _tensorflow_loaded() -> bool:
    import sys

    return "tensorflow" in sys.modules and "tasks.prune" in sys.modules


@pytest.fixture
def no_early_pool():
    yield
    fleet_module.discard_early_workers()


def test_an_early_pool_starts_its_workers_loaded_and_the_flow_takes_it(no_early_pool):
    run = RunConfig(workers=1)
    fleet_module.start_workers_early(run)
    pool = fleet_module._early_pool
    assert len(pool._executor._processes) == 1  # started before any stage was submitted
    # The initializer ran before this first call: TensorFlow and the stage modules are there already.
    assert pool._executor.submit(_tensorflow_loaded).result(timeout=300) is True
    with fleet_module._stage_runner(run) as runner:
        assert runner is pool
    assert fleet_module._early_pool is None and pool._executor is None  # the flow's exit stopped it


def test_a_pool_starts_no_worker_until_a_stage_or_an_early_start_asks():
    """A night with nothing to run enters the pool too: it must not load TensorFlow twice for nothing."""
    with fleet_module.WorkerPool(max_workers=2) as pool:
        assert not pool._executor._processes


def test_an_early_pool_for_another_run_config_is_stopped_not_used(no_early_pool):
    fleet_module.start_workers_early(RunConfig(workers=1))
    early = fleet_module._early_pool
    processes = list(early._executor._processes.values())
    with fleet_module._stage_runner(RunConfig(workers=2)) as runner:
        assert runner is not early and runner._max_workers == 2
        assert not any(p.is_alive() for p in processes)  # terminated, not left loading TensorFlow
    fleet_module.start_workers_early(RunConfig(workers=1))
    processes = list(fleet_module._early_pool._executor._processes.values())
    fleet_module.discard_early_workers()  # what run_fleet does when the flow never started
    assert fleet_module._early_pool is None and not any(p.is_alive() for p in processes)


def test_the_temporary_api_is_visible_to_threads(tmp_path, monkeypatch):
    """Prefect's own threads (the process pool's message forwarder) must not start a server of their own."""
    from prefect.settings import get_current_settings

    from flows.server import prefect_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    seen: list[str | None] = []
    before = get_current_settings().api.url
    with prefect_api() as url:
        t = threading.Thread(target=lambda: seen.append(get_current_settings().api.url))
        t.start()
        t.join()
    assert seen == [url]
    # Afterwards the process is as it was: later runs (and tests) must not see a stopped server.
    assert "PREFECT_API_URL" not in os.environ and get_current_settings().api.url == before != url
    t = threading.Thread(target=lambda: seen.append(get_current_settings().api.url))
    t.start()
    t.join()
    assert seen == [url, before]  # a thread started afterwards sees the settings of before, too


def test_prefect_clients_of_a_worker_share_one_tls_context(monkeypatch):
    import ssl

    import prefect.client.orchestration as orchestration
    from prefect.client.orchestration import SyncPrefectClient

    from tasks.stages import reuse_tls_context

    made = []
    real = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: made.append(k) or real(*a, **k))
    monkeypatch.setattr(orchestration, "ssl", ssl)  # (restored after the test, with the real module)
    SyncPrefectClient("http://127.0.0.1:9/api")
    SyncPrefectClient("http://127.0.0.1:9/api")
    assert len(made) == 2  # Prefect alone: a context per client
    made.clear()
    reuse_tls_context()
    first, second = SyncPrefectClient("http://127.0.0.1:9/api"), SyncPrefectClient("http://127.0.0.1:9/api")
    assert len(made) == 1 and made[0].get("cafile")  # one, still verifying against the CA bundle
    assert first is not second and orchestration.ssl.SSLContext is ssl.SSLContext


def test_a_worker_gets_the_settings_object_itself_and_the_same_settings():
    import pickle

    from prefect.context import SettingsContext, hydrated_context, serialize_context
    from prefect.settings import PREFECT_API_URL, PREFECT_TASK_DEFAULT_RETRIES, get_current_settings, temporary_settings

    from flows.fleet import settings_by_reference

    prefect_way = SettingsContext.serialize
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_TASK_DEFAULT_RETRIES: 4}):
        with settings_by_reference():
            sent = pickle.dumps(serialize_context())
        assert isinstance(serialize_context()["settings_context"]["settings"], dict)  # Prefect's way again
        expected = get_current_settings()
    assert SettingsContext.serialize is prefect_way
    with hydrated_context(pickle.loads(sent)):  # what the worker does with it
        got = get_current_settings()
        assert got == expected and got.api.url == "http://127.0.0.1:9/api" and got.tasks.default_retries == 4


"""How the flow hands models to Prefect's task runners: the runner sequence, the progress file, the temporary API."""

from __future__ import annotations

import concurrent.futures as cf
import os
import pickle
import threading
import uuid
from typing import ClassVar

from prefect.futures import PrefectConcurrentFuture
from prefect.task_runners import ProcessPoolTaskRunner

import flows.fleet as fleet_module
from flows.fleet import ProgressFile, Runners, models_per_pool
from shrinkfleet.config import RunConfig
from tasks.stages import StageFailed, model_task


class FakeRunner:
    """A task runner that records what it is given; the test finishes the futures by hand."""

    made: ClassVar[list[FakeRunner]] = []

    def __init__(self):
        self.submitted: list[str] = []
        self.futures: list[cf.Future] = []
        self.entered = self.exited = False
        FakeRunner.made.append(self)

    def __enter__(self):
        self.entered = True
        return self

    def __exit__(self, *exc):
        self.exited = True

    def submit(self, task, parameters, wait_for=None):
        inner = cf.Future()
        self.submitted.append(parameters["name"])
        self.futures.append(inner)
        return PrefectConcurrentFuture(task_run_id=uuid.uuid4(), wrapped_future=inner)


def test_a_fresh_runner_takes_over_once_the_current_one_ran_its_share_of_models(monkeypatch):
    FakeRunner.made = []
    monkeypatch.setattr(fleet_module, "task_runner", lambda run: FakeRunner())
    runners = Runners(RunConfig(workers=2, worker_max_models=1))  # 2 models per runner
    assert FakeRunner.made == []  # nothing starts before the first task
    prep = runners.submit(None, {"name": "prepare"}, model=False)
    a = runners.submit(None, {"name": "a"}, model=True, wait_for=[prep])
    b = runners.submit(None, {"name": "b"}, model=True)
    assert runners.submit(None, {"name": "c"}, model=True) is None  # its share taken, still busy
    first = FakeRunner.made[0]
    assert first.submitted == ["prepare", "a", "b"] and not first.exited
    for future in (prep, a):
        runners.finished(future)
    assert runners.submit(None, {"name": "c"}, model=True) is None  # b still runs on it
    runners.finished(b)
    c = runners.submit(None, {"name": "c"}, model=True)
    assert c is not None and first.exited and len(FakeRunner.made) == 2
    assert FakeRunner.made[1].submitted == ["c"] and FakeRunner.made[1].entered
    runners.close()
    assert FakeRunner.made[1].exited


def test_models_per_pool_follows_run_config():
    assert models_per_pool(RunConfig(workers=3, worker_max_models=4)) == 12
    assert models_per_pool(RunConfig(workers=3, worker_max_models=0)) is None  # one pool for the whole run
    assert models_per_pool(RunConfig(engine="dask", workers=3)) is None  # Dask manages its workers itself


def test_the_process_engine_is_prefects_own_process_pool():
    assert fleet_module.task_runner(RunConfig(workers=3)) == ProcessPoolTaskRunner(max_workers=3)


def test_the_progress_file_yields_whole_lines_once(tmp_path):
    stale = tmp_path / ".shrinkfleet" / "progress" / "1-2.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text('{"model": "a", "stage": "teacher"}\n')  # a run that died left it
    progress = ProgressFile(tmp_path)
    assert not stale.exists()
    assert progress.read() == []  # nothing written yet
    with progress.path.open("a") as f:
        f.write('{"model": "a", "stage": "teacher"}\n{"model": "a", "sta')
    assert progress.read() == [{"model": "a", "stage": "teacher"}]
    with progress.path.open("a") as f:
        f.write('ge": "distill"}\n')
    assert progress.read() == [{"model": "a", "stage": "distill"}]
    assert progress.read() == []
    progress.remove()
    assert not progress.path.exists()


def test_a_stage_failure_reaches_the_flow_with_its_stage_and_what_finished_before():
    done = {"teacher": {"status": "ran", "seconds": 1.0}}
    err = pickle.loads(pickle.dumps(StageFailed("distill", "ValueError: bad", done)))
    assert (err.stage, err.error, err.done) == ("distill", "ValueError: bad", done)
    assert str(err) == "distill failed: ValueError: bad"


def test_a_model_task_has_no_tag_of_its_own():
    """Only its nested training stages carry ``gpu``: a model waiting for a slot would hold a worker."""
    assert not model_task.tags


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

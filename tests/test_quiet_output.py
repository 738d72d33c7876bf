"""What `shrinkfleet run` shows: only shrinkfleet's own lines; the libraries' chatter goes to reports/run.log."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_PARAMS, make_project
from tests.test_cli import _in_a_terminal

EXE = str(Path(sys.executable).with_name("shrinkfleet"))
# What the issue saw on screen during a run, from MLflow, DVC, TFMOT and TensorFlow.
NOISE = ("UserWarning", "Add type hints to the `predict` method", "An input example was not provided",
         "Downloading artifacts", "Registered model", "Created version", "Collecting files and computing hashes",
         "Committing", "Waiting to acquire lock", "Input layer does not contain zero weights", "cuInit",
         "oneDNN", "WARNING:root:", "{'")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _env(root: Path, tmp: Path) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    return {**keep, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_HOME": str(tmp / "prefect"), "COLUMNS": "120"}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, str]:
    """A first `shrinkfleet run` of a one-model fleet, DVC on, in a pseudo-terminal: its project and screen."""
    tmp = tmp_path_factory.mktemp("quiet")
    params = copy.deepcopy(TINY_PARAMS)
    del params["models"]["cancer-mlp"]
    params["recipes"] = {"pruned-int8": {"steps": ["int8"]}}
    for section in ("teacher", "distill", "prune"):
        params[section]["epochs"] = 1
    params["gate"] = {"max_accuracy_drop": 1.0}  # (any variant passes: a version is registered and promoted)
    root = make_project(tmp / "project", params)
    screen = _in_a_terminal([EXE, "run", "--root", str(root)], _env(root, tmp), timeout=600)
    return root, ANSI.sub("", screen)


@pytest.mark.slow
def test_a_run_in_a_terminal_shows_only_our_lines_and_logs_the_rest(first_run):
    root, screen = first_run
    assert "✓ digits-mlp: ran prepare, teacher, distill, prune, compress, evaluate" in screen, screen[-3000:]
    assert "Fleet variants" in screen and "pruned-int8" in screen
    shown = [noise for noise in NOISE if noise in screen]
    assert shown == [], screen[-4000:]
    # The registry's line comes after the finished bars (the last redraw says done), not among them.
    assert screen.index("↑ digits-mlp promoted v1") > screen.rindex("digits-mlp: done")
    log = (root / "reports" / "run.log").read_text()
    for line in ("Add type hints to the `predict` method", "An input example was not provided",
                 "Registered model 'digits-mlp' already exists", "Created version '1' of model 'digits-mlp'"):
        assert line in log
    assert str(root / "reports" / "run.log") in screen.replace("\r\n", "").replace("\n", "")
    assert f"run log**: {root / 'reports' / 'run.log'}" in (root / "reports" / "fleet.md").read_text()


@pytest.mark.slow
def test_a_run_into_a_pipe_prints_one_line_per_stage_and_no_redraws(first_run, tmp_path):
    root, _ = first_run
    out = subprocess.run([EXE, "run", "--root", str(root)], cwd=root, env=_env(root, tmp_path), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "\r" not in out.stdout and "\x1b[" not in out.stdout
    stages = [line.split() for line in out.stdout.splitlines() if line.startswith(("digits ", "digits-mlp "))]
    # (in the order DVC's answers come: the prepare line may come last)
    assert sorted(stages) == sorted([["digits", "prepare", "skipped"], *[["digits-mlp", s, "skipped"] for s in
                                                                      ("teacher", "distill", "prune", "compress",
                                                                       "evaluate")]])
    assert [n for n in NOISE if n in out.stdout + out.stderr] == []
    # Each run's log is its own: the first run's (which registered v1) is kept beside it as run.log.1.
    assert "Created version '1' of model 'digits-mlp'" in (root / "reports" / "run.log.1").read_text()
    assert "Created version" not in (root / "reports" / "run.log").read_text()


SCRIPT = """
import logging, sys, warnings
from pathlib import Path
if sys.argv[3] == "1":
    import prefect.main  # (its logging set-up, as in a run's processes; `shrinkfleet stage` has none)
from shrinkfleet import runlog

runlog.install(Path(sys.argv[1]), show_all=sys.argv[2] == "1")
warnings.warn("a library's UserWarning")
logging.warning("a library's root warning")  # (as TFMOT warns: logging's module-level function)
logging.getLogger("dvc").warning("a dvc warning")
logging.getLogger("shrinkfleet").warning("our own warning")
logging.getLogger("mlflow").error("a real error")
with runlog.stderr_to_log("mlflow"):
    print("Created version '1' of model 'm'.", file=sys.stderr)
"""


@pytest.mark.parametrize(("verbose", "prefect"), [(False, True), (True, True), (False, False)],
                         ids=["quiet", "verbose", "quiet-without-prefect"])
def test_the_screen_keeps_our_warnings_and_errors_and_the_log_has_everything(tmp_path, verbose, prefect):
    log = tmp_path / "reports" / "run.log"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(log), str(int(verbose)), str(int(prefect))],
                         capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.returncode == 0, out.stderr
    screen = out.stdout + out.stderr
    assert "our own warning" in screen and "a real error" in screen
    library = ("a library's UserWarning", "a library's root warning", "a dvc warning", "Created version '1'")
    assert [line in screen for line in library] == [verbose] * len(library)
    assert all(line in log.read_text() for line in (*library, "our own warning", "a real error"))

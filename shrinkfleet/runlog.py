"""The run log: third-party chatter goes to ``reports/run.log``, the screen keeps shrinkfleet's own lines.

A run prints what shrinkfleet says (stage lines, registry moves, the table) and every ERROR,
whoever logs it. Everything else that libraries write — Python warnings (MLflow's
``UserWarning``\\ s about type hints and input examples), log records of other libraries
(TFMOT's ``Input layer does not contain zero weights``, DVC, MLflow), MLflow's registry
announcements (``Registered model ... already exists``, ``Created version``), which MLflow
prints to ``sys.stderr`` — is appended to the run log instead. ``--verbose`` (or
``SHRINKFLEET_VERBOSE=1``) puts it all back on the screen; the log file is written either way.

The CLI opens the log (:func:`install`) and exports its path in ``SHRINKFLEET_RUN_LOG``, so
the worker processes it starts and the ``shrinkfleet stage`` commands ``dvc repro`` runs append
to the same file. Only public means: ``logging`` handlers and filters,
``logging.captureWarnings``, ``contextlib.redirect_stderr`` scoped to the MLflow calls that
print, and MLflow's ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` setting for its download bars.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

LOG_ENV = "SHRINKFLEET_RUN_LOG"
VERBOSE_ENV = "SHRINKFLEET_VERBOSE"
RUN_LOG = Path("reports") / "run.log"  # under the project folder
OURS = ("shrinkfleet", "flows", "tasks")  # the loggers whose records are shrinkfleet's own
FORMAT = "%(asctime)s %(process)d %(levelname)-7s %(name)s: %(message)s"

_handler: logging.FileHandler | None = None


SCREEN = "shrinkfleet_screen"  # a record logged with ``extra={SCREEN: True}`` is shown whoever's logger it is


class ScreenFilter(logging.Filter):
    """Lets through a console handler shrinkfleet's own records and anyone's errors.

    Also a record marked ``extra={SCREEN: True}``: a stage's "attempt 1 of 3 failed; retrying"
    goes through Prefect's run logger (so Prefect's UI has it) and must reach the screen too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.ERROR or record.name.split(".")[0] in OURS
                or bool(getattr(record, SCREEN, False)))


class _LogWriter(io.TextIOBase):
    """A text stream whose every line becomes a DEBUG record of ``logger``."""

    def __init__(self, logger: logging.Logger, echo: TextIO | None = None):
        self.logger, self.echo, self.pending = logger, echo, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.echo is not None:
            self.echo.write(text)
        self.pending += text
        *lines, self.pending = self.pending.replace("\r", "\n").split("\n")
        for line in lines:
            if line.strip():
                self.logger.debug(line)
        return len(text)

    def flush(self) -> None:
        if self.echo is not None:
            self.echo.flush()
        if self.pending.strip():
            self.logger.debug(self.pending)
        self.pending = ""


def verbose() -> bool:
    """Whether third-party output should reach the screen too (``--verbose``)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def install(path: Path | None = None, show_all: bool | None = None, fresh: bool = False) -> Path | None:
    """Append every log record and warning of this process to the run log; keep the screen for ours.

    Args:
        path: the log file (the CLI passes ``<root>/reports/run.log``); None takes it from
            ``SHRINKFLEET_RUN_LOG`` (a worker process, a ``shrinkfleet stage`` under a run) and
            does nothing when that is unset either.
        fresh: start the file empty (the CLI, as a run starts: the log is this run's, like the
            report beside it; the previous run's is kept as ``run.log.1``), instead of appending.
        show_all: ``--verbose``; None reads ``SHRINKFLEET_VERBOSE``.

    Returns:
        The log file, or None when there is none. Call it after Prefect is imported: Prefect's
        logging set-up replaces the root logger's handlers.
    """
    global _handler
    if path is None:
        path = Path(os.environ[LOG_ENV]) if os.environ.get(LOG_ENV) else None
        if path is None:
            return None
    if show_all is None:
        show_all = verbose()
    path = path.resolve()
    os.environ[LOG_ENV] = str(path)
    if show_all:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    root = logging.getLogger()
    if _handler is None or _handler.baseFilename != str(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if _handler is not None:
            _detach(_handler)
        if fresh and path.exists():
            path.replace(path.with_name(path.name + ".1"))
        _handler = logging.FileHandler(path, encoding="utf-8")
        _handler.setFormatter(logging.Formatter(FORMAT))
    logging.getLogger("runlog").setLevel(logging.DEBUG)  # (the lines :func:`stderr_to_log` catches)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> root
    # MLflow's logger does not propagate; it gets the file too.
    for logger in (root, logging.getLogger("mlflow")):
        if _handler not in logger.handlers:
            logger.addHandler(_handler)
        if not show_all:
            for h in logger.handlers:
                if h is not _handler and not any(isinstance(f, ScreenFilter) for f in h.filters):
                    h.addFilter(ScreenFilter())
    if not root.handlers or root.handlers == [_handler]:
        # No console handler (a bare `shrinkfleet stage`): errors still need one, or logging's
        # last resort would print every WARNING, the libraries' ones included.
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        console.addFilter(ScreenFilter() if not show_all else logging.Filter())
        console.setLevel(logging.WARNING)
        root.addHandler(console)
    return path


def _detach(handler: logging.Handler) -> None:
    for logger in (logging.getLogger(), logging.getLogger("mlflow")):
        logger.removeHandler(handler)
    handler.close()


@contextlib.contextmanager
def stderr_to_log(name: str) -> Iterator[None]:
    """Send what the body prints to ``sys.stderr`` (MLflow's registry announcements) to the run log.

    Under ``--verbose`` it reaches the screen as well; without a run log nothing changes.
    Python-level only: the body's native (C++) output is :func:`shrinkfleet.tfenv.quiet_native_stderr`'s
    business.
    """
    if _handler is None:
        yield
        return
    writer = _LogWriter(logging.getLogger(f"runlog.{name}"), sys.stderr if verbose() else None)
    try:
        with contextlib.redirect_stderr(writer):
            yield
    finally:
        writer.flush()


def debug_line(name: str, text: str) -> None:
    """Put one line into the run log only (raw results a person need not read)."""
    if _handler is not None:
        logging.getLogger(f"runlog.{name}").debug(text)

"""A Prefect API for one fleet run when no ``PREFECT_API_URL`` is configured.

Prefect's ephemeral mode would start a temporary server in *every* worker process of the
process pool (each one a few seconds, and task states scattered over several servers).
Starting one temporary server here and handing its URL to the workers through the
settings keeps the whole run on one API.

The server is ``prefect server start`` as a subprocess on a free local port, with its UI off
and, through Prefect's public ``PREFECT_SERVER_SERVICES_*_ENABLED`` settings, only the
services a run needs (those that record task runs and events; no scheduler, no late-run or
cancellation sweeps, nobody will schedule anything on a server that lives for one run). It
takes about 9 s to answer on 2 cores, so ``shrinkfleet run`` launches it with
:func:`launch_early` as soon as it knows the run has something to do, and it starts while the
command checks its inputs; :func:`prefect_api` then waits for it (or launches one itself
when nobody did). It sends no telemetry.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

STARTUP_TIMEOUT_S = 120.0
# Services of a standing server that a server living for one run never needs: they schedule
# deployments, and sweep late, paused, cancelled or abandoned runs every few seconds.
IDLE_SERVICES = ("SCHEDULER", "LATE_RUNS", "CANCELLATION_CLEANUP", "FOREMAN", "PAUSE_EXPIRATIONS", "REPOSSESSOR",
                 "CLEANUP_RECONCILER")


def configured_api() -> str | None:
    """The Prefect API URL of the settings or environment, if any."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL") or None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TemporaryServer:
    """A local Prefect server subprocess on a free port, with its UI off; gone at :meth:`stop` or exit."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        self._ready = False
        self.launch()
        atexit.register(self.stop)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def launch(self) -> None:
        """Start the server process (returns at once; :meth:`wait_ready` waits for it to answer)."""
        from prefect.settings import get_current_settings

        env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True)}
        env.pop("PREFECT_API_URL", None)
        # Nothing the user's settings ask for is overridden (setdefault): no UI, no telemetry (and no
        # failing DNS look-ups on a machine without internet), none of the services a run does not need.
        for name in ("UI_ENABLED", "ANALYTICS_ENABLED", *(f"SERVICES_{s}_ENABLED" for s in IDLE_SERVICES)):
            env.setdefault(f"PREFECT_SERVER_{name}", "false")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "ERROR"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> str:
        """Block until the API answers its health check; its URL.

        Raises:
            RuntimeError: the server exited or did not answer within ``timeout`` seconds.
        """
        if self._ready:
            return self.api_url
        import httpx

        deadline = time.monotonic() + timeout
        retried = False
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                code = self.process.poll() if self.process else None
                if code is not None and not retried:  # the port was taken meanwhile, say: once more on another
                    retried = True
                    self.port = _free_port()
                    self.launch()
                elif code is not None:
                    raise RuntimeError(f"the temporary Prefect server exited with code {code} while starting")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                        self._ready = True
                        return self.api_url
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


_early: TemporaryServer | None = None


def launch_early() -> None:
    """Start the temporary server now, in the background, for the next :func:`prefect_api` to use.

    Does nothing when a Prefect API is configured or a server was launched already.
    """
    global _early
    if _early is None and not configured_api():
        _early = TemporaryServer()


def discard_early() -> None:
    """Stop a server :func:`launch_early` started that no run will use."""
    global _early
    if _early is not None:
        _early.stop()
        _early = None


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Yield the API URL in use: the configured one, or a temporary local server's."""
    global _early
    import prefect.context
    from prefect.logging import get_logger
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = configured_api()
    if configured:
        discard_early()
        yield configured
        return
    server, _early = _early or TemporaryServer(), None
    saved = os.environ.get("PREFECT_API_URL")
    try:
        url = server.wait_ready()
        get_logger("prefect").info("Started a temporary Prefect server on %s for this run", url)
        # Process-wide too: a thread sees Prefect's global settings, not this context's, and the
        # process pool's message-forwarding thread would start an ephemeral server of its own.
        os.environ["PREFECT_API_URL"] = url
        prefect.context.refresh_global_settings_context()
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
    finally:
        # Flush queued logs and events while the server is still up, or the workers
        # retry against a closed port for over a minute at exit.
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all()
        EventsWorker.drain_all()
        server.stop()
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved
        prefect.context.refresh_global_settings_context()  # Prefect's global settings follow the env again

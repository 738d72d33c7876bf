"""A Prefect API for one fleet run when no ``PREFECT_API_URL`` is configured.

Prefect's ephemeral mode would start a temporary server in *every* worker process of the
process pool (each one a few seconds, and task states scattered over several servers).
Starting one temporary server here and handing its URL to the workers through the
settings keeps the whole run on one API.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def configured_api() -> str | None:
    """The Prefect API URL of the settings or environment, if any."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL") or None


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Yield the API URL in use: the configured one, or a temporary local server's."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = configured_api()
    if configured:
        yield configured
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        # Flush queued logs and events while the server is still up, or the workers
        # retry against a closed port for over a minute at exit.
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all()
        EventsWorker.drain_all()
        server.stop()

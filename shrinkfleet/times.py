"""The one way shrinkfleet shows a time to people: UTC to the minute, ``2026-12-01 22:05 UTC``.

Tags and files keep machine-readable ISO-8601 (``promoted_at``, ``rolled_back_at``); every
table, message and report formats through :func:`shown`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

TIME_FORMAT = "%Y-%m-%d %H:%M UTC"


def shown(when: Any) -> str:
    """``when`` as :data:`TIME_FORMAT`, "" if unset.

    Args:
        when: a datetime (naive means UTC), epoch milliseconds (MLflow's timestamps) or a string
            in ISO-8601 or ``YYYY-MM-DD HH:MM:SS UTC``; a string that is neither is returned as is.
    """
    if when in (None, "", 0):
        return ""
    if isinstance(when, int | float):
        when = dt.datetime.fromtimestamp(when / 1000, dt.UTC)
    elif isinstance(when, str):
        try:
            when = dt.datetime.fromisoformat(when.removesuffix(" UTC").replace("Z", "+00:00"))
        except ValueError:
            return when
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).strftime(TIME_FORMAT)


def now() -> str:
    """The current time as :data:`TIME_FORMAT`."""
    return shown(dt.datetime.now(dt.UTC))

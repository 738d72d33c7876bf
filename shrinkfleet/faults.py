"""Fault injection for reliability tests: make a stage fail, hang or wait, on purpose.

Off unless ``SHRINKFLEET_FAULTS`` is set; a nightly run never sets it. The variable holds
comma-separated rules ``<stage>[@<target>]=<action>``:

    =========  ================================================================
    ``N``      the stage raises :class:`InjectedFault` (a transient error, retried
               by ``run.retries``) the first N times it starts, then runs normally
    ``fail``   the stage raises :class:`PermanentFault` every time (not retried),
               as a layer the converter cannot handle would
    ``hang``   the stage stops in the middle of its first crash-safe write (its
               output complete in a temporary path, not yet renamed into place),
               touches ``<state>/<stage>@<target>.hang`` and sleeps, to be killed
    ``delay:S`` the stage sleeps S seconds before it starts
    =========  ================================================================

e.g. ``SHRINKFLEET_FAULTS="teacher@digits-mlp=2,compress=fail"``. A rule without
``@<target>`` applies to every target of that stage. Attempt counts and hang markers live in
``SHRINKFLEET_FAULTS_STATE`` (default ``<project>/.shrinkfleet/faults``), so they hold across
worker processes and retries: ``<stage>@<target>.attempts`` counts every attempt of a stage a
rule names.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ENV = "SHRINKFLEET_FAULTS"
STATE_ENV = "SHRINKFLEET_FAULTS_STATE"


class InjectedFault(RuntimeError):
    """A transient failure injected by ``SHRINKFLEET_FAULTS`` (retried like a lost worker would be)."""


class PermanentFault(Exception):
    """A permanent failure injected by ``SHRINKFLEET_FAULTS`` (never retried)."""


@dataclass(frozen=True)
class Rule:
    stage: str
    target: str | None
    action: str  # "count" | "fail" | "hang" | "delay"
    value: float = 0


def parse(text: str) -> list[Rule]:
    """The rules of a ``SHRINKFLEET_FAULTS`` value.

    Raises:
        ValueError: a rule is malformed; the message quotes it.
    """
    rules = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        where, sep, action = item.partition("=")
        stage, _, target = where.strip().partition("@")
        action = action.strip()
        if not sep or not stage:
            raise ValueError(f"{ENV}: {item!r} is not <stage>[@<target>]=<N|fail|hang|delay:S>")
        if action.isdigit():
            rules.append(Rule(stage, target or None, "count", int(action)))
        elif action in ("fail", "hang"):
            rules.append(Rule(stage, target or None, action))
        elif action.startswith("delay:"):
            try:
                rules.append(Rule(stage, target or None, "delay", float(action.split(":", 1)[1])))
            except ValueError:
                raise ValueError(f"{ENV}: {item!r}: delay:S takes seconds, e.g. delay:5") from None
        else:
            raise ValueError(f"{ENV}: {item!r}: the action must be a count, fail, hang or delay:S")
    return rules


def _rules_for(stage: str, target: str) -> list[Rule]:
    text = os.environ.get(ENV, "")
    return [r for r in parse(text) if r.stage == stage and r.target in (None, target)] if text else []


def state_dir(root: Path) -> Path:
    return Path(os.environ.get(STATE_ENV) or root / ".shrinkfleet" / "faults")


# The stage this worker process is running (one at a time per process), for ``before_rename``.
_current: tuple[str, str, Path] | None = None


@contextlib.contextmanager
def stage(name: str, target: str, root: Path) -> Iterator[None]:
    """Apply the rules for ``name@target`` around one attempt of that stage."""
    global _current
    rules = _rules_for(name, target)
    attempt = 0
    if rules:  # count every attempt of a stage a rule names, so a test can see retries (or their absence)
        state = state_dir(root)
        state.mkdir(parents=True, exist_ok=True)
        counter = state / f"{name}@{target}.attempts"
        attempt = (int(counter.read_text() or 0) if counter.exists() else 0) + 1
        counter.write_text(str(attempt))
    for rule in rules:
        if rule.action == "delay":
            time.sleep(rule.value)
        elif rule.action == "fail":
            raise PermanentFault(f"injected permanent failure in {name}@{target} ({ENV})")
        elif rule.action == "count" and attempt <= rule.value:
            raise InjectedFault(f"injected transient failure {attempt} of {int(rule.value)} in {name}@{target} "
                                f"({ENV})")
    _current = (name, target, root) if any(r.action == "hang" for r in rules) else None
    try:
        yield
    finally:
        _current = None


def before_rename(tmp: Path) -> None:
    """Called by the crash-safe writers with the output complete at ``tmp``; hangs if a rule says so."""
    if _current is None:
        return
    name, target, root = _current
    state = state_dir(root)
    state.mkdir(parents=True, exist_ok=True)
    (state / f"{name}@{target}.hang").write_text(f"{os.getpid()}\n{tmp}\n")
    while True:  # until killed
        time.sleep(60)

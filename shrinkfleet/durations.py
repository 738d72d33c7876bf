"""How long each model's stages took when they last ran, so a run starts the longest models first.

The flow hands models to a fixed number of workers in the order it submits them. In fleet
order, a long model listed last starts when the others are done and runs alone at the end
while the other workers sit idle. Started longest first (the LPT rule), the workers finish
closer together: two workers given models of 20, 20, 20 and 60 s in that order take 80 s (the
60 s model starts at 20 s), longest first 60 s.

The history is ``.shrinkfleet/durations.json`` in the project (not versioned, not shared): per
model, per stage, the wall seconds of its last run. Each run merges in the stages it ran
(a stage skipped tonight keeps last night's figure). A model with no history (new, or the
first run) goes first, in fleet order: it runs every stage, which is the most work a model can
have. A file that cannot be read (hand-edited, cut short) counts as no history; it is
replaced at the end of the run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from shrinkfleet.storage import atomic_write_text

History = dict[str, dict[str, float]]  # model -> stage -> seconds


def path(root: Path) -> Path:
    return root / ".shrinkfleet" / "durations.json"


def load(root: Path) -> History:
    """The project's stage durations; ``{}`` when there are none or the file is unreadable."""
    try:
        data = json.loads(path(root).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {m: {s: float(v) for s, v in stages.items() if isinstance(v, int | float)}
            for m, stages in data.items() if isinstance(stages, dict)}


def save(root: Path, ran: Mapping[str, Mapping[str, float]]) -> History:
    """Merge this run's stage seconds (``ran``: model -> stage -> seconds) into the history; the new history."""
    history = load(root)
    for model, stages in ran.items():
        if stages:
            history.setdefault(model, {}).update({s: round(float(v), 3) for s, v in stages.items()})
    atomic_write_text(path(root), json.dumps(history, indent=1, sort_keys=True) + "\n")
    return history


def expected(history: History, model: str, stages: Iterable[str]) -> float | None:
    """Seconds ``stages`` of ``model`` took last time, or None when one of them has no figure."""
    known = history.get(model, {})
    total = 0.0
    for stage in stages:
        if stage not in known:
            return None
        total += known[stage]
    return total


def longest_first(models: list[str], chains: Mapping[str, list[str]], history: History) -> list[str]:
    """``models`` in the order to start them: unknown ones first, then by expected seconds, longest first.

    The sort is stable: models that tie (all unknown, on a first run) keep their fleet order.
    """
    def key(m: str) -> tuple[int, float]:
        seconds = expected(history, m, chains.get(m, []))
        return (0, 0.0) if seconds is None else (1, -seconds)

    return sorted(models, key=key)

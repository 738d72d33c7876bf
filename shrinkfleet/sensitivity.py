"""Sensitivity analysis: how much validation accuracy each layer loses when only it is pruned.

For each prunable layer and each level, the model with *only that layer* pruned is scored on
the validation split, with no fine-tuning (fast: one forward pass over the split per row).
Two methods:

- ``prune``: magnitude pruning; the level is the fraction of the layer's kernel weights set to
  zero (the smallest magnitudes, as TFMOT's masks choose them).
- ``channels``: channel pruning (:func:`shrinkfleet.channels.prune_channels`); the level is
  the fraction of the layer's units/filters removed (``keep = 1 - level``).

:func:`choose` turns a table into per-layer levels within an accuracy bound (the rule used by
``prune.layer_sparsity: auto`` and ``channels: {keep: auto}``):

1. each layer takes the largest level whose drop, with that layer alone pruned, is at most
   ``max_drop`` (none: the layer is not pruned);
2. then the model with *every* layer at its level is scored; while its drop exceeds
   ``max_drop``, the layer whose own drop at its current level is the largest steps down one
   level (to the next smaller level, or to unpruned). Unpruned always meets the bound, so
   the loop ends, and the levels it returns meet the bound on the validation split (before any
   fine-tuning, which usually recovers more).

Drops are measured against the input model's own validation accuracy, not the teacher's.
Classification only (accuracy is the measure).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from shrinkfleet import training, zoo
from shrinkfleet.channels import prune_channels
from shrinkfleet.evaluation import PRUNABLE, keras_caller, prunable_weight
from shrinkfleet.tfenv import keras

METHODS = ("prune", "channels")
COLUMNS = ("layer", "method", "level", "accuracy", "drop")


def magnitude_prunable(layer: keras.layers.Layer) -> bool:
    """Whether TFMOT's magnitude pruning zeroes this layer's kernel: Dense and convolutions.

    Not DepthwiseConv2D: TFMOT 0.8.1 wraps it but leaves its depthwise kernel dense (measured).
    """
    return (isinstance(layer, PRUNABLE) and not isinstance(layer, keras.layers.DepthwiseConv2D)
            and prunable_weight(layer) is not None)


def prunable_layers(model: keras.Model, method: str) -> list[str]:
    """The layers ``method`` can prune, in graph order.

    For ``channels``, a group of layers pruned together (they feed one Add) is listed once, by
    its first member: naming it prunes the whole group (:func:`shrinkfleet.channels.prune_channels`).
    """
    if method == "prune":
        return [layer.name for layer in model.layers if magnitude_prunable(layer)]
    if method == "channels":
        result = prune_channels(model, 0.5)
        later = {m for members in result.groups.values() for m in members[1:]}
        return [layer.name for layer in model.layers if layer.name in result.kept and layer.name not in later]
    raise ValueError(f"sensitivity method must be one of {', '.join(METHODS)}, got {method!r}")


def zero_smallest(kernel: np.ndarray, level: float) -> np.ndarray:
    """``kernel`` with its ``round(level * size)`` smallest-magnitude weights set to zero."""
    n = round(level * kernel.size)
    out = kernel.copy()
    if n:
        flat = out.reshape(-1)
        flat[np.argsort(np.abs(flat), kind="stable")[:n]] = 0
    return out


class _Scorer:
    """Validation accuracy of ``model`` with some layers pruned; the input model is never changed."""

    def __init__(self, model: keras.Model, x: np.ndarray, y: np.ndarray, method: str):
        self.model, self.x, self.y, self.method = model, x, y, method
        if method == "prune":
            # One copy and one traced call: each row swaps a kernel in and back out.
            self.work = zoo.clone(model)
            self.call = keras_caller(self.work)
            self.kernels = {layer.name: prunable_weight(layer).numpy() for layer in self.work.layers
                            if magnitude_prunable(layer)}

    def _accuracy(self, predict: Callable[[np.ndarray], np.ndarray]) -> float:
        scores = training.as_logits(np.asarray(predict(self.x), dtype=np.float32), zoo.output_kind(self.work))
        return float(np.mean(np.argmax(scores, axis=1) == self.y))

    def __call__(self, levels: dict[str, float]) -> float:
        levels = {k: v for k, v in levels.items() if v > 0}
        if self.method == "channels":
            model = prune_channels(self.model, {k: 1 - v for k, v in levels.items()}).model if levels else self.model
            return training.accuracy(model, self.x, self.y)
        for name, level in levels.items():
            prunable_weight(self.work.get_layer(name)).assign(zero_smallest(self.kernels[name], level))
        try:
            return self._accuracy(self.call)
        finally:
            for name in levels:
                prunable_weight(self.work.get_layer(name)).assign(self.kernels[name])


def analyse(model: keras.Model, x: np.ndarray, y: np.ndarray, levels: list[float], method: str = "prune"
            ) -> list[dict[str, Any]]:
    """One row per prunable layer and level: ``layer, method, level, accuracy, drop`` (fractions).

    Raises:
        ValueError: an unknown method, a level outside (0, 1), or no layer ``method`` can prune.
    """
    bad = [v for v in levels if not 0 < v < 1]
    if bad:
        raise ValueError(f"sensitivity levels must be fractions in (0, 1), got {bad}")
    layers = prunable_layers(model, method)
    if not layers:
        raise ValueError(f"sensitivity: no layer of {model.name!r} can be pruned by {method}")
    score = _Scorer(model, x, y, method)
    base = score({})
    return [{"layer": name, "method": method, "level": float(level), "accuracy": (acc := score({name: level})),
             "drop": base - acc} for name in layers for level in sorted(levels)]


def choose(model: keras.Model, x: np.ndarray, y: np.ndarray, rows: list[dict[str, Any]], max_drop: float
           ) -> tuple[dict[str, float], float]:
    """Per-layer levels from a table of :func:`analyse` within ``max_drop`` (rule: module docstring).

    Returns:
        ``({layer: level}, drop)``: every layer of the table (0.0 = not pruned) and the
        validation accuracy drop of the model with all of them applied at once (<= ``max_drop``).
    """
    method = rows[0]["method"]
    by_layer: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_layer.setdefault(r["layer"], []).append(r)
    chosen: dict[str, float] = {}
    for name, rs in by_layer.items():
        ok = [r["level"] for r in rs if r["drop"] <= max_drop]
        chosen[name] = max(ok) if ok else 0.0
    own = {(r["layer"], r["level"]): r["drop"] for r in rows}
    score = _Scorer(model, x, y, method)
    base = score({})
    drop = base - score(chosen)
    while drop > max_drop and any(chosen.values()):
        worst = max((n for n in chosen if chosen[n] > 0), key=lambda n: (own[(n, chosen[n])], chosen[n]))
        lower = [r["level"] for r in by_layer[worst] if r["level"] < chosen[worst]]
        chosen[worst] = max(lower) if lower else 0.0
        drop = base - score(chosen)
    return chosen, drop


def table_csv(rows: list[dict[str, Any]]) -> str:
    """The table as CSV text with a header row."""
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in COLUMNS})
    return out.getvalue()


def plot_png(rows: list[dict[str, Any]], title: str) -> bytes:
    """A line per layer: accuracy drop (points) against level; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.2), dpi=100)
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    for name in layers:
        rs = [r for r in rows if r["layer"] == name]
        ax.plot([r["level"] for r in rs], [100 * r["drop"] for r in rs], marker="o", label=name)
    method = rows[0]["method"]
    ax.set_xlabel("fraction of weights zeroed" if method == "prune" else "fraction of units/filters removed")
    ax.set_ylabel("validation accuracy drop (points)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(layers) > 8 else 1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def files(rows: list[dict[str, Any]], stem: str, title: str) -> dict[str, bytes]:
    """``{stem}.csv``, ``{stem}.json`` and ``{stem}.png`` for a table (what the stages write)."""
    return {f"{stem}.csv": table_csv(rows).encode(), f"{stem}.json": (json.dumps(rows, indent=2) + "\n").encode(),
            f"{stem}.png": plot_png(rows, title)}


def write(rows: list[dict[str, Any]], folder: Path, stem: str, title: str) -> list[Path]:
    """Write :func:`files` into ``folder``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, content in files(rows, stem, title).items():
        (folder / name).write_bytes(content)
        out.append(folder / name)
    return out

"""Shared training loop settings: Adam, early stopping on val loss, quiet logs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from shrinkfleet.tfenv import keras


def fit(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    val: tuple[np.ndarray, np.ndarray],
    *,
    loss: Callable | keras.losses.Loss,
    metrics: list[Any],
    epochs: int,
    batch_size: int,
    learning_rate: float,
    patience: int = 0,
    seed: int = 0,
    callbacks: list[keras.callbacks.Callback] | None = None,
) -> dict[str, list[float]]:
    """Compile with Adam and fit; restore the best val-loss weights when early stopping.

    Returns:
        Keras' history dict (per-epoch loss and metrics, train and val).
    """
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=metrics)
    cbs = list(callbacks or [])
    if patience:
        cbs.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))  # one seeded shuffle; fit reshuffles every epoch
    history = model.fit(
        x[order], y[order], validation_data=val, epochs=epochs, batch_size=batch_size,
        callbacks=cbs, verbose=0, shuffle=True,
    )
    return {k: [float(v) for v in vals] for k, vals in history.history.items()}


def logits(model: keras.Model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Model outputs (logits) for ``x`` in inference mode, ``batch_size`` samples at a time.

    The model's call is traced once as a plain ``tf.function``; ``model.predict`` would
    trace its whole predict loop, which on a small model costs more than the predictions.
    """
    from shrinkfleet.evaluation import keras_caller

    return np.asarray(keras_caller(model, batch_size=batch_size)(x), dtype=np.float32)


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a Keras model, as a fraction."""
    return float(np.mean(np.argmax(logits(model, x), axis=1) == y))


def sparse_ce() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

"""Shared training loop settings: Adam, early stopping on val loss, quiet logs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from shrinkfleet.tfenv import keras, tf

log = logging.getLogger(__name__)


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

    ``val`` is evaluated after every epoch only when early stopping needs it (``patience``
    > 0): nothing else reads the validation history, and on a small model Keras' traced
    validation loop and its per-epoch pass cost a good part of the fit.

    Returns:
        Keras' history dict (per-epoch loss and metrics; with ``patience``, val_* as well).
    """
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=metrics)
    cbs = list(callbacks or [])
    if patience:
        cbs.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True))
    prime(model, x, y)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))  # one seeded shuffle; fit reshuffles every epoch
    history = model.fit(
        x[order], y[order], validation_data=val if patience else None, epochs=epochs, batch_size=batch_size,
        callbacks=cbs, verbose=0, shuffle=True,
    )
    return {k: [float(v) for v in vals] for k, vals in history.history.items()}


def prime(model: keras.Model, x: np.ndarray, y: np.ndarray) -> None:
    """Create a compiled model's optimizer, loss and metric variables before ``fit``.

    A ``tf.function`` that creates variables on its first call is traced twice, so Keras'
    train step is traced twice per ``fit`` when these variables do not exist yet (measured:
    about 0.3 s of a 1 s fit of a small MLP). Creating them eagerly on two samples keeps it
    to one trace; the weights, the optimizer's state and the metrics are exactly as they
    were (metric states are reset). A model that cannot be primed this way is left as is.
    """
    try:
        model.optimizer.build(model.trainable_variables)
        xt, yt = tf.constant(x[:2]), tf.constant(y[:2])
        pred = model(xt, training=False)
        model.compiled_loss(yt, pred, regularization_losses=model.losses)
        model.compiled_metrics.update_state(yt, pred)
    except Exception as exc:  # (an optimisation only: fit creates them itself)
        log.debug("not primed (%s: %s); fit traces its step twice", type(exc).__name__, exc)
    finally:
        for metric in model.metrics:
            metric.reset_state()


def logits(model: keras.Model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Class scores in logit space for ``x``, whatever the model's output holds (see :func:`as_logits`)."""
    from shrinkfleet.zoo import output_kind

    return as_logits(outputs(model, x, batch_size), output_kind(model))


def as_logits(out: np.ndarray, kind: str) -> np.ndarray:
    """Model outputs as logits: unchanged, the log of probabilities, or a sigmoid's two-class log-odds pair.

    The log of softmax probabilities differs from the logits by a constant per sample, so a
    softmax at any temperature over them gives what it would over the logits: distillation
    and argmax read them alike. A one-unit sigmoid ``p`` becomes ``[log(1 - p), log(p)]``.
    """
    out = np.asarray(out, dtype=np.float32)
    if kind == "logits":
        return out
    eps = np.float32(1e-7)
    if kind == "sigmoid":
        p = np.clip(out[:, :1], eps, 1 - eps)
        return np.concatenate([np.log1p(-p), np.log(p)], axis=1)
    return np.log(np.clip(out, eps, 1.0))


def tf_as_logits(out: Any, kind: str) -> Any:
    """:func:`as_logits` on a tensor (inside a loss)."""
    out = tf.cast(out, tf.float32)
    if kind == "logits":
        return out
    if kind == "sigmoid":
        p = tf.clip_by_value(out[:, :1], 1e-7, 1 - 1e-7)
        return tf.concat([tf.math.log1p(-p), tf.math.log(p)], axis=1)
    return tf.math.log(tf.clip_by_value(out, 1e-7, 1.0))


def objective(kind: str, task: str = "classification") -> tuple[keras.losses.Loss, list[Any]]:
    """The loss and the metric to train with: cross-entropy and accuracy, or (regression) MSE and MAE."""
    if task == "regression":
        return keras.losses.MeanSquaredError(), ["mae"]
    return loss_for(kind), ["accuracy"]


def score(model: keras.Model, x: np.ndarray, y: np.ndarray, task: str = "classification") -> dict[str, float]:
    """A stage's summary of how good a model is on a split: ``accuracy``, or (regression) ``mae`` (standardised)."""
    if task == "regression":
        return {"mae": float(np.mean(np.abs(outputs(model, x)[:, 0] - y)))}
    return {"accuracy": accuracy(model, x, y)}


def loss_for(kind: str) -> keras.losses.Loss:
    """The training loss for integer class labels and a model whose output is ``kind``."""
    if kind == "sigmoid":
        return keras.losses.BinaryCrossentropy(from_logits=False)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=kind == "logits")


def outputs(model: keras.Model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Model outputs for ``x`` in inference mode, ``batch_size`` samples at a time.

    The model's call is traced once as a plain ``tf.function``; ``model.predict`` would
    trace its whole predict loop, which on a small model costs more than the predictions.
    """
    from shrinkfleet.evaluation import keras_caller

    return np.asarray(keras_caller(model, batch_size=batch_size)(x), dtype=np.float32)


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a Keras model, as a fraction."""
    return float(np.mean(np.argmax(logits(model, x), axis=1) == y))


def sparse_ce(model: keras.Model | None = None) -> keras.losses.Loss:
    """Cross-entropy on integer labels for ``model``'s outputs (logits when no model is given)."""
    from shrinkfleet.zoo import output_kind

    return loss_for("logits" if model is None else output_kind(model))

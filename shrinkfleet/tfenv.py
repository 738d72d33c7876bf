"""One place that imports TensorFlow, tf_keras and TFMOT, configured for this host.

Every module that needs TensorFlow imports it from here, so the legacy-Keras switch and
the GPU memory-growth setting are applied exactly once per process, before any model is
built.
"""

from __future__ import annotations

# Importing this module imports the package first, and shrinkfleet/__init__.py sets
# TF_USE_LEGACY_KERAS before TensorFlow loads.
import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Hold back what TensorFlow's C++ side prints to fd 2; replay it only if the body fails.

    TensorFlow 2.21 logs through absl before ``TF_CPP_MIN_LOG_LEVEL`` applies (oneDNN notes,
    "could not find cuda drivers" on every CPU-only host, converter statistics), once per
    worker process. ``SHRINKFLEET_TF_VERBOSE=1`` lets it through, for debugging GPU set-ups.
    """
    if os.environ.get("SHRINKFLEET_TF_VERBOSE") == "1":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


if os.environ.get("TF_USE_LEGACY_KERAS") not in ("1", "true", "True"):  # (TensorFlow's own test of it)
    raise ImportError(f"TF_USE_LEGACY_KERAS={os.environ.get('TF_USE_LEGACY_KERAS')} is set: shrinkfleet needs "
                      "Keras 2 (tf_keras), since TFMOT does not support Keras 3; unset it or set it to 1")

with quiet_native_stderr():
    import tensorflow as tf
    import tf_keras as keras

log = logging.getLogger(__name__)
# Retracing and deprecation chatter from TensorFlow's Python side is not actionable for users.
tf.get_logger().setLevel(logging.ERROR)

_configured = False


def configure_devices(mixed_precision: bool = False) -> list[str]:
    """Turn on memory growth for every visible GPU and return their names.

    Memory growth lets several training tasks share one GPU instead of the first one
    reserving all of its memory. ``CUDA_VISIBLE_DEVICES`` decides which GPUs are visible
    (an empty value hides them all). With no GPU, TensorFlow runs on the CPU and this
    returns an empty list. ``mixed_precision`` only decides what the log line says: the
    training stages apply it themselves through :func:`precision`, and only on a GPU.
    """
    global _configured
    with quiet_native_stderr():
        gpus = tf.config.list_physical_devices("GPU")
    if not _configured:
        for gpu in gpus:
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError as exc:  # already initialised by an earlier model
                log.debug("memory growth not changed for %s: %s", gpu.name, exc)
        _configured = True
        mode = " (mixed_float16 training)" if mixed_precision and gpus else ""
        log.info("devices: %s%s", ", ".join(g.name for g in gpus) or "CPU only (no GPU visible)", mode)
    return [gpu.name for gpu in gpus]


@contextlib.contextmanager
def precision(mixed: bool) -> Iterator[None]:
    """Build and train the models made inside under ``mixed_float16`` when ``mixed`` is true.

    Mixed precision computes in float16 and keeps the variables in float32 (Keras wraps
    the optimizer in a loss-scale optimizer at compile time). Only teacher and student
    training use it: the models they save are rebuilt in float32 (:func:`zoo.as_float32`),
    because TFMOT's pruning, clustering and QAT wrappers and the TFLite converter expect
    float32 layers. The global policy is restored on exit, so a worker process that runs
    a prune stage next is unaffected.
    """
    if not mixed:
        yield
        return
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def reset(seed: int) -> None:
    """Clear Keras' global graph state and seed every generator a stage uses.

    Worker processes run many stages one after another; without clearing, layer names
    and graph state accumulate across models and runs stop being reproducible.

    ``keras.utils.set_random_seed`` also gives this thread a generator of its own for the
    seeds of unseeded initializers. Without it Keras draws them from Python's global
    ``random``, which other threads of the process draw from too: a Dask worker's event
    loop does, so the same stage on Dask trained from different initial weights from one run
    to the next (and differed from the process pool, whose worker threads never draw).
    """
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)  # random, NumPy and TensorFlow, plus Keras' per-thread seed generator
    os.environ["PYTHONHASHSEED"] = str(seed)


def tfmot():
    """Import TensorFlow Model Optimization lazily (it takes a second to load)."""
    with quiet_native_stderr():
        import tensorflow_model_optimization as _tfmot

    return _tfmot


__all__ = ["configure_devices", "keras", "reset", "tf", "tfmot"]

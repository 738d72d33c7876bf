"""shrinkfleet: nightly compression of whole fleets of deep-learning models.

Importing the package pins Keras to ``tf_keras`` (Keras 2): TFMOT does not support
Keras 3, and ``TF_USE_LEGACY_KERAS`` only takes effect when it is set before the first
``import tensorflow`` anywhere in the process.
"""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
# TensorFlow's C++ start-up banners (oneDNN, CUDA probing) drown the report on CPU hosts.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Nothing phones home: MLflow 3 otherwise starts threads that fetch a telemetry config from
# the internet in every process that imports it (set the variable to "false" to allow it).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Prefect's client prints "Prefect collects anonymous usage data" on its first import in a
# terminal, whatever PREFECT_SERVER_ANALYTICS_ENABLED says; only DO_NOT_TRACK stops it. With
# analytics off (shrinkfleet's default; the Makefile exports it), the client says nothing either.
if os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false").strip().lower() in ("0", "false", "no", "off"):
    os.environ.setdefault("DO_NOT_TRACK", "1")

__version__ = "0.1.0"

"""shrinkfleet: nightly compression of whole fleets of deep-learning models.

Importing the package sets, where they are unset, only the two variables TensorFlow reads
once, at its first import anywhere in the process: ``TF_USE_LEGACY_KERAS=1`` (Keras 2 through
``tf_keras``: TFMOT does not support Keras 3; :mod:`shrinkfleet.tfenv` refuses to load under
an explicit ``TF_USE_LEGACY_KERAS=0``) and ``TF_CPP_MIN_LOG_LEVEL=2`` (TensorFlow's C++
start-up banners drown the report on CPU hosts). The command line and the ``flows`` package
also call :func:`no_telemetry`.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"


def no_telemetry(environ: "os._Environ[str] | dict[str, str]" = os.environ) -> None:
    """Ask MLflow and Prefect not to phone home, where the environment does not say otherwise.

    MLflow 3 starts threads that fetch a telemetry configuration from the internet in every
    process that imports it (``MLFLOW_DISABLE_TELEMETRY=false`` allows it). Prefect's client
    prints "Prefect collects anonymous usage data" on its first import in a terminal whatever
    ``PREFECT_SERVER_ANALYTICS_ENABLED`` says; only ``DO_NOT_TRACK`` stops it, so it is set when
    analytics are off (shrinkfleet's default; the Makefile exports it). Called by the
    ``shrinkfleet`` command and the flow module before they import MLflow or Prefect; worker
    processes inherit the variables.
    """
    environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false").strip().lower() in ("0", "false", "no", "off"):
        environ.setdefault("DO_NOT_TRACK", "1")

"""Importing the package changes the process only where TensorFlow needs it, and never a value a user set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import json, os, sys
before = dict(os.environ)
import shrinkfleet, shrinkfleet.config, shrinkfleet.datasets  # the core, as a library
after = dict(os.environ)
print(json.dumps({k: after.get(k) for k in set(before) | set(after) if before.get(k) != after.get(k)}))
"""


def _changed(env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_package_sets_only_tensorflow_s_two_variables():
    clean = {k: v for k, v in os.environ.items()
             if k not in ("TF_USE_LEGACY_KERAS", "TF_CPP_MIN_LOG_LEVEL", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")}
    assert _changed(clean) == {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


def test_a_user_s_own_values_are_kept():
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "true", "TF_CPP_MIN_LOG_LEVEL": "0"}
    assert _changed(env) == {}


def test_keras_3_asked_for_explicitly_is_refused_by_name():
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "0"}
    out = subprocess.run([sys.executable, "-c", "import shrinkfleet.tfenv"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1 and "TF_USE_LEGACY_KERAS=0 is set: shrinkfleet needs Keras 2 (tf_keras)" in out.stderr

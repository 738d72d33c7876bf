"""Preflight checks every model of yours before any work: all problems at once, exit 2, nothing written."""

from __future__ import annotations

import yaml

from tests.conftest import make_project, shrinkfleet_cmd

BUILDERS = '''
import tf_keras as keras


def good(input_shape, outputs, width=8):
    inputs = keras.Input(input_shape)
    x = keras.layers.Dense(width, activation="relu")(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, keras.layers.Dense(outputs)(x))


def wrong_outputs(input_shape, outputs):
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, keras.layers.Dense(outputs + 1)(keras.layers.Flatten()(inputs)))


def broken(input_shape, outputs):
    raise KeyError("width")
'''


def test_every_model_problem_is_reported_at_once_before_any_work(tmp_path, tiny_params):
    from shrinkfleet.tfenv import keras

    models = tiny_params["models"]
    base = models["digits-mlp"]
    models.clear()
    models["ok"] = {**base, "teacher": {"arch": "custom", "builder": "mine:good", "options": {"width": 4}}}
    models["builder-raises"] = {**base, "teacher": {"arch": "custom", "builder": "mine:broken"}}
    models["wrong-outputs"] = {**base, "student": {"arch": "custom", "builder": "mine:wrong_outputs"}}
    models["no-file"] = {**base, "teacher": {"arch": "pretrained", "path": "models/in/gone.keras"}}
    models["too-small"] = {**base, "student": {"arch": "application", "name": "MobileNetV2"}}
    models["bad-option"] = {**base, "teacher": {"arch": "custom", "builder": "mine:good", "options": {"depth": 3}}}
    models["wrong-input"] = {**base, "teacher": {"arch": "pretrained", "path": "models/in/six.keras"}}
    project = make_project(tmp_path / "p", tiny_params)
    (project / "mine.py").write_text(BUILDERS)
    (project / "models" / "in").mkdir(parents=True)
    inputs = keras.Input((6,))
    keras.Model(inputs, keras.layers.Dense(10)(inputs)).save(project / "models" / "in" / "six.keras")
    before = sorted(p.relative_to(project) for p in project.rglob("*") if ".git" not in p.parts)

    # (A subprocess, as a user runs it: TensorFlow's loggers keep the stderr they find at import.)
    result = shrinkfleet_cmd("run", cwd=project, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    out = " ".join(result.stderr.split())
    for expected in [
        "models.builder-raises.teacher: builder mine:broken raised KeyError: 'width'",
        "models.wrong-outputs.student: custom: has 11 output(s), the dataset has 10 classes",
        "models.no-file.teacher:", "models/in/gone.keras: model file not found",
        "models.too-small.student: application MobileNetV2 on inputs (8, 8, 1): Input size must be at least 32x32",
        "models.bad-option.teacher: builder mine:good raised TypeError:", "unexpected keyword argument 'depth'",
        "models.wrong-input.teacher: pretrained: takes inputs of shape (6,), the prepared data has (8, 8, 1)",
    ]:
        assert expected in out, expected
    assert "models.ok." not in out
    # nothing written: no prepared data, no models, no MLflow store, no DVC lock
    after = sorted(p.relative_to(project) for p in project.rglob("*") if ".git" not in p.parts)
    assert [p for p in after if p not in before and "__pycache__" not in str(p)] == []
    assert yaml.safe_load((project / "params.yaml").read_text())["models"].keys() == models.keys()

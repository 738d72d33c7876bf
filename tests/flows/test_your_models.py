"""Your own models end to end: a trained file used as it is (no student), a builder distilled into a
tf_keras.applications student; layers TFMOT refuses left as they are; served from the registry."""

from __future__ import annotations

import json
import re
import textwrap

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from shrinkfleet.datasets import load_images
from tests.conftest import make_project, shrinkfleet_cmd
from tests.shrinkfleet.test_sources import write_images
from tests.team.test_nightly_deployment import quick_params

pytestmark = pytest.mark.slow

USER_CODE = '''
import tf_keras as keras


@keras.utils.register_keras_serializable(package="mine")
class Scale(keras.layers.Layer):
    def build(self, input_shape):
        self.alpha = self.add_weight(name="alpha", shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.alpha


def build(input_shape, outputs, width=8):
    """A user-style CNN: preprocessing, BatchNorm, a depthwise conv, a custom layer, a softmax."""
    inputs = keras.Input(input_shape)
    x = keras.layers.Rescaling(2.0, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(width, 3, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.Conv2D(2 * width, 1, activation="relu")(x)
    x = Scale()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.LayerNormalization()(x)
    return keras.Model(inputs, keras.layers.Dense(outputs, activation="softmax")(x))
'''


def _train_outside(project, images):
    """The user's own training, outside shrinkfleet, on images scaled to [0, 1] as prepare scales them."""
    import sys

    sys.path.insert(0, str(project))
    from mymodels.cnn import build

    from shrinkfleet.tfenv import keras

    keras.utils.set_random_seed(0)
    model = build((32, 32, 3), 2, width=8)
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(images.x / 255.0, images.y, epochs=8, batch_size=16, verbose=0)
    (project / "models" / "in").mkdir(parents=True, exist_ok=True)
    model.save(project / "models" / "in" / "user.keras")
    return model


def test_your_trained_model_and_your_builder_with_an_application_student(tmp_path):
    params = quick_params(("digits-mlp",))
    for stage in ("teacher", "distill", "prune"):
        params[stage]["batch_size"] = 16
    params["prune"]["epochs"] = 2
    params["gate"] = {"max_accuracy_drop": 1.0}  # this test is about the route, not about tiny models' accuracy
    params["recipes"] = {"pruned-int8": {"steps": ["int8"]}, "pruned-pcqat": {"steps": ["cluster", "pcqat", "int8"]}}
    params["datasets"] = {"photos": {"source": "images", "path": "data/raw/photos", "image_size": [32, 32]}}
    params["models"] = {
        "photos-user": {"dataset": "photos", "student": None,
                        "teacher": {"arch": "pretrained", "path": "models/in/user.keras", "imports": ["mymodels.cnn"]}},
        # One recipe: the MobileNetV2 student's assertions are about its route and shape, not its recipes.
        "photos-mnv2": {"dataset": "photos", "teacher": {"arch": "custom", "builder": "mymodels.cnn:build",
                                                          "options": {"width": 8}},
                        "student": {"arch": "application", "name": "MobileNetV2", "options": {"alpha": 0.35}},
                        "recipes": ["pruned-int8"]},
    }
    project = make_project(tmp_path / "project", params)
    (project / "mymodels").mkdir()
    (project / "mymodels" / "__init__.py").write_text("")
    (project / "mymodels" / "cnn.py").write_text(textwrap.dedent(USER_CODE))
    write_images(project / "data" / "raw" / "photos", per_class=40, size=(32, 32))
    images = load_images(project / "data" / "raw" / "photos", (32, 32), "rgb")
    user = _train_outside(project, images)

    result = shrinkfleet_cmd("run", cwd=project, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(re.findall(r"✓ ([\w-]+): (ran [^;(]*)", result.stdout))
    assert lines["photos-user"].strip() == "ran prepare, teacher, prune, compress, evaluate"  # no distill
    assert lines["photos-mnv2"].strip() == "ran prepare, teacher, distill, prune, compress, evaluate"

    # The trained model is the teacher as it is: same weights, measured on the prepared test split.
    doc = json.loads((project / "metrics" / "photos-user.json").read_text())
    assert set(doc["variants"]) == {"teacher", "pruned", "pruned-int8", "pruned-pcqat"}
    assert doc["variants"]["teacher"]["recipe"] == "pretrained" and doc["variants"]["pruned"]["parent"] == "teacher"
    assert doc["variants"]["teacher"]["output"] == "probabilities"
    from shrinkfleet import zoo

    saved = zoo.load(project / "models" / "photos-user" / "teacher.keras", ["mymodels.cnn"], project)
    for a, b in zip(user.get_weights(), saved.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # Layers TFMOT refuses are left as they are, and said so.
    skipped = doc["variants"]["pruned-pcqat"]["skipped"]
    assert {"rescaling", "scale", "layer_normalization"} <= set(skipped["1.pcqat"])
    assert "scale" in doc["variants"]["pruned"]["skipped"]["prune"]
    report = (project / "reports" / "fleet.md").read_text()
    assert "## Layers and recipes left as they are" in report and "**photos-user** pcqat left" in report
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    exp = client.get_experiment_by_name("shrinkfleet/tiny")
    (pcqat,) = client.search_runs([exp.experiment_id], "tags.`shrinkfleet.variant` = 'pruned-pcqat' and "
                                  "tags.`shrinkfleet.model` = 'photos-user'")
    assert "LayerNormalization" in pcqat.data.tags["shrinkfleet.skipped_layers"]

    mnv2 = json.loads((project / "metrics" / "photos-mnv2.json").read_text())
    assert mnv2["variants"]["student"]["params"] > 100_000  # MobileNetV2 at alpha 0.35, not the zoo's MLP
    assert mnv2["variants"]["student"]["output"] == "logits"

    # Evaluation reads the user's softmax as it is: the teacher's accuracy is the user's model's own.
    from shrinkfleet.datasets import load_prepared
    from shrinkfleet.evaluation import TFLiteModel

    test = load_prepared(project / "data" / "prepared" / "photos").test
    own = float(np.mean(user.predict(test.x, verbose=0).argmax(axis=1) == test.y))
    assert doc["variants"]["teacher"]["accuracy"] == pytest.approx(own)

    # Served: the production flatbuffer's own probabilities, once (a softmax over probabilities would
    # flatten them towards 0.5), from uint8 images as decoded.
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    served = mlflow.pyfunc.load_model("models:/photos-user@production")
    version = client.get_model_version_by_alias("photos-user", "production")
    variant = version.tags["shrinkfleet.variant"]
    probs = np.asarray(served.predict(images.x))
    direct = TFLiteModel.from_path(project / doc["variants"][variant]["path"]).predict(
        (images.x / 255.0).astype(np.float32))
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-4)
    np.testing.assert_allclose(probs, direct, atol=1e-5)

    # A new file at the same path re-runs that model only, and says why.
    from shrinkfleet.tfenv import keras

    head = user.layers[-1]  # the output Dense (its auto-made name depends on what this process built before)
    assert isinstance(head, keras.layers.Dense)
    head.set_weights([w * 0.5 for w in head.get_weights()])
    user.save(project / "models" / "in" / "user.keras")
    again = shrinkfleet_cmd("run", cwd=project, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "✓ photos-user: ran teacher, prune, compress, evaluate (models/in/user.keras changed)" in again.stdout
    assert "✓ photos-mnv2: up to date, nothing ran" in again.stdout

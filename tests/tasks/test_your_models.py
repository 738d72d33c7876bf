"""Your own models: trained files, tf_keras.applications, builder functions, softmax and sigmoid outputs,
and layers TFMOT does not support. One test per arch kind, per output kind and per failure."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from shrinkfleet import techniques, training, zoo
from shrinkfleet.config import (
    ApplicationArch,
    ClusterConfig,
    CustomArch,
    DistillConfig,
    MlpArch,
    PretrainedArch,
    PruneConfig,
    QatConfig,
    parse_params,
)
from shrinkfleet.evaluation import TFLiteModel, kernel_sparsity, to_tflite
from shrinkfleet.tfenv import keras

CUSTOM_LAYER = '''
import tf_keras as keras


@keras.utils.register_keras_serializable(package="mine")
class Scale(keras.layers.Layer):
    """A layer of the user's own, with a weight per channel."""

    def build(self, input_shape):
        self.alpha = self.add_weight(name="alpha", shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.alpha
'''


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project folder holding a module of the user's (a custom layer and a builder)."""
    (tmp_path / "mymodels").mkdir()
    (tmp_path / "mymodels" / "__init__.py").write_text("")
    (tmp_path / "mymodels" / "layers.py").write_text(CUSTOM_LAYER)
    (tmp_path / "mymodels" / "cnn.py").write_text(textwrap.dedent('''
        import tf_keras as keras
        from mymodels.layers import Scale


        def build(input_shape, outputs, width=8):
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


        def sequential(input_shape, outputs):
            return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(), keras.layers.Dense(outputs)])


        def broken(input_shape, outputs):
            raise RuntimeError("no GPU here")


        def subclassed(input_shape, outputs):
            class Net(keras.Model):
                def call(self, x):
                    return x
            return Net()
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _user_cnn(project: Path, digits, epochs: int = 12) -> keras.Model:
    model = zoo.build(CustomArch(builder="mymodels.cnn:build", options={"width": 8}), digits.input_shape, 10,
                      "user", root=project)
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(digits.train.x, digits.train.y, epochs=epochs, batch_size=64, verbose=0)
    return model


def test_a_builder_is_imported_from_the_project_and_called_with_the_data_shape(project, digits):
    model = zoo.build(CustomArch(builder="mymodels.cnn:build", options={"width": 4}), (8, 8, 1), 10, "t",
                      root=project)
    assert model.name == "t" and tuple(model.inputs[0].shape[1:]) == (8, 8, 1)
    assert model.get_layer("conv2d").filters == 4
    assert zoo.output_kind(model) == "probabilities"


@pytest.mark.parametrize(("builder", "message"), [
    ("mymodels.cnn:broken", "builder mymodels.cnn:broken raised RuntimeError: no GPU here"),
    ("mymodels.cnn:subclassed", "a subclassed or unbuilt model"),
    ("mymodels.cnn:missing", "module mymodels.cnn has no function 'missing'"),
    ("mymodels.nothere:build", "cannot import module 'mymodels.nothere'"),
])
def test_a_builder_that_cannot_give_a_model_says_why(project, builder, message):
    with pytest.raises(zoo.ArchError, match=message):
        zoo.build(CustomArch(builder=builder), (8, 8, 1), 10, "t", root=project)


def test_a_sequential_model_becomes_functional(project):
    model = zoo.build(CustomArch(builder="mymodels.cnn:sequential"), (8, 8, 1), 10, "t", root=project)
    assert not isinstance(model, keras.Sequential)
    assert zoo.output_kind(model) == "logits"


@pytest.mark.parametrize("suffix", [".keras", ".h5", ""])  # "" is a SavedModel folder
def test_a_pretrained_model_loads_as_saved_with_the_same_weights(tmp_path, suffix):
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(8)(inputs)))
    path = tmp_path / f"mine{suffix}"
    model.save(path) if suffix else model.save(path, save_format="tf")
    loaded = zoo.load_pretrained(PretrainedArch(path=path.name), tmp_path)
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert zoo.output_kind(loaded) == "probabilities"


def test_a_pretrained_model_with_custom_layers_needs_its_imports(project, digits):
    model = _user_cnn(project, digits, epochs=1)
    model.save(project / "user.keras")
    import sys

    for name in [m for m in sys.modules if m.startswith("mymodels")]:
        del sys.modules[name]
    keras.utils.get_custom_objects().pop("mine>Scale", None)
    with pytest.raises(zoo.ArchError, match="if it has custom layers, list the modules that define them under"):
        zoo.load_pretrained(PretrainedArch(path="user.keras"), project)
    loaded = zoo.load_pretrained(PretrainedArch(path="user.keras", imports=["mymodels.layers"]), project, project)
    np.testing.assert_allclose(loaded(digits.test.x[:4]).numpy(), model(digits.test.x[:4]).numpy(), rtol=1e-6)


def test_a_missing_pretrained_file_is_named(tmp_path):
    with pytest.raises(zoo.ArchError, match="models/in/churn.keras: model file not found"):
        zoo.load_pretrained(PretrainedArch(path="models/in/churn.keras"), tmp_path)


def test_a_model_must_fit_its_data():
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    with pytest.raises(zoo.ArchError, match=r"takes inputs of shape \(6,\), the prepared data has \(30,\)"):
        zoo.check_fits(model, (30,), 3, "teacher")
    with pytest.raises(zoo.ArchError, match="has 3 output\\(s\\), the dataset has 2 classes"):
        zoo.check_fits(model, (6,), 2, "teacher")
    binary = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(inputs))
    zoo.check_fits(binary, (6,), 2, "teacher")  # one sigmoid unit for two classes


def test_an_application_is_built_with_no_weights_on_the_data_shape():
    model = zoo.build(ApplicationArch(name="MobileNetV2", options={"alpha": 0.35}), (32, 32, 3), 5, "s")
    assert tuple(model.inputs[0].shape[1:]) == (32, 32, 3) and model.outputs[0].shape[-1] == 5
    assert zoo.output_kind(model) == "logits"  # asked for logits: classifier_activation=None


@pytest.mark.parametrize(("arch", "shape", "message"), [
    (ApplicationArch(name="MobileNetV2", options={"alpha": 0.35}), (28, 28, 1), "at least 32x32"),
    (ApplicationArch(name="MobileNetV2", options={"alpa": 0.35}), (32, 32, 3), "unknown option\\(s\\) alpa"),
    (ApplicationArch(name="MobileNetV9"), (32, 32, 3), "'MobileNetV9' is not in tf_keras.applications"),
    (ApplicationArch(name="ResNet50"), (30,), "needs images"),
])
def test_an_application_that_cannot_take_the_data_is_refused(arch, shape, message):
    with pytest.raises(zoo.ArchError, match=message):
        zoo.build(arch, shape, 10, "s")


def test_application_options_shrinkfleet_sets_are_refused_in_params(tiny_params):
    from shrinkfleet.config import ConfigError

    tiny_params["models"]["digits-mlp"]["student"] = {"arch": "application", "name": "MobileNetV2",
                                                      "options": {"weights": "imagenet"}}
    with pytest.raises(ConfigError, match="models.digits-mlp.student.options: weights: set by shrinkfleet"):
        parse_params(tiny_params)


def test_a_model_without_student_runs_no_distill_and_no_recipe_from_a_student(tiny_params):
    from shrinkfleet import pipeline
    from shrinkfleet.config import ConfigError

    tiny_params["models"]["digits-mlp"]["student"] = None
    fleet = parse_params(tiny_params)
    assert pipeline.model_kinds(fleet, "digits-mlp") == ("teacher", "prune", "compress", "evaluate")
    stages = pipeline.stages(fleet)
    assert "distill-digits-mlp" not in stages
    assert "models/digits-mlp/teacher.keras" in stages["prune-digits-mlp"]["deps"]
    assert fleet.resolve("digits-mlp").keras_variants == ("teacher", "pruned")
    tiny_params["recipes"]["sparse"] = {"from": "student", "steps": ["int8"]}
    with pytest.raises(ConfigError, match="models.digits-mlp.recipes: sparse start\\(s\\) from the student, and "
                                          "models.digits-mlp has none"):
        parse_params(tiny_params)


@pytest.mark.parametrize(("activation", "units", "kind"), [(None, 3, "logits"), ("softmax", 3, "probabilities"),
                                                           ("sigmoid", 1, "sigmoid")])
def test_outputs_read_as_logits_give_the_same_classes(activation, units, kind):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(units, activation=activation)(inputs))
    assert zoo.output_kind(model) == kind
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    out = model(x).numpy()
    logits = training.as_logits(out, kind)
    expected = (out[:, 0] > 0.5).astype(int) if kind == "sigmoid" else out.argmax(axis=1)
    np.testing.assert_array_equal(logits.argmax(axis=1), expected)
    if kind == "probabilities":  # a softmax over log-probabilities gives the probabilities back
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        np.testing.assert_allclose(z / z.sum(axis=1, keepdims=True), out, atol=1e-5)


def test_a_softmax_teacher_distils_through_its_log_probabilities(digits):
    from tasks.distill import distill

    inputs = keras.Input(digits.input_shape)
    x = keras.layers.Dense(64, activation="relu")(keras.layers.Flatten()(inputs))
    teacher = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
    teacher.compile(keras.optimizers.Adam(0.003), "sparse_categorical_crossentropy")
    teacher.fit(digits.train.x, digits.train.y, epochs=8, batch_size=64, verbose=0)
    teacher_acc = training.accuracy(teacher, digits.test.x, digits.test.y)
    student, history = distill(teacher, MlpArch(hidden=[32]), DistillConfig(epochs=8, patience=0,
                                                                            learning_rate=5e-3), digits, seed=0)
    assert np.isfinite(history["loss"]).all() and history["loss"][-1] < history["loss"][0]
    assert training.accuracy(student, digits.test.x, digits.test.y) > teacher_acc - 0.1


def test_unsupported_layers_are_left_as_they_are_and_listed(project, digits):
    from tasks.compress import representative_samples
    from tasks.prune import expected_sparsity, prune

    model = _user_cnn(project, digits)
    before = training.accuracy(model, digits.test.x, digits.test.y)
    left = techniques.skipped_layers(model, "prune")
    assert {"batch_normalization", "depthwise_conv2d", "scale", "layer_normalization"} <= set(left)
    assert left["scale"].startswith("Scale: not pruned")

    cfg = PruneConfig(target_sparsity=0.5, epochs=3, frequency=5)
    pruned = prune(model, cfg, digits, 0)
    assert kernel_sparsity(pruned) == pytest.approx(expected_sparsity(cfg, model), abs=0.02)
    assert 0.4 < expected_sparsity(cfg, model) < 0.5  # the depthwise kernel stays dense
    assert (pruned.get_layer("conv2d_1").kernel.numpy() == 0).mean() == pytest.approx(0.5, abs=0.02)
    alpha = pruned.get_layer("scale").get_weights()[0]  # fine-tuned with the rest, never masked
    assert np.count_nonzero(alpha) == alpha.size
    clustered = techniques.cluster(pruned, ClusterConfig(clusters=8, epochs=1), digits, 0)
    qat = techniques.quantization_aware(clustered, "pcqat", QatConfig(epochs=1), digits, 0)
    assert {"rescaling", "scale", "layer_normalization"} <= set(techniques.skipped_layers(clustered, "pcqat"))
    tflite = TFLiteModel(to_tflite(qat, "int8", representative_samples(digits, 50, 0)))
    accuracy = np.mean(training.as_logits(tflite.predict(digits.test.x), "probabilities").argmax(1) == digits.test.y)
    assert accuracy > 0.5 and before > 0.5  # 10 classes: far above chance, though compressed


def test_a_technique_with_no_layer_to_work_on_says_so(digits):
    from tasks.prune import prune

    inputs = keras.Input(digits.input_shape)
    x = keras.layers.LayerNormalization()(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, keras.layers.Softmax()(x[:, :10]))
    with pytest.raises(techniques.NotApplicable, match="prune: no layer TFMOT can prune"):
        prune(model, PruneConfig(), digits, 0)
    with pytest.raises(techniques.NotApplicable, match="cluster: no Dense/Conv layer"):
        techniques.cluster(model, ClusterConfig(), digits, 0)

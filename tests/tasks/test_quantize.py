from __future__ import annotations

import pytest

from shrinkfleet import evaluation as ev
from shrinkfleet import training
from shrinkfleet.config import MlpArch, QuantizeConfig, TrainConfig


@pytest.fixture(scope="module")
def wide(digits):
    """Layers with many inputs per output channel: int8 keeps ~24 bytes of scales and zero points per
    output channel (weights and bias), so on narrow layers the ratio to float32 stays well under 4x."""
    from tasks.teacher import train_teacher

    model, _ = train_teacher(MlpArch(hidden=[256, 256]), TrainConfig(epochs=5, patience=0), digits, 0)
    return model


def _convert(model, digits, modes):
    from tasks.compress import representative_samples

    rep = representative_samples(digits, QuantizeConfig().representative_samples, seed=0)
    return {mode: ev.to_tflite(model, mode, rep) for mode in modes}


def test_int8_is_3x_smaller_and_within_2_points(wide, digits):
    out = _convert(wide, digits, ["float32", "int8"])
    assert len(out["float32"]) / len(out["int8"]) >= 3.0
    float_acc = ev.accuracy_of(ev.TFLiteModel(out["float32"]).predict, digits.test.x, digits.test.y)
    int8_acc = ev.accuracy_of(ev.TFLiteModel(out["int8"]).predict, digits.test.x, digits.test.y)
    keras_acc = training.accuracy(wide, digits.test.x, digits.test.y)
    assert float_acc == pytest.approx(keras_acc, abs=1e-6)
    assert abs(float_acc - int8_acc) <= 0.02


def test_every_mode_converts_and_sizes_are_ordered(wide, digits):
    out = _convert(wide, digits, ["float32", "float16", "dynamic", "int8"])
    assert set(out) == {"float32", "float16", "dynamic", "int8"}
    assert len(out["float32"]) > len(out["float16"]) > len(out["dynamic"])
    model = ev.TFLiteModel(out["int8"])
    assert model.input["dtype"].__name__ == "int8"  # full integer, inputs included


def test_unknown_mode_and_missing_calibration_are_errors(wide):
    with pytest.raises(ValueError, match="unknown quantization mode 'int4'"):
        ev.to_tflite(wide, "int4")
    with pytest.raises(ValueError, match="int8 conversion needs representative samples"):
        ev.to_tflite(wide, "int8")


def test_tflite_sparsity_reads_the_stored_weights(student, digits):
    from shrinkfleet.config import PruneConfig
    from tasks.prune import prune

    pruned = prune(student, PruneConfig(target_sparsity=0.6, epochs=2, frequency=5), digits, seed=0)
    for mode in ("float32", "float16", "int8"):
        content = ev.to_tflite(pruned, mode, digits.train.x[:20])
        assert ev.tflite_sparsity(ev.TFLiteModel(content)) == pytest.approx(0.6, abs=0.02), mode


def test_xnnpack_refusal_falls_back_to_builtin_kernels(wide, digits, monkeypatch):
    """Some int8 graphs fail XNNPACK's prepare step; the built-in kernels must still run them."""
    import ai_edge_litert.interpreter as litert

    content = ev.to_tflite(wide, "int8", digits.train.x[:20])
    real = litert.Interpreter

    class PickyInterpreter(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._default = "experimental_op_resolver_type" not in kwargs

        def allocate_tensors(self):
            if self._default:
                raise RuntimeError("failed to create XNNPACK runtime (TfLiteXNNPackDelegate) failed to prepare.")
            return super().allocate_tensors()

    monkeypatch.setattr(litert, "Interpreter", PickyInterpreter)
    model = ev.TFLiteModel(content)
    assert model.runtime == "builtin"
    monkeypatch.setattr(litert, "Interpreter", real)
    reference = ev.TFLiteModel(content)
    assert reference.runtime == "xnnpack"
    assert (model.predict(digits.test.x).argmax(1) == reference.predict(digits.test.x).argmax(1)).mean() > 0.99


def test_direct_conversion_matches_the_savedmodel_route_and_keeps_a_signature(wide, digits):
    """to_tflite freezes the model's inference function instead of writing a SavedModel first: the
    flatbuffer must compute what from_keras_model's does and still carry a serving_default signature."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    from shrinkfleet.tfenv import tf

    rep = digits.train.x[:50]
    for mode in ("float32", "int8"):
        fast = ev.to_tflite(wide, mode, rep)
        converter = tf.lite.TFLiteConverter.from_keras_model(wide)
        ev._configure(converter, mode, rep)
        slow = converter.convert()
        np.testing.assert_array_equal(ev.TFLiteModel(fast).predict(digits.test.x),
                                      ev.TFLiteModel(slow).predict(digits.test.x), err_msg=mode)
        it = Interpreter(model_content=fast)
        assert it.get_signature_list() == {
            "serving_default": {"inputs": list(wide.input_names), "outputs": list(wide.output_names)}}, mode
        runner = it.get_signature_runner()
        x = digits.test.x[:1].astype(np.float32)
        if mode == "int8":
            scale, zero = it.get_input_details()[0]["quantization"]
            x = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)
        (out,) = runner(**{wide.input_names[0]: x}).values()
        assert out.shape == (1, 10), mode


def test_keras_caller_in_slices_predicts_as_keras_does(wide, digits):
    import numpy as np

    call = ev.keras_caller(wide, batch_size=100)  # the test split is several slices of 100
    assert len(digits.test.x) > 200
    np.testing.assert_allclose(call(digits.test.x), wide.predict(digits.test.x, verbose=0), rtol=1e-5, atol=1e-6)

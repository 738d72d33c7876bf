"""Measuring variants: accuracy, bytes, sparsity and latency, for Keras and TFLite alike.

``size_bytes`` is always the size of a deployable TFLite flatbuffer: a ``.tflite``
variant's own file, and for a Keras variant (teacher, student, pruned) the float32
flatbuffer it converts to. So the teacher's ``size_bytes`` is the "float32 bytes" that
compression ratios are quoted against, free of ``.keras`` zip and JSON overhead.
"""

from __future__ import annotations

import gzip
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shrinkfleet.tfenv import keras, quiet_native_stderr, tf

WEIGHT_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV")

log = logging.getLogger(__name__)

PRUNABLE = (keras.layers.Dense, keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Conv1D)


# ----------------------------------------------------------------------------- conversion


def inference_function(model: keras.Model) -> Callable | None:
    """The model's inference call (``training=False``) traced once for any batch size.

    One trace serves the TFLite conversion, the latency runs and the accuracy of a Keras
    variant (``model.predict`` would trace a function of its own). ``None`` for a model
    with several inputs, which takes the general conversion path.
    """
    if len(model.inputs) != 1:
        return None
    (inp,) = model.inputs
    spec = tf.TensorSpec([None, *inp.shape[1:]], inp.dtype, name=model.input_names[0])
    return tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)


def to_tflite(model: keras.Model, mode: str = "float32", representative: np.ndarray | None = None,
              traced: Callable | None = None) -> bytes:
    """Convert a Keras model to a TFLite flatbuffer, with a ``serving_default`` signature.

    The model's inference function is frozen and converted directly, about 5x faster than
    ``TFLiteConverter.from_keras_model``, which writes and reloads a SavedModel of every
    layer first (measured: 0.08 s against 0.4 s for a small MLP, the same ops and outputs
    bit for bit). That route adds the signature itself; here :func:`_add_signature` does,
    naming inputs and outputs after the model's. A model the direct route cannot convert
    (several inputs, or a conversion error) goes through ``from_keras_model``.

    Args:
        mode: ``float32`` (plain), ``float16`` (half-precision weights), ``dynamic``
            (int8 weights, float activations) or ``int8`` (full integer, int8 inputs and
            outputs; needs ``representative``).
        representative: samples (N, *input_shape) that calibrate int8 activation ranges.
        traced: the model's :func:`inference_function`, if the caller has it already.

    Raises:
        ValueError: an unknown mode, or ``int8`` without representative samples.
    """
    if mode not in ("float32", "float16", "dynamic", "int8"):
        raise ValueError(f"unknown quantization mode {mode!r}; one of float32, float16, dynamic, int8")
    if mode == "int8" and (representative is None or len(representative) == 0):
        raise ValueError("int8 conversion needs representative samples")
    traced = traced or inference_function(model)
    if traced is not None:
        converter = tf.lite.TFLiteConverter.from_concrete_functions([traced], model)
        converter.experimental_lower_to_saved_model = False
        _configure(converter, mode, representative)
        try:
            with quiet_native_stderr():
                content = converter.convert()
            return _add_signature(content, model.input_names, model.output_names)
        except Exception as exc:  # (any failure of the direct route: the general one decides)
            log.debug("direct TFLite conversion failed (%s: %s); converting through a SavedModel",
                      type(exc).__name__, exc)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    _configure(converter, mode, representative)
    with quiet_native_stderr():
        return converter.convert()


def _configure(converter: tf.lite.TFLiteConverter, mode: str, representative: np.ndarray | None) -> None:
    if mode == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif mode == "int8":
        samples = np.asarray(representative, dtype=np.float32)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        converter.representative_dataset = lambda: ([samples[i: i + 1]] for i in range(len(samples)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8


def _add_signature(content: bytes, input_names: list[str], output_names: list[str]) -> bytes:
    """``content`` with a ``serving_default`` signature over its main subgraph's inputs and outputs.

    LiteRT's ``get_signature_runner()`` (and Android's ``runSignature``) address a model's
    tensors through it. Unchanged if the model has a signature already.
    """
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    if model.signatureDefs:
        return content
    graph = model.subgraphs[0]

    def tensor_maps(names: list[str], indices) -> list:
        maps = []
        for name, index in zip(names, indices, strict=True):
            m = schema.TensorMapT()
            m.name, m.tensorIndex = name, int(index)
            maps.append(m)
        return maps

    sig = schema.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = "serving_default", 0
    sig.inputs = tensor_maps(input_names, graph.inputs)
    sig.outputs = tensor_maps(output_names, graph.outputs)
    model.signatureDefs = [sig]
    builder = flatbuffers.Builder(len(content) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


# ----------------------------------------------------------------------------- TFLite runner


def open_interpreter(content: bytes, threads: int | None = None) -> tuple[object, str]:
    """A LiteRT interpreter with tensors allocated, and which kernels run it.

    ``threads`` is passed to the interpreter (and so to XNNPACK); ``None`` leaves LiteRT's
    default, which is what latency must never depend on (``evaluate.threads`` pins it).

    XNNPACK (the default CPU delegate) refuses some int8 graphs whose quantization scales it
    cannot represent ("failed to prepare"); the built-in kernels run them. Returns
    ``(interpreter, "xnnpack" | "builtin")`` so latencies can be read accordingly.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    try:
        it = Interpreter(model_content=content, num_threads=threads)
        it.allocate_tensors()
        return it, "xnnpack"
    except RuntimeError:
        it = Interpreter(model_content=content, num_threads=threads,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        it.allocate_tensors()
        return it, "builtin"


class TFLiteModel:
    """Runs a ``.tflite`` flatbuffer with LiteRT; quantizes int8 inputs and dequantizes outputs.

    The input is resized (and tensors reallocated) only when the batch size changes, so a
    caller timing one batch size pays for it once, in warm-up.
    """

    def __init__(self, content: bytes, threads: int | None = None):
        self.content = content
        self.threads = threads
        self.interpreter, self.runtime = open_interpreter(content, threads)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self._batch = int(self.input["shape"][0])

    @classmethod
    def from_path(cls, path: Path) -> TFLiteModel:
        return cls(Path(path).read_bytes())

    def _quantize(self, x: np.ndarray) -> np.ndarray:
        dtype = self.input["dtype"]
        if dtype in (np.int8, np.uint8):
            scale, zero = self.input["quantization"]
            info = np.iinfo(dtype)
            return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)
        return x.astype(dtype)

    def _dequantize(self, y: np.ndarray) -> np.ndarray:
        if self.output["dtype"] in (np.int8, np.uint8):
            scale, zero = self.output["quantization"]
            return (y.astype(np.float32) - zero) * scale
        return y.astype(np.float32)

    def _resize(self, batch: int) -> None:
        if batch != self._batch:
            self.interpreter.resize_tensor_input(self.input["index"], [batch, *self.input["shape"][1:]])
            self.interpreter.allocate_tensors()
            self.input = self.interpreter.get_input_details()[0]
            self.output = self.interpreter.get_output_details()[0]
            self._batch = batch

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Float outputs (logits) for ``x``, in batches."""
        outs = []
        for start in range(0, len(x), batch_size):
            chunk = x[start: start + batch_size]
            self._resize(len(chunk))
            self.interpreter.set_tensor(self.input["index"], self._quantize(chunk))
            self.interpreter.invoke()
            outs.append(self._dequantize(self.interpreter.get_tensor(self.output["index"])))
        return np.concatenate(outs)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self._resize(len(x))
        self.interpreter.set_tensor(self.input["index"], self._quantize(x))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"])

    def weight_tensors(self) -> list[np.ndarray]:
        """The constant weight tensors of every weight-bearing op (float16 weights followed through DEQUANTIZE)."""
        it, _ = open_interpreter(self.content)
        ops = it._get_ops_details()
        produced_by = {out: op for op in ops for out in op["outputs"]}
        weights = []
        for op in ops:
            if op["op_name"] not in WEIGHT_OPS or len(op["inputs"]) < 2:
                continue
            idx = int(op["inputs"][1])
            src = produced_by.get(idx)
            if src is not None and src["op_name"] == "DEQUANTIZE":
                idx = int(src["inputs"][0])
            try:
                weights.append(np.array(it.get_tensor(idx)))
            except ValueError:
                continue  # a weight computed at run time: not stored, so not counted
        return weights


# ----------------------------------------------------------------------------- measures


def prunable_weight(layer: keras.layers.Layer) -> Any:
    """The weight magnitude pruning zeroes in a Dense/Conv layer: its kernel (a depthwise one's
    ``depthwise_kernel``), or None when it has none yet."""
    return getattr(layer, "kernel", None) if hasattr(layer, "kernel") else getattr(layer, "depthwise_kernel", None)


def kernel_sparsity(model: keras.Model) -> float:
    """Fraction of exact zeros in the kernels of Dense/Conv layers (biases excluded)."""
    zeros = total = 0
    for layer in model.submodules if hasattr(model, "submodules") else model.layers:
        if isinstance(layer, PRUNABLE) and prunable_weight(layer) is not None:
            k = prunable_weight(layer).numpy()
            zeros += int(np.sum(k == 0))
            total += k.size
    return zeros / total if total else 0.0


def tflite_sparsity(model: TFLiteModel) -> float:
    """Fraction of stored weight values equal to zero (for int8: the quantized zero)."""
    weights = model.weight_tensors()
    total = sum(w.size for w in weights)
    return sum(int(np.sum(w == 0)) for w in weights) / total if total else 0.0


def gzip_size(content: bytes) -> int:
    """Bytes after gzip -9: what sparsity and repeated values save on the wire."""
    return len(gzip.compress(content, compresslevel=9, mtime=0))


def accuracy_of(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy (fraction) of any function returning logits/probabilities."""
    return float(np.mean(np.argmax(predict(x), axis=1) == y))


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p95_ms: float


def batch_of(sample: np.ndarray, batch: int) -> np.ndarray:
    """The first ``batch`` samples of ``sample``, repeated when it has fewer."""
    if len(sample) == 0:
        raise ValueError("latency needs at least one sample")
    reps = -(-batch // len(sample))
    return np.concatenate([sample] * reps)[:batch] if reps > 1 else sample[:batch]


def latency(call: Callable[[np.ndarray], object], sample: np.ndarray, runs: int, warmup: int,
            batch: int = 1) -> Latency:
    """Wall-clock latency of one call on ``batch`` samples: median and 95th percentile, in ms.

    The same input array is passed every time: a runtime that resizes on a new batch size
    (:class:`TFLiteModel`) does so once, in the (at least one) warm-up call, never in a timed one.
    """
    x = batch_of(sample, batch)
    for _ in range(max(warmup, 1)):
        call(x)
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        call(x)
        times[i] = time.perf_counter() - t0
    return Latency(float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 95) * 1e3))


def tflite_latencies(content: bytes, sample: np.ndarray, batch_sizes: list[int], runs: int, warmup: int,
                     threads: int | None) -> tuple[dict[int, Latency], str]:
    """LiteRT latency of a flatbuffer at each batch size, one interpreter per size, and its kernels.

    A separate interpreter per batch size keeps every timed call on tensors allocated for
    exactly that shape (alternating sizes on one interpreter would resize and reallocate).
    """
    out, runtime = {}, ""
    for batch in batch_sizes:
        model = TFLiteModel(content, threads)
        out[batch], runtime = latency(model, sample, runs, warmup, batch), model.runtime
    return out, runtime


def keras_caller(model: keras.Model, traced: Callable | None = None,
                 batch_size: int = 512) -> Callable[[np.ndarray], np.ndarray]:
    """A compiled (``tf.function``) inference call: how a Keras model is served, not eager Python.

    Inputs larger than ``batch_size`` are run in slices of it, as ``model.predict`` would.
    ``traced`` is the model's :func:`inference_function`, if the caller has it already.
    """
    fn = traced or inference_function(model) or tf.function(lambda x: model(x, training=False),
                                                            reduce_retracing=True)
    dtype = model.inputs[0].dtype  # a traced function takes exactly its input's dtype

    def call(x: np.ndarray) -> np.ndarray:
        if len(x) <= batch_size:
            return fn(tf.constant(x, dtype=dtype)).numpy()
        return np.concatenate([fn(tf.constant(x[i: i + batch_size], dtype=dtype)).numpy()
                               for i in range(0, len(x), batch_size)])

    return call

"""The registered model: an MLflow pyfunc that runs a ``.tflite`` variant with LiteRT.

MLflow stores this file inside every registered version ("models from code") and runs it
on load, so it imports only numpy, MLflow and ``ai_edge_litert``, never shrinkfleet: a
serving host needs no training stack.

Input: raw features as the dataset's source provides them (before shrinkfleet's
normalisation), one sample per row, either flat (``n x prod(input_shape)``) or shaped
(``n x *input_shape``, e.g. uint8 images ``n x height x width x channels``), as a numpy array
or a pandas DataFrame. A table's model takes a DataFrame of its raw columns by name (string
columns as strings; a category the train split never had is encoded as all zeros, with a
warning). The model applies the dataset's normalisation (saved with the version), quantizes
for int8 models, and returns class probabilities, ``n x classes``: the softmax of a model's
logits, or its own probabilities when it ends in a softmax or a sigmoid. A regression model
returns one number per row, in the label's own units.
"""

from __future__ import annotations

import json
import warnings

import mlflow
import numpy as np


class TFLiteClassifier(mlflow.pyfunc.PythonModel):
    """Class probabilities from a TFLite classifier, with the training-time preprocessing."""

    def load_context(self, context):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        with open(context.artifacts["preprocessing"]) as f:
            self.meta = json.load(f)
        with open(context.artifacts["tflite"], "rb") as f:
            content = f.read()
        try:
            self.interpreter = Interpreter(model_content=content)
            self.interpreter.allocate_tensors()
        except RuntimeError:  # XNNPACK refuses some int8 scale combinations; built-in kernels run them
            self.interpreter = Interpreter(
                model_content=content, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
            self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = int(self.input["shape"][0])

    def _encode(self, table) -> np.ndarray:
        """A table's raw columns as numbers, as shrinkfleet.datasets.encode_table does it."""
        import pandas as pd

        enc = self.meta["normalization"]["encoding"]
        if isinstance(table, dict):
            table = pd.DataFrame(table)
        elif not isinstance(table, pd.DataFrame):
            if enc["categorical"]:
                raise ValueError(f"this model takes a DataFrame with the columns {', '.join(enc['columns'])}")
            table = pd.DataFrame(np.asarray(table, dtype=np.float64).reshape(-1, len(enc["columns"])),
                                 columns=enc["columns"])
        missing = [c for c in enc["columns"] if c not in table.columns]
        if missing:
            raise ValueError(f"missing input column(s) {', '.join(missing)}; the model takes "
                             f"{', '.join(enc['columns'])}")
        parts = []
        for col in enc["columns"]:
            series = table[col]
            if col in enc["categorical"]:
                cats = enc["categorical"][col]
                values = [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in series]
                unseen = sorted({v for v in values if v is not None and v not in cats})
                if unseen:
                    warnings.warn(f"column {col!r}: {', '.join(unseen[:5])} not seen in training; encoded as no "
                                  "category (all zeros)", stacklevel=2)
                arr = np.array(values, dtype=object)
                parts.append(np.stack([arr == c for c in cats], axis=1).astype(np.float64) if cats
                             else np.zeros((len(arr), 0)))
            else:
                col_values = np.asarray(series, dtype=np.float64)
                if col in enc["impute"]:
                    col_values = np.where(np.isnan(col_values), enc["impute"][col], col_values)
                elif np.isnan(col_values).any():
                    raise ValueError(f"column {col!r} has missing values, and the model was trained without impute")
                parts.append(col_values[:, None])
        return np.concatenate(parts, axis=1)

    def _normalise(self, x: np.ndarray) -> np.ndarray:
        # The same steps, in the same order, as shrinkfleet.datasets.apply_tabular.
        norm = self.meta["normalization"]
        if norm["method"] == "scale":
            return x / np.float32(norm["scale"])
        z = x.reshape(len(x), -1)
        if "columns" in norm:
            z = z[:, norm["columns"]]
        z = (z - np.asarray(norm["mean"], dtype=np.float64)) / np.asarray(norm["std"], dtype=np.float64)
        if "select" in norm:
            z = z[:, norm["select"]]
        if "pca" in norm:
            z = (z - np.asarray(norm["pca"]["mean"])) @ np.asarray(norm["pca"]["components"]).T
        return z

    def predict(self, context, model_input, params=None):
        shape = tuple(self.meta["input_shape"])
        if "encoding" in self.meta["normalization"]:  # a table: raw columns by name
            x = self._encode(model_input)
        else:
            if isinstance(model_input, dict):  # a named tensor input: {name: array}
                (model_input,) = model_input.values()
            if hasattr(model_input, "to_numpy"):  # pandas DataFrame
                model_input = model_input.to_numpy()
            x = np.asarray(model_input, dtype=np.float64)
            if x.ndim == 1:
                x = x[None, :]
        x = self._normalise(x.reshape(len(x), -1)).reshape((len(x), *shape)).astype(np.float32)
        if self.input["dtype"] in (np.int8, np.uint8):
            scale, zero = self.input["quantization"]
            info = np.iinfo(self.input["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(self.input["dtype"])
        outs = []
        for start in range(0, len(x), 256):
            chunk = x[start: start + 256]
            if len(chunk) != self.batch:
                self.interpreter.resize_tensor_input(self.input["index"], [len(chunk), *shape])
                self.interpreter.allocate_tensors()
                self.input = self.interpreter.get_input_details()[0]
                self.output = self.interpreter.get_output_details()[0]
                self.batch = len(chunk)
            self.interpreter.set_tensor(self.input["index"], chunk)
            self.interpreter.invoke()
            y = self.interpreter.get_tensor(self.output["index"]).astype(np.float32)
            if self.output["dtype"] in (np.int8, np.uint8):
                scale, zero = self.output["quantization"]
                y = (y - zero) * scale
            outs.append(y)
        out = np.concatenate(outs)
        if self.meta.get("task") == "regression":  # in the label's own units
            target = self.meta["target"]
            return out[:, 0].astype(np.float64) * target["std"] + target["mean"]
        kind = self.meta.get("output", "logits")  # what the model ends in (shrinkfleet.zoo.output_kind)
        if kind == "sigmoid":  # one unit: the probability of class 1
            p = np.clip(out[:, :1], 0.0, 1.0)
            return np.concatenate([1.0 - p, p], axis=1)
        if kind == "probabilities":
            p = np.clip(out, 0.0, None)
            return p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
        z = np.exp(out - out.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)


mlflow.models.set_model(TFLiteClassifier())

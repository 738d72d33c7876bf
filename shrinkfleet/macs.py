"""Multiply-accumulates (MACs) of one forward pass of one example, counted from a Keras graph.

Decisions:

- Only layers that multiply inputs by weights count: Dense (on any rank, once per position),
  Conv1D/2D/3D (``groups`` too), Conv*DTranspose, DepthwiseConv1D/2D, SeparableConv1D/2D,
  LSTM/GRU/SimpleRNN (per time step, gates and recurrent kernel; elementwise gate products are
  not counted). A nested model is counted layer by layer.
- BatchNormalization, activations, pooling, Add/Multiply/Concatenate, reshapes and dropout
  count 0: they are elementwise or data movement, BatchNorm folds into the preceding
  convolution at TFLite conversion, and in a CNN they are well under 1% of the total.
- Bias additions are not counted (they are adds, not multiply-accumulates).
- A layer called several times (a shared layer) is counted once per call.

Shapes come from the layers' recorded input and output shapes, so the model must be built
(a Sequential given an input shape, or any functional model); an unbuilt model raises
``ValueError``. Unknown batch or sequence dimensions (``None``) other than the batch raise too.
"""

from __future__ import annotations

from shrinkfleet.tfenv import keras

L = keras.layers


def _prod(dims) -> int:
    out = 1
    for d in dims:
        if d is None:
            raise ValueError("count_macs needs fixed input shapes; a dimension is None (give the model a full "
                             "input shape)")
        out *= int(d)
    return out


def _shapes(layer) -> list[tuple[tuple, tuple]]:
    """(input shape, output shape) of every call of ``layer``."""
    pairs = []
    n = len(layer.inbound_nodes)
    for i in range(n):
        pairs.append((layer.get_input_shape_at(i), layer.get_output_shape_at(i)))
    return pairs


def _layer_macs(layer, in_shape, out_shape) -> int:
    if isinstance(in_shape, list) or isinstance(out_shape, list):
        return 0  # merge layers and multi-output layers hold no weights to multiply by
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if isinstance(layer, L.Dense):
        return _prod(out_shape[1:-1]) * int(in_shape[-1]) * layer.units
    if isinstance(layer, (L.SeparableConv1D, L.SeparableConv2D)):
        cin = int(in_shape[-1])
        spatial = _prod(out_shape[1:-1])
        mult = layer.depth_multiplier
        return spatial * _prod(layer.kernel_size) * cin * mult + spatial * cin * mult * layer.filters
    if isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D)):
        cin = int(in_shape[-1])
        return _prod(out_shape[1:-1]) * _prod(layer.kernel_size) * cin * layer.depth_multiplier
    if isinstance(layer, (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)):
        return _prod(in_shape[1:-1]) * _prod(layer.kernel_size) * int(in_shape[-1]) * layer.filters
    if isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D)):
        if layer.data_format == "channels_first":
            cin, spatial = int(in_shape[1]), _prod(out_shape[2:])
        else:
            cin, spatial = int(in_shape[-1]), _prod(out_shape[1:-1])
        return spatial * _prod(layer.kernel_size) * (cin // layer.groups) * layer.filters
    if isinstance(layer, (L.LSTM, L.GRU, L.SimpleRNN)):
        gates = 4 if isinstance(layer, L.LSTM) else 3 if isinstance(layer, L.GRU) else 1
        steps, features = int(in_shape[1]), int(in_shape[-1])
        return steps * gates * (features + layer.units) * layer.units
    return 0


def macs_by_layer(model: keras.Model) -> dict[str, int]:
    """MACs of one example per layer name (nested models' layers as ``outer/inner``); 0 for layers without."""
    if not model.built:
        raise ValueError(f"model {model.name!r} is not built: give it an input shape before counting MACs")
    out: dict[str, int] = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            for name, n in macs_by_layer(layer).items():
                out[f"{layer.name}/{name}"] = n
            continue
        if isinstance(layer, L.InputLayer):
            continue
        out[layer.name] = sum(_layer_macs(layer, i, o) for i, o in _shapes(layer))
    return out


def count_macs(model: keras.Model) -> int:
    """Multiply-accumulates of one forward pass of one example (see the module docstring for what counts)."""
    return sum(macs_by_layer(model).values())


__all__ = ["count_macs", "macs_by_layer"]

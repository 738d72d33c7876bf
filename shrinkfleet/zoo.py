"""Model zoo: functional tf_keras classifiers that output logits.

Functional (not Sequential) because TFMOT's clone-based wrappers (prune, cluster, QAT)
and the int8 converter all accept it; models output logits (no softmax) because
distillation softens them with a temperature. Argmax of the logits is the class.
"""

from __future__ import annotations

from collections.abc import Sequence

from shrinkfleet.config import CnnArch, MlpArch
from shrinkfleet.tfenv import keras


def build(arch: MlpArch | CnnArch, input_shape: Sequence[int], num_classes: int, name: str) -> keras.Model:
    """Build an untrained classifier for ``arch``.

    Raises:
        ValueError: a CNN on inputs that are not images (H, W, C), or inputs too small
            for the number of pooling blocks.
    """
    inputs = keras.Input(shape=tuple(input_shape), name="inputs")
    if arch.arch == "mlp":
        x = keras.layers.Flatten(name="flatten")(inputs) if len(input_shape) > 1 else inputs
        for i, units in enumerate(arch.hidden):
            x = keras.layers.Dense(units, activation="relu", name=f"dense_{i}")(x)
            if arch.dropout:
                x = keras.layers.Dropout(arch.dropout, name=f"dropout_{i}")(x)
    else:
        if len(input_shape) != 3:
            raise ValueError(
                f"cnn needs image inputs (height, width, channels); this dataset has shape {tuple(input_shape)}: "
                "use arch: mlp"
            )
        side = min(input_shape[0], input_shape[1])
        x = inputs
        for i, filters in enumerate(arch.filters):
            x = keras.layers.Conv2D(filters, arch.kernel_size, padding=arch.padding, activation="relu",
                                    name=f"conv_{i}")(x)
            if arch.padding == "valid":
                side -= arch.kernel_size - 1
                if side < 1:
                    raise ValueError(f"cnn: {len(arch.filters)} valid-padded {arch.kernel_size}x{arch.kernel_size} "
                                     f"convs shrink {tuple(input_shape[:2])} inputs to nothing; use padding: same")
            if side >= 2:
                x = keras.layers.MaxPooling2D(2, name=f"pool_{i}")(x)
                side //= 2
        x = keras.layers.Flatten(name="flatten")(x)
        for i, units in enumerate(arch.dense):
            x = keras.layers.Dense(units, activation="relu", name=f"dense_{i}")(x)
        if arch.dropout:
            x = keras.layers.Dropout(arch.dropout, name="dropout")(x)
    # Logits stay float32 under mixed precision: softmax and the distillation KL in float16
    # overflow at high temperatures.
    outputs = keras.layers.Dense(num_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def as_float32(model: keras.Model, arch: MlpArch | CnnArch, input_shape: Sequence[int], num_classes: int
               ) -> keras.Model:
    """``model`` (built by :func:`build`, possibly under mixed precision) rebuilt with float32 layers.

    Mixed precision keeps variables in float32, so the weights carry over exactly.
    """
    if all(layer.dtype_policy.name == "float32" for layer in model.layers):
        return model
    rebuilt = build(arch, input_shape, num_classes, name=model.name)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def clone(model: keras.Model) -> keras.Model:
    """A structurally identical model with copied weights (the input is left untouched)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def load(path) -> keras.Model:
    """Load a ``.keras`` model saved by a stage (no optimizer state, not compiled)."""
    return keras.models.load_model(path, compile=False)


def save(model: keras.Model, path) -> None:
    """Save weights and architecture, without optimizer state, atomically and byte-reproducibly.

    The native ``.keras`` format stores a compiled model's optimizer; an uncompiled clone
    keeps the artifact to what inference and the next stage need. The same model always
    gives the same bytes (see :func:`reproducible_archive`), so DVC sees an unchanged output
    when a stage re-runs on unchanged inputs and the stages after it stay up to date.
    """
    from pathlib import Path

    from shrinkfleet.storage import atomic_path

    with atomic_path(Path(path), suffix=".keras") as tmp:
        clone(model).save(tmp)
        reproducible_archive(tmp)


def reproducible_archive(path) -> None:
    """Rewrite a ``.keras`` archive in place without what changes from one save to the next.

    A ``.keras`` file is a zip of ``metadata.json``, ``config.json`` and the weights. Keras
    writes the time of saving twice: ``date_saved`` in the metadata, which Keras never reads
    back, and each member's zip timestamp. Both go (members get the zip epoch, 1980-01-01);
    members, their order and their compression stay as Keras wrote them.
    """
    import io
    import json
    import zipfile

    with zipfile.ZipFile(path) as zf:
        members = [(info, zf.read(info)) for info in zf.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for info, data in members:
            if info.filename == "metadata.json":
                meta = json.loads(data)
                meta.pop("date_saved", None)
                data = json.dumps(meta, sort_keys=True).encode()
            fixed = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            fixed.compress_type = info.compress_type
            fixed.external_attr = 0o644 << 16
            out.writestr(fixed, data)
    with open(path, "wb") as fh:
        fh.write(buf.getvalue())

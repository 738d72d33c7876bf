"""The models of a fleet: shrinkfleet's own (``mlp``, ``cnn``), ``tf_keras.applications``
architectures, your builder function, or your trained model file.

Every model is a functional tf_keras model, because TFMOT's clone-based wrappers (prune,
cluster, QAT) and the int8 converter accept it; a Sequential one is rebuilt as functional
over the same layers, a subclassed one is refused. shrinkfleet's own models and the
applications it builds output logits (no softmax), because distillation softens them with a
temperature. Your models may end in a softmax or a sigmoid: :func:`output_kind` says which,
and training, distillation, evaluation and serving read the outputs accordingly.

Your code (a builder's module, the ``imports`` of a pretrained model) is imported from the
project folder; a model whose artifacts need it (custom layers) is loaded after importing it
(:func:`load` with ``imports``).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from shrinkfleet.config import ApplicationArch, CnnArch, CustomArch, MlpArch, PretrainedArch, resolve_path
from shrinkfleet.tfenv import keras


class ArchError(ValueError):
    """A model cannot be built or loaded as params.yaml describes it; the message says why."""


OUTPUT_KINDS = ("logits", "probabilities", "sigmoid")


def build(arch: Any, input_shape: Sequence[int], num_classes: int, name: str, root: Path | None = None
          ) -> keras.Model:
    """Build an untrained model for ``arch`` (``mlp``, ``cnn``, ``application`` or ``custom``).

    ``root`` is the project folder a custom builder is imported from.

    Raises:
        ArchError: the architecture cannot take these inputs (a CNN or an application on a
            table, an application under its smallest input), an application option is
            unknown, or a builder fails or returns something else than a functional model.
    """
    if isinstance(arch, ApplicationArch):
        return build_application(arch, input_shape, num_classes, name)
    if isinstance(arch, CustomArch):
        return build_custom(arch, input_shape, num_classes, name, root)
    if isinstance(arch, PretrainedArch):
        raise ArchError(f"a pretrained model ({arch.path}) is loaded, not built")
    try:
        return _build_own(arch, input_shape, num_classes, name)
    except ValueError as exc:
        raise ArchError(str(exc)) from None


def _build_own(arch: MlpArch | CnnArch, input_shape: Sequence[int], num_classes: int, name: str) -> keras.Model:
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


def applications() -> list[str]:
    """Every architecture constructor of ``tf_keras.applications``."""
    return sorted(n for n in dir(keras.applications) if n[:1].isupper() and callable(getattr(keras.applications, n)))


def build_application(arch: ApplicationArch, input_shape: Sequence[int], num_classes: int, name: str
                      ) -> keras.Model:
    """``tf_keras.applications.<name>`` with ``weights=None`` (nothing is downloaded), on the dataset's inputs.

    Options are checked against the constructor's signature. It is asked for logits
    (``classifier_activation=None``) where it takes that argument.
    """
    known = applications()
    if arch.name not in known:
        raise ArchError(f"application {arch.name!r} is not in tf_keras.applications (one of: {', '.join(known)})")
    ctor = getattr(keras.applications, arch.name)
    params = inspect.signature(ctor).parameters
    named = {k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    unknown = sorted(set(arch.options) - named - {"classifier_activation"})
    if unknown:
        allowed = sorted(named - {"weights", "input_shape", "input_tensor", "classes", "include_top"})
        raise ArchError(f"application {arch.name}: unknown option(s) {', '.join(unknown)} (it takes: "
                        f"{', '.join(allowed)})")
    if len(input_shape) != 3:
        raise ArchError(f"application {arch.name} needs images (height, width, channels); this dataset has shape "
                        f"{tuple(input_shape)}")
    kwargs: dict[str, Any] = {"weights": None, "input_shape": tuple(input_shape), "classes": num_classes,
                              "include_top": True, **arch.options}
    if "classifier_activation" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs.setdefault("classifier_activation", None)
    try:
        model = ctor(**kwargs)
    except (TypeError, ValueError) as exc:  # e.g. "Input size must be at least 32x32"
        raise ArchError(f"application {arch.name} on inputs {tuple(input_shape)}: {exc}") from None
    if arch.batchnorm_momentum is not None:
        # Saved in each layer's config: every later stage (clone, prune, QAT) keeps it.
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = arch.batchnorm_momentum
    return keras.Model(model.inputs, model.outputs, name=name)


def _import(module: str, root: Path | None, what: str) -> Any:
    """Import ``module`` with the project folder first on the path (the user's code lives there)."""
    if root is not None and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        return importlib.import_module(module)
    except Exception as exc:  # (whatever the user's module raises on import is theirs to see)
        raise ArchError(f"{what}: cannot import module {module!r} ({type(exc).__name__}: {exc})") from None


def build_custom(arch: CustomArch, input_shape: Sequence[int], num_classes: int, name: str,
                 root: Path | None = None) -> keras.Model:
    """Call the user's ``builder(input_shape, outputs, **options)`` and check what it returns."""
    module_name, func_name = arch.builder.split(":")
    module = _import(module_name, root, f"builder {arch.builder}")
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ArchError(f"builder {arch.builder}: module {module_name} has no function {func_name!r}")
    try:
        model = fn(tuple(input_shape), num_classes, **arch.options)
    except Exception as exc:  # (the user's code: report it, with its type)
        raise ArchError(f"builder {arch.builder} raised {type(exc).__name__}: {exc}") from exc
    model = functional(model, f"builder {arch.builder}")
    return keras.Model(model.inputs, model.outputs, name=name)


def functional(model: Any, what: str) -> keras.Model:
    """``model`` as a functional tf_keras model: as it is, or a Sequential one rebuilt over the same layers.

    Raises:
        ArchError: it is not a tf_keras model (a Keras 3 one, say) or is subclassed (no graph to clone).
    """
    if not isinstance(model, keras.Model):
        kind = f"{type(model).__module__}.{type(model).__name__}"
        hint = " (a Keras 3 model? build it with tf_keras, which TFMOT needs)" if "keras" in kind else ""
        raise ArchError(f"{what}: returned {kind}, not a tf_keras model{hint}")
    if not getattr(model, "inputs", None):
        raise ArchError(f"{what}: a subclassed or unbuilt model; build it with keras.Input(...) and "
                        "keras.Model(inputs, outputs) (or a Sequential with an Input), which TFMOT can clone")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ArchError(f"{what}: has {len(model.inputs)} input(s) and {len(model.outputs)} output(s); "
                        "shrinkfleet compresses models with one of each")
    if isinstance(model, keras.Sequential):
        return keras.Model(model.inputs, model.outputs, name=model.name)
    return model


def load_pretrained(arch: PretrainedArch, base_dir: Path, root: Path | None = None) -> keras.Model:
    """Your trained model, as saved (``.keras``, ``.h5`` or a SavedModel folder), after importing ``imports``.

    Raises:
        ArchError: the file is missing, does not load, or is not a one-input, one-output
            functional or Sequential model.
    """
    path = resolve_path(arch.path, base_dir)
    if not path.exists():
        raise ArchError(f"{path}: model file not found")
    for module in arch.imports:
        _import(module, root, f"imports of {arch.path}")
    try:
        model = keras.models.load_model(str(path), compile=False)
    except Exception as exc:  # (Keras raises many kinds for a file it cannot read: the cause goes to the user)
        hint = ("; if it has custom layers, list the modules that define them under imports:"
                if not arch.imports else "")
        raise ArchError(f"{path}: cannot load ({type(exc).__name__}: {str(exc)[:500]}){hint}") from None
    return functional(model, str(path))


def import_user_modules(modules: Iterable[str], root: Path | None) -> None:
    for module in modules:
        _import(module, root, "the model's code")


def check_fits(model: keras.Model, input_shape: Sequence[int], num_classes: int, what: str) -> None:
    """A model must take the prepared inputs and give one output per class (or one sigmoid unit for two).

    Raises:
        ArchError: naming both shapes.
    """
    got_in = tuple(model.inputs[0].shape[1:])
    want_in = tuple(input_shape)
    if len(got_in) != len(want_in) or any(g is not None and g != w for g, w in zip(got_in, want_in, strict=False)):
        raise ArchError(f"{what}: takes inputs of shape {got_in}, the prepared data has {want_in}")
    outputs = model.outputs[0].shape[-1]
    if output_kind(model) == "sigmoid" and num_classes == 2:
        return
    if outputs != num_classes:
        wanted = "a regression model has 1" if num_classes == 1 else f"the dataset has {num_classes} classes"
        raise ArchError(f"{what}: has {outputs} output(s), {wanted}")


def output_kind(model: keras.Model) -> str:
    """What the model's output holds: ``logits``, ``probabilities`` (softmax) or ``sigmoid`` (one unit, two classes).

    Read off the layer that produces the output: a ``Softmax`` layer or a softmax activation
    gives probabilities, a sigmoid on one unit the probability of class 1; anything else is
    taken for logits. A sigmoid on several units (independent probabilities) is read as
    probabilities.
    """
    last = model.layers[-1]
    act = getattr(last, "activation", None)
    if isinstance(last, keras.layers.Softmax) or act is keras.activations.softmax:
        return "probabilities"
    if act is keras.activations.sigmoid:
        return "sigmoid" if int(model.outputs[0].shape[-1]) == 1 else "probabilities"
    return "logits"


def as_float32(model: keras.Model, arch: Any, input_shape: Sequence[int], num_classes: int,
               root: Path | None = None) -> keras.Model:
    """``model`` (built by :func:`build`, possibly under mixed precision) rebuilt with float32 layers.

    Mixed precision keeps variables in float32, so the weights carry over exactly.
    """
    if all(layer.dtype_policy.name == "float32" for layer in model.layers):
        return model
    rebuilt = build(arch, input_shape, num_classes, name=model.name, root=root)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def clone(model: keras.Model) -> keras.Model:
    """A structurally identical model with copied weights (the input is left untouched)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def load(path, imports: Iterable[str] = (), root: Path | None = None) -> keras.Model:
    """Load a ``.keras`` model saved by a stage (no optimizer state, not compiled).

    ``imports`` (see :func:`user_modules`) are imported first, from ``root``, so that custom
    layers they register resolve.
    """
    import_user_modules(imports, root)
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

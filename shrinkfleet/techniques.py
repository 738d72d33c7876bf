"""Training-time compression techniques beyond pruning: weight clustering and the QAT family.

Each function takes a model and returns a new one; the input is cloned first, because
TFMOT's wrappers reuse (and fine-tuning would move) the wrapped layers' weights. Each
training-time wrapper is paired with its strip/export step: clustering is stripped here;
a QAT model is returned wrapped, because the TFLite converter reads its fake-quant ranges.

Every technique wraps layer by layer, only the layers TFMOT supports for it, and leaves the
others as they are (TFMOT's whole-model calls refuse a model with one unsupported layer:
preprocessing layers such as Rescaling, LayerNormalization, custom layers, nested models).
:func:`skipped_layers` lists the layers holding weights that a technique leaves alone, and
why; a technique with no layer to work on raises :class:`NotApplicable`, which the compress
stage records as that recipe's verdict instead of failing the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shrinkfleet import sensitivity, training, zoo
from shrinkfleet.channels import prune_channels
from shrinkfleet.config import ChannelsConfig, ClusterConfig, QatConfig
from shrinkfleet.datasets import Prepared
from shrinkfleet.evaluation import PRUNABLE, prunable_weight
from shrinkfleet.macs import count_macs
from shrinkfleet.tfenv import keras, reset, tfmot


class NotApplicable(ValueError):
    """A technique has no layer of this model to work on; the message says why."""


_INITS = {
    "kmeans_plus_plus": "KMEANS_PLUS_PLUS",
    "linear": "LINEAR",
    "density_based": "DENSITY_BASED",
    "random": "RANDOM",
}


def positive_zeros(model: keras.Model) -> keras.Model:
    """Turn every -0.0 weight into +0.0 (in place; returns the model).

    TFMOT's masks multiply pruned weights by zero, which leaves -0.0 for negative ones:
    numerically zero, but a different bit pattern, so it would cost entropy-coding bits.
    """
    model.set_weights([np.where(w == 0, np.zeros_like(w), w) for w in model.get_weights()])
    return model


def _fit(model: keras.Model, kind: str, data: Prepared, epochs: int, batch_size: int, learning_rate: float,
         seed: int) -> None:
    # ``kind``: the unwrapped model's output (TFMOT's wrappers hide the last layer's activation).
    loss, metrics = training.objective(kind, data.task)
    training.fit(model, data.train.x, data.train.y, (data.val.x, data.val.y), loss=loss,
                 metrics=metrics, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                 patience=0, seed=seed)


def cluster(model: keras.Model, cfg: ClusterConfig, data: Prepared, seed: int) -> keras.Model:
    """Weight clustering: every Dense/Conv kernel keeps at most ``cfg.clusters`` distinct values.

    With ``preserve_sparsity`` (the default) pruned zeros stay zero, so a pruned model
    stays exactly as sparse. Fine-tunes the centroids, then strips the wrappers.
    """
    ck = tfmot().clustering.keras
    reset(seed)
    base = zoo.clone(model)
    params = {"number_of_clusters": cfg.clusters,
              "cluster_centroids_init": getattr(ck.CentroidInitialization, _INITS[cfg.init]),
              "preserve_sparsity": cfg.preserve_sparsity}

    def clusterable(layer: keras.layers.Layer) -> bool:
        # k-means needs more (non-zero) weights than centroids; a layer that small is left
        # as it is: it holds too few weights to matter for size.
        if not isinstance(layer, PRUNABLE) or prunable_weight(layer) is None:
            return False
        k = prunable_weight(layer).numpy()
        n = int(np.count_nonzero(k)) if cfg.preserve_sparsity else k.size
        return n >= 2 * cfg.clusters

    def wrap(layer: keras.layers.Layer) -> keras.layers.Layer:
        # The TFMOT pattern: wrap the (trained) layer object itself; `base` is our own copy.
        return ck.cluster_weights(layer, **params) if clusterable(layer) else layer

    if not any(clusterable(layer) for layer in base.layers):
        raise NotApplicable(f"cluster: no Dense/Conv layer has at least {2 * cfg.clusters} weights to share "
                            f"{cfg.clusters} values; lower cluster.clusters")
    kind = zoo.output_kind(base)
    wrapped = keras.models.clone_model(base, clone_function=wrap)
    _fit(wrapped, kind, data, cfg.epochs, cfg.batch_size, cfg.learning_rate, seed)
    return positive_zeros(zoo.clone(ck.strip_clustering(wrapped)))


def channel_prune(model: keras.Model, cfg: ChannelsConfig, data: Prepared, seed: int
                  ) -> tuple[keras.Model, dict[str, Any]]:
    """Channel pruning (the ``channels`` recipe step): remove units/filters, then fine-tune.

    ``cfg.keep`` is one fraction for every prunable layer, or ``auto`` (per-layer fractions
    from :mod:`shrinkfleet.sensitivity`, method ``channels``); ``cfg.target_macs`` replaces it
    with the largest uniform keep (bisection, 1/256 resolution) whose model has at most that
    fraction of the input's MACs. Layers channel pruning cannot follow stay at full width.

    Returns:
        The fine-tuned smaller model, and what was done: ``keep`` (a fraction or a per-layer
        dict), ``kept`` (layer -> [kept, total]), ``full_width`` (layer -> why), ``groups``
        (first member -> the layers pruned together because they feed one Add), ``macs_before``,
        ``macs_after`` and, for ``auto``, the ``sensitivity`` rows.

    Raises:
        NotApplicable: no layer can be channel-pruned, or ``target_macs`` is out of reach.
    """
    reset(seed)
    base = zoo.clone(model)
    macs_before = count_macs(base)
    info: dict[str, Any] = {}
    if cfg.keep == "auto" and cfg.target_macs is None:
        if data.task == "regression":
            raise NotApplicable("channels: keep auto bounds an accuracy drop; this is a regression dataset")
        try:
            rows = sensitivity.analyse(base, data.val.x, data.val.y, cfg.auto_levels, "channels")
        except ValueError as exc:
            raise NotApplicable(f"channels: {exc}") from None
        levels, drop = sensitivity.choose(base, data.val.x, data.val.y, rows, cfg.auto_max_drop)
        keep: float | dict[str, float] = {name: 1 - level for name, level in levels.items()}
        info.update(sensitivity=rows, auto_val_drop_before_fine_tuning=drop)
    elif cfg.target_macs is not None:
        keep = _keep_for_macs(base, cfg, macs_before)
    else:
        keep = float(cfg.keep)
    result = prune_channels(base, keep, cfg.norm, cfg.round_to)
    # keep 1.0 (or auto keeping every layer whole) is a valid no-op; a cut that finds no layer is not.
    wanted = any(v < 1 for v in keep.values()) if isinstance(keep, dict) else keep < 1
    if wanted and not result.kept:
        raise NotApplicable("channels: no layer can be channel-pruned (every Dense/Conv layer is kept at full "
                            "width: " + "; ".join(f"{k}: {v}" for k, v in result.full_width.items()) + ")")
    pruned = result.model
    if cfg.epochs:
        _fit(pruned, zoo.output_kind(base), data, cfg.epochs, cfg.batch_size, cfg.learning_rate, seed)
    info.update(keep=keep, kept={k: list(v) for k, v in result.summary().items()}, full_width=result.full_width,
                groups=result.groups, macs_before=macs_before, macs_after=count_macs(pruned))
    return pruned, info


def _keep_for_macs(model: keras.Model, cfg: ChannelsConfig, macs_before: int) -> float:
    goal = cfg.target_macs * macs_before
    macs = lambda keep: count_macs(prune_channels(model, keep, cfg.norm, cfg.round_to).model)  # noqa: E731
    if macs(1.0) <= goal:
        return 1.0
    lowest = macs(1 / 256)
    if lowest > goal:
        raise NotApplicable(f"channels: target_macs {cfg.target_macs:g} is out of reach: the fewest MACs channel "
                            f"pruning leaves is {lowest / macs_before:.3f} of the model's (layers kept at full width "
                            f"and unprunable layers); raise channels.target_macs")
    lo, hi = 1 / 256, 1.0  # macs(lo) <= goal < macs(hi)
    while hi - lo > 1 / 256:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(mid) <= goal else (lo, mid)
    return lo


def quantization_aware(model: keras.Model, scheme: str, cfg: QatConfig, data: Prepared, seed: int) -> keras.Model:
    """Quantization-aware training; ``scheme`` is ``qat``, ``pqat``, ``cqat`` or ``pcqat``.

    ``pqat`` keeps the sparsity of a pruned model, ``cqat`` its clusters, ``pcqat`` both
    (TFMOT's collaborative optimisation schemes). Returns the QAT-wrapped model, ready
    for the int8 converter.
    """
    t = tfmot()
    q = t.quantization.keras
    combine = t.experimental.combine
    schemes = {
        "qat": None,
        "pqat": combine.Default8BitPrunePreserveQuantizeScheme,
        "cqat": combine.Default8BitClusterPreserveQuantizeScheme,
        "pcqat": lambda: combine.Default8BitClusterPreserveQuantizeScheme(preserve_sparsity=True),
    }
    if scheme not in schemes:
        raise ValueError(f"unknown QAT scheme {scheme!r}; one of {', '.join(schemes)}")
    reset(seed)
    base = zoo.clone(model)
    kind = zoo.output_kind(base)
    make = schemes[scheme] or q.default_8bit.Default8BitQuantizeScheme
    chosen = make()
    supported = qat_supported(base, chosen)
    if not any(supported.values()):
        raise NotApplicable(f"{scheme}: TFMOT quantizes none of this model's layers")
    # Layers the chosen scheme claims but the default 8-bit registry refuses (see qat_supported)
    # get an explicit "leave in float" config, TFMOT's documented way for a layer it cannot quantize.
    claimed = qat_claimed(base, chosen)
    leave_float = _leave_float_config()

    def annotate(layer: keras.layers.Layer) -> keras.layers.Layer:
        # Annotating layer by layer (TFMOT's quantize_annotate_layer) leaves the others in float:
        # quantize_annotate_model refuses a whole model with one layer it does not support.
        if supported[layer.name]:
            return q.quantize_annotate_layer(layer)
        if claimed[layer.name]:
            return q.quantize_annotate_layer(layer, quantize_config=leave_float())
        return layer

    annotated = keras.models.clone_model(base, clone_function=annotate)
    with q.quantize_scope({"LeaveFloat": leave_float}):
        qat_model = q.quantize_apply(annotated, chosen)
    _fit(qat_model, kind, data, cfg.epochs, cfg.batch_size, cfg.learning_rate, seed)
    return qat_model


def qat_supported(model: keras.Model, scheme: Any) -> dict[str, bool]:
    """Whether ``scheme`` quantizes each layer, by its registry (TFMOT's public ``get_quantize_registry``).

    A layer must be supported by the default 8-bit registry too: the collaborative schemes'
    registries call every weightless layer supported, then ask the default one for its config,
    which refuses some of them (Rescaling, measured with TFMOT 0.8.1). Input layers and nested
    models count as unsupported (nothing to annotate).
    """
    registries = [scheme.get_quantize_registry(),
                  tfmot().quantization.keras.default_8bit.Default8BitQuantizeScheme().get_quantize_registry()]
    return {layer.name: not isinstance(layer, (keras.layers.InputLayer, keras.Model))
            and all(r.supports(layer) for r in registries) for layer in model.layers}


def qat_claimed(model: keras.Model, scheme: Any) -> dict[str, bool]:
    """Layers ``scheme``'s own registry calls supported but the default 8-bit registry cannot configure."""
    own = scheme.get_quantize_registry()
    default = tfmot().quantization.keras.default_8bit.Default8BitQuantizeScheme().get_quantize_registry()
    return {layer.name: not isinstance(layer, (keras.layers.InputLayer, keras.Model))
            and own.supports(layer) and not default.supports(layer) for layer in model.layers}


_LEAVE_FLOAT: Any = None


def _leave_float_config() -> Any:
    """A ``tfmot.quantization.keras.QuantizeConfig`` that quantizes nothing (the layer stays in float)."""
    global _LEAVE_FLOAT
    if _LEAVE_FLOAT is None:
        q = tfmot().quantization.keras

        class LeaveFloat(q.QuantizeConfig):
            def get_weights_and_quantizers(self, layer):
                return []

            def get_activations_and_quantizers(self, layer):
                return []

            def set_quantize_weights(self, layer, quantize_weights):
                pass

            def set_quantize_activations(self, layer, quantize_activations):
                pass

            def get_output_quantizers(self, layer):
                return []

            def get_config(self):
                return {}

        _LEAVE_FLOAT = LeaveFloat
    return _LEAVE_FLOAT


def skipped_layers(model: keras.Model, technique: str, clusters: int = 16, preserve_sparsity: bool = True
                   ) -> dict[str, str]:
    """Layers holding weights that ``technique`` (channels, prune, cluster, qat, ...) leaves as they are, and why.

    Layers without weights are not listed (nothing to compress), except for the QAT family,
    where a weightless layer TFMOT does not support stays in float in the int8 model.
    """
    out: dict[str, str] = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        cls = type(layer).__name__
        if isinstance(layer, keras.Model):
            out[layer.name] = f"nested model ({cls}): its layers are left as they are"
            continue
        weighted = bool(layer.weights)
        if technique == "prune":
            if weighted and not (isinstance(layer, PRUNABLE) and prunable_weight(layer) is not None
                                 and not isinstance(layer, keras.layers.DepthwiseConv2D)):
                out[layer.name] = f"{cls}: not pruned (TFMOT prunes Dense and Conv1D/Conv2D kernels)"
        elif technique == "cluster":
            if not weighted:
                continue
            if not (isinstance(layer, PRUNABLE) and prunable_weight(layer) is not None):
                out[layer.name] = f"{cls}: not clustered (TFMOT clusters Dense and convolution kernels)"
                continue
            k = prunable_weight(layer).numpy()
            n = int(np.count_nonzero(k)) if preserve_sparsity else k.size
            if n < 2 * clusters:
                out[layer.name] = f"{cls}: {n} weights, fewer than twice the {clusters} clusters: left as it is"
    if technique == "channels":
        # Structural: which layers channel pruning cannot follow (the same at any keep < 1).
        out.update(prune_channels(model, 0.5).full_width)
    if technique in ("qat", "pqat", "cqat", "pcqat"):
        q = tfmot().quantization.keras
        for name, ok in qat_supported(model, q.default_8bit.Default8BitQuantizeScheme()).items():
            layer = model.get_layer(name)
            if not ok and not isinstance(layer, (keras.layers.InputLayer, keras.Model)):
                out[name] = f"{type(layer).__name__}: not quantization-aware trained (TFMOT does not support it)"
    return out


def distinct_values(model: keras.Model) -> dict[str, int]:
    """Distinct values per Dense/Conv kernel (what clustering bounds)."""
    return {layer.name: len(np.unique(prunable_weight(layer).numpy()))
            for layer in model.layers if isinstance(layer, PRUNABLE) and prunable_weight(layer) is not None}

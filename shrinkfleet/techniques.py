"""Training-time compression techniques beyond pruning: weight clustering and the QAT family.

Each function takes a model and returns a new one; the input is cloned first, because
TFMOT's wrappers reuse (and fine-tuning would move) the wrapped layers' weights. Each
training-time wrapper is paired with its strip/export step: clustering is stripped here;
a QAT model is returned wrapped, because the TFLite converter reads its fake-quant ranges.
"""

from __future__ import annotations

import numpy as np

from shrinkfleet import training, zoo
from shrinkfleet.config import ClusterConfig, QatConfig
from shrinkfleet.datasets import Prepared
from shrinkfleet.tfenv import keras, reset, tfmot

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


def _fit(model: keras.Model, data: Prepared, epochs: int, batch_size: int, learning_rate: float, seed: int) -> None:
    training.fit(model, data.train.x, data.train.y, (data.val.x, data.val.y), loss=training.sparse_ce(),
                 metrics=["accuracy"], epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                 patience=0, seed=seed)


def cluster(model: keras.Model, cfg: ClusterConfig, data: Prepared, seed: int) -> keras.Model:
    """Weight clustering: every Dense/Conv kernel keeps at most ``cfg.clusters`` distinct values.

    With ``preserve_sparsity`` (the default) pruned zeros stay zero, so a pruned model
    stays exactly as sparse. Fine-tunes the centroids, then strips the wrappers.
    """
    from shrinkfleet.evaluation import PRUNABLE

    ck = tfmot().clustering.keras
    reset(seed)
    base = zoo.clone(model)
    params = {"number_of_clusters": cfg.clusters,
              "cluster_centroids_init": getattr(ck.CentroidInitialization, _INITS[cfg.init]),
              "preserve_sparsity": cfg.preserve_sparsity}

    def clusterable(layer: keras.layers.Layer) -> bool:
        # k-means needs more (non-zero) weights than centroids; a layer that small is left
        # as it is: it holds too few weights to matter for size.
        if not isinstance(layer, PRUNABLE):
            return False
        k = layer.kernel.numpy()
        n = int(np.count_nonzero(k)) if cfg.preserve_sparsity else k.size
        return n >= 2 * cfg.clusters

    def wrap(layer: keras.layers.Layer) -> keras.layers.Layer:
        # The TFMOT pattern: wrap the (trained) layer object itself; `base` is our own copy.
        return ck.cluster_weights(layer, **params) if clusterable(layer) else layer

    if not any(clusterable(layer) for layer in base.layers):
        raise ValueError(f"cluster: no layer has at least {2 * cfg.clusters} weights to share {cfg.clusters} "
                         "values; lower cluster.clusters")
    wrapped = keras.models.clone_model(base, clone_function=wrap)
    _fit(wrapped, data, cfg.epochs, cfg.batch_size, cfg.learning_rate, seed)
    return positive_zeros(zoo.clone(ck.strip_clustering(wrapped)))


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
    annotated = q.quantize_annotate_model(zoo.clone(model))
    make = schemes[scheme]
    qat_model = q.quantize_apply(annotated, make()) if make else q.quantize_apply(annotated)
    _fit(qat_model, data, cfg.epochs, cfg.batch_size, cfg.learning_rate, seed)
    return qat_model


def distinct_values(model: keras.Model) -> dict[str, int]:
    """Distinct values per Dense/Conv kernel (what clustering bounds)."""
    from shrinkfleet.evaluation import PRUNABLE

    return {layer.name: len(np.unique(layer.kernel.numpy()))
            for layer in model.layers if isinstance(layer, PRUNABLE)}

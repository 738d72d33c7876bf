"""prune: TFMOT magnitude pruning to a target sparsity, fine-tuning, then strip.

The sparsity follows TFMOT's ``PolynomialDecay`` from ``initial_sparsity`` to
``target_sparsity``; the target is reached after ``end_fraction`` of the fine-tuning
steps, and the remaining steps recover accuracy with the final mask fixed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from shrinkfleet import training, zoo
from shrinkfleet.config import PruneConfig
from shrinkfleet.datasets import Prepared, load_prepared
from shrinkfleet.evaluation import PRUNABLE, kernel_sparsity
from shrinkfleet.techniques import positive_zeros
from shrinkfleet.tfenv import configure_devices, keras, reset, tfmot
from tasks.common import StageContext


def schedule_steps(n_samples: int, cfg: PruneConfig) -> tuple[int, int, int]:
    """``(end_step, frequency, total_steps)`` so the last mask update lands on ``end_step``.

    Raises:
        ValueError: fewer than two gradient steps, so no schedule fits.
    """
    total = cfg.epochs * math.ceil(n_samples / cfg.batch_size)
    if total < 2:
        raise ValueError(
            f"prune: only {total} gradient step(s) ({n_samples} samples, batch_size {cfg.batch_size}, "
            f"epochs {cfg.epochs}); raise prune.epochs"
        )
    last = max(1, min(total - 1, round(cfg.end_fraction * total)))
    frequency = min(cfg.frequency, last)
    end = (last // frequency) * frequency
    return end, frequency, total


def prune(model: keras.Model, cfg: PruneConfig, data: Prepared, seed: int) -> keras.Model:
    """A pruned, fine-tuned and stripped copy of ``model``; ``model`` itself is not changed.

    TFMOT's wrappers reuse the wrapped layers, so fine-tuning would move the input
    model's weights too: the input is cloned first.
    """
    sparsity = tfmot().sparsity.keras
    reset(seed)
    base = zoo.clone(model)
    end, frequency, _ = schedule_steps(len(data.train), cfg)
    if cfg.pattern == "2:4":
        # Two zeros in every four consecutive weights (along the input dimension): the
        # structure sparse tensor cores accelerate. The target sparsity is 0.5 by definition.
        wrapped = sparsity.prune_low_magnitude(
            base, pruning_schedule=sparsity.ConstantSparsity(0.5, begin_step=0, frequency=frequency),
            sparsity_m_by_n=(2, 4))
    else:
        targets = layer_targets(base, cfg)

        def schedule(target: float) -> Any:
            return sparsity.PolynomialDecay(
                initial_sparsity=min(cfg.initial_sparsity, target), final_sparsity=target,
                begin_step=0, end_step=end, power=cfg.power, frequency=frequency,
            )

        def wrap(layer: keras.layers.Layer) -> keras.layers.Layer:
            # TFMOT's per-layer pattern: wrap the layer object itself (base is our own copy).
            if layer.name in targets:
                return sparsity.prune_low_magnitude(layer, pruning_schedule=schedule(targets[layer.name]))
            return layer

        wrapped = keras.models.clone_model(base, clone_function=wrap)
    training.fit(
        wrapped, data.train.x, data.train.y, (data.val.x, data.val.y),
        loss=training.sparse_ce(), metrics=["accuracy"], epochs=cfg.epochs, batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, patience=0, seed=seed, callbacks=[sparsity.UpdatePruningStep()],
    )
    stripped = sparsity.strip_pruning(wrapped)
    # A plain functional model, free of the wrapper's training graph, with -0.0 made +0.0.
    return positive_zeros(zoo.clone(stripped))


def layer_targets(model: keras.Model, cfg: PruneConfig) -> dict[str, float]:
    """Target sparsity per prunable layer: ``layer_sparsity`` where given, else ``target_sparsity``.

    Raises:
        ValueError: ``layer_sparsity`` names a layer the model does not have.
    """
    prunable = [layer.name for layer in model.layers if isinstance(layer, PRUNABLE)]
    unknown = sorted(set(cfg.layer_sparsity) - set(prunable))
    if unknown:
        raise ValueError(f"prune.layer_sparsity: no prunable layer named {', '.join(unknown)} "
                         f"(the model's are: {', '.join(prunable)})")
    return {name: cfg.layer_sparsity.get(name, cfg.target_sparsity) for name in prunable}


def expected_sparsity(cfg: PruneConfig, model: keras.Model | None = None) -> float:
    """The overall kernel sparsity ``prune`` reaches with ``cfg`` (weighted by layer size)."""
    if cfg.pattern == "2:4":
        return 0.5
    if model is None or not cfg.layer_sparsity:
        return cfg.target_sparsity
    targets = layer_targets(model, cfg)
    sizes = {layer.name: layer.kernel.shape.num_elements() for layer in model.layers if layer.name in targets}
    return sum(targets[n] * sizes[n] for n in targets) / sum(sizes.values())


def run(ctx: StageContext, model_name: str) -> dict[str, Any]:
    """Prune one fleet member's student into models/<model>/pruned.keras."""
    cfg = ctx.fleet.resolve(model_name)
    configure_devices(ctx.fleet.run.mixed_precision)
    data = load_prepared(ctx.ws.prepared(cfg.dataset_name))
    student = zoo.load(ctx.ws.keras(model_name, "student"))
    pruned = prune(student, cfg.prune, data, cfg.seed)
    reached = kernel_sparsity(pruned)
    target = expected_sparsity(cfg.prune, student)
    if not np.isclose(reached, target, atol=0.02):
        raise RuntimeError(f"prune: reached sparsity {reached:.3f}, target {target}; check prune.frequency")
    zoo.save(pruned, ctx.ws.keras(model_name, "pruned"))
    return {"sparsity": reached, "val_accuracy": training.accuracy(pruned, data.val.x, data.val.y)}

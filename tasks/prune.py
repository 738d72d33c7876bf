"""prune: TFMOT magnitude pruning to a target sparsity, fine-tuning, then strip.

The sparsity follows TFMOT's ``PolynomialDecay`` from ``initial_sparsity`` to
``target_sparsity``; the target is reached after ``end_fraction`` of the fine-tuning
steps, and the remaining steps recover accuracy with the final mask fixed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from shrinkfleet import sensitivity, training, zoo
from shrinkfleet.config import PruneConfig
from shrinkfleet.datasets import Prepared, load_prepared
from shrinkfleet.evaluation import PRUNABLE, kernel_sparsity, prunable_weight
from shrinkfleet.sensitivity import magnitude_prunable
from shrinkfleet.techniques import NotApplicable, positive_zeros, skipped_layers
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
    model's weights too: the input is cloned first. Only the layers TFMOT prunes (Dense and
    convolution kernels) are wrapped; every other layer (normalisation, preprocessing, custom
    layers, nested models) is kept as it is (see :func:`shrinkfleet.techniques.skipped_layers`).

    Raises:
        NotApplicable: the model has no layer TFMOT can prune.
    """
    sparsity = tfmot().sparsity.keras
    if cfg.layer_sparsity == "auto":
        cfg = resolve_auto(model, cfg, data)[0]
    reset(seed)
    base = zoo.clone(model)
    kind = zoo.output_kind(base)
    targets = layer_targets(base, cfg)
    if not targets:
        kinds = "Dense, Conv2D" if cfg.pattern == "2:4" else "Dense, Conv1D, Conv2D"
        raise NotApplicable(f"prune: no layer TFMOT can prune ({kinds}) in this model")
    end, frequency, _ = schedule_steps(len(data.train), cfg)

    def schedule(target: float) -> Any:
        if cfg.pattern == "2:4":
            # Two zeros in every four consecutive weights (along the input dimension): the
            # structure sparse tensor cores accelerate. The target sparsity is 0.5 by definition.
            return sparsity.ConstantSparsity(0.5, begin_step=0, frequency=frequency)
        return sparsity.PolynomialDecay(
            initial_sparsity=min(cfg.initial_sparsity, target), final_sparsity=target,
            begin_step=0, end_step=end, power=cfg.power, frequency=frequency,
        )

    def wrap(layer: keras.layers.Layer) -> keras.layers.Layer:
        # TFMOT's per-layer pattern: wrap the layer object itself (base is our own copy). Layers
        # TFMOT does not prune stay as they are, so a model never fails because of one of them.
        if layer.name not in targets:
            return layer
        m_by_n = {"sparsity_m_by_n": (2, 4)} if cfg.pattern == "2:4" else {}
        return sparsity.prune_low_magnitude(layer, pruning_schedule=schedule(targets[layer.name]), **m_by_n)

    wrapped = keras.models.clone_model(base, clone_function=wrap)
    loss, metrics = training.objective(kind, data.task)
    training.fit(
        wrapped, data.train.x, data.train.y, (data.val.x, data.val.y),
        loss=loss, metrics=metrics, epochs=cfg.epochs, batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, patience=0, seed=seed, callbacks=[sparsity.UpdatePruningStep()],
    )
    stripped = sparsity.strip_pruning(wrapped)
    # A plain functional model, free of the wrapper's training graph, with -0.0 made +0.0.
    return positive_zeros(zoo.clone(stripped))


prunes = magnitude_prunable


def resolve_auto(model: keras.Model, cfg: PruneConfig, data: Prepared
                 ) -> tuple[PruneConfig, list[dict[str, Any]], float]:
    """``cfg`` with ``layer_sparsity: auto`` replaced by per-layer targets from a sensitivity analysis.

    Every layer TFMOT prunes is tried alone at each of ``cfg.auto_levels`` (no fine-tuning), and
    :func:`shrinkfleet.sensitivity.choose` picks its level within ``cfg.auto_max_drop`` of
    ``model``'s validation accuracy (a layer at 0.0 is not pruned).

    Returns:
        The resolved config, the sensitivity table, and the validation drop of all chosen
        levels at once before fine-tuning.

    Raises:
        NotApplicable: no layer to prune, or a regression dataset (the bound is on accuracy).
    """
    if data.task == "regression":
        raise NotApplicable("prune.layer_sparsity auto bounds an accuracy drop; this is a regression dataset")
    if cfg.pattern == "2:4":
        raise NotApplicable("prune.layer_sparsity auto picks unstructured sparsities; pattern 2:4 has one")
    try:
        rows = sensitivity.analyse(model, data.val.x, data.val.y, cfg.auto_levels, "prune")
    except ValueError as exc:
        raise NotApplicable(f"prune: {exc}") from None
    levels, drop = sensitivity.choose(model, data.val.x, data.val.y, rows, cfg.auto_max_drop)
    return cfg.model_copy(update={"layer_sparsity": levels}), rows, drop


def layer_targets(model: keras.Model, cfg: PruneConfig) -> dict[str, float]:
    """Target sparsity per prunable layer: ``layer_sparsity`` where given, else ``target_sparsity``.

    Raises:
        ValueError: ``layer_sparsity`` names a layer the model does not have.
    """
    if cfg.layer_sparsity == "auto":
        raise ValueError("prune.layer_sparsity auto: resolve it first (tasks.prune.resolve_auto)")
    prunable = [layer.name for layer in model.layers if prunes(layer)]
    if cfg.pattern == "2:4":  # TFMOT's m-by-n sparsity covers Dense and Conv2D kernels only
        prunable = [n for n in prunable if type(model.get_layer(n)) in (keras.layers.Dense, keras.layers.Conv2D)]
    unknown = sorted(set(cfg.layer_sparsity) - set(prunable))
    if unknown:
        raise ValueError(f"prune.layer_sparsity: no prunable layer named {', '.join(unknown)} "
                         f"(the model's are: {', '.join(prunable)})")
    return {name: cfg.layer_sparsity.get(name, cfg.target_sparsity) for name in prunable}


def expected_sparsity(cfg: PruneConfig, model: keras.Model | None = None) -> float:
    """The overall kernel sparsity ``prune`` reaches with ``cfg`` (weighted by layer size).

    Over every prunable kernel :func:`shrinkfleet.evaluation.kernel_sparsity` counts: those
    ``cfg`` does not target (a DepthwiseConv2D under 2:4) stay dense.
    """
    if model is None:
        return 0.5 if cfg.pattern == "2:4" else cfg.target_sparsity
    targets = layer_targets(model, cfg)
    sizes = {layer.name: prunable_weight(layer).shape.num_elements() for layer in model.layers
             if isinstance(layer, PRUNABLE) and prunable_weight(layer) is not None}
    if not sizes:
        return 0.0
    per_layer = {n: (0.5 if cfg.pattern == "2:4" else targets[n]) if n in targets else 0.0 for n in sizes}
    return sum(per_layer[n] * sizes[n] for n in sizes) / sum(sizes.values())


def run(ctx: StageContext, model_name: str) -> dict[str, Any]:
    """Prune one fleet member's student (or teacher, with no student) into models/<model>/pruned.keras.

    A model with no layer TFMOT can prune is saved unchanged (sparsity 0), so its recipes
    still run; the stage's result says so.
    """
    cfg = ctx.fleet.resolve(model_name)
    configure_devices(ctx.fleet.run.mixed_precision)
    data = load_prepared(ctx.ws.prepared(cfg.dataset_name))
    base = zoo.load(ctx.ws.keras(model_name, cfg.base), cfg.user_modules, ctx.ws.root)
    note = ""
    prune_cfg, auto = cfg.prune, {}
    try:
        if prune_cfg.layer_sparsity == "auto":
            prune_cfg, rows, drop = resolve_auto(base, prune_cfg, data)
            # Beside metrics/<model>.json: a diagnostic of this run, rewritten whenever the stage runs.
            files = sensitivity.write(rows, ctx.ws.metrics(model_name).parent, f"{model_name}-prune-sensitivity",
                                      f"{model_name}: magnitude-pruning sensitivity ({cfg.base}, no fine-tuning)")
            auto = {"layer_sparsity": prune_cfg.layer_sparsity, "auto_val_drop_before_fine_tuning": drop,
                    "sensitivity_files": [str(f.relative_to(ctx.ws.root)) for f in files]}
        pruned = prune(base, prune_cfg, data, cfg.seed)
    except NotApplicable as exc:
        pruned, note = base, f"{exc}: pruned.keras is the {cfg.base} unchanged"
    else:
        reached = kernel_sparsity(pruned)
        target = expected_sparsity(prune_cfg, base)
        if not np.isclose(reached, target, atol=0.02):
            raise RuntimeError(f"prune: reached sparsity {reached:.3f}, target {target}; check prune.frequency")
    zoo.save(pruned, ctx.ws.keras(model_name, "pruned"))
    return {"sparsity": kernel_sparsity(pruned),
            **{f"val_{k}": v for k, v in training.score(pruned, data.val.x, data.val.y, data.task).items()},
            "from": cfg.base, "skipped_layers": skipped_layers(base, "prune"), "note": note, **auto}

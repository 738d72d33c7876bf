"""compress: run every recipe of a model (and the optional search), write each variant.

A recipe starts from the teacher, the student or the pruned student and applies techniques
in order (``channels``, ``prune``, ``cluster``, ``qat``/``pqat``/``cqat``/``pcqat``), ending in one TFLite
conversion (``float32``, ``float16``, ``dynamic``, ``int8``). Every variant is written as
``models/<model>/variants/<name>.tflite`` plus its entropy-coded ``<name>.sfc`` (see
:mod:`shrinkfleet.coding`), and ``manifest.json`` says how each one was made and which layers
each technique left as they are. A recipe whose technique has no layer of the model to work
on (:class:`shrinkfleet.techniques.NotApplicable`) gets a verdict in the manifest instead of
a file; the model's other recipes go on.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shrinkfleet import coding, sensitivity, training, zoo
from shrinkfleet.config import ClusterConfig, PruneConfig, ResolvedModel
from shrinkfleet.datasets import Prepared, load_prepared
from shrinkfleet.evaluation import TFLiteModel, accuracy_of, to_tflite
from shrinkfleet.storage import atomic_dir
from shrinkfleet.techniques import NotApplicable, channel_prune, cluster, quantization_aware, skipped_layers
from shrinkfleet.tfenv import configure_devices, keras, reset
from tasks.common import StageContext
from tasks.prune import prune, resolve_auto

# The technique registry: a recipe step's name -> fn(model, resolved config, data, seed) -> model.
STEPS: dict[str, Callable[[keras.Model, Any, Prepared, int], keras.Model]] = {
    "channels": lambda m, c, d, seed: channel_prune(m, c, d, seed)[0],
    "prune": prune,
    "cluster": cluster,
    **{scheme: (lambda s: lambda m, c, d, seed: quantization_aware(m, s, c, d, seed))(scheme)
       for scheme in ("qat", "pqat", "cqat", "pcqat")},
}


def representative_samples(data: Prepared, n: int, seed: int) -> np.ndarray:
    """``n`` train samples (seeded, without replacement) that calibrate int8 ranges."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(data.train), size=min(n, len(data.train)), replace=False)
    return data.train.x[np.sort(idx)]


@dataclass
class Variant:
    """One compressed variant: its flatbuffer, its coded blob and how it was made."""

    content: bytes
    coded: bytes
    parent: str
    steps: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] | None = None
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)  # step -> {layer: why it was left as it is}
    files: dict[str, bytes] = field(default_factory=dict)  # more files beside the variant (sensitivity tables)


def _label(name: str, cfg: Any) -> str:
    if name == "prune":
        if cfg.pattern == "2:4":
            return "prune(2:4)"
        return "prune(auto)" if cfg.layer_sparsity == "auto" else f"prune({cfg.target_sparsity:g})"
    if name == "cluster":
        return f"cluster({cfg.clusters})"
    if name == "channels":
        keep = f"macs {cfg.target_macs:g}" if cfg.target_macs is not None else (
            "auto" if cfg.keep == "auto" else f"{cfg.keep:g}")
        return f"channels({keep})"
    return name


def encode_best(content: bytes) -> bytes:
    """The smaller of the range-coded and Huffman-coded blobs."""
    return min((coding.encode(content, c) for c in ("range", "huffman")), key=len)


def run_recipe(recipe: str, cfg: ResolvedModel, bases: dict[str, keras.Model], data: Prepared) -> Variant:
    """Apply one recipe of ``cfg`` to its starting model and convert; the bases are not changed."""
    spec = cfg.recipes[recipe]
    model = bases[spec.start]
    labels, settings = [], {}
    names = spec.step_names()
    skipped: dict[str, dict[str, str]] = {}
    files: dict[str, bytes] = {}
    for i in range(len(names) - 1):
        step_name, step_cfg = cfg.step_config(recipe, i)
        extra = ({"clusters": step_cfg.clusters, "preserve_sparsity": step_cfg.preserve_sparsity}
                 if step_name == "cluster" else {})
        left = skipped_layers(model, step_name, **extra)
        if left:
            skipped[f"{i}.{step_name}"] = left
        settings[f"{i}.{step_name}"] = step_cfg.model_dump()
        label = _label(step_name, step_cfg)  # as written: "auto" before it is resolved
        if step_name == "channels":
            model, info = channel_prune(model, step_cfg, data, cfg.seed)
            rows = info.pop("sensitivity", None)
            info.pop("full_width")  # already in ``skipped`` (and MLflow params must stay short)
            if rows:
                files.update(sensitivity.files(rows, f"{recipe}-channels-sensitivity",
                                               f"{cfg.name} {recipe}: channel-pruning sensitivity"))
            settings[f"{i}.{step_name}"].update(info)
        else:
            if step_name == "prune" and step_cfg.layer_sparsity == "auto":
                # Resolved here, not inside prune, so the manifest records the levels and the table.
                step_cfg, rows, drop = resolve_auto(model, step_cfg, data)
                files.update(sensitivity.files(rows, f"{recipe}-prune-sensitivity",
                                               f"{cfg.name} {recipe}: magnitude-pruning sensitivity"))
                settings[f"{i}.{step_name}"].update(layer_sparsity=step_cfg.layer_sparsity,
                                                    auto_val_drop_before_fine_tuning=drop)
            model = STEPS[step_name](model, step_cfg, data, cfg.seed)
        labels.append(label)
    conversion = names[-1]
    rep = representative_samples(data, cfg.quantize.representative_samples, cfg.seed) if conversion == "int8" else None
    try:
        content = to_tflite(model, conversion, rep)
    except Exception as exc:  # (the converter's many error types: the recipe's verdict, the others go on)
        raise NotApplicable(f"{conversion} conversion failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
    return Variant(content, encode_best(content), spec.start, [*labels, conversion], settings, skipped=skipped,
                   files=files)


def search_order(cfg: ResolvedModel) -> list[tuple[float, int, str]]:
    """Search candidates, smallest expected size first: non-zeros x (index + value bits)."""
    s = cfg.search
    grid = itertools.product(s.sparsities, s.clusters, s.conversions)
    return sorted(grid, key=lambda g: ((1 - g[0]) * (np.log2(g[1]) + 4.0), g[2] != "float32", g))


def search(cfg: ResolvedModel, teacher: keras.Model, student: keras.Model, data: Prepared) -> dict[str, Variant]:
    # ``student``: the model pruning starts from (the teacher itself for a model with no student).
    """Try (sparsity, clusters, conversion) candidates, smallest expected first, within the budget.

    Stops at the first candidate whose validation accuracy is within
    ``search.max_accuracy_drop`` of the teacher's; that one is marked ``best``. Every trial
    is returned (and becomes a tracked variant), passing or not.
    """
    s = cfg.search
    teacher_val = training.accuracy(teacher, data.val.x, data.val.y)
    trials: dict[str, Variant] = {}
    for i, (sparsity, clusters, conversion) in enumerate(search_order(cfg)[: s.budget]):
        # The candidate's sparsity is the search's: a prune.layer_sparsity of auto would replace it.
        per_layer = {} if cfg.prune.layer_sparsity == "auto" else cfg.prune.layer_sparsity
        prune_cfg = PruneConfig.model_validate({**cfg.prune.model_dump(), "target_sparsity": sparsity,
                                                "initial_sparsity": 0.0, "pattern": "unstructured",
                                                "layer_sparsity": per_layer})
        cluster_cfg = ClusterConfig.model_validate({**cfg.cluster.model_dump(), "clusters": clusters})
        model = cluster(prune(student, prune_cfg, data, cfg.seed), cluster_cfg, data, cfg.seed)
        rep = representative_samples(data, cfg.quantize.representative_samples, cfg.seed)
        content = to_tflite(model, conversion, rep if conversion == "int8" else None)
        val = accuracy_of(TFLiteModel(content).predict, data.val.x, data.val.y)
        drop = teacher_val - val
        name = f"search-{i + 1}-s{sparsity:g}-k{clusters}-{conversion}"
        info = {"trial": i + 1, "val_accuracy": val, "val_drop": drop, "within_bound": drop <= s.max_accuracy_drop,
                "best": False}
        trials[name] = Variant(content, encode_best(content), cfg.base,
                               [f"prune({sparsity:g})", f"cluster({clusters})", conversion],
                               {"prune": prune_cfg.model_dump(), "cluster": cluster_cfg.model_dump()}, info)
        if info["within_bound"]:
            info["best"] = True
            break
    return trials


def compress(cfg: ResolvedModel, bases: dict[str, keras.Model], data: Prepared
             ) -> tuple[dict[str, Variant], dict[str, str]]:
    """Every recipe's variant, then the search trials (if enabled), by name; and the recipes
    that do not apply to this model, with why."""
    out: dict[str, Variant] = {}
    not_applicable: dict[str, str] = {}
    for name in cfg.recipes:
        try:
            out[name] = run_recipe(name, cfg, bases, data)
        except NotApplicable as exc:
            not_applicable[name] = str(exc)
    if cfg.search.enabled:
        try:
            out.update(search(cfg, bases["teacher"], bases[cfg.base], data))
        except NotApplicable as exc:
            not_applicable["search"] = str(exc)
    return out, not_applicable


def run(ctx: StageContext, model_name: str) -> dict[str, Any]:
    """Write models/<model>/variants/{<name>.tflite, <name>.sfc, manifest.json}."""
    cfg = ctx.fleet.resolve(model_name)
    configure_devices(ctx.fleet.run.mixed_precision)
    reset(cfg.seed)
    data = load_prepared(ctx.ws.prepared(cfg.dataset_name))
    bases = {name: zoo.load(ctx.ws.keras(model_name, name), cfg.user_modules, ctx.ws.root)
             for name in cfg.keras_variants}
    variants, not_applicable = compress(cfg, bases, data)
    if not variants:
        raise NotApplicable(f"compress: no recipe applies to {model_name}: "
                            + "; ".join(f"{r}: {why}" for r, why in not_applicable.items()))
    manifest: dict[str, Any] = {}
    with atomic_dir(ctx.ws.variants_dir(model_name)) as tmp:
        for name, v in variants.items():
            (tmp / f"{name}.tflite").write_bytes(v.content)
            (tmp / f"{name}.sfc").write_bytes(v.coded)
            for extra, content in v.files.items():
                (tmp / extra).write_bytes(content)
            manifest[name] = {"file": f"{name}.tflite", "coded": f"{name}.sfc", "parent": v.parent,
                              "steps": v.steps, "settings": v.settings, "search": v.search, "skipped": v.skipped,
                              **({"files": sorted(v.files)} if v.files else {})}
        for name, why in not_applicable.items():
            manifest[name] = {"not_applicable": why}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {"variants": len(variants), "bytes": {n: len(v.content) for n, v in variants.items()},
            "coded_bytes": {n: len(v.coded) for n, v in variants.items()}, "not_applicable": not_applicable}

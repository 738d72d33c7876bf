"""teacher: the full-size model every variant is measured against: trained here, or yours as it is.

An ``arch: pretrained`` teacher is loaded and saved unchanged (same weights) as
``teacher.keras``, after checking that it takes the prepared inputs and has one output per
class; every other architecture is built and trained on the train split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shrinkfleet import training, zoo
from shrinkfleet.config import PretrainedArch, TrainConfig
from shrinkfleet.datasets import Prepared, load_prepared
from shrinkfleet.tfenv import configure_devices, keras, precision, reset
from tasks.common import StageContext


def train_teacher(
    arch: Any, cfg: TrainConfig, data: Prepared, seed: int, name: str = "teacher",
    mixed_precision: bool = False, root: Path | None = None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Build and train a teacher; returns the model (best val-loss weights, float32 layers) and its history.

    ``mixed_precision`` trains in mixed_float16 (the stage asks for it only on a GPU);
    ``root`` is where a custom builder is imported from.
    """
    reset(seed)
    with precision(mixed_precision):
        model = zoo.build(arch, data.input_shape, data.num_classes, name=name, root=root)
        loss, metrics = training.objective(zoo.output_kind(model), data.task)
        history = training.fit(
            model, data.train.x, data.train.y, (data.val.x, data.val.y),
            loss=loss, metrics=metrics, epochs=cfg.epochs, batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate, patience=cfg.patience, seed=seed,
        )
    return zoo.as_float32(model, arch, data.input_shape, data.num_classes, root=root), history


def load_teacher(arch: PretrainedArch, data: Prepared, base_dir: Path, root: Path) -> keras.Model:
    """Your trained teacher, checked against the prepared data; its weights as they are."""
    model = zoo.load_pretrained(arch, base_dir, root)
    zoo.check_fits(model, data.input_shape, data.num_classes, f"teacher {arch.path}")
    return model


def run(ctx: StageContext, model_name: str) -> dict[str, Any]:
    """Train one fleet member's teacher and save it to models/<model>/teacher.keras."""
    cfg = ctx.fleet.resolve(model_name)
    gpus = configure_devices(ctx.fleet.run.mixed_precision)
    mixed = ctx.fleet.run.mixed_precision and bool(gpus)
    data = load_prepared(ctx.ws.prepared(cfg.dataset_name))
    if isinstance(cfg.teacher_arch, PretrainedArch):
        model, history = load_teacher(cfg.teacher_arch, data, ctx.base_dir, ctx.ws.root), {"loss": []}
    else:
        model, history = train_teacher(cfg.teacher_arch, cfg.teacher, data, cfg.seed, mixed_precision=mixed,
                                       root=ctx.ws.root)
        zoo.check_fits(model, data.input_shape, data.num_classes, f"teacher ({cfg.teacher_arch.arch})")
    zoo.save(model, ctx.ws.keras(model_name, "teacher"))
    return {
        "epochs": len(history["loss"]),
        **{f"val_{k}": v for k, v in training.score(model, data.val.x, data.val.y, data.task).items()},
        "params": int(model.count_params()),
        "devices": ",".join(gpus) or "cpu",
        "mixed_precision": mixed,
    }

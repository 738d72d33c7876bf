"""teacher: supervised training of the full-size model every variant is measured against."""

from __future__ import annotations

from typing import Any

from shrinkfleet import training, zoo
from shrinkfleet.config import CnnArch, MlpArch, TrainConfig
from shrinkfleet.datasets import Prepared, load_prepared
from shrinkfleet.tfenv import configure_devices, keras, precision, reset
from tasks.common import StageContext


def train_teacher(
    arch: MlpArch | CnnArch, cfg: TrainConfig, data: Prepared, seed: int, name: str = "teacher",
    mixed_precision: bool = False,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Build and train a teacher; returns the model (best val-loss weights, float32 layers) and its history.

    ``mixed_precision`` trains in mixed_float16 (the stage asks for it only on a GPU).
    """
    reset(seed)
    with precision(mixed_precision):
        model = zoo.build(arch, data.input_shape, data.num_classes, name=name)
        history = training.fit(
            model, data.train.x, data.train.y, (data.val.x, data.val.y),
            loss=training.sparse_ce(), metrics=["accuracy"], epochs=cfg.epochs, batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate, patience=cfg.patience, seed=seed,
        )
    return zoo.as_float32(model, arch, data.input_shape, data.num_classes), history


def run(ctx: StageContext, model_name: str) -> dict[str, Any]:
    """Train one fleet member's teacher and save it to models/<model>/teacher.keras."""
    cfg = ctx.fleet.resolve(model_name)
    gpus = configure_devices(ctx.fleet.run.mixed_precision)
    mixed = ctx.fleet.run.mixed_precision and bool(gpus)
    data = load_prepared(ctx.ws.prepared(cfg.dataset_name))
    model, history = train_teacher(cfg.teacher_arch, cfg.teacher, data, cfg.seed, mixed_precision=mixed)
    zoo.save(model, ctx.ws.keras(model_name, "teacher"))
    return {
        "epochs": len(history["loss"]),
        "val_accuracy": training.accuracy(model, data.val.x, data.val.y),
        "params": int(model.count_params()),
        "devices": ",".join(gpus) or "cpu",
        "mixed_precision": mixed,
    }

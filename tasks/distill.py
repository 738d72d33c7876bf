"""distill: train the small student from the teacher's softened outputs (knowledge distillation).

Classification loss (Hinton et al., 2015):
``alpha * CE(y, s) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T))``.
The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones
when T changes. Regression: ``alpha * MSE(y, s) + (1 - alpha) * MSE(t, s)``, the teacher's
outputs as soft targets (temperature unused). Models that end in a softmax or a sigmoid take
part through the log of their probabilities (:func:`shrinkfleet.training.as_logits`), never
through a second softmax of probabilities. A pretrained student (``arch: pretrained``) is used as it is, not trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shrinkfleet import training, zoo
from shrinkfleet.config import ConfigError, DistillConfig, PretrainedArch
from shrinkfleet.datasets import Prepared, load_prepared
from shrinkfleet.tfenv import configure_devices, keras, precision, reset, tf
from tasks.common import StageContext


def distillation_loss(
    labels: tf.Tensor, teacher_logits: tf.Tensor, student_logits: tf.Tensor, temperature: float, alpha: float
) -> tf.Tensor:
    """Mean over the batch of ``alpha * CE(y, s) + (1 - alpha) * T^2 * KL(p_t || p_s)``."""
    labels = tf.cast(labels, tf.int32)
    student_logits = tf.cast(student_logits, tf.float32)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=student_logits)
    log_p_t = tf.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_p_s = tf.nn.log_softmax(student_logits / temperature, axis=-1)
    kl = tf.reduce_sum(tf.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return tf.reduce_mean(alpha * ce + (1.0 - alpha) * temperature**2 * kl)


def pack_targets(y: np.ndarray, teacher_logits: np.ndarray) -> np.ndarray:
    """Labels and teacher logits in one array, so Keras' ``fit`` can carry both as ``y``."""
    return np.concatenate([y.astype(np.float32)[:, None], teacher_logits.astype(np.float32)], axis=1)


class _PackedKD(keras.losses.Loss):
    def __init__(self, temperature: float, alpha: float, kind: str = "logits"):
        super().__init__(name="distillation")
        self.temperature, self.alpha, self.kind = temperature, alpha, kind

    def call(self, y_packed, student_out):
        student_logits = training.tf_as_logits(student_out, self.kind)
        return distillation_loss(y_packed[:, 0], y_packed[:, 1:], student_logits, self.temperature, self.alpha)


class _PackedRegressionKD(keras.losses.Loss):
    def __init__(self, alpha: float):
        super().__init__(name="distillation")
        self.alpha = alpha

    def call(self, y_packed, student_out):
        s = tf.cast(student_out[:, 0], tf.float32)
        hard = tf.reduce_mean(tf.square(y_packed[:, 0] - s))
        soft = tf.reduce_mean(tf.square(y_packed[:, 1] - s))
        return self.alpha * hard + (1.0 - self.alpha) * soft


def _packed_mae(y_packed, student_out):
    return tf.abs(y_packed[:, 0] - tf.cast(student_out[:, 0], tf.float32))


_packed_mae.__name__ = "mae"


def _packed_accuracy_for(kind: str):
    def accuracy(y_packed, student_out):
        labels = tf.cast(y_packed[:, 0], tf.int64)
        predicted = tf.argmax(training.tf_as_logits(student_out, kind), axis=-1)
        return tf.cast(tf.equal(predicted, labels), tf.float32)

    return accuracy


def distill(
    teacher: keras.Model, arch: Any, cfg: DistillConfig, data: Prepared, seed: int,
    name: str = "student", mixed_precision: bool = False, root: Path | None = None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Train a fresh ``arch`` student on ``data`` with the teacher's soft targets.

    The teacher is only read (its logits are computed once, in inference mode).
    ``mixed_precision`` trains in mixed_float16; the returned student has float32 layers.
    ``root`` is where a custom builder is imported from.
    """
    regression = data.task == "regression"
    soft = training.outputs if regression else training.logits
    t_train, t_val = soft(teacher, data.train.x), soft(teacher, data.val.x)
    reset(seed)
    with precision(mixed_precision):
        student = zoo.build(arch, data.input_shape, data.num_classes, name=name, root=root)
        kind = zoo.output_kind(student)
        if regression:
            loss, metric = _PackedRegressionKD(cfg.alpha), _packed_mae
        else:
            loss, metric = _PackedKD(cfg.temperature, cfg.alpha, kind), _packed_accuracy_for(kind)
            metric.__name__ = "accuracy"
        history = training.fit(
            student, data.train.x, pack_targets(data.train.y, t_train),
            (data.val.x, pack_targets(data.val.y, t_val)),
            loss=loss, metrics=[metric], epochs=cfg.epochs,
            batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, patience=cfg.patience, seed=seed,
        )
    return zoo.as_float32(student, arch, data.input_shape, data.num_classes, root=root), history


def run(ctx: StageContext, model_name: str) -> dict[str, Any]:
    """Distil one fleet member's student from its teacher into models/<model>/student.keras."""
    cfg = ctx.fleet.resolve(model_name)
    gpus = configure_devices(ctx.fleet.run.mixed_precision)
    mixed = ctx.fleet.run.mixed_precision and bool(gpus)
    data = load_prepared(ctx.ws.prepared(cfg.dataset_name))
    if cfg.student_arch is None:
        raise ConfigError(f"models.{model_name}.student: null: the model has no student to distil")
    if isinstance(cfg.student_arch, PretrainedArch):
        student, history = zoo.load_pretrained(cfg.student_arch, ctx.base_dir, ctx.ws.root), {"loss": []}
        zoo.check_fits(student, data.input_shape, data.num_classes, f"student {cfg.student_arch.path}")
    else:
        teacher = zoo.load(ctx.ws.keras(model_name, "teacher"), cfg.user_modules, ctx.ws.root)
        student, history = distill(teacher, cfg.student_arch, cfg.distill, data, cfg.seed, mixed_precision=mixed,
                                   root=ctx.ws.root)
        zoo.check_fits(student, data.input_shape, data.num_classes, f"student ({cfg.student_arch.arch})")
    zoo.save(student, ctx.ws.keras(model_name, "student"))
    return {
        "epochs": len(history["loss"]),
        **{f"val_{k}": v for k, v in training.score(student, data.val.x, data.val.y, data.task).items()},
        "params": int(student.count_params()),
        "devices": ",".join(gpus) or "cpu",
        "mixed_precision": mixed,
    }

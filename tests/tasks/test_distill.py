from __future__ import annotations

import numpy as np
import pytest

from shrinkfleet import training
from tasks.distill import distillation_loss, pack_targets


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.5), (4.0, 0.1), (2.5, 1.0), (10.0, 0.0)])
def test_loss_equals_hand_computation(temperature, alpha):
    labels = np.array([0, 2, 1])
    t = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [-0.5, 1.5, 0.0]])
    s = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 2.0], [0.3, 0.3, 0.3]])
    ce = -_log_softmax(s)[np.arange(3), labels]
    log_pt, log_ps = _log_softmax(t / temperature), _log_softmax(s / temperature)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1)
    expected = np.mean(alpha * ce + (1 - alpha) * temperature**2 * kl)
    got = float(distillation_loss(labels, t.astype(np.float32), s.astype(np.float32), temperature, alpha))
    assert got == pytest.approx(expected, rel=1e-5)


def test_loss_is_zero_kl_when_student_copies_teacher():
    t = np.array([[2.0, 0.5, -1.0]], np.float32)
    assert float(distillation_loss(np.array([0]), t, t, 3.0, 0.0)) == pytest.approx(0.0, abs=1e-6)


def test_pack_targets_keeps_labels_and_logits():
    packed = pack_targets(np.array([3, 1]), np.ones((2, 4)))
    assert packed.shape == (2, 5) and packed[:, 0].tolist() == [3.0, 1.0]


def test_student_is_smaller_and_close_to_teacher(teacher, student, digits):
    assert student.count_params() < teacher.count_params() / 1.8
    t_acc = training.accuracy(teacher, digits.test.x, digits.test.y)
    s_acc = training.accuracy(student, digits.test.x, digits.test.y)
    assert s_acc > t_acc - 0.06


def test_distill_leaves_the_teacher_untouched(teacher, digits):
    from shrinkfleet.config import DistillConfig, MlpArch
    from tasks.distill import distill

    before = [w.copy() for w in teacher.get_weights()]
    distill(teacher, MlpArch(hidden=[4]), DistillConfig(epochs=1, patience=0), digits, seed=1)
    for a, b in zip(before, teacher.get_weights(), strict=True):
        assert (a == b).all()

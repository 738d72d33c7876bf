from __future__ import annotations

import numpy as np
import pytest

from shrinkfleet import training
from shrinkfleet.config import PruneConfig
from shrinkfleet.evaluation import kernel_sparsity


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9])
def test_pruning_reaches_the_target_sparsity(student, digits, target):
    from tasks.prune import prune

    pruned = prune(student, PruneConfig(target_sparsity=target, epochs=2, frequency=5), digits, seed=0)
    assert kernel_sparsity(pruned) == pytest.approx(target, abs=0.01)
    # every prunable layer is pruned, not just the big one
    for layer in pruned.layers:
        if hasattr(layer, "kernel"):
            assert np.mean(layer.kernel.numpy() == 0) == pytest.approx(target, abs=0.02)


def test_pruning_keeps_accuracy_and_leaves_the_input_alone(student, digits):
    from tasks.prune import prune

    before = [w.copy() for w in student.get_weights()]
    pruned = prune(student, PruneConfig(target_sparsity=0.5, epochs=3, frequency=5), digits, seed=0)
    assert kernel_sparsity(student) == 0.0
    for a, b in zip(before, student.get_weights(), strict=True):
        assert (a == b).all()
    s_acc = training.accuracy(student, digits.test.x, digits.test.y)
    assert training.accuracy(pruned, digits.test.x, digits.test.y) > s_acc - 0.05
    assert not any("prune" in layer.name for layer in pruned.layers)  # stripped


def test_schedule_ends_on_a_mask_update():
    from tasks.prune import schedule_steps

    end, freq, total = schedule_steps(1000, PruneConfig(epochs=3, batch_size=64, frequency=7))
    assert total == 48 and end % freq == 0 and end <= 0.75 * total + freq


def test_too_few_steps_is_a_clear_error():
    from tasks.prune import schedule_steps

    with pytest.raises(ValueError, match="raise prune.epochs"):
        schedule_steps(10, PruneConfig(epochs=1, batch_size=64))


def test_layer_sparsity_overrides_named_layers(student, digits):
    from tasks.prune import expected_sparsity, prune

    cfg = PruneConfig(target_sparsity=0.9, layer_sparsity={"logits": 0.5}, epochs=2, frequency=5)
    pruned = prune(student, cfg, digits, seed=0)
    by_name = {layer.name: np.mean(layer.kernel.numpy() == 0) for layer in pruned.layers if hasattr(layer, "kernel")}
    assert by_name["logits"] == pytest.approx(0.5, abs=0.02)
    assert by_name["dense_0"] == pytest.approx(0.9, abs=0.02)
    assert kernel_sparsity(pruned) == pytest.approx(expected_sparsity(cfg, student), abs=0.01)
    with pytest.raises(ValueError, match="prune.layer_sparsity: no prunable layer named ghost"):
        prune(student, PruneConfig(layer_sparsity={"ghost": 0.5}, epochs=1), digits, seed=0)


def test_layer_sparsity_auto_picks_levels_from_the_sensitivity_table_within_the_bound(student, digits):
    from tasks.prune import prune, resolve_auto

    cfg = PruneConfig(layer_sparsity="auto", auto_levels=[0.3, 0.6, 0.9], auto_max_drop=0.02, epochs=2, frequency=5)
    resolved, rows, drop = resolve_auto(student, cfg, digits)
    levels = resolved.layer_sparsity
    assert set(levels) == {"dense_0", "logits"} and len(rows) == 2 * 3
    assert drop <= 0.02
    for name, level in levels.items():  # never more than the largest level within the bound on its own
        alone = [r["level"] for r in rows if r["layer"] == name and r["drop"] <= 0.02]
        assert level <= max(alone, default=0.0)
    pruned = prune(student, cfg, digits, seed=0)  # auto resolves the same way inside prune
    by_name = {layer.name: np.mean(layer.kernel.numpy() == 0) for layer in pruned.layers if hasattr(layer, "kernel")}
    assert by_name == pytest.approx(levels, abs=0.02)

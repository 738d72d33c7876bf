"""Stage-duration history: saved atomically, merged run by run, and the order it gives."""

from __future__ import annotations

import json

from shrinkfleet import durations


def test_longest_first_puts_unknown_models_first_then_the_longest():
    history = {"a": {"teacher": 5.0, "distill": 5.0}, "b": {"teacher": 30.0, "distill": 1.0},
               "c": {"teacher": 1.0}}  # c: distill has no figure, so c counts as unknown
    chains = {"a": ["teacher", "distill"], "b": ["teacher", "distill"], "c": ["teacher", "distill"],
              "d": ["teacher"]}
    assert durations.longest_first(["a", "b", "c", "d"], chains, history) == ["c", "d", "b", "a"]


def test_longest_first_counts_only_the_stages_still_to_run():
    history = {"a": {"teacher": 50.0, "evaluate": 1.0}, "b": {"teacher": 10.0, "evaluate": 2.0}}
    # a's teacher is skipped tonight (DVC found it current): only its evaluate runs
    chains = {"a": ["evaluate"], "b": ["teacher", "evaluate"]}
    assert durations.longest_first(["a", "b"], chains, history) == ["b", "a"]


def test_a_first_run_keeps_fleet_order():
    chains = {m: ["teacher"] for m in "zyx"}
    assert durations.longest_first(["z", "y", "x"], chains, {}) == ["z", "y", "x"]


def test_save_merges_into_the_last_runs_figures(tmp_path):
    durations.save(tmp_path, {"a": {"teacher": 4.0, "distill": 2.0}})
    history = durations.save(tmp_path, {"a": {"distill": 3.0}, "b": {"teacher": 1.5}, "c": {}})
    assert history == {"a": {"teacher": 4.0, "distill": 3.0}, "b": {"teacher": 1.5}}
    assert durations.load(tmp_path) == history
    assert not list(durations.path(tmp_path).parent.glob("*.tmp*"))  # the temp file was renamed


def test_an_unreadable_history_counts_as_none_and_is_replaced(tmp_path):
    target = durations.path(tmp_path)
    target.parent.mkdir(parents=True)
    target.write_text('{"a": {"teacher": 4.0')  # cut short
    assert durations.load(tmp_path) == {}
    durations.save(tmp_path, {"b": {"teacher": 1.0}})
    assert json.loads(target.read_text()) == {"b": {"teacher": 1.0}}
    target.write_text('["not", "a", "mapping"]')
    assert durations.load(tmp_path) == {}
    target.write_text('{"a": {"teacher": "slow", "distill": 2}}')
    assert durations.load(tmp_path) == {"a": {"distill": 2.0}}

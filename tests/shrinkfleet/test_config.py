"""params.yaml schema: the shipped file is valid; every kind of mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shrinkfleet.config import ConfigError, load_params, parse_params

REPO = Path(__file__).resolve().parents[2]


def test_shipped_params_are_valid_and_have_three_sklearn_models():
    fleet = load_params(REPO / "params.yaml")
    assert len(fleet.models) >= 3
    assert {fleet.datasets[m.dataset].source for m in fleet.models.values()} == {"sklearn"}
    archs = {(fleet.datasets[m.dataset].name, m.teacher.arch) for m in fleet.models.values()}
    assert ("digits", "cnn") in archs and ("digits", "mlp") in archs
    assert any(name in ("breast_cancer", "wine") and arch == "mlp" for name, arch in archs)


def test_every_key_of_the_shipped_params_is_commented():
    """Top-level keys and every key of the stage sections say their meaning and unit."""
    section = None
    for i, line in enumerate((REPO / "params.yaml").read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#") or ":" not in line:
            continue
        if line == line.lstrip():
            section = line.split(":", 1)[0]
        elif section in ("models", "datasets", "recipes"):
            continue  # documented on the first entry; the rest repeat the same keys
        assert "#" in line, f"params.yaml:{i}: key without a comment: {line!r}"


def test_models_override_fleet_defaults(tiny_params):
    tiny_params["models"]["digits-mlp"]["prune"] = {"target_sparsity": 0.9}
    tiny_params["models"]["digits-mlp"]["student"]["epochs"] = 11
    fleet = parse_params(tiny_params)
    resolved = fleet.resolve("digits-mlp")
    assert resolved.prune.target_sparsity == 0.9
    assert resolved.prune.epochs == tiny_params["prune"]["epochs"]
    assert resolved.distill.epochs == 11
    assert fleet.resolve("cancer-mlp").prune.target_sparsity == 0.4


def _set(d: dict, path: str, value):
    keys = path.split(".")
    for k in keys[:-1]:
        d = d[k]
    if value is _DELETE:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("bogus", 1, "bogus: unknown key"),
        ("prune.bogus", 1, "prune.bogus: unknown key"),
        ("models.digits-mlp.teacher.widths", [3], "models.digits-mlp.teacher.widths: unknown key"),
        ("models.digits-mlp.prune.target_sparsity", 1.0,
         "models.digits-mlp.prune.target_sparsity: must be less than 1"),
        ("prune.target_sparsity", -0.1, "prune.target_sparsity: must be greater than or equal to 0"),
        ("distill.temperature", 0, "distill.temperature: must be greater than 0"),
        ("distill.alpha", 1.5, "distill.alpha: must be less than or equal to 1"),
        ("teacher.epochs", "many", "teacher.epochs: must be a valid integer"),
        ("quantize.modes", ["int8"], "quantize.modes: unknown key"),
        ("recipes", {"r": {"steps": ["cluster"]}}, "recipes.r.steps: the last step must be a conversion"),
        ("recipes", {"r": {"steps": ["int4"]}}, "recipes.r.steps: unknown step 'int4'"),
        ("recipes", {"r": {"steps": ["pcqat", "int8"]}}, "pcqat preserves clusters: put a cluster step before it"),
        ("recipes", {"r": {"steps": ["qat", "float16"]}}, "qat trains for int8: the recipe must end with int8"),
        ("recipes", {"r": {"from": "nowhere", "steps": ["int8"]}}, "recipes.r.from: must be one of"),
        ("cluster.clusters", 1, "cluster.clusters: must be greater than or equal to 2"),
        ("prune.pattern", "3:4", "prune.pattern: must be one of: 'unstructured' or '2:4'"),
        ("models.digits-mlp.recipes", ["ghost"], "models.digits-mlp.recipes: ghost not in recipes:"),
        ("datasets.digits.features", {"select_k": 4}, "datasets.digits.features: feature selection/extraction "
         "applies to tabular data"),
        ("datasets.cancer.features", {"pca": 0}, "datasets.cancer.features.pca: must be greater than or equal to 1"),
        ("models.digits-mlp.teacher.arch", "rnn", "models.digits-mlp.teacher.arch: 'rnn' is not one of: 'mlp', 'cnn'"),
        ("datasets.digits.source", "hub", "datasets.digits.source: 'hub' is not one of"),
        ("datasets.digits.name", "mnist", "datasets.digits.name: must be one of: 'digits'"),
        ("models.digits-mlp.dataset", "nope", "models.digits-mlp.dataset: 'nope' is not in datasets:"),
        ("models.digits-mlp.teacher", _DELETE, "models.digits-mlp.teacher: required key is missing"),
        ("models.digits-mlp.prune", {"initial_sparsity": 0.6},
         "models.digits-mlp.prune.initial_sparsity: must be <= target_sparsity"),
        ("models", {}, "models: the fleet is empty"),
        ("models", [{"dataset": "digits"}], "models: must be a mapping keyed by model name"),
        ("data.val_fraction", 0.7, "data.val_fraction: must be less than 0.5"),
        ("run.workers", 0, "run.workers: must be greater than or equal to 1"),
    ],
)
def test_bad_values_name_their_key(tiny_params, path, value, expected):
    _set(tiny_params, path, value)
    with pytest.raises(ConfigError) as exc:
        parse_params(tiny_params)
    assert expected in str(exc.value)


def test_bad_model_name_is_rejected(tiny_params):
    tiny_params["models"]["Bad Name"] = tiny_params["models"]["digits-mlp"]
    with pytest.raises(ConfigError, match="name 'Bad Name' must be lower-case"):
        parse_params(tiny_params)


def test_all_problems_are_reported_at_once(tiny_params):
    tiny_params["distill"]["temperature"] = -1
    tiny_params["models"]["cancer-mlp"]["teacher"]["hidden"] = [0]
    with pytest.raises(ConfigError) as exc:
        parse_params(tiny_params)
    assert "distill.temperature" in str(exc.value)
    assert "models.cancer-mlp.teacher.hidden.0" in str(exc.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the fleet definition"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_params(bad)


def test_yaml_is_loaded_safely(tmp_path, tiny_params):
    p = tmp_path / "params.yaml"
    del tiny_params["fleet"]  # written once, as the tagged value (a second one would be a duplicate key)
    p.write_text("fleet: !!python/object/apply:os.system ['echo pwned']\n" + yaml.safe_dump(tiny_params))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(p)


def test_duplicate_model_names_are_refused_with_key_path_and_line(tmp_path, tiny_params):
    p = tmp_path / "params.yaml"
    text = yaml.safe_dump(tiny_params, sort_keys=False)  # models: is the last section
    p.write_text(text + "  digits-mlp: {dataset: cancer}\n")
    first = text.splitlines().index("  digits-mlp:") + 1
    last = len(text.splitlines()) + 1
    with pytest.raises(ConfigError) as exc:
        load_params(p)
    assert f"models.digits-mlp: duplicate key (line {last}; first at line {first})" in str(exc.value)


def test_duplicate_keys_anywhere_name_their_path(tmp_path, tiny_params):
    p = tmp_path / "params.yaml"
    text = yaml.safe_dump(tiny_params, sort_keys=False)
    text = text.replace("prune:\n  target_sparsity: 0.5\n", "prune:\n  target_sparsity: 0.5\n  power: 2\n  power: 3\n")
    p.write_text(text)
    with pytest.raises(ConfigError, match="prune.power: duplicate key"):
        load_params(p)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path, tiny_params):
    p = tmp_path / "params.yaml"
    text = yaml.safe_dump(tiny_params, sort_keys=False)
    text = text.replace("teacher:\n  epochs: 4\n", "teacher: &t\n  epochs: 4\n")
    text = text.replace("distill:\n  temperature: 4.0\n", "distill:\n  <<: *t\n  temperature: 4.0\n")
    p.write_text(text)
    assert load_params(p).distill.learning_rate == 0.005  # distill's own key wins over teacher's 0.003


def test_recipe_step_overrides_resolve_and_are_checked(tiny_params):
    tiny_params["recipes"] = {"dc": {"steps": [{"cluster": {"clusters": 4}}, "float32"]},
                              "bad": {"steps": [{"cluster": {"clusterz": 4}}, "float32"]}}
    fleet = parse_params(tiny_params)
    cfg = fleet.resolve("digits-mlp")
    name, step = cfg.step_config("dc", 0)
    assert name == "cluster" and step.clusters == 4 and step.epochs == tiny_params["cluster"]["epochs"]
    with pytest.raises(ConfigError, match=r"recipes.bad.steps\[0\].cluster.clusterz: unknown key"):
        cfg.step_config("bad", 0)


def test_a_model_may_pick_its_recipes(tiny_params):
    tiny_params["models"]["cancer-mlp"]["recipes"] = ["pruned-int8"]
    fleet = parse_params(tiny_params)
    assert list(fleet.resolve("cancer-mlp").recipes) == ["pruned-int8"]
    assert len(fleet.resolve("digits-mlp").recipes) == len(fleet.recipes)

"""params.yaml schema: the shipped file is valid; every kind of mistake names its key."""

from __future__ import annotations

import re
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
    tiny_params["recipes"] = {"dc": {"steps": [{"cluster": {"clusters": 4}}, "float32"]}}
    fleet = parse_params(tiny_params)
    cfg = fleet.resolve("digits-mlp")
    name, step = cfg.step_config("dc", 0)
    assert name == "cluster" and step.clusters == 4 and step.epochs == tiny_params["cluster"]["epochs"]


def test_a_bad_recipe_step_override_stops_validation_naming_recipe_and_key(tiny_params):
    """Checked when params.yaml is read (before any stage trains), merged with each model's own section."""
    tiny_params["recipes"] = {"dc": {"steps": [{"cluster": {"clusterz": 4}}, "float32"]},
                              "few": {"steps": [{"prune": {"target_sparsity": 0.5}}, {"cluster": {"clusters": 1}},
                                                "float32"]}}
    with pytest.raises(ConfigError) as err:
        parse_params(tiny_params)
    text = str(err.value)
    assert "recipes.dc.steps[0].cluster.clusterz: unknown key" in text
    assert "recipes.few.steps[1].cluster.clusters: must be greater than or equal to 2" in text
    assert text.count("recipes.dc.steps[0]") == 1  # said once, not once per model
    tiny_params["recipes"] = {"dc": {"steps": [{"cluster": {"clusters": 4}}, "float32"]}}
    tiny_params["models"]["digits-mlp"]["cluster"] = {"learning_rate": 2.0}  # bad only once merged for this model
    with pytest.raises(ConfigError, match=r"models.digits-mlp.cluster.learning_rate: must be less than 1"):
        parse_params(tiny_params)


def test_the_code_and_the_shipped_params_yaml_have_the_same_defaults():
    """One source of defaults: every stage section of params.yaml lists every field of its schema
    with the schema's default, so a key left out of a user's params.yaml means what the shipped one says."""
    from shrinkfleet.config import DEFAULT_RECIPES, FleetConfig, RecipeSpec

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    sections = [k for k in FleetConfig.model_fields if k not in ("datasets", "models")]
    assert sorted(k for k in raw if k not in ("datasets", "models")) == sorted(sections)
    disagree = []
    for section in sections:
        default = FleetConfig.model_fields[section].get_default(call_default_factory=True)
        if section == "recipes":
            shipped = {k: RecipeSpec.model_validate(v) for k, v in raw[section].items()}
            if shipped != {k: RecipeSpec.model_validate(v) for k, v in DEFAULT_RECIPES.items()}:
                disagree.append("recipes")
        elif hasattr(default, "model_dump"):
            code = default.model_dump()
            disagree += [f"{section}.{k}: params.yaml {raw[section].get(k, '(missing)')!r}, code {v!r}"
                         for k, v in code.items() if raw[section].get(k, "(missing)") != v]
        elif raw[section] != default:
            disagree.append(f"{section}: params.yaml {raw[section]!r}, code {default!r}")
    assert not disagree, "\n".join(disagree)


def test_a_snapshot_is_read_once_and_knows_when_the_file_changed(tmp_path, tiny_params):
    from shrinkfleet.config import load_snapshot

    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(tiny_params))
    snap = load_snapshot(p)
    assert snap.file_unchanged() and snap.path == p.resolve() and len(snap.digest) == 64
    p.write_text("# a comment changes the file, not the settings\n" + p.read_text())
    again = load_snapshot(p)
    assert not snap.file_unchanged() and again.digest == snap.digest and again.file_sha256 != snap.file_sha256
    tiny_params["prune"]["target_sparsity"] = 0.37
    p.write_text(yaml.safe_dump(tiny_params))
    edited = load_snapshot(p)
    assert edited.digest != snap.digest
    assert snap.fleet.prune.target_sparsity != 0.37  # the snapshot holds what it read
    assert '"target_sparsity": 0.37' in edited.to_json()


def test_a_model_may_pick_its_recipes(tiny_params):
    tiny_params["models"]["cancer-mlp"]["recipes"] = ["pruned-int8"]
    fleet = parse_params(tiny_params)
    assert list(fleet.resolve("cancer-mlp").recipes) == ["pruned-int8"]
    assert len(fleet.resolve("digits-mlp").recipes) == len(fleet.recipes)


@pytest.mark.parametrize("step, expected", [
    ({"channels": {"kep": 0.5}}, "recipes.ch.steps[0].channels.kep"),
    ({"channels": {"keep": 1.5}}, "recipes.ch.steps[0].channels.keep"),
    ({"channels": {"norm": "l3"}}, "recipes.ch.steps[0].channels.norm"),
    ({"channels": {"keep": "half"}}, "recipes.ch.steps[0].channels.keep: must be a fraction in (0, 1] or auto, "
                                     "got 'half'"),
    ({"prune": {"layer_sparsity": "aut"}}, "recipes.ch.steps[0].prune.layer_sparsity: must be a mapping of layer "
                                          "name to sparsity, or auto, got 'aut'"),
])
def test_a_bad_channels_step_names_recipe_and_key(tiny_params, step, expected):
    tiny_params["recipes"] = {"ch": {"steps": [step, "int8"]}}
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse_params(tiny_params)


def test_channels_and_auto_settings_resolve(tiny_params):
    tiny_params["recipes"] = {"ch": {"steps": [{"channels": {"keep": "auto"}}, "cluster", "float32"]}}
    tiny_params["prune"] = {**tiny_params.get("prune", {}), "layer_sparsity": "auto"}
    resolved = parse_params(tiny_params).resolve("digits-mlp")
    name, cfg = resolved.step_config("ch", 0)
    assert (name, cfg.keep, cfg.norm) == ("channels", "auto", "l1")
    assert resolved.prune.layer_sparsity == "auto"


def test_auto_layer_sparsity_is_refused_for_a_regression_model(tiny_params):
    tiny_params["datasets"]["houses"] = {"source": "csv", "path": "houses.csv", "label": "price", "task": "regression"}
    tiny_params["models"]["cancer-mlp"]["dataset"] = "houses"
    tiny_params["models"]["cancer-mlp"]["prune"] = {"layer_sparsity": "auto"}
    with pytest.raises(ConfigError, match=r"models.cancer-mlp.prune.layer_sparsity: auto bounds an accuracy drop"):
        parse_params(tiny_params)

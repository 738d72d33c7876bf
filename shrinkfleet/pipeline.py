"""The stage graph of a fleet, and ``dvc.yaml`` written from it.

One entry per stage kind says which code it runs and which parameter sections it reads;
:func:`stages` turns a fleet into one DVC stage per dataset (``prepare-<dataset>``) and per
model and stage kind (``teacher-<model>`` ... ``evaluate-<model>``), each with its own
dependencies: the stage's code, the files it reads (a dataset's raw file or folder, the
outputs of the stages before it) and the ``params.yaml`` keys it reads.

Why ``dvc.yaml`` is written rather than templated with ``foreach``: DVC's templates give
every stage of a ``foreach`` group the same list of dependencies, and a fleet's stages do not
have the same inputs (a bundled scikit-learn set reads no file, an ``.npz`` one file, an MNIST
folder a folder; a model lists only the override sections it has). DVC refuses a template
key that an item lacks, so a raw data file could not be a dependency at all, and replacing it
in place re-ran nothing. Written out, every input is a plain DVC dependency: ``dvc status``
names the file that changed, and ``dvc repro`` and ``shrinkfleet run`` agree.

``shrinkfleet sync`` writes it; every ``shrinkfleet run`` (and every deployment run) rewrites
it first when the fleet changed; ``shrinkfleet stage`` (what ``dvc repro`` calls) refuses to
run from an out-of-date one. Only the datasets that some model uses get a stage, so a dataset
kept in ``params.yaml`` for later does not leave ``dvc status`` dirty.

A bundled scikit-learn set is versioned by the scikit-learn release that ships it: its
prepare command carries ``--sklearn-version``, so an upgrade reads as a changed command and
re-runs that prepare stage (and nothing after it, if the data came out the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shrinkfleet.config import CustomArch, FleetConfig, PretrainedArch

PIPELINE_FILE = "dvc.yaml"
HEADER = """\
# Written by `shrinkfleet sync` from params.yaml; do not edit (every `shrinkfleet run` rewrites
# it when the fleet changes). One stage per dataset in use and per model stage; each lists its
# code, the files it reads (raw data included) and only the params.yaml keys it reads, so a
# change re-runs exactly the stages that read it. See shrinkfleet/pipeline.py.
"""


@dataclass(frozen=True)
class StageKind:
    """What every stage of one kind shares: its code and the fleet-wide sections it reads."""

    name: str
    code: tuple[str, ...]
    sections: tuple[str, ...]  # top-level params.yaml sections the stage reads
    model_keys: tuple[str, ...] = ()  # keys of models.<name> the stage reads


_TRAIN = ("shrinkfleet/tfenv.py", "shrinkfleet/zoo.py", "shrinkfleet/training.py")
KINDS: dict[str, StageKind] = {k.name: k for k in (
    StageKind("prepare", ("shrinkfleet/datasets.py", "tasks/prepare.py"), ("seed", "data")),
    StageKind("teacher", (*_TRAIN, "tasks/teacher.py"), ("seed", "teacher"), ("dataset", "teacher")),
    StageKind("distill", (*_TRAIN, "tasks/distill.py"), ("seed", "distill"), ("student", "distill")),
    StageKind("prune", (*_TRAIN, "shrinkfleet/techniques.py", "shrinkfleet/sensitivity.py", "tasks/prune.py"),
              ("seed", "prune"), ("prune",)),
    StageKind("compress",
              (*_TRAIN, "shrinkfleet/techniques.py", "shrinkfleet/channels.py", "shrinkfleet/macs.py",
               "shrinkfleet/sensitivity.py", "shrinkfleet/evaluation.py", "shrinkfleet/coding.py",
               "tasks/prune.py", "tasks/compress.py"),
              ("seed", "prune", "cluster", "channels", "qat", "quantize", "recipes", "search"),
              ("prune", "cluster", "channels", "qat", "quantize", "recipes", "search")),
    StageKind("evaluate", ("shrinkfleet/evaluation.py", "shrinkfleet/coding.py", "shrinkfleet/macs.py",
                           "tasks/evaluate.py"),
              ("evaluate",), ("distill", "prune")),
)}
STAGE_KINDS = tuple(KINDS)
MODEL_STAGE_KINDS = STAGE_KINDS[1:]


def _code(kind: StageKind, root: Path) -> list[str]:
    """The stage's code files, where the project holds them (a clone of shrinkfleet does; a project
    folder of yours that uses an installed shrinkfleet does not, and is versioned by the install)."""
    return [c for c in kind.code if (root / c).is_file()]


def stage_name(kind: str, target: str) -> str:
    """The DVC stage of one kind for one dataset or model: ``prepare-digits``, ``teacher-digits-cnn``."""
    return f"{kind}-{target}"


def split_stage_name(name: str) -> tuple[str, str]:
    """``(kind, target)`` of a stage named by :func:`stage_name`."""
    kind, _, target = name.partition("-")
    return kind, target


def _present(fleet: FleetConfig, section: str) -> bool:
    # DVC refuses a params key that params.yaml lacks; sections left to the schema's defaults are not listed.
    return section in fleet.model_fields_set


def raw_inputs(fleet: FleetConfig, dataset: str) -> list[str]:
    """The files or folders a dataset reads, as written in params.yaml (relative to the project root)."""
    path = getattr(fleet.datasets[dataset], "path", None)
    if path is None:
        return []
    return [str(Path(path).expanduser()) if path.startswith("~") else path]


def model_kinds(fleet: FleetConfig, model: str) -> tuple[str, ...]:
    """The stage kinds one model runs: all of them, but ``distill`` for a model with ``student: null``."""
    return tuple(k for k in MODEL_STAGE_KINDS if k != "distill" or fleet.models[model].student is not None)


def module_paths(module: str, root: Path) -> list[str]:
    """The project files a module of yours is read from: its top-level package folder, or its file.

    The whole package, because a builder in ``mymodels/cnn.py`` may import its neighbours.
    Nothing for a module outside the project (an installed library is versioned by its install).
    """
    top = module.split(".")[0]
    if (root / top).is_dir():
        return [top]
    if (root / f"{top}.py").is_file():
        return [f"{top}.py"]
    return []


def user_modules(*archs: Any) -> list[str]:
    """Modules of yours that models of these architectures need imported (see ``ResolvedModel.user_modules``)."""
    out: list[str] = []
    for arch in archs:
        if isinstance(arch, PretrainedArch):
            out += arch.imports
        elif isinstance(arch, CustomArch):
            out.append(arch.builder.split(":")[0])
    return list(dict.fromkeys(out))


def arch_inputs(arch: Any, root: Path) -> list[str]:
    """The files a model's architecture reads: a pretrained model's file and its imports, a builder's module."""
    if isinstance(arch, PretrainedArch):
        path = str(Path(arch.path).expanduser()) if arch.path.startswith("~") else arch.path
        return [path, *(p for m in arch.imports for p in module_paths(m, root))]
    if isinstance(arch, CustomArch):
        return module_paths(arch.builder.split(":")[0], root)
    return []


def sklearn_version() -> str:
    from importlib.metadata import version

    return version("scikit-learn")


def stages(fleet: FleetConfig, root: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every DVC stage of the fleet, in run order: the datasets in use, then each model's chain.

    ``root`` is the project folder, where the modules of custom builders and imports are
    looked up (default: the current folder).
    """
    root = Path(".") if root is None else root
    out: dict[str, dict[str, Any]] = {}
    for ds in fleet.datasets_in_use():
        kind = KINDS["prepare"]
        cmd = f"shrinkfleet stage prepare {ds}"
        if fleet.datasets[ds].source == "sklearn":
            cmd += f" --sklearn-version {sklearn_version()}"
        out[stage_name("prepare", ds)] = {
            "cmd": cmd,
            "deps": [*_code(kind, root), *raw_inputs(fleet, ds)],
            "params": [s for s in kind.sections if _present(fleet, s)] + [f"datasets.{ds}"],
            "outs": [f"data/prepared/{ds}"],
        }
    for m, spec in fleet.models.items():
        prepared = f"data/prepared/{spec.dataset}"
        model_dir = f"models/{m}"
        keras = [f"{model_dir}/{v}.keras" for v in ("teacher", "student", "pruned")
                 if v != "student" or spec.student is not None]
        base = "teacher" if spec.student is None else "student"
        # Later stages load the saved models, whose custom layers your modules define.
        user_code = list(dict.fromkeys(p for m in user_modules(spec.teacher, spec.student)
                                       for p in module_paths(m, root)))
        inputs = {
            "teacher": [prepared, *arch_inputs(spec.teacher, root)],
            "distill": [prepared, f"{model_dir}/teacher.keras", *arch_inputs(spec.student, root)],
            "prune": [prepared, f"{model_dir}/{base}.keras", *user_code],
            "compress": [prepared, *keras, *user_code],
            "evaluate": [prepared, *keras, f"{model_dir}/variants", *user_code],
        }
        outs: dict[str, list[Any]] = {
            "teacher": [f"{model_dir}/teacher.keras"],
            "distill": [f"{model_dir}/student.keras"],
            "prune": [f"{model_dir}/pruned.keras"],
            "compress": [f"{model_dir}/variants"],
        }
        for name in model_kinds(fleet, m):
            kind = KINDS[name]
            params = [s for s in kind.sections if _present(fleet, s)]
            params += [f"models.{m}.{k}" for k in kind.model_keys if k in spec.model_fields_set]
            stage: dict[str, Any] = {"cmd": f"shrinkfleet stage {name} {m}",
                                     "deps": [*_code(kind, root), *inputs[name]],
                                     "params": params}
            if name == "evaluate":  # (an out, not a metric: `dvc metrics show` lists the flat summaries)
                stage["outs"] = [{f"metrics/{m}.json": {"cache": False}}]
            else:
                stage["outs"] = outs[name]
            out[stage_name(name, m)] = stage
    return out


TREND_TEMPLATE = "shrinkfleet-trend"  # .dvc/plots/<name>.json, written by sync

PLOTS = [
    {"accuracy-vs-coded-bytes": {"title": "Every variant, accuracy vs coded bytes", "template": "scatter",
                                 "x": "coded_bytes", "y": {"reports/variants.csv": "accuracy"}}},
    {"production-accuracy-over-runs": {"title": "Production accuracy after each run", "template": TREND_TEMPLATE,
                                       "x": "time", "y": {"reports/trends.csv": "accuracy"}}},
    {"production-coded-bytes-over-runs": {"title": "Production coded bytes after each run",
                                          "template": TREND_TEMPLATE,
                                          "x": "time", "y": {"reports/trends.csv": "coded_bytes"}}},
    "reports/plots/",
]

# A Vega-Lite template for DVC: a time axis (DVC's own templates have numeric ones) and a
# colour per model (theirs colour by file and revision; one CSV holds every model).
TREND_SPEC = {
    "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
    "data": {"values": "<DVC_METRIC_DATA>"},
    "title": "<DVC_METRIC_TITLE>",
    "width": 400, "height": 250,
    "mark": {"type": "line", "point": True},
    "encoding": {
        "x": {"field": "<DVC_METRIC_X>", "type": "temporal", "title": "run started (UTC)"},
        "y": {"field": "<DVC_METRIC_Y>", "type": "quantitative", "title": "<DVC_METRIC_Y_LABEL>",
              "scale": {"zero": False}},
        "color": {"field": "model", "type": "nominal"},
        "tooltip": [{"field": "model"}, {"field": "version"}, {"field": "<DVC_METRIC_X>", "type": "temporal"},
                    {"field": "<DVC_METRIC_Y>"}],
    },
}


def metrics_files(fleet: FleetConfig) -> list[str]:
    """The flat per-model summaries (report.write_summary) that ``dvc metrics show`` lists."""
    return [f"metrics/summary/{m}.json" for m in fleet.model_names()]


def render(fleet: FleetConfig, root: Path | None = None) -> str:
    """The text of ``dvc.yaml`` for ``fleet`` in the project folder ``root``."""
    body = {"stages": stages(fleet, root), "metrics": metrics_files(fleet), "plots": PLOTS}
    return HEADER + yaml.safe_dump(body, sort_keys=False, default_flow_style=False, width=120)


def write_templates(root: Path) -> Path | None:
    """Write ``.dvc/plots/shrinkfleet-trend.json`` (the trend plots' template) if DVC is set up in ``root``."""
    import json

    from shrinkfleet.storage import atomic_write_text

    if not (root / ".dvc").is_dir():
        return None
    path = root / ".dvc" / "plots" / f"{TREND_TEMPLATE}.json"
    text = json.dumps(TREND_SPEC, indent=2) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    return path


def changes(root: Path, fleet: FleetConfig) -> list[str]:
    """How the project's ``dvc.yaml`` differs from the fleet's: one line per stage added, removed or changed.

    Empty when it is current. A missing or unreadable file counts as every stage added.
    """
    path = root / PIPELINE_FILE
    wanted = stages(fleet, root)
    try:
        current = (yaml.safe_load(path.read_text()) or {}).get("stages", {}) or {}
    except (OSError, yaml.YAMLError):
        current = {}
    lines = [f"added {s}" for s in wanted if s not in current]
    lines += [f"removed {s}" for s in current if s not in wanted]
    lines += [f"changed {s}" for s in wanted if s in current and current[s] != wanted[s]]
    if not lines and path.is_file() and path.read_text() != render(fleet, root):
        lines.append("rewritten (same stages)")
    return lines


def sync(root: Path, fleet: FleetConfig) -> list[str]:
    """Write ``dvc.yaml`` for ``fleet`` if it is not current (atomically); what changed, as :func:`changes`."""
    from shrinkfleet.storage import atomic_write_text

    diff = changes(root, fleet)
    if diff:
        atomic_write_text(root / PIPELINE_FILE, render(fleet, root))
    write_templates(root)
    return diff


def summary(diff: list[str], most: int = 4) -> str:
    """:func:`changes` in one line: the first few, then how many more."""
    shown = ", ".join(diff[:most])
    return shown + (f" and {len(diff) - most} more" if len(diff) > most else "")

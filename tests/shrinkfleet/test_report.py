"""The report builder on a fixture of MLflow runs: numbers, plots, HTML, trends, DVC plots."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from shrinkfleet import report
from shrinkfleet.metrics import METRICS
from shrinkfleet.workspace import Workspace
from tests.conftest import mlflow_env_restored

REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def _variant(acc: float, size: float, coded: float, fmt: str, parent: str | None, sparsity: float = 0.0) -> dict:
    metrics = {m: 0.0 for m in METRICS}
    metrics |= {"accuracy": acc, "size_bytes": size, "coded_bytes": coded, "sparsity": sparsity,
                "accuracy_drop": 0.98 - acc, "compression_ratio": 200_000 / size, "coded_ratio": 200_000 / coded}
    return {"metrics": metrics, "format": fmt, "parent": parent}


# Two nights of one model: night 2 prunes harder (smaller, slightly less accurate).
NIGHTS = {
    1: {"teacher": _variant(0.98, 200_000, 180_000, "keras", None),
        "student": _variant(0.97, 20_000, 18_000, "keras", "teacher"),
        "pruned": _variant(0.96, 20_000, 6_000, "keras", "student", 0.8),
        "pruned-int8": _variant(0.955, 8_000, 3_000, "tflite", "pruned", 0.8),
        "pruned-clustered": _variant(0.96, 20_000, 2_500, "tflite", "pruned", 0.8)},
    2: {"teacher": _variant(0.98, 200_000, 180_000, "keras", None),
        "student": _variant(0.97, 20_000, 18_000, "keras", "teacher"),
        "pruned": _variant(0.95, 20_000, 4_000, "keras", "student", 0.9),
        "pruned-int8": _variant(0.945, 8_000, 2_000, "tflite", "pruned", 0.9),
        "pruned-clustered": _variant(0.95, 20_000, 1_800, "tflite", "pruned", 0.9)},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLflow store holding two fleet runs of ``digits-mlp`` laid out as shrinkfleet logs them (read-only)."""
    tmp_path = tmp_path_factory.mktemp("mlflow")
    with mlflow_env_restored():  # set_tracking_uri / set_experiment export MLFLOW_* variables
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
        exp = MlflowClient().create_experiment("shrinkfleet/fixture", artifact_location=(tmp_path / "art").as_uri())
        mlflow.set_experiment(experiment_id=exp)
        for night, variants in NIGHTS.items():
            model_tags = {"shrinkfleet.kind": "model", "shrinkfleet.model": "digits-mlp",
                          "shrinkfleet.production_version": str(night)}
            with (mlflow.start_run(run_name=f"fleet-{night}", tags={"shrinkfleet.kind": "fleet"}),
                  mlflow.start_run(run_name="digits-mlp", nested=True, tags=model_tags)):
                best = variants["pruned-clustered"]["metrics"]
                mlflow.log_metrics({"production_accuracy": best["accuracy"],
                                    "production_coded_bytes": best["coded_bytes"]})
                for name, v in variants.items():
                    with mlflow.start_run(run_name=f"digits-mlp/{name}", nested=True, tags={
                        "shrinkfleet.kind": "variant", "shrinkfleet.variant": name, "shrinkfleet.format": v["format"],
                        "shrinkfleet.recipe": name, "shrinkfleet.parent_variant": v["parent"] or "",
                    }):
                        mlflow.log_metrics(v["metrics"])
        yield exp
        mlflow.set_tracking_uri("")


def test_docs_come_from_each_models_latest_run(store):
    docs = report.docs_from_mlflow(store)
    assert list(docs) == ["digits-mlp"]
    doc = docs["digits-mlp"]
    assert set(doc["variants"]) == set(NIGHTS[2])
    assert doc["variants"]["pruned-int8"]["coded_bytes"] == 2_000  # night 2, not night 1
    assert doc["variants"]["pruned"]["parent"] == "student"
    # Pareto over (accuracy up, coded bytes down): clustered beats int8 on both; pruned is dominated by it.
    assert doc["pareto_front"] == ["pruned-clustered", "student", "teacher"]
    assert report.best_variant(doc) == "pruned-clustered"


def test_since_leaves_out_older_runs(store):
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert report.docs_from_mlflow(store, since=future) == {}
    assert report.docs_from_mlflow(store, models=["other"]) == {}


def test_trends_hold_what_production_served_after_each_run(store):
    trends = report.trends_from_mlflow(store)
    assert list(trends["version"]) == [1, 2]
    assert list(trends["coded_bytes"]) == [2_500, 1_800]
    assert trends["accuracy"].tolist() == pytest.approx([0.96, 0.95])
    assert report.trends_from_mlflow(store, last=1)["version"].tolist() == [2]


def _doc(night: int = 1) -> dict:
    return {"model": "m", "variants": {n: {**v["metrics"], "format": v["format"], "parent": v["parent"],
                                           "recipe": f"teacher > distill > prune > {n.removeprefix('pruned-')}"}
                                       for n, v in NIGHTS[night].items()},
            "pareto_front": ["pruned-clustered", "student", "teacher"]}


def test_waterfall_goes_from_teacher_to_coded():
    doc = _doc()
    doc["variants"]["pruned-clustered"]["recipe"] = "teacher > distill > prune > cluster > float32"
    steps = report.waterfall(doc)
    # A clustered float32 flatbuffer is named by its conversion, not "quantized".
    assert [s for s, _, _ in steps] == ["teacher", "student", "pruned", "float32", "coded"]
    assert [b for _, b, _ in steps] == [200_000, 20_000, 20_000, 20_000, 2_500]
    assert steps[2][2] == "80% zeros" and all(len(f"{s} {note}") <= 20 for s, _, note in steps)


def test_waterfall_ends_at_the_served_variant():
    steps = report.waterfall(report.plot_doc(_doc(), {"version": "3", "variant": "pruned-int8", "coded_bytes": 3_000}))
    assert [s for s, _, _ in steps][-2:] == ["int8", "coded"] and steps[-1][1] == 3_000


SERVED = {"digits-mlp": {"version": "2", "variant": "pruned-int8", "coded_bytes": 2_000.0, "objective": "accuracy"}}


def test_production_is_marked_and_explained_in_the_report(store, tmp_path):
    docs = report.docs_from_mlflow(store)
    ws = Workspace(tmp_path / "project")
    md = report.write_report(ws, docs, {}, {"fleet": "fixture"}, served=SERVED).read_text()
    row = next(line for line in md.splitlines() if line.startswith("| digits-mlp") and "(production)" in line)
    assert "pruned-int8" in row
    assert md.count("(production)") == 2  # the row, and the legend explaining the mark
    note = next(line for line in md.splitlines() if line.startswith("- **digits-mlp**: production v2"))
    assert "not the Pareto front's smallest pruned-clustered" in note
    assert note.endswith("the gate's objective (accuracy) picked pruned-int8")
    page = (ws.reports / "fleet.html").read_text()
    assert "pruned-int8 (production)" in page and "not the Pareto front&#x27;s smallest" in page
    csv = pd.read_csv(ws.reports / "variants.csv")
    assert csv.loc[csv["production"], "variant"].tolist() == ["pruned-int8"]  # what dvc plots reads


def test_production_from_an_earlier_run_is_not_marked_on_this_runs_variant(store, tmp_path):
    docs = report.docs_from_mlflow(store)
    older = {"digits-mlp": {**SERVED["digits-mlp"], "coded_bytes": 3_000.0}}  # night 1's bytes
    md = report.write_report(Workspace(tmp_path / "p"), docs, {}, {}, served=older).read_text()
    assert "| pruned-int8 (production)" not in md.replace("  ", " ")
    assert "production v2 serves pruned-int8 from an earlier run" in md


def _crowded() -> dict:
    """Many variants a few bytes and a tenth of a point apart, one at 100%: labels would collide."""
    variants = {"teacher": {"accuracy": 1.0, "size_bytes": 200_000, "coded_bytes": 180_000, "format": "keras"}}
    for i in range(12):
        variants[f"pruned-variant-{i}"] = {"accuracy": 0.95 + i * 0.001, "size_bytes": 8_000,
                                           "coded_bytes": 2_000 + 40 * i, "format": "tflite"}
    return {"model": "m", "variants": variants, "pareto_front": ["teacher", *list(variants)[1:]]}


def test_pareto_labels_do_not_overlap_and_accuracy_stops_at_100():
    doc = report.plot_doc(_crowded(), {"version": "1", "variant": "pruned-variant-3", "coded_bytes": 2_120},
                          {"max_accuracy_drop": 0.04, "max_size_bytes": None})
    fig = report.pareto_figure(doc)
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    texts = [t for t in ax.texts if t.get_text()]
    assert {t.get_text() for t in texts} == set(doc["variants"])  # the front and the served variant
    boxes = [t.get_window_extent(renderer) for t in texts]
    for i, a in enumerate(boxes):
        for j, b in enumerate(boxes[:i]):
            assert not a.overlaps(b), f"{texts[i].get_text()} overlaps {texts[j].get_text()}"
    assert ax.get_ylim()[1] <= 100
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "production: pruned-variant-3" in legend
    gate = next(line for line in ax.get_lines() if line.get_label().startswith("gate"))
    assert gate.get_ydata()[0] == pytest.approx(96.0)  # the teacher's 100% less the 4-point limit
    report._pyplot().close(fig)


def test_only_the_front_and_the_served_variant_are_labelled():
    doc = _doc()  # pruned-int8 is not on this front
    labels = {t.get_text() for t in report.pareto_figure(report.plot_doc(doc)).axes[0].texts}
    assert labels == {"pruned-clustered", "student", "teacher"}
    served = report.plot_doc(doc, {"version": "1", "variant": "pruned-int8", "coded_bytes": 3_000})
    assert "pruned-int8" in {t.get_text() for t in report.pareto_figure(served).axes[0].texts}


def _costed() -> dict:
    """_doc() with MACs and batch-32 latency: pruned-int8 is the fastest, teacher the only one above 1M MACs."""
    doc = _doc()
    costs = {"teacher": (1_200_000, 0.9), "student": (150_000, 0.30), "pruned": (150_000, 0.31),
             "pruned-int8": (150_000, 0.12), "pruned-clustered": (150_000, 0.29)}
    for name, (macs, ms) in costs.items():
        v = doc["variants"][name]
        for regression_metric in ("mae", "rmse", "r2", "error_increase"):  # a classifier's document
            v.pop(regression_metric)
        v |= {"macs": macs, "latency_ms_p50_b32": ms}
    return doc


@pytest.mark.parametrize(("axis", "metric", "front"), [
    ("latency", "latency_ms_p50_b32", {"pruned-int8", "pruned-clustered", "student", "teacher"}),
    ("macs", "macs", {"student", "teacher"}),
])
def test_the_pareto_plot_can_put_latency_or_macs_on_its_x_axis(axis, metric, front):
    doc = report.plot_doc(_costed(), {"version": "1", "variant": "student", "coded_bytes": 18_000},
                          {"latency_batch": 32, "max_latency_ms_p50": 0.5, "max_accuracy_drop": 0.04}, axis)
    fig = report.pareto_figure(doc)
    ax = fig.axes[0]
    points = {tuple(p) for c in ax.collections for p in c.get_offsets().tolist()}
    assert {(float(v[metric]), v["accuracy"] * 100) for v in doc["variants"].values()} <= points
    assert {t.get_text() for t in ax.texts} == front  # the front over this cost (served student is on it)
    assert ("batch 32" if axis == "latency" else "multiply-accumulates") in ax.get_xlabel()
    limits = [line for line in ax.get_lines() if line.get_label() == "gate: max_latency_ms_p50"]
    assert [line.get_xdata()[0] for line in limits] == ([0.5] if axis == "latency" else [])
    report._pyplot().close(fig)


def test_a_document_without_the_axis_metric_falls_back_to_coded_bytes():
    doc = report.plot_doc(_doc(), None, {"latency_batch": 32}, "latency")
    assert report.pareto_axis(doc)[0] == "coded_bytes"
    fig = report.pareto_figure(doc)
    assert "coded bytes" in fig.axes[0].get_xlabel()
    report._pyplot().close(fig)


def test_summary_has_one_flat_row_per_model(store, tmp_path):
    docs = report.docs_from_mlflow(store)
    ws = Workspace(tmp_path / "project")
    report.write_report(ws, docs, {}, {}, served=SERVED)
    files = sorted((ws.root / "metrics" / "summary").glob("*.json"))
    assert [f.stem for f in files] == list(docs)
    row = json.loads(files[0].read_text())
    assert row == {"variant": "pruned-int8", "version": 2, "accuracy": 0.945, "coded_bytes": 2_000,
                   "coded_ratio": 100.0}


def test_a_rebuilt_report_elsewhere_leaves_the_runs_report_alone(store, tmp_path):
    docs = report.docs_from_mlflow(store)
    ws = Workspace(tmp_path / "project")
    run_md = report.write_report(ws, docs, {}, {"fleet": "run"})
    before = run_md.read_bytes(), (ws.reports / "variants.csv").read_bytes()
    other = report.write_report(ws, docs, {}, {"fleet": "rebuilt"}, out=ws.reports / "rebuilt-x")
    assert (run_md.read_bytes(), (ws.reports / "variants.csv").read_bytes()) == before
    assert "rebuilt" in other.read_text() and (other.parent / "plots" / "digits-mlp-pareto.png").is_file()


@pytest.mark.parametrize(("n", "text"), [(950, "950 B"), (1_000, "1 kB"), (1_506, "1.51 kB"),
                                         (20_000, "20 kB"), (3_500_000, "3.5 MB"), (2e9, "2 GB")])
def test_bytes_read_in_decimal_units(n, text):
    assert report.human_bytes(n) == text


def test_byte_axes_are_labelled_in_bytes_not_powers_of_ten():
    plt = report._pyplot()
    fig, ax = plt.subplots()
    ax.bar(["a", "b"], [1_500, 180_000])
    ax.set_yscale("log")
    report._byte_ticks(ax.yaxis)
    fig.canvas.draw()
    labels = {t.get_text() for t in ax.get_yticklabels() if t.get_text()}
    plt.close(fig)
    assert {"1 kB", "10 kB", "100 kB"} <= labels and not any("$" in t for t in labels)


def test_report_files_have_the_right_numbers_and_valid_plots(store, tmp_path):
    import matplotlib.image

    docs = report.docs_from_mlflow(store)
    trends = report.trends_from_mlflow(store)
    ws = Workspace(tmp_path / "project")
    md = report.write_report(ws, docs, {"cnn": "prune failed: OOM"}, {"fleet": "fixture"}, trends=trends)
    text = md.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| digits-mlp") and "pruned-int8" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "94.50"  # accuracy %
    assert cells[4] == "8,000" and cells[5] == "25.0x"  # bytes, ratio vs the 200,000-byte teacher
    assert cells[6] == "2,000" and cells[7] == "100.0x"  # coded bytes, coded ratio
    assert "**cnn**: prune failed: OOM" in text
    plots = sorted((ws.reports / "plots").glob("*.png"))
    assert [p.name for p in plots] == ["digits-mlp-pareto.png", "digits-mlp-trend.png", "digits-mlp-waterfall.png"]
    for png in plots:
        assert png.read_bytes()[:8] == PNG
        h, w, _ = matplotlib.image.imread(png).shape
        assert h > 200 and w > 400
        assert f"(plots/{png.name})" in text
    page = (ws.reports / "fleet.html").read_text()
    assert page.count("src='data:image/png;base64,") == 3
    assert not re.search(r"""(src|href)=['"](?!data:)""", page)  # self-contained: nothing fetched
    assert "<td>94.50</td>" in page and "prune failed: OOM" in page
    csv = pd.read_csv(ws.reports / "variants.csv")
    assert csv.set_index("variant").loc["pruned-clustered", "coded_bytes"] == 1_800
    assert len(pd.read_csv(ws.reports / "trends.csv")) == 2


def test_plots_of_unchanged_metrics_are_not_redrawn(store, tmp_path):
    docs = report.docs_from_mlflow(store)
    ws = Workspace(tmp_path / "project")
    report.write_report(ws, docs, {}, {"fleet": "fixture"})
    pareto = ws.reports / "plots" / "digits-mlp-pareto.png"
    first = pareto.stat().st_mtime_ns, pareto.read_bytes()
    report.write_report(ws, docs, {}, {"fleet": "fixture"})  # a night where nothing changed
    assert (pareto.stat().st_mtime_ns, pareto.read_bytes()) == first
    docs["digits-mlp"]["variants"]["pruned-int8"]["accuracy"] -= 0.1  # a changed metric is drawn again
    report.write_report(ws, docs, {}, {"fleet": "fixture"})
    assert pareto.read_bytes() != first[1]
    pareto.write_bytes(b"not a png")  # so is a damaged file
    report.write_report(ws, docs, {}, {"fleet": "fixture"})
    assert pareto.read_bytes()[:8] == PNG


def test_a_plot_key_is_the_same_in_another_process():
    """A no-op night runs in a new process: the key of an unchanged plot must not depend on it
    (nested functions and comprehensions are code objects whose repr holds an address)."""
    doc = {"model": "m", "variants": {}}
    script = ("import json, sys; from shrinkfleet import report; "
              "print(json.dumps([report.plot_key(f, json.loads(sys.argv[1])) "
              "for f in (report.plot_model, report.plot_waterfall)]))")
    out = subprocess.run([sys.executable, "-c", script, json.dumps(doc)], capture_output=True, text=True,
                         check=True, cwd=Path(report.__file__).parents[1])
    assert json.loads(out.stdout) == [report.plot_key(f, doc) for f in (report.plot_model, report.plot_waterfall)]


def test_dvc_plots_show_renders_the_report(store, tmp_path, tiny_params):
    import yaml

    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, check=True)
    from shrinkfleet import pipeline
    from shrinkfleet.config import parse_params

    pipeline.sync(project, parse_params(tiny_params))
    report.write_report(Workspace(project), report.docs_from_mlflow(store), {}, {},
                        trends=report.trends_from_mlflow(store), served=SERVED)
    out = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", "plots-html"], cwd=project,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "failed to load" not in out.stdout + out.stderr
    page = (project / "plots-html" / "index.html").read_text()
    assert "accuracy-vs-coded-bytes" in page or "Every variant" in page
    # The trend specs: time on a temporal axis, a colour per model.
    assert '"type": "temporal"' in page and '"color": {"field": "model"' in page
    shown = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show"], cwd=project, capture_output=True,
                           text=True, check=True).stdout
    rows = {line.split()[0]: line.split()[1:] for line in shown.splitlines() if line.startswith("metrics/")}
    assert list(rows) == ["metrics/summary/digits-mlp.json", "metrics/summary/cancer-mlp.json"]
    assert {"pruned-int8", "2000"} <= set(rows["metrics/summary/digits-mlp.json"])
    assert set(rows["metrics/summary/cancer-mlp.json"]) == {"-"}  # no run of it in this store
    static = sorted(p.name for p in (project / "plots-html" / "static").glob("*.png"))
    assert len(static) == 3 and all("digits-mlp" in n for n in static)


@pytest.mark.parametrize(("text", "span"), [("30m", dt.timedelta(minutes=30)), ("12h", dt.timedelta(hours=12)),
                                             ("7d", dt.timedelta(days=7)), ("2w", dt.timedelta(weeks=2))])
def test_since_accepts_a_number_and_a_unit(text, span):
    assert report.parse_since(text) == span


@pytest.mark.parametrize("text", ["7", "0d", "d", "7y", "-1d", ""])
def test_since_refuses_anything_else(text):
    with pytest.raises(ValueError, match="e.g. 30m, 12h, 7d or 2w"):
        report.parse_since(text)

"""The fleet report: every variant in one table, plots per model, trends over runs.

Written after every run, and rebuilt from MLflow at any time by ``shrinkfleet report``
(into ``reports/rebuilt-<time>/`` unless ``--out`` says otherwise, so the run's stays):

    reports/fleet.md                 table (production marked), registry, failures, fronts, plots
    reports/fleet.html               the same, self-contained (plots embedded)
    reports/plots/<model>-pareto.png     accuracy vs coded bytes (or report.pareto_x), front, served variant, gate limit
    reports/plots/<model>-waterfall.png  bytes from teacher to student, pruned, the served flatbuffer, coded
    reports/plots/<model>-trend.png      production accuracy and bytes over the last runs, manual moves
    reports/variants.csv, trends.csv     the plotted data
    metrics/summary/<model>.json         the served variant's headline numbers, flat

dvc.yaml declares the CSVs and reports/plots/ as DVC plots, so ``dvc plots show`` renders them,
and the summaries as its metrics, so ``dvc metrics show`` prints one row per model."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from shrinkfleet.metrics import COST_METRICS, PER_BATCH, metric_names, pareto_front, quality
from shrinkfleet.storage import atomic_path, atomic_write_text
from shrinkfleet.workspace import Workspace

COLUMNS = [
    "model", "variant", "format", "accuracy", "accuracy_drop", "mae", "rmse", "r2", "error_increase",
    "size_bytes", "gzip_bytes",
    "compression_ratio", "coded_bytes", "coded_ratio", "student_ratio", "bits_per_nonzero",
    "sparsity", "params", "latency_ms_p50", "latency_ms_p95", "pareto", "recipe",
]


def load_metrics(ws: Workspace, models: list[str]) -> dict[str, dict[str, Any]]:
    """The metrics documents that exist for ``models`` (missing ones are left out)."""
    docs = {}
    for m in models:
        path = ws.metrics(m)
        if path.is_file():
            docs[m] = json.loads(path.read_text())
    return docs


def variant_table(docs: dict[str, dict[str, Any]], gates: dict[str, dict[str, str]] | None = None,
                  served: dict[str, dict[str, Any]] | None = None) -> pd.DataFrame:
    """One row per (model, variant) with every metric, the gate's verdict and ``production`` when given.

    Args:
        served: :func:`served_variants`' answer; the column ``production`` is True on the row it serves.
    """
    rows = [
        {"model": model, "variant": name, "pareto": False, "coded_bytes": v.get("size_bytes"),
         "coded_ratio": v.get("compression_ratio"), "student_ratio": float("nan"), "bits_per_nonzero": float("nan"),
         **v, "gate": (gates or {}).get(model, {}).get(name, ""),
         "production": served_here(doc, (served or {}).get(model)) == name}
        for model, doc in docs.items()
        for name, v in doc["variants"].items()
    ]
    return pd.DataFrame(rows, columns=[*COLUMNS, "gate", "production"])


def served_variants(models: list[str]) -> dict[str, dict[str, Any]]:
    """What the registry's ``production`` alias serves for each model that has it.

    Returns:
        model -> ``{"version", "variant", "coded_bytes", "objective"}`` (from the version's tags).
    """
    from shrinkfleet import registry

    out = {}
    for model in models:
        try:
            version = registry.production(model)
        except Exception:  # (no registry reachable, or the model was never registered: nothing is served)
            version = None
        if version is None:
            continue
        tags = version.tags
        coded = tags.get(f"{registry.T}.metric.coded_bytes")
        try:
            objective = json.loads(tags.get(f"{registry.T}.gate_config", "{}")).get("objective", "")
        except ValueError:
            objective = ""
        out[model] = {"version": str(version.version), "variant": tags.get(f"{registry.T}.variant", ""),
                      "coded_bytes": float(coded) if coded else None, "objective": objective}
    return out


def served_here(doc: dict[str, Any], served: dict[str, Any] | None) -> str | None:
    """The variant of this report's ``doc`` that production serves, or None.

    A variant counts only when it has the production version's name and its coded bytes (same
    content): on a night where no variant passed the gate, production serves an earlier run's
    bytes, and this run's variant of the same name is not what users get.
    """
    if not served or served.get("variant") not in doc["variants"]:
        return None
    v = doc["variants"][served["variant"]]
    if served.get("coded_bytes") is not None and abs(float(v["coded_bytes"]) - served["coded_bytes"]) > 0.5:
        return None
    return served["variant"]


def why_not_smallest(doc: dict[str, Any], served: str, failed: str | None, objective: str) -> str:
    """Why production serves ``served`` and not the Pareto front's smallest, or "" when it serves that one.

    ``failed``: the smallest's failed gate limits ("" or None when it passes); ``objective``:
    ``gate.objective``. The one wording of the report's production line and of the CLI's notes.
    """
    smallest = best_variant(doc)
    if smallest is None or served == smallest:
        return ""
    why = (f"{smallest} fails the gate ({failed})" if failed
           else f"the gate's objective ({objective}) picked {served}")
    return f"not the Pareto front's smallest {smallest}: {why}"


def production_note(doc: dict[str, Any], served: dict[str, Any] | None,
                    gate: dict[str, str] | None = None) -> str:
    """One line: which variant production serves, and why when it is not the Pareto front's smallest.

    ``gate``: this run's verdict per variant (``pass`` or ``fail: <limits>``).
    """
    if not served:
        return "nothing in production"
    here = served_here(doc, served)
    if here is None:
        return (f"production v{served['version']} serves {served['variant'] or '?'} from an earlier run "
                "(not this run's variant of that name)")
    verdict = (gate or {}).get(best_variant(doc) or "", "")
    failed = verdict.removeprefix("fail: ") if verdict.startswith("fail") else None
    why = why_not_smallest(doc, here, failed, served.get("objective") or "its objective")
    return f"production v{served['version']} serves {here}" + (f", {why}" if why else "")


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """The table as people read it: accuracy in %, drop in points, ratios with an x."""
    def shown(values: pd.Series, fmt: str, scale: float = 1.0) -> pd.Series:
        return values.map(lambda v: "" if pd.isna(v) else fmt.format(v * scale))

    marks = table["pareto"].map({True: " *", False: ""})
    if "production" in table:
        marks = marks + table["production"].map({True: " (production)", False: ""})
    out = pd.DataFrame({"model": table["model"], "variant": table["variant"] + marks})
    if table["accuracy"].notna().any():
        out["accuracy %"] = shown(table["accuracy"], "{:.2f}", 100)
        out["drop (pts)"] = shown(table["accuracy_drop"], "{:+.2f}", 100)
    if table["mae"].notna().any():  # regression models: error in the label's units, increase vs the teacher
        out["MAE"] = table["mae"].map(lambda v: "" if pd.isna(v) else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}")
        out["MAE +%"] = shown(table["error_increase"], "{:+.1f}", 100)
    out = out.assign(**{
        "bytes": table["size_bytes"].map("{:,.0f}".format),
        "ratio": table["compression_ratio"].map("{:.1f}x".format),
        "coded": table["coded_bytes"].map("{:,.0f}".format),
        "coded ratio": table["coded_ratio"].map("{:.1f}x".format),
        "sparsity": (table["sparsity"] * 100).map("{:.0f}%".format),
        "bits/nz": table["bits_per_nonzero"].map("{:.1f}".format),
        "p50 ms": table["latency_ms_p50"].map("{:.3f}".format),
    })
    if "gate" in table and table["gate"].astype(bool).any():
        out["gate"] = table["gate"].replace({"not a candidate": ""})
    return out


def markdown(pretty: pd.DataFrame) -> str:
    """:func:`formatted`'s table as Markdown, numbers exactly as formatted (``94.50``, not ``94.5``)."""
    align = ["left" if c in ("model", "variant", "gate") else "right" for c in pretty.columns]
    return pretty.to_markdown(index=False, disable_numparse=True, colalign=align)


def plot_model(doc: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Accuracy vs coded bytes (log scale) of one model's variants, Pareto front drawn, as PNG."""
    _save(pareto_figure(doc), path, metadata)


# Where a point's label may go, in points from the point, tried in order (the first that overlaps
# nothing placed wins): right, above, left, below, then further out.
_OFFSETS = [(dx * r, dy * r) for r in (5, 14, 26, 40)
            for dx, dy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1.3), (0, -1.6), (1.2, 0), (-1.2, 0))]


_BYTES_AXIS = ("coded_bytes", "coded bytes (entropy-coded flatbuffer, log scale)", "coded bytes")


def pareto_axis(doc: dict[str, Any]) -> tuple[str, str, str]:
    """(metric, axis label, title word) of the Pareto plot's x axis, from ``doc["pareto_x"]`` (report.pareto_x).

    ``latency`` is the median LiteRT latency at the gate's ``latency_batch`` (what the gate's
    latency limit and objective read); a document whose variants lack the metric (written by an
    older version, or a variant that was not timed) falls back to coded bytes.
    """
    kind = doc.get("pareto_x") or "coded_bytes"
    if kind == "latency":
        batch = int((doc.get("gate") or {}).get("latency_batch") or 1)
        metric, label = f"latency_ms_p50_b{batch}", f"median LiteRT latency at batch {batch} (ms, log scale)"
        word = f"latency (batch {batch})"
    elif kind == "macs":
        metric, label, word = "macs", "multiply-accumulates per example (log scale)", "MACs"
    else:
        return _BYTES_AXIS
    if all(isinstance(v.get(metric), (int, float)) and v[metric] > 0 for v in doc["variants"].values()):
        return metric, label, word
    return _BYTES_AXIS


def pareto_figure(doc: dict[str, Any]) -> Any:
    """The Pareto plot's figure: every variant a point; the front, its line and the served variant labelled.

    ``doc`` is a metrics document, optionally with ``served`` (the variant production serves,
    drawn as a star), ``gate`` (the gate's settings: its accuracy or error limit is drawn as a
    dashed line, the limit on the x axis' metric as a vertical one) and ``pareto_x`` (the x axis,
    :func:`pareto_axis`; on latency or MACs the front drawn is the one over that cost, while the
    table's front stays the coded bytes'). Only the front and the served variant are labelled,
    each label placed where it overlaps no other (the rest are dots: the table has them). The
    accuracy axis ends at 100%.
    """
    plt = _pyplot()
    metric, xlabel, xword = pareto_axis(doc)

    def size(v: dict[str, Any]) -> float:
        return v.get("coded_bytes", v["size_bytes"]) if metric == "coded_bytes" else v[metric]

    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=100)
    front = doc.get("pareto_front", [])
    if metric != "coded_bytes":
        front = pareto_front({n: (quality(v), size(v)) for n, v in doc["variants"].items()})
    served = doc.get("served")
    regression = "mae" in doc["variants"]["teacher"]

    def y(v: dict[str, Any]) -> float:
        return v["mae"] if regression else v["accuracy"] * 100

    for name, v in doc["variants"].items():
        marker = "s" if v["format"] == "keras" else "o"
        colour = "tab:red" if name in front else "tab:blue"
        ax.scatter(size(v), y(v), marker=marker, s=40, color=colour, zorder=3, clip_on=False)
    if served in doc["variants"]:
        v = doc["variants"][served]
        ax.scatter(size(v), y(v), marker="*", s=220, facecolor="gold", edgecolor="black", zorder=4,
                   clip_on=False, label=f"production: {served}")
    if front:
        pts = sorted((size(doc["variants"][n]), y(doc["variants"][n])) for n in front)
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="tab:red", alpha=0.6,
                label="Pareto front")
    gate = doc.get("gate") or {}
    teacher = doc["variants"]["teacher"]
    if gate and regression and gate.get("max_error_increase") is not None:
        ax.axhline(teacher["mae"] * (1 + gate["max_error_increase"]), color="tab:green", ls="--", lw=1,
                   label=f"gate: MAE +{gate['max_error_increase'] * 100:.0f}% of the teacher's")
    elif gate and not regression and gate.get("max_accuracy_drop") is not None:
        ax.axhline((teacher["accuracy"] - gate["max_accuracy_drop"]) * 100, color="tab:green", ls="--", lw=1,
                   label=f"gate: {gate['max_accuracy_drop'] * 100:.1f} pts below the teacher")
    limit = {"coded_bytes": "max_size_bytes", "macs": "max_macs"}.get(metric, "max_latency_ms_p50")
    if gate.get(limit):
        ax.axvline(gate[limit], color="tab:green", ls=":", lw=1, label=f"gate: {limit}")
    ax.set_xscale("log")
    if metric == "coded_bytes":
        _byte_ticks(ax.xaxis)
    if not regression:
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, min(top, 100.0))
    ax.set_xlabel(xlabel)
    what = "MAE" if regression else "accuracy"
    ax.set_ylabel("test MAE (label units)" if regression else "test accuracy (%)")
    ax.set_title(f"{doc['model']}: {what} vs {xword} (squares: Keras, red: Pareto front)", y=1.0)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right" if regression else "lower right", fontsize=8)
    _margins(fig, left=0.7, bottom=0.6)
    labelled = [n for n in doc["variants"] if n in front or n == served]
    _place_labels(fig, ax, [(n, size(doc["variants"][n]), y(doc["variants"][n])) for n in labelled])
    return fig


def _place_labels(fig: Any, ax: Any, points: list[tuple[str, float, float]]) -> None:
    """Label each point at the first offset of :data:`_OFFSETS` whose box overlaps no label placed before it.

    An offset that keeps the label inside the axes is preferred; one outside them only when no other fits.
    """
    renderer = fig.canvas.get_renderer()
    area = ax.get_window_extent(renderer)
    placed: list[Any] = []
    for name, x, y in points:
        fits = []  # (offset, inside the axes) of each offset that overlaps no placed label
        for dx, dy in _OFFSETS:
            text = _label(ax, name, x, y, dx, dy)
            box = text.get_window_extent(renderer)
            text.remove()
            if not any(box.overlaps(other) for other in placed):
                fits.append(((dx, dy), area.contains(box.x0, box.y0) and area.contains(box.x1, box.y1)))
                if fits[-1][1]:
                    break
        inside = [off for off, ok in fits if ok]
        dx, dy = (inside or [off for off, _ in fits] or [_OFFSETS[0]])[0]
        placed.append(_label(ax, name, x, y, dx, dy).get_window_extent(renderer))


def _label(ax: Any, name: str, x: float, y: float, dx: float, dy: float) -> Any:
    return ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7,
                       ha="left" if dx >= 0 else "right", va="bottom" if dy >= 0 else "top",
                       arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if abs(dx) + abs(dy) > 20 else None)


def best_variant(doc: dict[str, Any]) -> str | None:
    """The .tflite variant on the Pareto front with the fewest coded bytes (where the waterfall ends)."""
    tflite = [n for n in doc.get("pareto_front", []) if doc["variants"][n]["format"] == "tflite"]
    if not tflite:
        tflite = [n for n, v in doc["variants"].items() if v["format"] == "tflite"]
    return min(tflite, key=lambda n: doc["variants"][n]["coded_bytes"]) if tflite else None


def conversion(variant: dict[str, Any], name: str = "") -> str:
    """The conversion a .tflite variant ended in (``int8``, ``float16``, ``dynamic``, ``float32``).

    Read from the last step of its recipe (``teacher > ... > cluster > float32``); a variant
    without a recipe falls back to its name's last part (``pruned-int8`` -> ``int8``).
    """
    last = (variant.get("recipe") or name).replace(">", " ").split()[-1:] or [""]
    word = last[0].rsplit("-", 1)[-1]
    return word if word in ("int8", "float16", "dynamic", "float32") else "tflite"


def served_note(doc: dict[str, Any], served: str | None, gate_cfg: Any) -> str:
    """One line saying why production serves ``served`` and not the Pareto front's smallest, or "".

    Either the smallest fails the gate (its failed limits are named, checked now against
    ``gate_cfg``) or it passes and the gate's objective (``gate.objective``) ranked ``served``
    above it.
    """
    from shrinkfleet import gate

    smallest = best_variant(doc)
    if served is None or smallest is None or served == smallest or served not in doc["variants"]:
        return ""  # (the gate is checked only when there is something to explain)
    fails = "; ".join(str(f) for f in gate.check(doc["variants"][smallest], gate_cfg))
    why = why_not_smallest(doc, served, fails, gate_cfg.objective)
    return f"{doc['model']}: production serves {served}, {why}" if why else ""


def waterfall(doc: dict[str, Any]) -> list[tuple[str, float, str]]:
    """``(step, bytes, note)`` from the teacher to the served variant (or the smallest coded one).

    teacher and student are float32 bytes; pruned is the pruned model's float32 bytes (the
    zeros are still stored: they are saved at coding); then the variant's flatbuffer, named by
    its conversion (``int8``; a clustered float32 model is ``float32``, not "quantized"); coded is
    that flatbuffer entropy-coded. Steps and notes are short: they are the bars' labels.
    """
    v = doc["variants"]
    steps = [("teacher", v["teacher"]["size_bytes"], "float32")]
    if "student" in v:
        steps.append(("student", v["student"]["size_bytes"], "distilled"))
    if "pruned" in v:
        steps.append(("pruned", v["pruned"]["size_bytes"], f"{v['pruned']['sparsity'] * 100:.0f}% zeros"))
    served = doc.get("served")
    best = served if served in v and v[served]["format"] == "tflite" else best_variant(doc)
    if best is not None:
        kind = conversion(v[best], best)
        steps.append((kind, v[best]["size_bytes"], "flatbuffer" if kind != "int8" else "quantized"))
        steps.append(("coded", v[best]["coded_bytes"], "entropy-coded"))
    return steps


def plot_waterfall(doc: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Bytes at each step from teacher to coded variant (log scale), each bar labelled with its ratio."""
    plt = _pyplot()
    steps = waterfall(doc)
    fig, ax = plt.subplots(figsize=(7.2, 4.2), dpi=100)
    names = [f"{s}\n{note}" for s, _, note in steps]
    sizes = [b for _, b, _ in steps]
    bars = ax.bar(names, sizes, color=["tab:gray", "tab:blue", "tab:cyan", "tab:orange", "tab:red"][:len(steps)])
    for bar, size in zip(bars, sizes, strict=True):
        ax.annotate(f"{size:,.0f} B\n{sizes[0] / size:.1f}x", (bar.get_x() + bar.get_width() / 2, size),
                    ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    _byte_ticks(ax.yaxis)
    ax.set_ylim(min(sizes) / 2, max(sizes) * 4)
    ax.set_ylabel("bytes (log scale)")
    served = doc.get("served")
    end = best_variant(doc) if served not in doc["variants"] else served
    what = (f"production: {served}" if served in doc["variants"] else
            f"smallest on the front: {end}" if end else steps[-1][0])
    ax.set_title(f"{doc['model']}: teacher to {what}", y=1.0, fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    _margins(fig, left=0.9, bottom=0.55)
    _save(fig, path, metadata)


def plot_trend(trend: pd.DataFrame, model: str, path: Path, moves: pd.DataFrame | None = None) -> None:
    """Production accuracy (left axis) and coded bytes (right axis) of ``model`` over fleet runs.

    Args:
        moves: :func:`moves_from_registry`'s table; each manual promote or rollback of ``model``
            is a vertical line labelled with what it did (``rollback v3 -> v2``).
    """
    plt = _pyplot()
    t = trend.sort_values("time")
    fig, ax = plt.subplots(figsize=(7.2, 3.6), dpi=100)
    regression = t["accuracy"].isna().all() and t["mae"].notna().any()
    score = t["mae"] if regression else t["accuracy"] * 100
    ax.plot(t["time"], score, marker="o", color="tab:blue", label="MAE" if regression else "accuracy %")
    ax.set_ylabel("test MAE" if regression else "test accuracy (%)", color="tab:blue")
    right = ax.twinx()
    right.plot(t["time"], t["coded_bytes"], marker="s", color="tab:red", label="coded bytes")
    _byte_ticks(right.yaxis)
    right.set_ylabel("coded bytes", color="tab:red")
    for x, y, version in zip(t["time"], score, t["version"], strict=True):
        ax.annotate(f"v{version}", (x, y), textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
    mine = moves[moves["model"] == model] if moves is not None and not moves.empty else None
    if mine is not None:
        mine = mine[(mine["time"] >= t["time"].min()) & (mine["time"] <= t["time"].max() + pd.Timedelta(days=1))]
        for _, move in mine.iterrows():
            colour = "tab:purple" if move["action"] == "rollback" else "tab:green"
            ax.axvline(move["time"], color=colour, ls="--", lw=1)
            ax.annotate(f"{move['action']} v{move['from_version'] or '-'} -> v{move['to_version']}",
                        (move["time"], 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                        ha="right", va="top", color=colour)
    ax.set_title(f"{model}: production over the last {len(t)} run(s)", y=1.0)
    fig.autofmt_xdate()
    _margins(fig, left=0.75, bottom=0.9, right=0.9)
    _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def human_bytes(n: float) -> str:
    """``n`` bytes in decimal units to three significant digits: ``950 B``, ``1.5 kB``, ``12 MB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g} B"


def _byte_ticks(axis: Any) -> None:
    """Label a log-scale byte axis ``2 kB``, ``10 kB``, ``1 MB``.

    Matplotlib's own log labels (``2x10^3``) are mathtext, parsed for every tick label of every
    plot: about a third of a plot's drawing time. Which ticks get a label is still
    matplotlib's choice (``LogFormatter``); only the text differs.
    """
    from matplotlib.ticker import LogFormatter

    class ByteFormatter(LogFormatter):
        def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
            return human_bytes(x)

    axis.set_major_formatter(ByteFormatter())
    axis.set_minor_formatter(ByteFormatter(labelOnlyBase=False))


def _margins(fig: Any, *, left: float, bottom: float, top: float = 0.4, right: float = 0.2) -> None:
    """Fixed margins in inches around the axes (room for tick labels, axis labels and title).

    ``tight_layout`` measures every text on the figure, a full extra draw per plot; the
    report's plots have fixed label sizes, so fixed margins fit them at a fraction of the cost.
    """
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h)


def _save(fig: Any, path: Path, metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", metadata=metadata)
    _pyplot().close(fig)


PLOT_KEY = "shrinkfleet-plot-key"


def plot_key(fn: Any, doc: dict[str, Any]) -> str:
    """What a plot depends on: the plotting function's code and the model's metrics document."""
    h = hashlib.sha256(_code_digest(fn.__code__))
    h.update(json.dumps(doc, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _code_digest(code: Any) -> bytes:
    """A digest of a function's code that is the same in every process.

    Nested functions and comprehensions are code objects among the constants, and their
    ``repr`` holds a memory address, so they are digested the same way instead.
    """
    h = hashlib.sha256(code.co_code)
    for const in code.co_consts:
        h.update(_code_digest(const) if hasattr(const, "co_code") else repr(const).encode())
    return h.digest()


def _plot_if_changed(fn: Any, doc: dict[str, Any], path: Path) -> None:
    """Draw ``fn(doc, path)`` unless ``path`` holds the same plot already (a night where nothing changed).

    The key is stored in the PNG's own text metadata, so an edited or foreign file is redrawn.
    """
    key = plot_key(fn, doc)
    if path.is_file():
        from PIL import Image

        try:
            with Image.open(path) as img:
                if img.info.get(PLOT_KEY) == key:
                    return
        except OSError:
            pass
    fn(doc, path, metadata={PLOT_KEY: key})


# ----------------------------------------------------------------------------- from MLflow


def parse_since(text: str) -> dt.timedelta:
    """``30m``, ``12h``, ``7d`` or ``2w`` as a time span.

    Raises:
        ValueError: anything else, with the accepted forms in the message.
    """
    m = re.fullmatch(r"\s*(\d+)\s*([mhdw])\s*", text or "")
    if not m or int(m[1]) == 0:
        raise ValueError(f"--since {text!r}: write a positive number and a unit, e.g. 30m, 12h, 7d or 2w")
    unit = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m[2]]
    return dt.timedelta(**{unit: int(m[1])})


def _runs(experiment_id: str, query: str, since: dt.datetime | None) -> list[Any]:
    from mlflow.tracking import MlflowClient

    if since is not None:
        query += f" and attributes.start_time >= {int(since.timestamp() * 1000)}"
    return MlflowClient().search_runs([experiment_id], filter_string=query, max_results=50_000,
                                      order_by=["attributes.start_time DESC"])


def docs_from_mlflow(experiment_id: str, models: list[str] | None = None, since: dt.datetime | None = None
                     ) -> dict[str, dict[str, Any]]:
    """Each model's metrics document as its latest finished MLflow run logged it, in ``models``' order.

    The variants come from the model run's nested variant runs (metrics and tags), so a
    report can be rebuilt on any machine that reaches the tracking server.
    """
    docs: dict[str, dict[str, Any]] = {}
    for run in _runs(experiment_id, "tags.`shrinkfleet.kind` = 'model' and attributes.status = 'FINISHED'", since):
        model = run.data.tags.get("shrinkfleet.model", "")
        if model in docs or (models and model not in models):
            continue
        variant_runs = _runs(experiment_id, f"tags.`mlflow.parentRunId` = '{run.info.run_id}'", None)
        variants = {}
        for vr in sorted(variant_runs, key=lambda r: r.info.start_time):
            tags, metrics = vr.data.tags, vr.data.metrics
            task = "regression" if "mae" in metrics and "accuracy" not in metrics else "classification"
            if tags.get("shrinkfleet.kind") != "variant" or not set(metric_names(task)) <= set(metrics):
                continue
            variants[tags["shrinkfleet.variant"]] = {
                **{k: metrics[k] for k in metric_names(task)},
                **{k: v for k, v in metrics.items() if k in COST_METRICS or k.startswith(PER_BATCH)},
                "format": tags.get("shrinkfleet.format", ""), "recipe": tags.get("shrinkfleet.recipe", ""),
                "parent": tags.get("shrinkfleet.parent_variant") or None, "path": tags.get("shrinkfleet.artifact", ""),
            }
            if tags.get("shrinkfleet.gate"):  # the run's verdict (tracking.log_model tags it)
                variants[tags["shrinkfleet.variant"]]["gate"] = tags["shrinkfleet.gate"]
        if "teacher" not in variants:
            continue
        front = pareto_front({n: (quality(v), v["coded_bytes"]) for n, v in variants.items()})
        for name, v in variants.items():
            v["pareto"] = name in front
        docs[model] = {"model": model, "variants": variants, "pareto_front": front,
                       "teacher_bytes": variants["teacher"]["size_bytes"], "run_id": run.info.run_id,
                       "time": dt.datetime.fromtimestamp(run.info.start_time / 1000, dt.UTC)}
    order = models or sorted(docs)
    return {m: docs[m] for m in order if m in docs}


def verdicts_of(docs: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Per model, the gate's verdict on each variant as :func:`docs_from_mlflow` read it from the runs."""
    return {m: {n: v["gate"] for n, v in doc["variants"].items() if v.get("gate")} for m, doc in docs.items()}


def trends_from_mlflow(experiment_id: str, models: list[str] | None = None, since: dt.datetime | None = None,
                       last: int = 30) -> pd.DataFrame:
    """What ``production`` served after each of the last ``last`` runs of each model.

    Columns: model, time, run_id, version, accuracy (or, for regression, mae), coded_bytes,
    size_bytes, compression_ratio.
    """
    rows = []
    for run in _runs(experiment_id, "tags.`shrinkfleet.kind` = 'model'", since):
        model, metrics = run.data.tags.get("shrinkfleet.model", ""), run.data.metrics
        version = run.data.tags.get("shrinkfleet.production_version")
        scored = "production_accuracy" in metrics or "production_mae" in metrics
        if version is None or (models and model not in models) or not scored:
            continue
        rows.append({"model": model, "time": pd.Timestamp(run.info.start_time, unit="ms", tz="UTC"),
                     "run_id": run.info.run_id, "version": int(version),
                     **{k: metrics.get(f"production_{k}", float("nan"))
                        for k in ("accuracy", "mae", "coded_bytes", "size_bytes", "compression_ratio")}})
    cols = ["model", "time", "run_id", "version", "accuracy", "mae", "coded_bytes", "size_bytes",
            "compression_ratio"]
    table = pd.DataFrame(rows, columns=cols)
    if table.empty:
        return table
    return (table.sort_values("time").groupby("model", group_keys=False).tail(last).reset_index(drop=True))


def moves_from_registry(models: list[str]) -> pd.DataFrame:
    """The manual alias moves (``shrinkfleet promote`` and ``rollback``) of ``models``, oldest first.

    Columns: model, time, action, from_version, to_version, reason, actor. Moves made by fleet
    runs are left out: they are the trend's own points.
    """
    from shrinkfleet import registry

    cols = ["model", "time", "action", "from_version", "to_version", "reason", "actor"]
    rows = [{**{k: e[k] for k in cols if k != "time"},
             "time": pd.to_datetime(e["time"].removesuffix(" UTC"), utc=True)}
            for m in models for e in registry.events(m) if e["trigger"] == "cli" and e["time"]]
    return pd.DataFrame(rows, columns=cols)


# ----------------------------------------------------------------------------- writing


def plot_doc(doc: dict[str, Any], served: dict[str, Any] | None = None,
             gate: dict[str, Any] | None = None, pareto_x: str = "coded_bytes") -> dict[str, Any]:
    """``doc`` with what its plots also show: the variant production serves here, the gate's
    settings and the Pareto plot's x axis (``report.pareto_x``)."""
    return {**doc, "served": served_here(doc, served), "gate": gate or {}, "pareto_x": pareto_x}


def model_plots(ws: Workspace, model: str, doc: dict[str, Any], served: dict[str, Any] | None = None,
                gate: dict[str, Any] | None = None, plot_dir: Path | None = None,
                pareto_x: str = "coded_bytes") -> tuple[Path, Path]:
    """Draw ``<plot_dir>/<model>-pareto.png`` and ``-waterfall.png`` unless they show ``doc`` already.

    The fleet flow calls this as each model finishes (with what production serves and the
    model's gate), so :func:`write_report` at the end of the run finds them current and only
    writes the pages. ``plot_dir`` defaults to ``reports/plots``; ``pareto_x`` is the Pareto
    plot's x axis (:func:`pareto_axis`).
    """
    plot_dir = plot_dir or ws.reports / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    pareto_png, waterfall_png = plot_dir / f"{model}-pareto.png", plot_dir / f"{model}-waterfall.png"
    shown = plot_doc(doc, served, gate, pareto_x)
    _plot_if_changed(plot_model, shown, pareto_png)
    _plot_if_changed(plot_waterfall, shown, waterfall_png)
    return pareto_png, waterfall_png


SUMMARY_DIR = Path("metrics") / "summary"


def summary_row(doc: dict[str, Any], served: dict[str, Any] | None) -> dict[str, Any]:
    """A model's few headline numbers, flat: what ``dvc metrics show`` lists as its row.

    The variant is the one production serves (or, with nothing served from this run, the
    front's smallest .tflite); ``version`` (production's) is 0 when nothing is in production.
    """
    name = served_here(doc, served) or best_variant(doc) or "teacher"
    v = doc["variants"][name]
    row: dict[str, Any] = {"variant": name, "version": int((served or {}).get("version") or 0)}
    row |= ({"accuracy": round(float(v["accuracy"]), 6)} if "accuracy" in v else {"mae": round(float(v["mae"]), 6)})
    return row | {"coded_bytes": int(v["coded_bytes"]), "coded_ratio": round(float(v["coded_ratio"]), 2)}


def write_summary(ws: Workspace, docs: dict[str, dict[str, Any]],
                  served: dict[str, dict[str, Any]] | None = None) -> list[Path]:
    """``metrics/summary/<model>.json`` per model (:func:`summary_row`); dvc.yaml declares them as metrics.

    One flat file per model, so ``dvc metrics show`` prints one short row per model; a model
    no longer reported keeps its file until it leaves the fleet (dvc.yaml then stops listing it).
    """
    out = []
    for model, doc in docs.items():
        path = ws.root / SUMMARY_DIR / f"{model}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(summary_row(doc, (served or {}).get(model)), indent=1) + "\n")
        out.append(path)
    return out


def write_report(ws: Workspace, docs: dict[str, dict[str, Any]], failures: dict[str, str],
                 header: dict[str, str], outcomes: dict[str, dict[str, Any]] | None = None,
                 trends: pd.DataFrame | None = None, *, served: dict[str, dict[str, Any]] | None = None,
                 gates: dict[str, dict[str, Any]] | None = None, moves: pd.DataFrame | None = None,
                 out: Path | None = None, pareto_x: str = "coded_bytes") -> Path:
    """Write fleet.md and fleet.html (table, registry, failures, fronts, plots); return the .md path.

    Args:
        outcomes: per model, ``{"gate": {variant: verdict}, "registry": Registration dict}``.
        trends: :func:`trends_from_mlflow`'s table; a trend plot per model with two or more runs.
        served: :func:`served_variants`' answer: production is marked in the table and plots.
        gates: per model, its gate's settings (``GateConfig.model_dump()``): the limit is drawn.
        moves: :func:`moves_from_registry`'s table: manual promotes and rollbacks on the trends.
        out: the folder (default ``reports/``, the run's report, which also writes the
            ``metrics/summary`` files and the CSVs ``dvc plots`` reads); plots go to ``out/plots``.
        pareto_x: the Pareto plots' x axis (``report.pareto_x``, :func:`pareto_axis`).
    """
    outcomes, served, gates = outcomes or {}, served or {}, gates or {}
    out = out or ws.reports
    run_report = out.resolve() == ws.reports.resolve()
    out.mkdir(parents=True, exist_ok=True)
    verdicts = {m: o.get("gate") or {} for m, o in outcomes.items()}
    table = variant_table(docs, verdicts, served) if docs else None
    pretty = formatted(table) if table is not None else None
    regs = {m: o["registry"] for m, o in outcomes.items() if o.get("registry")}
    notes = {m: production_note(doc, served.get(m), verdicts.get(m)) for m, doc in docs.items()}
    plots: list[tuple[str, str, Path]] = []  # (model, caption, png)
    plot_dir = out / "plots"
    plot_dir.mkdir(exist_ok=True)
    for stale in plot_dir.glob("*.png"):  # models no longer in the report (dvc plots shows the folder)
        if not any(stale.name.startswith(f"{m}-") for m in docs):
            stale.unlink()
    for model, doc in docs.items():
        pareto_png, waterfall_png = model_plots(ws, model, doc, served.get(model), gates.get(model), plot_dir,
                                                pareto_x)
        word = pareto_axis(plot_doc(doc, None, gates.get(model), pareto_x))[2]
        plots.append((model, f"{'MAE' if 'mae' in doc['variants']['teacher'] else 'accuracy'} vs {word}", pareto_png))
        plots.append((model, "bytes from teacher to the served variant", waterfall_png))
        if trends is not None and (trends["model"] == model).sum() >= 2:
            trend_png = plot_dir / f"{model}-trend.png"
            plot_trend(trends[trends["model"] == model], model, trend_png, moves)
            plots.append((model, "production over the last runs", trend_png))
    if run_report:
        _write_plot_data(ws, table, trends)
        write_summary(ws, docs, served)

    lines = ["# Fleet report", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    lines += ["", *LEGEND, ""]
    lines.append(markdown(pretty) if pretty is not None else "_No model finished._")
    registry_lines = {m: _registry_line(regs[m]) + (f"; {notes[m]}" if m in notes else "") if m in regs
                      else notes[m] for m in [*docs, *(m for m in regs if m not in docs)]}
    if registry_lines:
        lines += ["", "## Registry (alias `production`)", ""]
        lines += [f"- **{m}**: {line}" for m, line in registry_lines.items()]
    if failures:
        lines += ["", "## Failed", ""]
        lines += [f"- **{m}**: {why}" for m, why in failures.items()]
    left = notes_on_layers(docs)
    if left:
        lines += ["", "## Layers and recipes left as they are", ""]
        lines += [f"- {line}" for line in left]
    if docs:
        lines += ["", "## Pareto fronts (accuracy vs coded bytes)", ""]
        lines += [f"- **{model}**: {_front_line(doc)}" for model, doc in docs.items()]
        lines += ["", "## Plots", ""]
        for model, caption, png in plots:
            lines += [f"**{model}**: {caption}", "", f"![{model} {caption}](plots/{png.name})", ""]
    path = out / "fleet.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    atomic_write_text(out / "fleet.html", _html(header, pretty, registry_lines, failures, docs, plots))
    return path


def notes_on_layers(docs: dict[str, dict[str, Any]]) -> list[str]:
    """One line per technique that left layers of a model as they are, and per recipe that does not apply.

    A layer a technique does not support (preprocessing, normalisation, custom layers,
    nested models) stays as it is; the variant is still made from the layers it supports.
    """
    out = []
    for model, doc in docs.items():
        seen: dict[tuple[str, str], list[str]] = {}  # (technique, reason) -> variants
        for variant, v in doc["variants"].items():
            for step, layers in (v.get("skipped") or {}).items():
                technique = step.split(".", 1)[-1]
                desc = ", ".join(f"{name} ({why.split(':')[0]})" for name, why in layers.items())
                seen.setdefault((technique, desc), []).append(variant)
        for (technique, desc), variants in seen.items():
            out.append(f"**{model}** {technique} left {desc} as they are (in {', '.join(variants)})")
        for recipe, why in (doc.get("not_applicable") or {}).items():
            out.append(f"**{model}** recipe {recipe} does not apply: {why}")
    return out


LEGEND = [
    "Accuracy on each model's test split; drop vs its teacher in percentage points; bytes of the",
    "TFLite flatbuffer (Keras variants as float32); ratio = teacher bytes / variant bytes; coded = the",
    "entropy-coded flatbuffer (decodes to the same bytes); coded ratio = teacher bytes / coded bytes;",
    "bits/nz = weight bits per non-zero weight; * = on the Pareto front of accuracy vs coded bytes;",
    "(production) = the variant the registry's production alias serves (a star on the plots).",
    "Regression models: MAE on the test split in the label's units, MAE +% = its increase vs the teacher's.",
]


def _registry_line(reg: dict[str, Any]) -> str:
    where = f"v{reg['version']}" if reg["version"] else "none"
    return (f"{'promoted to' if reg['promoted'] else 'production'} {where} "
            f"(candidate: {reg['candidate'] or 'none'}): {reg['reason']}")


def _front_line(doc: dict[str, Any]) -> str:
    def score(v: dict[str, Any]) -> str:
        return f"MAE {v['mae']:.4g}" if "mae" in v else f"{v['accuracy'] * 100:.2f}%"

    return ", ".join(f"{n} ({score(doc['variants'][n])}, {doc['variants'][n]['coded_bytes']:,.0f} B)"
                     for n in doc.get("pareto_front", []))


def _write_plot_data(ws: Workspace, table: pd.DataFrame | None, trends: pd.DataFrame | None) -> None:
    """The plotted numbers as CSV, which dvc.yaml declares as plots (``dvc plots show``)."""
    cols = ["model", "variant", "accuracy", "mae", "coded_bytes", "size_bytes", "compression_ratio", "pareto",
            "production"]
    variants = table[cols] if table is not None else pd.DataFrame(columns=cols)
    atomic_write_text(ws.reports / "variants.csv", variants.to_csv(index=False))
    tcols = ["model", "time", "version", "accuracy", "mae", "coded_bytes"]
    t = trends[tcols].copy() if trends is not None and not trends.empty else pd.DataFrame(columns=tcols)
    if not t.empty:  # ISO 8601 with a T: what a browser's Date parses (DVC's plots are drawn by Vega in one)
        t["time"] = pd.to_datetime(t["time"], utc=True).map(lambda x: x.strftime("%Y-%m-%dT%H:%M:%SZ"))
    atomic_write_text(ws.reports / "trends.csv", t.to_csv(index=False))


def _img(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def _html(header: dict[str, str], pretty: pd.DataFrame | None, regs: dict[str, str], failures: dict[str, str],
          docs: dict[str, dict[str, Any]], plots: list[tuple[str, str, Path]]) -> str:
    """One HTML file with everything inline (no external CSS, scripts or image files)."""
    e = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Fleet report</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;"
        "text-align:right}th{background:#f3f3f3}td:nth-child(-n+2){text-align:left}"
        ".fail{color:#b00}figure{display:inline-block;margin:0 1em 1em 0}"
        "figcaption{font-size:13px;color:#444}</style></head><body>",
        "<h1>Fleet report</h1><ul>",
        *(f"<li><b>{e(str(k))}</b>: {e(str(v))}</li>" for k, v in header.items()),
        "</ul>", f"<p>{e(' '.join(LEGEND))}</p>",
        pretty.to_html(index=False, border=0, escape=True) if pretty is not None else "<p>No model finished.</p>",
    ]
    if regs:
        parts += ["<h2>Registry (alias <code>production</code>)</h2><ul>",
                  *(f"<li><b>{e(m)}</b>: {e(line)}</li>" for m, line in regs.items()), "</ul>"]
    if failures:
        parts += ["<h2 class='fail'>Failed</h2><ul>",
                  *(f"<li class='fail'><b>{e(m)}</b>: {e(why)}</li>" for m, why in failures.items()), "</ul>"]
    left = notes_on_layers(docs)
    if left:
        parts += ["<h2>Layers and recipes left as they are</h2><ul>",
                  *(f"<li>{e(line).replace('**', '')}</li>" for line in left), "</ul>"]
    if docs:
        parts += ["<h2>Pareto fronts</h2><ul>",
                  *(f"<li><b>{e(m)}</b>: {e(_front_line(d))}</li>" for m, d in docs.items()), "</ul>"]
        parts.append("<h2>Plots</h2>")
        for model, caption, png in plots:
            parts.append(f"<figure><img alt='{e(model)} {e(caption)}' src='{_img(png)}'>"
                         f"<figcaption>{e(model)}: {e(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"

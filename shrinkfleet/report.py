"""The fleet report: one table of every variant (pandas), a plot per model, reports/fleet.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from shrinkfleet.storage import atomic_path, atomic_write_text
from shrinkfleet.workspace import Workspace

COLUMNS = [
    "model", "variant", "format", "accuracy", "accuracy_drop", "size_bytes", "gzip_bytes",
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


def variant_table(docs: dict[str, dict[str, Any]], gates: dict[str, dict[str, str]] | None = None) -> pd.DataFrame:
    """One row per (model, variant) with every metric (and the gate's verdict, when given)."""
    rows = [
        {"model": model, "variant": name, "pareto": False, "coded_bytes": v.get("size_bytes"),
         "coded_ratio": v.get("compression_ratio"), "student_ratio": float("nan"), "bits_per_nonzero": float("nan"),
         **v, "gate": (gates or {}).get(model, {}).get(name, "")}
        for model, doc in docs.items()
        for name, v in doc["variants"].items()
    ]
    return pd.DataFrame(rows, columns=[*COLUMNS, "gate"])


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """The table as people read it: accuracy in %, drop in points, ratios with an x."""
    out = pd.DataFrame({
        "model": table["model"],
        "variant": table["variant"] + table["pareto"].map({True: " *", False: ""}),
        "accuracy %": (table["accuracy"] * 100).map("{:.2f}".format),
        "drop (pts)": (table["accuracy_drop"] * 100).map("{:+.2f}".format),
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


def plot_model(doc: dict[str, Any], path: Path) -> None:
    """Accuracy vs coded bytes (log scale) of one model's variants, Pareto front drawn, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def size(v: dict[str, Any]) -> float:
        return v.get("coded_bytes", v["size_bytes"])

    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=100)
    front = doc.get("pareto_front", [])
    for name, v in doc["variants"].items():
        marker = "s" if v["format"] == "keras" else "o"
        colour = "tab:red" if name in front else "tab:blue"
        ax.scatter(size(v), v["accuracy"] * 100, marker=marker, s=40, color=colour, zorder=3)
        ax.annotate(name, (size(v), v["accuracy"] * 100), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if front:
        pts = sorted((size(doc["variants"][n]), doc["variants"][n]["accuracy"] * 100) for n in front)
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="tab:red", alpha=0.6,
                label="Pareto front")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("coded bytes (entropy-coded flatbuffer, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{doc['model']}: accuracy vs coded size (squares: Keras, red: Pareto front)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(ws: Workspace, docs: dict[str, dict[str, Any]], failures: dict[str, str],
                 header: dict[str, str], outcomes: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write reports/fleet.md (table, gate, registry, failures, plots) and return its path.

    Args:
        outcomes: per model, ``{"gate": {variant: verdict}, "registry": Registration dict}``.
    """
    outcomes = outcomes or {}
    ws.reports.mkdir(parents=True, exist_ok=True)
    lines = ["# Fleet report", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    lines += ["", "Accuracy on each model's test split; drop vs its teacher in percentage points; bytes of the",
              "TFLite flatbuffer (Keras variants as float32); ratio = teacher bytes / variant bytes; coded = the",
              "entropy-coded flatbuffer (decodes to the same bytes); coded ratio = teacher bytes / coded bytes;",
              "bits/nz = weight bits per non-zero weight; * = on the Pareto front of accuracy vs coded bytes.", ""]
    if docs:
        gates = {m: o.get("gate") or {} for m, o in outcomes.items()}
        lines.append(formatted(variant_table(docs, gates)).to_markdown(index=False))
    else:
        lines.append("_No model finished._")
    regs = {m: o["registry"] for m, o in outcomes.items() if o.get("registry")}
    if regs:
        lines += ["", "## Registry (alias `production`)", ""]
        for m, reg in regs.items():
            where = f"v{reg['version']}" if reg["version"] else "none"
            lines.append(f"- **{m}**: {'promoted to' if reg['promoted'] else 'production'} {where} "
                         f"(candidate: {reg['candidate'] or 'none'}): {reg['reason']}")
    if failures:
        lines += ["", "## Failed", ""]
        lines += [f"- **{m}**: {why}" for m, why in failures.items()]
    if docs:
        lines += ["", "## Pareto fronts (accuracy vs coded bytes)", ""]
        for model, doc in docs.items():
            front = doc.get("pareto_front", [])
            lines.append(f"- **{model}**: " + ", ".join(
                f"{n} ({doc['variants'][n]['accuracy'] * 100:.2f}%, {doc['variants'][n]['coded_bytes']:,.0f} B)"
                for n in front))
        lines += ["", "## Plots", ""]
        for model, doc in docs.items():
            png = ws.reports / f"{model}-pareto.png"
            plot_model(doc, png)
            lines.append(f"![{model}]({png.name})")
    path = ws.reports / "fleet.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path

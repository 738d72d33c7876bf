"""The README's benchmark table, from the JSON files the benchmarks wrote.

    python bench/table.py            # reads bench/results/*.json, prints Markdown

Each row: what was measured, the figure, the goal, and whether it was met. A benchmark
whose JSON is missing, or was written by a --quick run, is left out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    return None if doc.get("quick") else doc


def rows() -> list[tuple[str, ...]]:
    """One row per figure; the last column is when its benchmark ran (they may come from different runs)."""
    out: list[tuple[str, ...]] = []
    if doc := _load("orchestration"):
        m = doc["median_seconds"]
        out.append((f"Orchestration overhead ({doc['fleet']}, 1 worker)",
                    f"flow {m['flow']:.1f} s / direct {m['direct']:.1f} s = **{doc['ratio']:.2f}**",
                    f"<= {doc['goal']:.2f}", _ok(doc), _when(doc)))
    if doc := _load("noop"):
        out.append((f"No-op rerun ({doc['fleet']})",
                    f"{doc['median_rerun_seconds']:.1f} s vs first {doc['first_seconds']:.1f} s = "
                    f"**{doc['share_of_first']:.0%}**, {len(doc['artifacts_rewritten'])} artifacts rewritten",
                    f"no training, <= {doc['goal_share']:.0%}", _ok(doc), _when(doc)))
    if doc := _load("fanout"):
        m = doc["median_seconds"]
        out.append((f"Fan-out ({doc['models']} small models)",
                    f"1 worker {m['1']:.1f} s / 2 workers {m['2']:.1f} s = **{doc['speedup']:.2f}x**",
                    f">= {doc['goal']}x", _ok(doc), _when(doc)))
    if doc := _load("inference"):
        f, i = doc["results"].values()
        out.append((f"Inference ({doc['model']}, CPU)",
                    f"batch 1: {f['batch1_ms']:.3f} ms float vs {i['batch1_ms']:.3f} ms int8 = "
                    f"**{doc['speedup_batch1']:.1f}x**; batch 32: {doc['speedup_batch32']:.1f}x; accuracy "
                    f"{f['accuracy'] * 100:.2f}% vs {i['accuracy'] * 100:.2f}%",
                    f">= {doc['goal_batch1']}x at batch 1", _ok(doc), _when(doc)))
    if doc := _load("scale"):
        parts = [f"{r['models']}: {r['seconds']:.0f} s ({r['seconds_per_model']:.1f} s/model, "
                 f"largest process {r['peak_process_rss_mb']:.0f} MB, all {r['peak_rss_mb']:.0f} MB)"
                 for r in doc["results"]]
        out.append(("Scale (small models, 2 workers)", "; ".join(parts) +
                    f"; s/model ratio **{doc['seconds_per_model_ratio']:.2f}**, memory ratio "
                    f"**{doc['peak_process_rss_ratio']:.2f}**", "linear time, flat memory (<= 1.25)", _ok(doc),
                    _when(doc)))
    if doc := _load("compression"):
        for r in doc.get("results", []):
            best = r.get("best")
            if not best:
                continue
            ok = best["ratio"] >= 50 and best["test_drop_pts"] <= 0.5
            out.append((f"Compression ({r['model']}, MNIST)",
                        f"{r['float32_bytes']:,} -> {best['coded_bytes']:,} B = **{best['ratio']:.1f}x**, "
                        f"test accuracy drop {best['test_drop_pts']:+.2f} pts",
                        ">= 50x at <= 0.5 pts", "yes" if ok else "**no**", _when(doc)))
    if doc := _load("byo"):
        for name, m in doc["models"].items():
            student = "no student" if name == "byo-null" else "MobileNetV2 student"
            out.append((f"Your own model ({name}: user CNN on MNIST PNGs, {student})",
                        f"{m['float_bytes']:,} -> {m['coded_bytes']:,} B = **{m['ratio']:.1f}x** ({m['variant']}), "
                        f"drop {m['accuracy_drop'] * 100:+.2f} pts, run {m['wall_seconds']:.0f} s",
                        ">= 10x at <= 1 pt" if name == "byo-null" else "reported",
                        _ok(doc) if name == "byo-null" else "-", _when(doc)))
    if doc := _load("tables"):
        out.append((f"Prepare a table ({doc['rows']:,} rows x {doc['columns']} columns, Parquet)",
                    f"{doc['prepare_seconds']:.1f} s; peak {doc['peak_rss_mb']:.0f} MB, baseline "
                    f"{doc['baseline_peak_rss_mb']:.0f} MB: **{doc['peak_over_table']:.2f}x** the table "
                    f"({doc['table_bytes_in_memory'] / 2**20:.0f} MB)",
                    f"<= {doc['goal']:g}x", _ok(doc), _when(doc)))
    return out


def _when(doc: dict) -> str:
    return str(doc.get("measured", "not recorded"))[:16]


def _ok(doc: dict) -> str:
    return "yes" if doc.get("meets_goal") else "**no**"


def main() -> int:
    table = rows()
    if not table:
        print("no full benchmark results in bench/results/ (run `make bench`)", file=sys.stderr)
        return 1
    machine = next((d["machine"] for n in ("orchestration", "noop", "fanout", "inference", "scale", "compression")
                    if (d := _load(n))), {})
    print(f"Measured on {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
          f"{machine.get('memory_gb', '?')} GB, Python {machine.get('python', '?')}, no GPU.\n")
    print("| benchmark | measured (medians) | goal | met | run (UTC) |")
    print("|---|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The figures of docs/benchmarks.md, from the JSON files the benchmarks wrote.

    python bench/table.py            # reads bench/results/*.json, prints Markdown
    python bench/table.py --write    # rewrites the block between the markers in docs/benchmarks.md
    python bench/table.py --check    # exit 1 if that block is not what the JSON files give

The block: the machine, one row per figure (what was measured, the figure, the goal, whether
it was met, when), the Deep Compression comparison, and how long `make bench` took. A
benchmark whose JSON is missing, or was written by a --quick run, is left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
START = "<!-- bench-table:start -->"
END = "<!-- bench-table:end -->"


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
        f, i, *_ = doc["results"].values()
        out.append((f"Inference ({doc['model']}, CPU, int8 vs float32 both on LiteRT)",
                    f"batch 32: {f['batch32_ms']:.3f} ms float vs {i['batch32_ms']:.3f} ms int8 = "
                    f"**{doc['speedup_batch32']:.2f}x**; batch 1: {doc['speedup_batch1']:.2f}x; accuracy "
                    f"{f['accuracy'] * 100:.2f}% vs {i['accuracy'] * 100:.2f}%; Keras (tf.function) at batch 1: "
                    f"{doc['keras_over_litert_float32_batch1']:.0f}x float32 LiteRT",
                    f">= {doc['goal_batch32']}x at batch 32", _ok(doc), _when(doc)))
    if doc := _load("latency"):
        for m in doc["models"].values():
            v = m["variants"]
            figures = "; ".join(
                f"{label.replace('_', ' ')} **{m[f'{label}_vs_float32_tflite_batch32']:.2f}x** "
                f"(batch 1: {m[f'{label}_vs_float32_tflite_batch1']:.2f}x, drop {v[label]['drop_pts']:+.2f} pts)"
                for label in ("int8", "channel_pruned", "channel_pruned_int8"))
            goals = doc["goals"]
            out.append((f"Latency vs float32 TFLite at batch 32 ({m['model']}, MNIST, LiteRT {doc['threads']} "
                        f"thread)", f"float32 {v['float32']['batch32_ms']:.3f} ms; {figures}; channel-pruned "
                        f"{m['channel_macs_share']:.0%} MACs",
                        f"int8 >= {goals['int8']}x, channel-pruned >= {goals['channel_pruned']}x, both >= "
                        f"{goals['channel_pruned_int8']}x, drop <= {goals['max_drop_pts']:g} pt",
                        "yes" if m["meets_goals"] else "**no**", _when(doc)))
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
    for name in sorted(p.stem for p in RESULTS.glob("compare*.json")):  # compare.json, then each --only run's
        if doc := _load(name):
            out.append(_compare_row(doc))
    if doc := _load("tables"):
        out.append((f"Prepare a table ({doc['rows']:,} rows x {doc['columns']} columns, Parquet)",
                    f"{doc['prepare_seconds']:.1f} s; peak {doc['peak_rss_mb']:.0f} MB, baseline "
                    f"{doc['baseline_peak_rss_mb']:.0f} MB: **{doc['peak_over_table']:.2f}x** the table "
                    f"({doc['table_bytes_in_memory'] / 2**20:.0f} MB)",
                    f"<= {doc['goal']:g}x", _ok(doc), _when(doc)))
    return out


def _compare_row(doc: dict) -> tuple[str, ...]:
    """bench/compare.py's figures: each as before -> after, with its median paired ratio (the verdict's)."""
    b, a = doc["median_before"], doc["median_after"]
    r = doc.get("paired_ratio") or doc["ratio"]  # (files written before compare.py paired its rounds)
    parts = [f"{k.removesuffix('_s').replace('_', ' ')} {b[k]:.1f} -> {a[k]:.1f} s (**{r[k]:.2f}x**)"
             for k in doc["held"]]
    share = "fanout_cpu_outside_stages_share"
    if share in b:
        parts.append(f"CPU outside the stages (fan-out) {b[share]:.0%} -> {a[share]:.0%} (goal <= 15%)")
    same = f", {doc['before']}'s fleet and work on both" if doc.get("after_overlay") else ""
    how = "median paired ratio" if "paired_ratio" in doc else "ratio of medians"
    return (f"Before and after ({doc['before']} -> {doc['after']}, {doc['rounds']} round(s), {how}{same})",
            "; ".join(parts), f"each <= {doc['tolerance']:.2f}x", _ok(doc), _when(doc))


def _when(doc: dict) -> str:
    return str(doc.get("measured", "not recorded"))[:16]


def _ok(doc: dict) -> str:
    return "yes" if doc.get("meets_goal") else "**no**"


def compression_rows() -> list[tuple[str, ...]]:
    """The Deep Compression benchmark next to the paper's Table 1 (Han et al., ICLR 2016)."""
    doc = _load("compression")
    if not doc:
        return []
    out: list[tuple[str, ...]] = []
    for r in doc.get("results", []):
        best = r.get("best")
        if not best:
            continue
        before, after = r["float_test_accuracy"] * 100, best["test_accuracy"] * 100
        out.append((f"{r['model']} (shrinkfleet)", f"{r['float32_bytes']:,}", f"{best['coded_bytes']:,}",
                    f"**{best['ratio']:.1f}x**", f"{before:.2f}% -> {after:.2f}%", f"{before - after:+.2f} pts",
                    f"{best['bits_per_nonzero']:.1f}", " > ".join(best["steps"])))
        if paper := doc.get("paper", {}).get(r["model"]):
            p_before, p_after = 100 - paper["error_before"], 100 - paper["error_after"]
            out.append((f"{r['model']} (Deep Compression, Table 1)", f"{paper['float_kb']:,} KB",
                        f"{paper['compressed_kb']:,} KB", f"{paper['ratio']}x", f"{p_before:.2f}% -> {p_after:.2f}%",
                        f"{p_before - p_after:+.2f} pts", "", "prune, quantize, Huffman"))
    return out


def _coders() -> str:
    doc = _load("compression")
    parts = [f"{r['model']}: range {b['range_bytes']:,} B, Huffman {b['huffman_bytes']:,} B, zstd "
             f"{b['zstd_bytes']:,} B, zlib {b['zlib_bytes']:,} B"
             for r in (doc or {}).get("results", []) if (b := r.get("best"))]
    return ("The same best variant under each coder: " + "; ".join(parts) + ".") if parts else ""


def _wall_time() -> str:
    doc = _load("all")
    if not doc or doc.get("meets_goal") is None:
        return ""
    per = ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in doc["seconds"].items())
    return (f"`make bench` took **{doc['total_seconds'] / 60:.1f} minutes** (goal: under {doc['goal_minutes']}; "
            f"{'met' if doc['meets_goal'] else 'missed'}), run {_when(doc)} UTC: {per} minutes.")


def render() -> str:
    """The Markdown block, markers excluded ('' when there are no full results)."""
    table = rows()
    if not table:
        return ""
    machine = next((d["machine"] for n in ("orchestration", "noop", "fanout", "inference", "scale", "compression")
                    if (d := _load(n))), {})
    lines = [f"Measured on {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
             f"{machine.get('memory_gb', '?')} GB, Python {machine.get('python', '?')}, no GPU.", "",
             "| benchmark | measured (medians) | goal | met | run (UTC) |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    if comp := compression_rows():
        lines += ["", "Deep Compression on MNIST (test split; the paper trained on all 60,000 images):", "",
                  "| model | float32 bytes | coded bytes | ratio | accuracy float -> compressed | drop | "
                  "bits / non-zero | recipe |", "|---|---|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in comp]
        if coders := _coders():
            lines += ["", coders]
    if wall := _wall_time():
        lines += ["", wall]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between START and END replaced by ``block``.

    Raises:
        ValueError: a marker is missing.
    """
    head, sep, rest = text.partition(START)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise ValueError(f"markers {START} ... {END} not found")
    return f"{head}{START}\n<!-- Generated by `python bench/table.py --write` from bench/results/*.json. -->\n" \
           f"{block.strip()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the block in docs/benchmarks.md")
    mode.add_argument("--check", action="store_true", help="exit 1 if that block is stale; write nothing")
    ap.add_argument("--file", type=Path, default=DOC, help=f"the page (default {DOC})")
    args = ap.parse_args(argv)
    block = render()
    if not block:
        print("no full benchmark results in bench/results/ (run `make bench`)", file=sys.stderr)
        return 1
    if not (args.write or args.check):
        print(block)
        return 0
    text = args.file.read_text()
    new = replace_block(text, block)
    if args.check:
        if new != text:
            print(f"{args.file}: the benchmark table is stale; run `python bench/table.py --write`", file=sys.stderr)
            return 1
        print(f"{args.file}: the benchmark table is current")
        return 0
    if new != text:
        args.file.write_text(new)
        print(f"rewrote the benchmark table in {args.file}")
    else:
        print(f"{args.file}: the benchmark table is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())

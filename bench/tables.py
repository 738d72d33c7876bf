"""A big table: the prepare stage on a 1,000,000-row, 20-column Parquet file, time and peak memory.

    python bench/tables.py            # 1,000,000 rows
    python bench/tables.py --quick    # 100,000 rows (a smoke run)

Tables are read into memory. This measures what that costs: ``shrinkfleet stage prepare`` on
the table (15 number columns, 5 string columns of 4 to 12 categories, a string label), as the
pipeline runs it, in its own process: wall time and the process's peak resident memory,
against the same command on a 10-row table of the same columns (the process's own baseline:
Python, pandas, pyarrow, scikit-learn), and against the table's in-memory size
(``DataFrame.memory_usage(deep=True)``). Goal: the prepare stage's peak above its baseline at
most 3x the table's in-memory size. Writes bench/results/tables.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import TINY_FLEET, make_project, print_table, run_cli, write_results

GOAL = 3.0


def table(rows: int, seed: int = 0):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    data = {f"x{i:02d}": rng.normal(size=rows).astype(np.float64) for i in range(15)}
    for i, k in enumerate((4, 6, 8, 10, 12)):
        data[f"s{i}"] = rng.choice([f"cat{j}" for j in range(k)], size=rows)
    df = pd.DataFrame(data)
    df["label"] = np.where(df["x00"] + (df["s0"] == "cat1") > 0.5, "yes", "no")
    return df


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100,000 rows")
    ap.add_argument("--rows", type=int, default=None, help="rows of the big table (default 1,000,000)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/[quick-]tables.json)")
    args = ap.parse_args(argv)
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    params = copy.deepcopy(TINY_FLEET)
    params["datasets"] = {name: {"source": "parquet", "path": f"data/raw/{name}.parquet", "label": "label"}
                          for name in ("small", "big")}
    params["models"] = {f"m-{name}": {"dataset": name, "teacher": {"arch": "mlp", "hidden": [8]},
                                      "student": None} for name in ("small", "big")}
    with tempfile.TemporaryDirectory(prefix="bench-tables-") as tmp:
        project = make_project(Path(tmp) / "project", params)
        (project / "data" / "raw").mkdir(parents=True)
        big = table(rows)
        in_memory = int(big.memory_usage(deep=True).sum())
        big.to_parquet(project / "data" / "raw" / "big.parquet")
        file_bytes = (project / "data" / "raw" / "big.parquet").stat().st_size
        del big
        table(10).to_parquet(project / "data" / "raw" / "small.parquet")
        run_cli(project, "sync")
        baseline = run_cli(project, "stage", "prepare", "small")
        run = run_cli(project, "stage", "prepare", "big")
    above = run.peak_process_rss_mb - baseline.peak_process_rss_mb
    ratio = above * 2**20 / in_memory
    print_table([
        {"what": "table in memory (pandas, deep)", "value": f"{in_memory / 2**20:,.0f} MB"},
        {"what": "Parquet file", "value": f"{file_bytes / 2**20:,.0f} MB"},
        {"what": "prepare: wall time", "value": f"{run.seconds:.1f} s"},
        {"what": "prepare: peak RSS", "value": f"{run.peak_process_rss_mb:,.0f} MB"},
        {"what": "baseline (10 rows): peak RSS", "value": f"{baseline.peak_process_rss_mb:,.0f} MB"},
        {"what": "peak above baseline / table in memory", "value": f"{ratio:.2f}x"},
    ], f"prepare on a {rows:,}-row, 20-column Parquet table")
    ok = ratio <= GOAL
    print(f"\npeak above baseline: {ratio:.2f}x the table (goal <= {GOAL:g}x): "
          f"{'meets the goal' if ok else 'MISSES the goal'}")
    path = write_results("tables", {
        "quick": args.quick, "rows": rows, "columns": 20, "table_bytes_in_memory": in_memory,
        "parquet_bytes": file_bytes, "prepare_seconds": run.seconds, "peak_rss_mb": run.peak_process_rss_mb,
        "baseline_peak_rss_mb": baseline.peak_process_rss_mb, "peak_over_table": ratio, "goal": GOAL,
        "meets_goal": ok}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

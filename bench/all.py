"""`make bench`: every benchmark one after another, each timed, then the table in docs/benchmarks.md.

    python bench/all.py              # every script, 25 minutes on 2 cores (2026-11-29)
    python bench/all.py --quick      # every script in its --quick mode (a smoke run)

Writes bench/results/all.json: the wall time of each script and of the whole run, with the
machine, so docs/benchmarks.md can say how long `make bench` took from a measurement. A script that
fails stops the run with its exit code (its own JSON is then not rewritten).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, print_table, write_results

HERE = Path(__file__).resolve().parent
SCRIPTS = ("inference", "latency", "orchestration", "noop", "fanout", "scale", "compression")
GOAL_MINUTES = 30


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every script's --quick mode")
    ap.add_argument("--only", nargs="+", choices=SCRIPTS, default=None, help="these scripts only")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/[quick-]all.json)")
    args = ap.parse_args(argv)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    for name in args.only or SCRIPTS:
        print(f"\n=== bench/{name}.py", flush=True)
        t = time.perf_counter()
        quick_out = (args.out or RESULTS / "all.json").with_name(f"quick-{name}.json")
        extra = ["--quick", "--out", str(quick_out)] if args.quick else []
        code = subprocess.call([sys.executable, str(HERE / f"{name}.py"), *extra])
        seconds[name] = time.perf_counter() - t
        if code != 0:
            print(f"bench/{name}.py failed with exit code {code}", file=sys.stderr)
            return code
    total = time.perf_counter() - start
    print_table([*({"script": f"bench/{k}.py", "minutes": f"{v / 60:.1f}"} for k, v in seconds.items()),
                 {"script": "all", "minutes": f"{total / 60:.1f}"}], "make bench: wall time per script")
    ok = total <= GOAL_MINUTES * 60 if not args.only else None  # (a partial run says nothing of make bench)
    verdict = "partial run, no verdict" if ok is None else "meets the goal" if ok else "MISSES the goal"
    print(f"\nmake bench: {total / 60:.1f} min (goal < {GOAL_MINUTES} min on 2 cores: {verdict})")
    path = write_results("all", {"quick": args.quick, "scripts": list(seconds), "seconds": seconds,
                                 "total_seconds": total, "goal_minutes": GOAL_MINUTES, "meets_goal": ok}, args.out)
    print(f"wrote {path}")
    if not args.quick and not args.only:
        subprocess.call([sys.executable, str(HERE / "table.py"), "--write"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

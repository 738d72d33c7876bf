"""Scale: fleets of 10, 50 and 100 small models; wall time and peak memory against fleet size.

    python bench/scale.py            # 10, 50, 100 models (10 minutes on 2 cores)
    python bench/scale.py --quick    # 2 and 4 models (CI smoke run)

Each fleet is a fresh project run with `shrinkfleet run --no-dvc` and 2 worker processes, so
each worker trains about half the fleet, one model after another. Gate promotion is off
(`gate.promote: false`): registering a version per model is the registry's cost, measured by
the registry's own tests, not the pipeline's. Goals: wall time linear in N (seconds per model
flat), and the peak memory of the largest process flat (no TensorFlow graph or session
leaking from one model to the next inside a worker).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_project, print_table, run_cli, tiny_fleet, verdict, write_results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fleets of 2 and 4 models")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="fleet sizes (default 10 50 100)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/[quick-]scale.json)")
    args = ap.parse_args(argv)
    sizes = args.sizes or ([2, 4] if args.quick else [10, 50, 100])
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for n in sizes:
            params = tiny_fleet(n)
            params["gate"] = {"promote": False}
            project = make_project(Path(tmp) / f"n{n}", params, dvc=False)
            t = run_cli(project, "run", "--no-dvc", "--workers", "2")
            results.append({"models": n, "seconds": t.seconds, "seconds_per_model": t.seconds / n,
                            "peak_rss_mb": t.peak_rss_mb, "peak_process_rss_mb": t.peak_process_rss_mb})
            print(f"{n} models: {t.seconds:.1f} s, peak {t.peak_rss_mb:.0f} MB in all, "
                  f"{t.peak_process_rss_mb:.0f} MB largest process", flush=True)
    for r in results:
        rows.append({"models": r["models"], "wall s": f"{r['seconds']:.1f}",
                     "s / model": f"{r['seconds_per_model']:.2f}",
                     "peak RSS, all processes (MB)": f"{r['peak_rss_mb']:.0f}",
                     "peak RSS, largest process (MB)": f"{r['peak_process_rss_mb']:.0f}"})
    print_table(rows, "Scale: fleets of small models, 2 workers")
    small, big = results[0], results[-1]
    # Linear: the per-model time of the biggest fleet within 25% of the smallest's (fixed start-up
    # costs make small fleets look slower per model, so a fall is fine); memory: largest process
    # within 25% as well.
    time_ratio = big["seconds_per_model"] / small["seconds_per_model"]
    mem_ratio = big["peak_process_rss_mb"] / small["peak_process_rss_mb"]
    linear, flat = time_ratio <= 1.25, mem_ratio <= 1.25
    print(f"\ns/model at {big['models']} vs {small['models']}: {time_ratio:.2f}x (linear: {verdict(linear)}); "
          f"largest process: {mem_ratio:.2f}x (flat: {verdict(flat)})")
    path = write_results("scale", {"quick": args.quick, "workers": 2, "results": results,
                                   "seconds_per_model_ratio": time_ratio, "peak_process_rss_ratio": mem_ratio,
                                   "goal": "s/model and largest-process RSS within 1.25x, smallest to largest fleet",
                                   "meets_goal": linear and flat}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

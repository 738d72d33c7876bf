"""No-op rerun: a second `shrinkfleet run` with nothing changed, against the first.

    python bench/noop.py            # the default fleet (params.yaml), then 3 no-op reruns
    python bench/noop.py --quick    # 1 small model, 1 rerun (CI smoke run)
    python bench/noop.py --params other/params.yaml   # another fleet (bench/compare.py: the earlier commit's)

The project is a copy of this repository's code, dvc.yaml and params.yaml with git + DVC, as
after a fresh clone. The first run trains everything; each rerun must train nothing (every
artifact keeps its modification time, `dvc status` stays clean). Goal: a rerun takes at
most 10% of the first run's wall time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, make_project, median, print_table, run_cli, tiny_fleet, verdict, write_results

GOAL = 0.10


def _artifacts(project: Path) -> dict[str, int]:
    return {str(p.relative_to(project)): p.stat().st_mtime_ns for p in (project / "models").rglob("*") if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 small model, 1 rerun")
    ap.add_argument("--reps", type=int, default=None, help="no-op reruns (default 3, quick 1)")
    ap.add_argument("--params", type=Path, default=None,
                    help="the fleet of the full run (default: params.yaml of the code measured)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/[quick-]noop.json)")
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    params = tiny_fleet(1) if args.quick else yaml.safe_load((args.params or ROOT / "params.yaml").read_text())
    with tempfile.TemporaryDirectory(prefix="bench-noop-") as tmp:
        project = make_project(Path(tmp) / "project", params)
        first = run_cli(project, "run")
        print(f"first run: {first.seconds:.1f} s", flush=True)
        before = _artifacts(project)
        reruns, retrained = [], []
        for rep in range(reps):
            t = run_cli(project, "run")
            reruns.append(t.seconds)
            changed = sorted(k for k, v in _artifacts(project).items() if before.get(k) != v)
            retrained.extend(changed)
            print(f"no-op rerun {rep + 1}/{reps}: {t.seconds:.1f} s, {len(changed)} artifact(s) rewritten", flush=True)
        status = subprocess.run([sys.executable, "-m", "dvc", "status", "--quiet"], cwd=project).returncode
    rerun = median(reruns)
    share = rerun / first.seconds
    ok = share <= GOAL and not retrained and status == 0
    print_table([{"run": "first (trains everything)", "seconds": f"{first.seconds:.1f}"},
                 {"run": f"no-op rerun (median of {reps})", "seconds": f"{rerun:.1f}"}],
                f"No-op rerun: {'1 small model' if args.quick else 'the default fleet'}")
    print(f"\nrerun / first: {share:.1%} (goal <= {GOAL:.0%}); artifacts rewritten: {len(retrained)}; "
          f"dvc status clean: {status == 0} -> {verdict(ok)}")
    path = write_results("noop", {
        "quick": args.quick, "fleet": "1 small model" if args.quick else str(args.params or "default (params.yaml)"),
        "first_seconds": first.seconds, "rerun_seconds": reruns, "median_rerun_seconds": rerun,
        "share_of_first": share, "artifacts_rewritten": retrained, "dvc_status_clean": status == 0,
        "goal_share": GOAL, "meets_goal": ok,
    }, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

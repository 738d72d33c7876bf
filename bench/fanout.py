"""Fan-out: the same fleet of small models with 1 and with 2 parallel worker processes.

    python bench/fanout.py            # 8 models, 3 repetitions of each (about 5 minutes on 2 cores)
    python bench/fanout.py --quick    # 2 models, 1 repetition (CI smoke run)

Each repetition is a fresh project, run as a user would (`shrinkfleet run --no-dvc --workers N`),
so every stage trains. Goal: 2 workers at least 1.7x faster than 1 on 2 cores.

Where the CPU goes: the CPU time of the whole process tree of each run (the command, the Prefect
server, every worker: ``getrusage(RUSAGE_CHILDREN)`` around it) against the CPU the stages' work
took inside the workers (each stage's ``time.process_time()`` in its worker, summed by the flow
into the fleet run's MLflow metric ``stage_cpu_seconds``). ``cpu_outside_stages_share`` is the
rest (flow process, Prefect server, worker start-up, imports) as a share of the total, median of
the 2-worker runs. Goal: at most 0.15. Each run's ``by_process`` splits the CPU by kind of
process (the command with its flow, the Prefect server, the workers), sampled with psutil every
0.1 s while the run lasts, so it may miss a process's last tenth of a second.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_project, median, print_table, run_cli, tiny_fleet, verdict, write_results

GOAL = 1.7
CPU_GOAL = 0.15


def children_cpu() -> float:
    """User + system CPU seconds of every finished descendant of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stage_cpu(project: Path) -> float:
    """The fleet run's ``stage_cpu_seconds``: CPU the stages' work took inside the workers."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    (exp,) = [e for e in client.search_experiments() if e.name.startswith("shrinkfleet/")]
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`shrinkfleet.kind` = 'fleet'")
    return float(run.data.metrics["stage_cpu_seconds"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 models, 1 repetition")
    ap.add_argument("--models", type=int, default=None, help="fleet size (default 8, quick 2)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per worker count (default 3, quick 1)")
    ap.add_argument("--workers", type=int, nargs="+", choices=(1, 2), default=[1, 2],
                    help="worker counts to run (default 1 2; the speedup needs both)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/[quick-]fanout.json)")
    args = ap.parse_args(argv)
    n = args.models or (2 if args.quick else 8)
    reps = args.reps or (1 if args.quick else 3)
    seconds: dict[int, list[float]] = {w: [] for w in args.workers}
    cpu: dict[int, list[dict[str, float]]] = {w: [] for w in args.workers}
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        for rep in range(reps):
            for workers in args.workers:
                project = make_project(Path(tmp) / f"w{workers}-r{rep}", tiny_fleet(n), dvc=False)
                before = children_cpu()
                t = run_cli(project, "run", "--no-dvc", "--workers", str(workers))
                total, stages = children_cpu() - before, stage_cpu(project)
                seconds[workers].append(t.seconds)
                cpu[workers].append({"total": total, "stages": stages, "outside_share": (total - stages) / total,
                                     "by_process": t.cpu_by_process})
                parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(t.cpu_by_process.items()))
                print(f"rep {rep + 1}/{reps}, {workers} worker(s): {t.seconds:.1f} s; CPU {total:.1f} s, "
                      f"{stages:.1f} s of it in stages (by process, sampled: {parts})", flush=True)
    one, two = (median(seconds[w]) if seconds.get(w) else None for w in (1, 2))
    speedup = one / two if one and two else None
    share = median([c["outside_share"] for c in cpu[max(cpu)]])
    rows = [{"workers": w, "median s": f"{median(s):.1f}", "runs s": ", ".join(f"{x:.1f}" for x in s),
             "CPU s (stages)": ", ".join(f"{c['total']:.1f} ({c['stages']:.1f})" for c in cpu[w])}
            for w, s in seconds.items()]
    print_table(rows, f"Fan-out: {n} small models, {reps} repetition(s) each")
    if speedup is not None:
        print(f"\nspeedup 2 vs 1 worker: {speedup:.2f}x (goal >= {GOAL}x: {verdict(speedup >= GOAL)})")
    most = f"{max(cpu)} worker{'s' if max(cpu) > 1 else ''}"
    print(f"CPU outside the stages' work, {most}: {share:.1%} of all CPU (goal <= {CPU_GOAL:.0%}: "
          f"{verdict(share <= CPU_GOAL)})")
    path = write_results("fanout", {
        "quick": args.quick, "models": n, "repetitions": reps,
        "seconds": {str(w): s for w, s in seconds.items()},
        "median_seconds": {"1": one, "2": two}, "speedup": speedup, "goal": GOAL,
        "meets_goal": None if speedup is None else speedup >= GOAL,
        "cpu_seconds": {str(w): c for w, c in cpu.items()}, "cpu_outside_stages_share": share,
        "cpu_goal": CPU_GOAL, "meets_cpu_goal": share <= CPU_GOAL,
    }, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

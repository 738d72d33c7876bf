"""Orchestration overhead: the fleet through the Prefect flow vs the same stage functions called directly.

    python bench/orchestration.py            # the default fleet, epochs capped at 5, 3 repetitions
    python bench/orchestration.py --quick    # 1 small model, 1 repetition (CI smoke run)

Both sides start a fresh Python process in a fresh project and do the same work: every stage
of every model, MLflow tracking, gate and registry, the report.
  flow:   `shrinkfleet run --no-dvc --workers 1` (Prefect server, flow, one worker process)
  direct: this script's `--direct` mode: the stage functions (tasks/*.run), register.record
          and report.write_report called one after another in one process, no Prefect.
With one worker neither side runs stages in parallel, so the ratio is Prefect's overhead.
The default fleet's epochs are capped at 5 so three repetitions fit in a few minutes; the
models, recipes and data are the default fleet's. Goal: flow / direct <= 1.10.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    ROOT,
    make_project,
    median,
    print_table,
    run_cli,
    timed,
    tiny_fleet,
    verdict,
    write_results,
)

GOAL = 1.10
EPOCH_CAP = 5


def capped_default_fleet() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section in ("teacher", "distill", "prune", "cluster", "qat"):
        if "epochs" in params.get(section, {}):
            params[section]["epochs"] = min(params[section]["epochs"], EPOCH_CAP)
    for model in params["models"].values():
        for section in ("teacher", "student", "distill", "prune", "cluster", "qat"):
            if isinstance(model.get(section), dict) and "epochs" in model[section]:
                model[section]["epochs"] = min(model[section]["epochs"], EPOCH_CAP)
    return params


def direct(project: Path) -> None:
    """Every stage of every model in this process, then tracking, gate, registry and report."""
    sys.path.insert(0, str(project))
    from shrinkfleet import registration as register
    from shrinkfleet import report, tracking
    from tasks import common, compress, distill, evaluate, prepare, prune, teacher

    ctx = common.context(project)
    fleet, ws = ctx.fleet, ctx.ws
    names = fleet.model_names()
    experiment_id = tracking.setup(project, fleet.fleet)
    with tracking.fleet_run(experiment_id, {"trigger": "bench-direct"}):
        for ds in fleet.datasets_in_use(names):
            prepare.run(ctx, ds)
        outcomes = {}
        for m in names:
            for stage in (teacher, distill, prune, compress, evaluate):
                stage.run(ctx, m)
            stages = dict.fromkeys(register.MODEL_STAGES, "ran")
            outcomes[m] = register.record(ws, fleet.resolve(m), stages, False, "bench-direct", "bench")
        docs = report.load_metrics(ws, names)
        report.write_report(ws, docs, {}, {"fleet": fleet.fleet}, outcomes=outcomes,
                            trends=report.trends_from_mlflow(experiment_id, names))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 small model, 1 repetition")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of each side (default 3, quick 1)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default bench/results/[quick-]orchestration.json)")
    ap.add_argument("--direct", type=Path, default=None, help=argparse.SUPPRESS)  # the direct side's own process
    args = ap.parse_args(argv)
    if args.direct:
        direct(args.direct)
        return 0
    reps = args.reps or (1 if args.quick else 3)
    params = tiny_fleet(1) if args.quick else capped_default_fleet()
    seconds: dict[str, list[float]] = {"flow": [], "direct": []}
    with tempfile.TemporaryDirectory(prefix="bench-orch-") as tmp:
        for rep in range(reps):
            project = make_project(Path(tmp) / f"flow-{rep}", params, dvc=False)
            seconds["flow"].append(run_cli(project, "run", "--no-dvc", "--workers", "1").seconds)
            project = make_project(Path(tmp) / f"direct-{rep}", params, dvc=False)
            start = time.perf_counter()
            t = timed([sys.executable, __file__, "--direct", str(project)], cwd=project)
            if t.returncode != 0:
                raise SystemExit(f"direct run failed:\n{t.output[-4000:]}")
            seconds["direct"].append(time.perf_counter() - start)
            print(f"rep {rep + 1}/{reps}: flow {seconds['flow'][-1]:.1f} s, direct {seconds['direct'][-1]:.1f} s",
                  flush=True)
    flow_s, direct_s = median(seconds["flow"]), median(seconds["direct"])
    ratio = flow_s / direct_s
    print_table([{"side": k, "median s": f"{median(v):.1f}", "runs s": ", ".join(f"{x:.1f}" for x in v)}
                 for k, v in seconds.items()],
                f"Orchestration: {'1 small model' if args.quick else 'default fleet, epochs <= 5'}, 1 worker")
    print(f"\nflow / direct: {ratio:.3f} (goal <= {GOAL}: {verdict(ratio <= GOAL)})")
    path = write_results("orchestration", {
        "quick": args.quick, "fleet": "1 small model" if args.quick else f"default, epochs capped at {EPOCH_CAP}",
        "repetitions": reps, "seconds": seconds, "median_seconds": {"flow": flow_s, "direct": direct_s},
        "ratio": ratio, "goal": GOAL, "meets_goal": ratio <= GOAL,
    }, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Before and after: the same orchestration benchmarks on two commits, side by side in one run.

    python bench/compare.py --before 9709c8e                 # against HEAD, about 20 minutes on 2 cores
    python bench/compare.py --before 9709c8e --rounds 2      # twice each, alternating which goes first
    python bench/compare.py --before 9709c8e --quick         # small fleets (a smoke run)
    python bench/compare.py --before 9709c8e --only fanout --rounds 8   # one figure, 8 pairs
    make compare BEFORE=9709c8e

Both commits (``--before``, and ``--after``, default HEAD) are checked out into temporary git
worktrees, so uncommitted changes are not measured and the checkout can be edited meanwhile.
Both sides run *this* checkout's benchmark scripts, on the same machine, interleaved (before,
after, then after, before with ``--rounds 2``), so load on the machine falls on both alike;
only the code under test differs (``SHRINKFLEET_BENCH_CODE`` and ``PYTHONPATH`` point at each
side's tree). Each benchmark runs on both sides in turn before the next one starts (the order
alternating from one to the next and from round to round), so the two sides of a figure are
measured minutes apart: this machine's speed drifts by 20-30% within the hour. Measured,
each as a user runs it (``shrinkfleet run`` in a fresh project):

- the default fleet's first run and its no-op rerun (``bench/noop.py``, DVC on);
- the 8-model fan-out with 2 workers (``bench/fanout.py``), with where the CPU went;
- the 100-model fleet with 2 workers (``bench/scale.py``), with the peak memory of the largest process.

Like with like: both sides run the same fleets doing the same work. The default fleet is the
*before* commit's ``params.yaml`` on both sides (a later commit may retune it: more epochs are
more work, not slower orchestration), and the after side's projects get ``LIKE_FOR_LIKE``: the
keys a later schema renamed are dropped, and work added since (latency timed at more batch
sizes) is set to what the earlier code did. ``--own-fleets`` measures each side on its own
``params.yaml`` and defaults instead.

Goal: every figure after within 10% of before, or better. The verdict is the median of the
rounds' paired ratios (after / before of one round, whose two runs were minutes apart), which a
drift of the machine's speed between rounds does not move; the ratio of the two sides' medians
is recorded next to it. Writes bench/results/compare.json (with ``--only``,
bench/results/compare-<benchmarks>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, print_table, verdict, write_results

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOLERANCE = 1.10
# The after side's edits so that it does the work the before side does (bench/_common.overlay), right
# for the commits of issue 18's measurement (before 9709c8e): run.worker_max_stages became
# run.worker_max_models (both default to no recycling within these fleets), and evaluate times
# batch 1 only, as the earlier code did (it added evaluate.batch_sizes, default [1, 32]).
LIKE_FOR_LIKE = {"set": {"evaluate": {"batch_sizes": [1]}}, "drop": ["run.worker_max_stages"]}


BENCHES = ("noop", "fanout", "scale")


def measure(name: str, code: Path, out: Path, quick: bool, fleet: Path | None = None,
            edits: dict | None = None) -> dict[str, float]:
    """The figures of one benchmark on one side: this checkout's script ``name`` on the code in ``code``.

    ``fleet``: the default fleet's params.yaml (else the side's own); ``edits``: the overlay of
    every project's params.yaml (``$SHRINKFLEET_BENCH_OVERLAY``).
    """
    env = {**os.environ, "SHRINKFLEET_BENCH_CODE": str(code), "PYTHONPATH": str(code)}
    env.pop("SHRINKFLEET_BENCH_OVERLAY", None)
    if edits:
        env["SHRINKFLEET_BENCH_OVERLAY"] = json.dumps(edits)
    out.mkdir(parents=True, exist_ok=True)
    fan_models, scale_models = ("2", "4") if quick else ("8", "100")
    script, *args = {
        "noop": ["noop.py", "--reps", "1", *(["--quick"] if quick else []),
                 *(["--params", str(fleet)] if fleet and not quick else [])],
        "fanout": ["fanout.py", "--models", fan_models, "--reps", "1", "--workers", "2"],
        "scale": ["scale.py", "--sizes", scale_models],
    }[name]
    path = out / f"{name}.json"
    print(f"--- {code.name}: bench/{script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args, "--out", str(path)], env=env, check=True)
    doc = json.loads(path.read_text())
    if name == "noop":
        return {"first_run_s": doc["first_seconds"], "noop_rerun_s": doc["median_rerun_seconds"]}
    if name == "fanout":
        return {
            "fanout_2_workers_s": doc["median_seconds"]["2"],
            "fanout_cpu_outside_stages_share": doc["cpu_outside_stages_share"],
            # The stages' own CPU: the same work on both sides, so its ratio is how the machine's speed
            # drifted between the two (or, with --own-fleets, how the stage work itself changed).
            "fanout_stage_cpu_seconds": median([c["stages"] for c in doc["cpu_seconds"]["2"]]),
        }
    (scale,) = doc["results"]
    return {"scale_s": scale["seconds"], "scale_peak_process_rss_mb": scale["peak_process_rss_mb"]}


def paired_ratio(figures: dict[str, list[dict[str, float]]], key: str) -> float | None:
    """The median over rounds of after / before for ``key`` (None when a before figure is 0)."""
    pairs = list(zip(figures["after"], figures["before"], strict=True))
    if any(not b[key] for _, b in pairs):
        return None
    return median([a[key] / b[key] for a, b in pairs])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    ap.add_argument("--after", default="HEAD", help="the later commit (default HEAD)")
    ap.add_argument("--rounds", type=int, default=1, help="before/after pairs, alternating which goes first")
    ap.add_argument("--quick", action="store_true", help="small fleets: a smoke run, no verdict worth quoting")
    ap.add_argument("--own-fleets", action="store_true",
                    help="each side its own params.yaml and defaults (default: the before side's fleet, like for like)")
    ap.add_argument("--only", action="append", choices=BENCHES, default=None,
                    help="run only this benchmark (repeatable; default all): more rounds of one figure in less time")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/[quick-]compare.json)")
    args = ap.parse_args(argv)
    benches = [b for b in BENCHES if b in (args.only or BENCHES)]
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    before_sha = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout.strip()
    after_sha = subprocess.run(["git", "rev-parse", "--short", args.after], cwd=REPO, check=True,
                               capture_output=True, text=True).stdout.strip()
    figures: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        trees = {"before": Path(tmp) / f"before-{before_sha}", "after": Path(tmp) / f"after-{after_sha}"}
        try:
            for side, rev in (("before", args.before), ("after", args.after)):
                subprocess.run(["git", "worktree", "add", "--detach", "-q", str(trees[side]), rev], cwd=REPO,
                               check=True)
            fleet = None if args.own_fleets else trees["before"] / "params.yaml"
            edits = {"before": None, "after": None if args.own_fleets else LIKE_FOR_LIKE}
            for r in range(args.rounds):  # each benchmark on both sides in turn: minutes apart, not a round
                figures["before"].append({})
                figures["after"].append({})
                for i, name in enumerate(benches):
                    order = ["before", "after"] if (r + i) % 2 == 0 else ["after", "before"]
                    for side in order:
                        figures[side][r].update(measure(name, trees[side], Path(tmp) / f"{side}-{r}", args.quick,
                                                        fleet, edits[side]))
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
    keys = list(figures["before"][0])
    before = {k: median([f[k] for f in figures["before"]]) for k in keys}
    after = {k: median([f[k] for f in figures["after"]]) for k in keys}
    ratios = {k: after[k] / before[k] if before[k] else None for k in keys}
    paired = {k: paired_ratio(figures, k) for k in keys}
    held = {k: paired[k] is not None and paired[k] <= TOLERANCE for k in keys if k.endswith("_s")}
    rows = [{"figure": k, f"before ({before_sha})": f"{before[k]:.3g}",
             f"after ({after_sha})": f"{after[k]:.3g}",
             "ratio of medians": "" if ratios[k] is None else f"{ratios[k]:.2f}",
             "median paired ratio": "" if paired[k] is None else f"{paired[k]:.2f}"} for k in keys]
    print_table(rows, f"Before and after, {args.rounds} round(s), medians, the same machine and run")
    for k, ok in held.items():
        print(f"{k}: {paired[k]:.2f}x of before, the median of {args.rounds} paired round(s) "
              f"(goal <= {TOLERANCE:.2f}: {verdict(ok)})")
    path = write_results("compare" if args.only is None else f"compare-{'-'.join(benches)}", {
        "quick": args.quick, "before": before_sha, "after": after_sha,
        "rounds": args.rounds, "fleets": "own" if args.own_fleets else f"{before_sha}'s params.yaml on both sides",
        "after_overlay": None if args.own_fleets else LIKE_FOR_LIKE, "figures": figures,
        "median_before": before, "median_after": after,
        "ratio": ratios, "paired_ratio": paired, "tolerance": TOLERANCE, "held": held, "meets_goal": all(held.values()),
    }, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

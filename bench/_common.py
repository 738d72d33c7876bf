"""What the benchmarks share: throw-away projects, timed CLI runs with peak memory, JSON and tables.

Every benchmark runs shrinkfleet the way a user does (the ``shrinkfleet`` console script in
a project folder with dvc.yaml and params.yaml), times it with a wall clock, and samples the
resident memory of the whole process tree (CLI, Prefect server, worker processes) every
0.1 s. Results are medians of several repetitions, written as JSON with a machine description.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The code a benchmark runs: this checkout, or another one (bench/compare.py sets it, with PYTHONPATH).
ROOT = Path(os.environ.get("SHRINKFLEET_BENCH_CODE") or Path(__file__).resolve().parents[1]).resolve()
# Edits to every benchmark project's params.yaml, as JSON {"set": {nested keys}, "drop": ["a.b"]}:
# bench/compare.py has both commits do the same work (see its LIKE_FOR_LIKE).
OVERLAY_ENV = "SHRINKFLEET_BENCH_OVERLAY"
RESULTS = Path(__file__).resolve().parent / "results"
SHRINKFLEET = Path(sys.executable).with_name("shrinkfleet")

# A small model: trains in a second or two, still goes through every stage and one recipe.
TINY_MODEL = {
    "dataset": "digits",
    "teacher": {"arch": "mlp", "hidden": [32]},
    "student": {"arch": "mlp", "hidden": [8]},
    "distill": {}, "prune": {}, "quantize": {},
}

TINY_FLEET: dict[str, Any] = {
    "fleet": "bench",
    "seed": 7,
    "run": {"workers": 2, "retries": 0, "retry_delay_seconds": 0},
    "data": {"val_fraction": 0.15, "test_fraction": 0.2},
    "teacher": {"epochs": 2, "batch_size": 64, "learning_rate": 0.003, "patience": 0},
    "distill": {"temperature": 4.0, "alpha": 0.1, "epochs": 2, "batch_size": 64, "learning_rate": 0.005,
                "patience": 0},
    "prune": {"target_sparsity": 0.5, "initial_sparsity": 0.0, "epochs": 1, "batch_size": 64,
              "learning_rate": 0.001, "frequency": 5, "power": 3.0, "end_fraction": 0.75},
    "quantize": {"representative_samples": 50},
    "cluster": {"clusters": 8, "epochs": 1},
    "qat": {"epochs": 1},
    "recipes": {"pruned-int8": {"steps": ["int8"]}},
    "search": {"enabled": False},
    "evaluate": {"latency_runs": 5, "latency_warmup": 1},
    "datasets": {"digits": {"source": "sklearn", "name": "digits"}},
    "models": {},
}


def tiny_fleet(n: int) -> dict[str, Any]:
    """``n`` small models on the digits (``m000`` ...), each a different width so none is a copy."""
    params = copy.deepcopy(TINY_FLEET)
    for i in range(n):
        model = copy.deepcopy(TINY_MODEL)
        model["teacher"]["hidden"] = [32 + i % 8]
        params["models"][f"m{i:03d}"] = model
    return params


def overlay(params: dict[str, Any], edits: dict[str, Any]) -> dict[str, Any]:
    """``params`` with ``edits["set"]`` merged in (nested mappings key by key) and ``edits["drop"]`` removed."""
    out = copy.deepcopy(params)

    def merge(into: dict[str, Any], new: dict[str, Any]) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = copy.deepcopy(value)

    merge(out, edits.get("set", {}))
    for dotted in edits.get("drop", []):
        *parents, last = dotted.split(".")
        node = out
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def make_project(path: Path, params: dict[str, Any], dvc: bool = True) -> Path:
    """A project folder as a user has it: the code DVC's stages depend on, dvc.yaml, params.yaml, git + DVC.

    ``$SHRINKFLEET_BENCH_OVERLAY`` (JSON, see :func:`overlay`) edits ``params`` first.
    """
    import yaml

    if os.environ.get(OVERLAY_ENV):
        params = overlay(params, json.loads(os.environ[OVERLAY_ENV]))
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    for folder in ("shrinkfleet", "tasks", "flows"):
        shutil.copytree(ROOT / folder, path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if dvc:
        from shrinkfleet import pipeline
        from shrinkfleet.config import parse_params

        pipeline.sync(path, parse_params(params))  # what `shrinkfleet sync` writes
        subprocess.run(["git", "init", "-q"], cwd=path, check=True)
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=path, check=True)
        subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=path, check=True)
    return path


@dataclass
class Timed:
    seconds: float
    peak_rss_mb: float  # the whole process tree at its largest
    peak_process_rss_mb: float  # the largest single process
    returncode: int
    output: str
    # CPU seconds by kind of process, as last sampled (every 0.1 s, so a short-lived process may be
    # missed): "command" (the command itself: the flow), "prefect server", "workers", "other".
    cpu_by_process: dict[str, float] = field(default_factory=dict)


def _kind(cmdline: list[str], root_pid: int, pid: int) -> str:
    line = " ".join(cmdline)
    if pid == root_pid:
        return "command"
    if "prefect server start" in line or "prefect.server.api.server" in line:
        return "prefect server"
    if "multiprocessing.spawn" in line or "distributed" in line:
        return "workers"
    return "other"


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> Timed:
    """Run ``cmd``, timing it and sampling the resident memory of it and every descendant."""
    import psutil

    full_env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})}
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        if key not in (env or {}):
            full_env.pop(key, None)
    peak = {"tree": 0, "proc": 0}
    cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds when last seen)
    done = threading.Event()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                rss = []
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        rss.append(p.memory_info().rss)
                        times = p.cpu_times()
                        kind = cpu[p.pid][0] if p.pid in cpu else _kind(p.cmdline(), proc.pid, p.pid)
                        cpu[p.pid] = (kind, times.user + times.system)
                peak["tree"] = max(peak["tree"], sum(rss))
                peak["proc"] = max(peak["proc"], max(rss, default=0))
            except psutil.Error:
                pass
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    by_kind: dict[str, float] = {}
    for kind, seconds_cpu in cpu.values():
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds_cpu
    return Timed(seconds, peak["tree"] / 2**20, peak["proc"] / 2**20, proc.returncode, output, by_kind)


def run_cli(project: Path, *args: str) -> Timed:
    """``shrinkfleet <args>`` in ``project``; a non-zero exit stops the benchmark with the output."""
    result = timed([str(SHRINKFLEET), *args], cwd=project)
    if result.returncode != 0:
        raise SystemExit(f"shrinkfleet {' '.join(args)} failed ({result.returncode}):\n{result.output[-4000:]}")
    return result


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import psutil

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import version

    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(), "os": platform.platform(),
        "gpu": os.environ.get("CUDA_VISIBLE_DEVICES", "none visible") if shutil.which("nvidia-smi") else "none",
        "versions": {p: version(p) for p in ("tensorflow", "prefect", "mlflow", "dvc", "ai-edge-litert")},
    }


def write_results(name: str, doc: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``doc`` (plus the machine and the time) to bench/results/<name>.json atomically.

    A ``--quick`` run (``doc["quick"]``) goes to bench/results/quick-<name>.json instead, so a
    smoke run never replaces the full run's figures that docs/benchmarks.md quotes.
    """
    path = out or RESULTS / (f"quick-{name}.json" if doc.get("quick") else f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "measured": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "machine": machine(), **doc}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from tabulate import tabulate

    print(f"\n{title}\n")
    print(tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True))


def verdict(ok: bool) -> str:
    return "meets the goal" if ok else "MISSES the goal"

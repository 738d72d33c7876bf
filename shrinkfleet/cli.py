"""The ``shrinkfleet`` command line.

Exit codes: 0 every model finished; 1 at least one model failed (the report names it);
2 bad input (params, data, paths), reported before any work starts; 3 another run holds the
workspace and ``--if-busy refuse`` was given.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from shrinkfleet import no_telemetry

no_telemetry()  # before any command imports MLflow or Prefect

app = typer.Typer(
    name="shrinkfleet",
    help="Compress a whole fleet of models every night: distil, prune, cluster, quantize, entropy-code, evaluate, "
    "track, register.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Off a terminal (CI logs, `make run | tee`), Rich would wrap the variant table at 80 columns.
console = Console() if Console().is_terminal else Console(width=200)
err = Console(stderr=True)

ParamsOpt = Annotated[
    Path | None,
    typer.Option("--params", "-p", help="Fleet definition (default: <root>/params.yaml).", show_default=False),
]
RootOpt = Annotated[
    Path,
    typer.Option("--root", help="Project folder holding dvc.yaml; artifacts are written under it."),
]


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _paths(root: Path, params: Path | None) -> tuple[Path, Path]:
    root = root.resolve()
    params = (params or root / "params.yaml").resolve()
    return root, params


def _load(params: Path):
    from shrinkfleet.config import ConfigError, load_params

    try:
        return load_params(params)
    except ConfigError as exc:
        _fail(str(exc))


def preflight(fleet: Any, params: Path, root: Path, models: list[str]) -> list[str]:
    """Problems that would stop the run later, found now and all together (see :mod:`shrinkfleet.preflight`).

    Datasets are loaded and checked, output folders must be writable, an MLflow server in
    MLFLOW_TRACKING_URI must answer, remote storage needs credentials. Writes nothing.
    """
    from shrinkfleet.preflight import all_problems

    return all_problems(fleet, params, root, models)


@app.command()
def run(
    models: Annotated[
        str | None, typer.Option("--models", "-m", help="Comma-separated fleet members to run (default: all).")
    ] = None,
    params: ParamsOpt = None,
    root: RootOpt = Path("."),
    force: Annotated[
        bool, typer.Option("--force", help="Re-run every stage even if DVC says it is up to date.")
    ] = False,
    no_dvc: Annotated[bool, typer.Option("--no-dvc", help="Neither skip nor record stages with DVC.")] = False,
    workers: Annotated[
        int | None, typer.Option("--workers", "-w", min=1, help="Worker processes (default: run.workers).")
    ] = None,
    trigger: Annotated[str, typer.Option(help="Recorded in MLflow as the run's trigger tag.")] = "manual",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's own log lines.")] = False,
    engine: Annotated[
        str | None, typer.Option("--engine", help="process | dask (default: run.engine).", show_default=False)
    ] = None,
    dask_address: Annotated[
        str | None,
        typer.Option("--dask-address", help="Scheduler of an existing Dask cluster, e.g. tcp://10.0.0.5:8786 "
                     "(implies --engine dask; default: run.dask_address).", show_default=False),
    ] = None,
    if_busy: Annotated[
        str, typer.Option("--if-busy", help="Another run holds this project: wait for it, or refuse (exit 3).")
    ] = "wait",
) -> None:
    """Run the fleet: every stage of every model, then print and write the report.

    Stages DVC reports up to date are skipped, so a rerun with nothing changed trains
    nothing. Exit code 0 only if every model finished.
    """
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from shrinkfleet import locks

    if if_busy not in locks.IF_BUSY:
        _fail(f"--if-busy: {if_busy!r} is not a choice; one of: {', '.join(locks.IF_BUSY)}")
    root, params = _paths(root, params)
    fleet = _load(params)
    run_cfg = _run_config(fleet, workers, engine, dask_address)
    wanted = [m.strip() for m in models.split(",") if m.strip()] if models else None
    from shrinkfleet.config import ConfigError, select_models

    try:
        names = select_models(fleet.model_names(), wanted)
    except ConfigError as exc:
        _fail(str(exc))
    import flows.fleet as fleet_flow

    if no_dvc or force:
        # The run needs the temporary Prefect server (if no API is configured) whatever DVC says: it
        # comes up while the inputs are checked, and a run that stops at the checks stops it unused.
        # (With DVC, only DVC can say whether anything is to run, and asking it writes under .dvc/tmp,
        # which a run stopped by bad input must not do: that server starts when the run does.)
        fleet_flow.launch_server_early(params, root, names, False, force)
    problems = preflight(fleet, params, root, names)
    from shrinkfleet import versioning

    use_dvc = not no_dvc
    if use_dvc and not versioning.is_dvc_repo(root):
        err.print(f"[yellow]note:[/] {root} is not a DVC project (no .dvc/): stages are neither skipped nor recorded "
                  "(run `dvc init` to turn that on)", soft_wrap=True)
        use_dvc = False
    elif use_dvc and params != root / "params.yaml":
        err.print(f"[yellow]note:[/] DVC tracks {root / 'params.yaml'}; with --params {params} stages always run "
                  "and are not recorded", soft_wrap=True)
    if problems:
        _fail("cannot start:\n  " + "\n  ".join(problems))
    start = time.perf_counter()
    try:
        # Taken before anything is written or Prefect starts, so a refusal is immediate and leaves no trace;
        # the flow sees that this process holds it.
        with locks.run_lock(root, if_busy, on_wait=lambda info: err.print(
                f"[yellow]waiting:[/] {escape(locks.describe(info))} holds {root}; this run starts when it ends",
                soft_wrap=True)):
            # Only now, every check passed: this may create the bucket and writes the DVC remote into .dvc/config.
            _remote_storage(fleet, root)
            if use_dvc:
                _sync_pipeline(root, params, fleet)
            where = (f"Dask at {run_cfg.dask_address}" if run_cfg.dask_address
                     else f"{run_cfg.workers} {run_cfg.engine} worker(s)")
            console.print(f"[bold]shrinkfleet[/] fleet [cyan]{fleet.fleet}[/]: {len(names)} model(s), "
                          f"{where}, DVC {'on' if use_dvc else 'off'}")
            summary = _run_with_progress(params, root, names, force, use_dvc, trigger, workers, engine,
                                         dask_address)
    except locks.WorkspaceBusy as exc:
        _fail(str(exc), code=3)
    elapsed = time.perf_counter() - start
    _print_summary(root, names, summary, elapsed)
    failed = [m for m, r in summary["models"].items() if r["status"] != "ok"]
    raise typer.Exit(1 if failed else 0)


def _run_config(fleet: Any, workers: int | None, engine: str | None, dask_address: str | None) -> Any:
    """``run:`` with the command line's overrides; a bad one stops here (exit 2) naming the option."""
    from flows.fleet import ENGINES, resolve_run
    from shrinkfleet.config import ConfigError

    if engine is not None and engine not in ENGINES:
        _fail(f"--engine: {engine!r} is not an engine; one of: {', '.join(ENGINES)}")
    try:
        return resolve_run(fleet.run, workers, engine, dask_address)
    except ConfigError as exc:
        option = {"run.dask_address": "--dask-address", "run.engine": "--engine", "run.workers": "--workers"}
        key = str(exc).split(":", 1)[0]
        _fail(f"{option.get(key, key)}: {str(exc).split(':', 1)[1].strip()}")


def _run_with_progress(params: Path, root: Path, names: list[str], force: bool, use_dvc: bool, trigger: str,
                       workers: int | None, engine: str | None = None,
                       dask_address: str | None = None) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    import flows.fleet as fleet_flow

    progress = Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=False)
    bars = {m: progress.add_task(f"{m}: waiting", total=len(fleet_flow.STAGE_NAMES)) for m in names}
    fleet = _load(params)
    by_dataset: dict[str, list[str]] = {}
    for m in names:
        by_dataset.setdefault(fleet.models[m].dataset, []).append(m)

    def hook(event: dict[str, Any]) -> None:
        if event["stage"] == "notice":
            progress.console.print(f"[yellow]{escape(event['status'])}[/]", highlight=False)
            return
        if event["stage"] == "registry":
            colour = "green" if event["status"].startswith("promoted") else "yellow"
            progress.console.print(f"[{colour}]↑ {event['target']} {event['status']}[/]: {event.get('error', '')}",
                                   highlight=False)
            return
        targets = by_dataset.get(event["target"], []) if event["stage"] == "prepare" else [event["target"]]
        for m in targets:
            if m not in bars:
                continue
            if event["status"] == "failed":
                progress.update(bars[m], description=f"[red]{m}: {event['stage']} failed")
                progress.console.print(f"[red]✗ {m} {event['stage']}:[/] {event.get('error', '')}", highlight=False)
            else:
                progress.advance(bars[m])
                done = progress.tasks[bars[m]].completed
                label = "done" if done >= len(fleet_flow.STAGE_NAMES) else f"{event['stage']} {event['status']}"
                progress.update(bars[m], description=f"{m}: {label}")

    fleet_flow.progress_hook = hook
    try:
        with progress:
            return fleet_flow.run_fleet(params, root, names, force=force, use_dvc=use_dvc, trigger=trigger,
                                        workers=workers, engine=engine, dask_address=dask_address)
    finally:
        fleet_flow.progress_hook = None


def _print_summary(root: Path, names: list[str], summary: dict[str, Any], elapsed: float) -> None:
    from rich.table import Table

    from shrinkfleet import report
    from shrinkfleet.workspace import Workspace

    ws = Workspace(root)
    ok = [m for m in names if summary["models"][m]["status"] == "ok"]
    docs = report.load_metrics(ws, ok)
    if docs:
        gates = {m: summary["models"][m].get("gate") or {} for m in ok}
        table = report.formatted(report.variant_table(docs, gates))
        t = Table(title="Fleet variants", show_lines=False)
        for col in table.columns:
            t.add_column(col, justify="left" if col in ("model", "variant") else "right")
        for row in table.itertuples(index=False):
            t.add_row(*[str(v) for v in row])
        console.print(t)
    for m in names:
        r = summary["models"][m]
        if r["status"] != "ok":
            console.print(f"[red]✗ {m}[/]: {r.get('failed_stage', '?')} failed: {r.get('error', 'not run')}",
                          highlight=False)
        else:
            ran = [s for s, st in r["stages"].items() if st == "ran"]
            why = f" ({r['reason']})" if ran and r.get("reason") else ""
            line = f"[green]✓ {m}[/]: {'ran ' + ', '.join(ran) + why if ran else 'up to date, nothing ran'}"
            reg = r.get("registry")
            if reg:
                line += f"; production {'v' + reg['version'] if reg['version'] else 'unset'} ({reg['reason']})"
            console.print(line, highlight=False)
    console.print(f"Report: {summary['report']}   MLflow parent run: {summary['parent_run_id']}   "
                  f"wall time {elapsed:.0f}s")


def validate_schedule(cron: str, timezone: str) -> Any:
    """Prefect's own cron schedule for ``cron`` in ``timezone``; a ValueError names the bad option."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        first = exc.errors()[0]
        option = "--timezone" if "timezone" in first["loc"] else "--cron"
        detail = str(first["msg"]).removeprefix("Value error, ")
        example = " (five fields: minute hour day month weekday, e.g. '0 2 * * *')" if option == "--cron" else ""
        raise ValueError(f"{option}: {detail}{example}") from None


SERVED_DEPLOYMENT = "shrinkfleet-schedule"
SERVED_TAG = "served-by-shrinkfleet"


def _foreign_deployment(full_name: str) -> str | None:
    """How an existing deployment ``flow/name`` that ``schedule`` did not create came about, or None.

    None also when there is no such deployment.

    Raises:
        httpx.HTTPError: the Prefect API did not answer.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(full_name)
    except ObjectNotFound:
        return None
    if SERVED_TAG in (deployment.tags or []):
        return None
    pool = f"work pool {deployment.work_pool_name}" if deployment.work_pool_name else "no work pool"
    return f"entrypoint {deployment.entrypoint or '?'}, {pool}, tags {', '.join(deployment.tags or []) or 'none'}"


@app.command()
def schedule(
    cron: Annotated[str, typer.Option("--cron", help="When to run: a cron expression, e.g. '0 2 * * *' (02:00).")],
    timezone: Annotated[str, typer.Option("--timezone", help="IANA time zone the cron is read in.")] = "UTC",
    models: Annotated[
        str | None, typer.Option("--models", "-m", help="Comma-separated fleet members to run (default: all).")
    ] = None,
    params: ParamsOpt = None,
    root: RootOpt = Path("."),
    name: Annotated[str, typer.Option("--name", help="Name of the Prefect deployment (prefect.yaml's is "
                                      "shrinkfleet-nightly).")] = SERVED_DEPLOYMENT,
) -> None:
    """Serve the fleet flow on a cron schedule from this machine until stopped (Ctrl-C).

    The deployment is ``shrinkfleet-fleet/<name>``, tagged ``served-by-shrinkfleet``. A
    deployment of that name that this command did not create (``prefect deploy`` of
    prefect.yaml, say) is never replaced: the command stops and names it.

    Needs a Prefect server (PREFECT_API_URL): its scheduler creates the runs, and this process
    runs each one in a subprocess. Scheduled runs are tagged ``trigger=schedule`` in MLflow;
    `prefect deployment run` of the same deployment is tagged ``trigger=deployment``.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        cron_schedule = validate_schedule(cron, timezone)
    except ValueError as exc:
        _fail(str(exc))
    root, params = _paths(root, params)
    fleet = _load(params)
    wanted = [m.strip() for m in models.split(",") if m.strip()] if models else None
    from shrinkfleet.config import ConfigError, select_models

    try:
        names = select_models(fleet.model_names(), wanted)
    except ConfigError as exc:
        _fail(str(exc))
    problems = preflight(fleet, params, root, names)
    if problems:
        _fail("cannot start:\n  " + "\n  ".join(problems))
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL")
    if not api:
        _fail("PREFECT_API_URL is not set: a schedule needs a running Prefect server whose scheduler creates the "
              "runs (start one with `prefect server start`, then export PREFECT_API_URL=http://127.0.0.1:4200/api)")
    import httpx
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.fleet import fleet_flow

    try:
        other = _foreign_deployment(f"{fleet_flow.name}/{name}")
    except httpx.HTTPError as exc:
        _fail(f"the Prefect API at {api} does not answer ({type(exc).__name__}: {exc}); is `prefect server start` "
              "running there?")
    if other:
        _fail(f"deployment {fleet_flow.name}/{name} exists and was not created by `shrinkfleet schedule` "
              f"({other}); serving it would replace it. Pick another --name, or remove it first with "
              f"`prefect deployment delete {fleet_flow.name}/{name}`")
    console.print(f"[bold]shrinkfleet[/] serving deployment [cyan]shrinkfleet-fleet/{name}[/] on {api}: "
                  f"'{cron_schedule.cron}' ({cron_schedule.timezone}), fleet {fleet.fleet}, "
                  f"{len(names)} model(s); Ctrl-C stops it")
    fleet_flow.serve(
        name=name,
        schedules=[Cron(cron_schedule.cron, timezone=cron_schedule.timezone)],
        parameters={"params_file": str(params), "root": str(root), "models": wanted},
        tags=["shrinkfleet", "nightly", SERVED_TAG],
        # Run by module path: this process's cwd need not be the repository.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="prepare | teacher | distill | prune | compress | evaluate")],
    target: Annotated[str, typer.Argument(help="A dataset name (prepare) or a model name (other stages).")],
    sklearn_version: Annotated[
        str | None, typer.Option("--sklearn-version", help="prepare of a bundled set: the scikit-learn release "
                                 "dvc.yaml was written for (refused if this environment has another).")
    ] = None,
    params: ParamsOpt = None,
    root: RootOpt = Path("."),
) -> None:
    """Run one stage for one target, without Prefect or DVC bookkeeping (what dvc.yaml calls).

    Refuses to run when dvc.yaml is behind params.yaml: what DVC would record as this stage's
    inputs would not be what it read (`shrinkfleet sync` rewrites dvc.yaml).
    """
    from shrinkfleet import pipeline, versioning
    from shrinkfleet.config import ConfigError
    from shrinkfleet.datasets import DatasetError

    if name not in pipeline.STAGE_KINDS:
        _fail(f"unknown stage {name!r}; one of: {', '.join(pipeline.STAGE_KINDS)}")
    root, params = _paths(root, params)
    fleet = _load(params)
    names = fleet.datasets if name == "prepare" else fleet.models
    if target not in names:
        kind = "dataset" if name == "prepare" else "model"
        _fail(f"{target!r} is not a {kind} of the fleet (one of: {', '.join(names)})")
    if sklearn_version is not None and sklearn_version != pipeline.sklearn_version():
        _fail(f"dvc.yaml was written for scikit-learn {sklearn_version}, this environment has "
              f"{pipeline.sklearn_version()}: run `shrinkfleet sync` (then prepare-{target} re-runs)")
    if versioning.is_dvc_repo(root) and params == root / "params.yaml":
        behind = pipeline.changes(root, fleet)
        if behind:
            _fail(f"dvc.yaml is behind {params.name} ({pipeline.summary(behind)}): run `shrinkfleet sync`, "
                  "then `dvc repro` again")
    import importlib

    from tasks.common import context

    module = importlib.import_module(f"tasks.{name}")
    start = time.perf_counter()
    try:
        summary = module.run(context(root, params), target)
    except (ConfigError, DatasetError) as exc:
        _fail(str(exc))
    console.print(f"{pipeline.stage_name(name, target)}: done in {time.perf_counter() - start:.1f}s {summary}",
                  highlight=False)


def _sync_pipeline(root: Path, params: Path, fleet: Any) -> list[str]:
    """Rewrite dvc.yaml from the fleet when it is behind, saying so; what changed."""
    from shrinkfleet import pipeline

    changed = pipeline.sync(root, fleet)
    if changed:
        err.print(f"[yellow]note:[/] dvc.yaml rewritten from {params.name}: {escape(pipeline.summary(changed))}",
                  soft_wrap=True)
    return changed


@app.command()
def sync(params: ParamsOpt = None, root: RootOpt = Path(".")) -> None:
    """Write dvc.yaml from params.yaml: one DVC stage per dataset in use and per model stage.

    `shrinkfleet run` does this itself; run it before a bare `dvc repro` after editing the fleet.
    """
    root, params = _paths(root, params)
    fleet = _load(params)
    if params != root / "params.yaml":
        _fail(f"DVC tracks {root / 'params.yaml'}; dvc.yaml is written from that file only")
    if not _sync_pipeline(root, params, fleet):
        console.print(f"{root / 'dvc.yaml'} is up to date with {params.name}")


@app.command()
def validate(params: ParamsOpt = None, root: RootOpt = Path(".")) -> None:
    """Check params.yaml and everything a run needs, without running or writing anything.

    Keys, types and ranges; every dataset file, loaded and checked; the output folders; the
    MLflow server in MLFLOW_TRACKING_URI; S3 credentials when remote storage is configured.
    """
    root, params = _paths(root, params)
    fleet = _load(params)
    problems = preflight(fleet, params, root, fleet.model_names())
    if problems:
        _fail("\n  ".join([f"{params}:", *problems]))
    console.print(f"{params}: fleet [cyan]{fleet.fleet}[/] is valid: {len(fleet.models)} model(s) "
                  f"({', '.join(fleet.models)}) on {len(fleet.datasets_in_use())} dataset(s)")
    from shrinkfleet import pipeline, versioning

    if versioning.is_dvc_repo(root) and params == root / "params.yaml" and (behind := pipeline.changes(root, fleet)):
        err.print(f"[yellow]note:[/] dvc.yaml is behind {params.name} ({escape(pipeline.summary(behind))}); "
                  "the next `shrinkfleet run` (or `shrinkfleet sync`) rewrites it", soft_wrap=True)


@app.command()
def report(
    models: Annotated[str | None, typer.Option("--models", "--model", "-m",
                                               help="Comma-separated models (default: all).")] = None,
    since: Annotated[str | None, typer.Option(help="Only runs this recent: 30m, 12h, 7d, 2w (default: all).")] = None,
    params: ParamsOpt = None,
    root: RootOpt = Path("."),
) -> None:
    """Rebuild reports/fleet.md and fleet.html from MLflow and print the variant table.

    Each model's latest finished run (within --since) gives its variants; the trend plots
    show what production served after each run.
    """
    import datetime as dt

    from shrinkfleet import report as rep
    from shrinkfleet import tracking
    from shrinkfleet.workspace import Workspace

    root, params = _paths(root, params)
    fleet = _load(params)
    try:
        cutoff = dt.datetime.now(dt.UTC) - rep.parse_since(since) if since else None
    except ValueError as exc:
        _fail(str(exc))
    wanted = [m.strip() for m in models.split(",") if m.strip()] if models else None
    unknown = sorted(set(wanted or []) - set(fleet.model_names()))
    if unknown:
        _fail(f"--models: {', '.join(unknown)} not in {params.name} (fleet: {', '.join(fleet.model_names())})")
    experiment_id = tracking.setup(root, fleet.fleet)
    docs = rep.docs_from_mlflow(experiment_id, wanted, cutoff)
    if not docs:
        window = f" in the last {since}" if since else ""
        _fail(f"no finished model runs{window} in MLflow ({tracking.tracking_uri(root)}): run `shrinkfleet run` first",
              code=1)
    trends = rep.trends_from_mlflow(experiment_id, wanted, cutoff)
    latest = max(d["time"] for d in docs.values())
    path = rep.write_report(Workspace(root), docs, {}, {
        "fleet": fleet.fleet, "rebuilt from": tracking.tracking_uri(root),
        "latest run": latest.strftime("%Y-%m-%d %H:%M:%S UTC"), "window": since or "all runs",
        "models": ", ".join(docs)}, trends=trends)
    console.print(rep.markdown(rep.formatted(rep.variant_table(docs))))
    console.print(f"\nwrote {path} and {path.with_suffix('.html')}")


@app.command()
def decode(
    blob: Annotated[Path, typer.Argument(help="An entropy-coded variant (models/<model>/variants/<name>.sfc).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the .tflite flatbuffer.")],
) -> None:
    """Decode a .sfc blob back to its .tflite flatbuffer (byte-identical to the variant)."""
    from shrinkfleet import coding
    from shrinkfleet.storage import atomic_path

    try:
        content = coding.decode(blob.read_bytes())
    except OSError as exc:
        _fail(f"{blob}: {exc.strerror}")
    except coding.CodingError as exc:
        _fail(f"{blob}: {exc}")
    with atomic_path(out.resolve(), suffix=".tflite") as tmp:
        tmp.write_bytes(content)
    console.print(f"{blob} ({blob.stat().st_size:,} B) -> {out} ({len(content):,} B)")


# ----------------------------------------------------------------------------- registry


def _registry_setup(root: Path) -> None:
    import logging

    import mlflow

    from shrinkfleet import tracking

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking.tracking_uri(root))


def _split_ref(spec: str) -> tuple[str, str | None]:
    """``model``, ``model@alias`` or ``model:version`` -> (model, ref)."""
    for sep in ("@", ":"):
        if sep in spec:
            model, ref = spec.split(sep, 1)
            return model, sep + ref
    return spec, None


def _metric(mv: Any, name: str) -> float | None:
    value = mv.tags.get(f"shrinkfleet.metric.{name}")
    return float(value) if value not in (None, "") else None


def _fmt_version_row(mv: Any) -> list[str]:
    acc, mae, size, ratio = (_metric(mv, m) for m in ("accuracy", "mae", "size_bytes", "compression_ratio"))
    score = f"{acc * 100:.2f}" if acc is not None else f"MAE {mae:.4g}" if mae is not None else ""
    return [
        str(mv.version),
        mv.tags.get("shrinkfleet.variant", ""),
        score,
        f"{size:,.0f}" if size is not None else "",
        f"{ratio:.1f}x" if ratio is not None else "",
    ]


def _registry_call(fn, *args, **kwargs):
    from shrinkfleet.registry import RegistryError
    from shrinkfleet.restore import RestoreError

    try:
        return fn(*args, **kwargs)
    except (RegistryError, RestoreError) as exc:
        _fail(str(exc), code=1)


@app.command()
def status(params: ParamsOpt = None, root: RootOpt = Path(".")) -> None:
    """One line per fleet member: production version, its accuracy, bytes, ratio, when promoted."""
    from rich.table import Table

    from shrinkfleet import registry

    root, params = _paths(root, params)
    fleet = _load(params)
    _registry_setup(root)
    t = Table(title="Production (alias production)")
    for col in ("model", "version", "variant", "accuracy % | MAE", "bytes", "ratio", "promoted at", "versions"):
        t.add_column(col, justify="left" if col in ("model", "variant", "promoted at") else "right")
    for m in fleet.model_names():
        mv = registry.production(m)
        n = len(registry.versions(m))
        if mv is None:
            t.add_row(m, "-", "", "", "", "", "never promoted", str(n))
            continue
        row = _fmt_version_row(mv)
        t.add_row(m, row[0], row[1], row[2], row[3], row[4], mv.tags.get("shrinkfleet.promoted_at", "")[:19], str(n))
    console.print(t)


@app.command()
def history(
    model: Annotated[str, typer.Argument(help="A fleet member (its registered model).")],
    root: RootOpt = Path("."),
) -> None:
    """Every registered version of a model and every move of its production alias."""
    from rich.table import Table

    from shrinkfleet import registry

    root = root.resolve()
    _registry_setup(root)
    vs = registry.versions(model)
    if not vs:
        _fail(f"{model}: no registered versions yet (run `shrinkfleet run` first)", code=1)
    prod = registry.production(model)
    t = Table(title=f"{model}: versions")
    for col in ("version", "variant", "accuracy % | MAE", "bytes", "ratio", "created", "git", "state"):
        t.add_column(col)
    for mv in vs:
        created = _fmt_time(mv.creation_timestamp)
        state = "production" if prod is not None and str(prod.version) == str(mv.version) else ""
        if mv.tags.get("shrinkfleet.rolled_back_at"):
            state = (state + " rolled back").strip()
        t.add_row(*_fmt_version_row(mv), created, mv.tags.get("shrinkfleet.git_sha", "")[:12], state)
    console.print(t)
    ev = Table(title=f"{model}: moves of alias production")
    for col in ("time", "action", "from", "to", "reason", "by", "trigger"):
        ev.add_column(col)
    for e in registry.events(model):
        ev.add_row(e["time"], e["action"], f"v{e['from_version']}" if e["from_version"] else "-",
                   f"v{e['to_version']}", e["reason"], e["actor"], e["trigger"])
    console.print(ev)


def _fmt_time(ms: int | None) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if ms else ""


@app.command()
def promote(
    model: Annotated[str, typer.Argument(help="A fleet member.")],
    version: Annotated[str, typer.Argument(help="The version to put in production.")],
    force: Annotated[bool, typer.Option("--force", help="Promote even if the version fails the gate.")] = False,
    reason: Annotated[str, typer.Option("--reason", help="Why; recorded in the history.")] = "",
    params: ParamsOpt = None,
    root: RootOpt = Path("."),
) -> None:
    """Move production to a version; refuses one that fails the gate unless --force.

    The gate is the model's (``models.<name>.gate`` over ``gate:``), or the fleet's ``gate:`` for a
    registered model no longer in the fleet. A version that lacks a metric the gate bounds (its
    registry tags were removed, or it was registered by hand) fails closed: it cannot be checked,
    so it is refused unless --force.
    """
    from shrinkfleet import gate, registry

    root, params = _paths(root, params)
    fleet = _load(params)
    gate_cfg = fleet.resolve(model).gate if model in fleet.models else fleet.gate
    _registry_setup(root)

    def check(mv: Any) -> list[str]:
        drop = "error_increase" if _metric(mv, "error_increase") is not None else "accuracy_drop"
        bounded = {drop: True, "size_bytes": gate_cfg.max_size_bytes is not None,
                   "latency_ms_p50": gate_cfg.max_latency_ms_p50 is not None}
        metrics = {m: _metric(mv, m) for m, bound in bounded.items() if bound}
        missing = [m for m, v in metrics.items() if v is None]
        if missing:
            return [f"no {', '.join(missing)} recorded on v{mv.version} (tags shrinkfleet.metric.*): the gate "
                    "cannot check it"]
        return [str(f) for f in gate.check(metrics, gate_cfg)]

    previous = _registry_call(registry.promote, model, version, reason, force, check)
    console.print(f"{model}: production v{previous or '-'} -> v{version}")


@app.command()
def rollback(
    model: Annotated[str, typer.Argument(help="A fleet member.")],
    to: Annotated[str | None, typer.Option("--to", help="Version to go back to (default: the previous one).")] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why; recorded in the history.")] = "",
    root: RootOpt = Path("."),
) -> None:
    """Move production back to the previous production version (or --to a given one)."""
    from shrinkfleet import registry

    root = root.resolve()
    _registry_setup(root)
    old, new = _registry_call(registry.rollback, model, to, reason)
    console.print(f"{model}: production v{old} -> v{new} (v{old} is marked rolled back and will not be "
                  "re-promoted automatically)")


@app.command()
def lineage(
    spec: Annotated[str, typer.Argument(help="model, model@alias or model:version (default @production).")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    root: RootOpt = Path("."),
) -> None:
    """Where a version came from: dataset -> teacher -> student -> pruned -> variant -> version."""
    import json

    from shrinkfleet.lineage import lineage as build

    root = root.resolve()
    _registry_setup(root)
    model, ref = _split_ref(spec)
    info = _registry_call(build, model, ref)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    d = info["dataset"]
    console.print(f"[bold]{model} v{info['version']}[/] {' '.join('@' + a for a in info['aliases'])}  "
                  f"git {info['git_sha']}  content {info['content_sha256'][:23]}…", highlight=False)
    console.print(f"  dataset {d['name']}: digest {d['digest']}  DVC {d['path']} {d['dvc_md5']}", highlight=False)
    for step in info["chain"]:
        acc = (f"{step['accuracy'] * 100:.2f}%" if step["accuracy"] is not None
               else f"MAE {step['mae']:.4g}" if step.get("mae") is not None else "")
        console.print(f"  └─ {step['variant']:<16} run {step['run_id']}  {acc:>7}  {step['recipe']}", highlight=False)
        console.print(f"       {step['artifact']}  md5 {step['dvc_md5']}", highlight=False)
    console.print(f"  fleet run {info['fleet_run']['run_id']} (trigger {info['fleet_run']['trigger']}, "
                  f"Prefect flow run {info['fleet_run']['prefect_flow_run_id']})", highlight=False)
    changed = info["params_changed_from_defaults"]
    console.print("  settings that differ from the defaults: "
                  + (", ".join(f"{k}={v}" for k, v in changed.items()) or "none"), highlight=False)


@app.command()
def restore(
    spec: Annotated[str, typer.Argument(help="model, model@alias or model:version (default @production).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to restore into (created).")],
    root: RootOpt = Path("."),
) -> None:
    """Restore a version's prepared dataset and artifacts, byte-identical, from the DVC cache/remote."""
    import json

    from shrinkfleet import registry
    from shrinkfleet.restore import restore as do_restore

    root = root.resolve()
    _registry_setup(root)
    model, ref = _split_ref(spec)
    mv = _registry_call(registry.get_version, model, ref)
    outs = json.loads(mv.tags.get("shrinkfleet.dvc_outs", "{}"))
    if not outs:
        _fail(f"{model} v{mv.version} records no DVC hashes (it was registered with DVC off)", code=1)
    files = _registry_call(do_restore, root, outs, out.resolve())
    for rel, md5 in files:
        console.print(f"  {md5}  {rel}", highlight=False)
    console.print(f"{model} v{mv.version}: restored {len(files)} file(s) into {out} (md5 verified)")


# ----------------------------------------------------------------------------- remote storage


def _remote_storage(fleet: Any, root: Path, create_bucket: bool = True, required: bool = False) -> Any:
    """The S3 location from storage: / SHRINKFLEET_S3_*, made ready (credentials, bucket, DVC remote), or None.

    Exits with code 2, naming the cause, when it cannot be used (or is missing and ``required``).
    """
    from shrinkfleet import remote
    from shrinkfleet.config import ConfigError

    try:
        loc = remote.location(fleet.storage)
        if loc is None:
            if required:
                _fail("no remote storage configured: set storage.s3_bucket in params.yaml or SHRINKFLEET_S3_BUCKET "
                      "(plus storage.endpoint_url or SHRINKFLEET_S3_ENDPOINT_URL for MinIO)")
            return None
        remote.prepare(root, loc, create_bucket=create_bucket)
        remote.activate(fleet.storage)
    except (ConfigError, remote.RemoteError) as exc:
        _fail(f"remote storage: {exc}")
    return loc


@app.command()
def push(params: ParamsOpt = None, root: RootOpt = Path(".")) -> None:
    """Send every DVC-tracked dataset and artifact to the S3 remote (dvc push); creates the bucket if missing."""
    from shrinkfleet import remote, versioning

    root, params = _paths(root, params)
    fleet = _load(params)
    if not versioning.is_dvc_repo(root):
        _fail(f"{root}: not a DVC project (no .dvc/); nothing to push")
    loc = _remote_storage(fleet, root, create_bucket=True, required=True)
    try:
        n = remote.push(root)
    except remote.RemoteError as exc:
        _fail(str(exc), code=1)
    console.print(f"pushed {n} file(s) to {loc.dvc_url}", highlight=False)


@app.command()
def pull(params: ParamsOpt = None, root: RootOpt = Path(".")) -> None:
    """Fetch and check out every DVC-tracked dataset and artifact from the S3 remote (dvc pull), e.g. in a clone."""
    from shrinkfleet import remote, versioning

    root, params = _paths(root, params)
    fleet = _load(params)
    if not versioning.is_dvc_repo(root):
        _fail(f"{root}: not a DVC project (no .dvc/); nothing to pull")
    loc = _remote_storage(fleet, root, create_bucket=False, required=True)
    try:
        stats = remote.pull(root)
    except remote.RemoteError as exc:
        _fail(str(exc), code=1)
    console.print(f"pulled from {loc.dvc_url}: {len(stats.get('fetched', []) or [])} object(s) fetched, "
                  f"{len(stats.get('added', []) or [])} added, {len(stats.get('modified', []) or [])} modified",
                  highlight=False)


def main() -> None:  # pragma: no cover
    """The ``shrinkfleet`` command."""
    app(prog_name="shrinkfleet")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

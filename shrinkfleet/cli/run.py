"""`shrinkfleet run`: the fleet, with progress, and its summary."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from shrinkfleet.cli.common import (
    ParamsOpt,
    RootOpt,
    _fail,
    _load,
    _paths,
    _remote_storage,
    _sync_pipeline,
    app,
    console,
    err,
    preflight,
)


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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's log lines and the libraries' "
                                          "warnings and progress bars too (reports/run.log has them either way).")
                       ] = False,
    engine: Annotated[
        str | None, typer.Option("--engine", help="process | dask (default: run.engine).", show_default=False)
    ] = None,
    dask_address: Annotated[
        str | None,
        typer.Option("--dask-address", help="Scheduler of an existing Dask cluster, e.g. tcp://10.0.0.5:8786 "
                     "(implies --engine dask; default: run.dask_address).", show_default=False),
    ] = None,
    wide: Annotated[bool, typer.Option("--wide", help="The run table with every column, however wide the "
                                       "terminal.")] = False,
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
    if no_dvc or force or not (root / "dvc.lock").exists():
        # The run needs the temporary Prefect server (if no API is configured) whatever DVC says: it
        # starts now, before this process loads the flow's modules (about 2 s), and comes up while the
        # inputs are checked; a run that stops at the checks stops it unused. Without a dvc.lock no stage
        # was ever recorded, so a first run has everything to do. (Otherwise only DVC can say whether
        # anything is to run, and asking it writes under .dvc/tmp, which a run stopped by bad input must
        # not do: that server starts when the run does.)
        from flows.server import launch_early

        launch_early()
    fleet = _load(params)
    run_cfg = _run_config(fleet, workers, engine, dask_address)
    wanted = [m.strip() for m in models.split(",") if m.strip()] if models else None
    from shrinkfleet.config import ConfigError, select_models

    try:
        names = select_models(fleet.model_names(), wanted)
    except ConfigError as exc:
        _fail(str(exc))
    problems = preflight(fleet, params, root, names)
    from shrinkfleet import versioning

    use_dvc = not no_dvc
    if use_dvc and not versioning.is_dvc_repo(root):
        err.print(f"[yellow]note:[/] {root} is not a DVC project (no .dvc/): stages are neither skipped nor recorded "
                  "(run `dvc init` to turn that on)")
        use_dvc = False
    elif use_dvc and params != root / "params.yaml":
        err.print(f"[yellow]note:[/] DVC tracks {root / 'params.yaml'}; with --params {params} stages always run "
                  "and are not recorded")
    from flows.server import discard_early

    if problems:
        discard_early()  # (a server launched above for a run that will not happen)
        _fail("cannot start:\n  " + "\n  ".join(problems))
    start = time.perf_counter()
    try:
        # Taken before anything is written or Prefect starts, so a refusal is immediate and leaves no trace;
        # the flow sees that this process holds it.
        with locks.run_lock(root, if_busy, on_wait=lambda info: err.print(
                f"[yellow]waiting:[/] {escape(locks.describe(info))} holds {root}; this run starts when it ends")):
            # Only now, every check passed: this may create the bucket and writes the DVC remote into
            # .dvc/config, once the bucket answers (a run stopped here has written nothing).
            _remote_storage(fleet, root)
            # From here on third-party output goes to the run log (and its path to the workers and
            # `shrinkfleet stage`), on screen too with --verbose.
            from shrinkfleet import runlog

            runlog.install(root / runlog.RUN_LOG, verbose, fresh=True)
            if use_dvc:
                _sync_pipeline(root, params, fleet)
            where = (f"Dask at {run_cfg.dask_address}" if run_cfg.dask_address
                     else f"{run_cfg.workers} {run_cfg.engine} worker(s)")
            console.print(f"[bold]shrinkfleet[/] fleet [cyan]{fleet.fleet}[/]: {len(names)} model(s), "
                          f"{where}, DVC {'on' if use_dvc else 'off'}")
            summary = _run_with_progress(params, root, names, force, use_dvc, trigger, workers, engine,
                                         dask_address)
    except locks.WorkspaceBusy as exc:
        discard_early()
        _fail(str(exc), code=3)
    elapsed = time.perf_counter() - start
    _print_summary(root, names, summary, elapsed, fleet, wide)
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
    """Run the fleet, showing its progress: live bars in a terminal, else one line per stage transition.

    Off a terminal (cron, a CI log, a pipe) redrawn bars would be a wall of carriage returns, so each
    stage that ends prints a line (``digits-mlp  teacher  ran (3.2s)``) as it happens. In a terminal the
    registry's lines (``↑ m promoted v3``) wait until the bars are complete and print below them, so the
    screen reads top to bottom: progress, what production became, the table.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    import flows.fleet as fleet_flow

    live = console.is_terminal
    progress = Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=False, disable=not live)
    bars = {m: progress.add_task(f"{m}: waiting", total=len(fleet_flow.STAGE_NAMES)) for m in names}
    fleet = _load(params)
    by_dataset: dict[str, list[str]] = {}
    for m in names:
        by_dataset.setdefault(fleet.models[m].dataset, []).append(m)
    held: list[str] = []  # registry lines, printed once the bars are done
    width = max(len(m) for m in names)

    def say(line: str) -> None:
        progress.console.print(line, highlight=False, soft_wrap=not live)

    def hook(event: dict[str, Any]) -> None:
        if event["stage"] == "notice":
            say(f"[yellow]{escape(event['status'])}[/]")
            return
        if event["stage"] == "registry":
            colour = "green" if event["status"].startswith("promoted") else "yellow"
            line = f"[{colour}]↑ {escape(event['target'])} {event['status']}[/]: {escape(event.get('error', ''))}"
            if live:
                held.append(line)
            else:
                say(line)
            return
        targets = by_dataset.get(event["target"], []) if event["stage"] == "prepare" else [event["target"]]
        if not live and event["status"] != "failed":
            seconds = f" ({event['seconds']:.1f}s)" if event.get("seconds") else ""
            say(f"{escape(event['target']):<{width}}  {event['stage']:<8}  {event['status']}{seconds}")
        for m in targets:
            if m not in bars:
                continue
            if event["status"] == "failed":
                progress.update(bars[m], description=f"[red]{m}: {event['stage']} failed")
                say(f"[red]✗ {escape(m)} {event['stage']}:[/] {escape(event.get('error', ''))}")
            else:
                progress.advance(bars[m])
                done = progress.tasks[bars[m]].completed
                label = "done" if done >= len(fleet_flow.STAGE_NAMES) else f"{event['stage']} {event['status']}"
                progress.update(bars[m], description=f"{m}: {label}")

    try:
        with progress:
            return fleet_flow.run_fleet(params, root, names, force=force, use_dvc=use_dvc, trigger=trigger,
                                        workers=workers, engine=engine, dask_address=dask_address, on_event=hook)
    finally:
        for line in held:
            say(line)


SUMMARY_COLUMNS = ("model", "variant", "accuracy %", "MAE", "coded", "coded ratio", "gate", "prod")
"""The run table's columns at any width; ``--wide`` adds every other column of the report's table."""


def summary_rows(docs: dict[str, Any], summary: dict[str, Any], wide: bool) -> tuple[list[str], list[list[str]]]:
    """The run table: header and rows, the variant production serves marked in column ``prod``.

    Without ``wide`` only :data:`SUMMARY_COLUMNS` (the gate's verdict shortened to pass/fail);
    with it every column of :func:`shrinkfleet.report.formatted` and the gate's full verdict.
    """
    gates = {m: summary["models"][m].get("gate") or {} for m in docs}
    served = {m: (summary["models"][m].get("registry") or {}).get("serving") for m in docs}
    return variant_rows(docs, gates, served, wide)


def variant_rows(docs: dict[str, Any], gates: dict[str, dict[str, str]], served: dict[str, str | None],
                 wide: bool) -> tuple[list[str], list[list[str]]]:
    """:func:`summary_rows` from its parts: verdicts per model and variant, the served variant per model."""
    from shrinkfleet import report

    table = report.formatted(report.variant_table(docs, gates))
    table["prod"] = [("◆" if served.get(m) == v.removesuffix(" *") else "")
                     for m, v in zip(table["model"], table["variant"], strict=True)]
    if not any(served.values()):
        table = table.drop(columns="prod")
    if not wide:
        if "gate" in table:
            table["gate"] = table["gate"].map(lambda g: g.split(":", 1)[0])
        table = table[[c for c in SUMMARY_COLUMNS if c in table.columns]]
    return list(table.columns), [[str(v) for v in row] for row in table.itertuples(index=False)]


def _print_summary(root: Path, names: list[str], summary: dict[str, Any], elapsed: float, fleet: Any = None,
                   wide: bool = False) -> None:
    from shrinkfleet import report
    from shrinkfleet.cli.common import print_table
    from shrinkfleet.workspace import Workspace

    ws = Workspace(root)
    ok = [m for m in names if summary["models"][m]["status"] == "ok"]
    docs = report.load_metrics(ws, ok)
    if docs:
        header, rows = summary_rows(docs, summary, wide)
        print_table("Fleet variants", header, rows, left=("gate",), wide=wide, group="model",
                    legend="* on the Pareto front" + ("   ◆ production serves it" if "prod" in header else "")
                    + ("" if wide else "   (--wide: every column)"))
        for m, doc in docs.items():
            serving = (summary["models"][m].get("registry") or {}).get("serving")
            note = report.served_note(doc, serving, fleet.resolve(m).gate) if fleet is not None else ""
            if note:
                console.print(note, highlight=False)
    # One line per model, never wrapped (cron logs and tests read them whole; a terminal wraps them itself).
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
    from shrinkfleet import runlog

    console.print(f"Report: {summary['report']}   MLflow parent run: {summary['parent_run_id']}   "
                  f"wall time {elapsed:.0f}s")
    console.print(f"Libraries' warnings and progress: {root / runlog.RUN_LOG}", highlight=False)

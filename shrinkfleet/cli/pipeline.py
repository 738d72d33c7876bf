"""The pipeline's own commands: `stage` (what `dvc repro` calls), `sync`, `validate`, `report`, `decode`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from shrinkfleet.cli.common import (
    JsonOpt,
    ModelsOpt,
    ParamsOpt,
    RootOpt,
    WideOpt,
    _fail,
    _load,
    _paths,
    _sync_pipeline,
    app,
    console,
    err,
    preflight,
    print_json,
    print_table,
    selected,
)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(
        metavar="STAGE", help="prepare | teacher | distill | prune | compress | evaluate")],
    target: Annotated[str, typer.Argument(
        metavar="TARGET", help="A dataset name (prepare) or a model name (other stages).")],
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
        from shrinkfleet.config import did_you_mean

        _fail(f"{target!r} is not a {kind} of the fleet{did_you_mean(target, names)} (one of: {', '.join(names)})")
    if sklearn_version is not None and sklearn_version != pipeline.sklearn_version():
        _fail(f"dvc.yaml was written for scikit-learn {sklearn_version}, this environment has "
              f"{pipeline.sklearn_version()}: run `shrinkfleet sync` (then prepare-{target} re-runs)")
    if versioning.is_dvc_repo(root) and params == root / "params.yaml":
        behind = pipeline.changes(root, fleet)
        if behind:
            _fail(f"dvc.yaml is behind {params.name} ({pipeline.summary(behind)}): run `shrinkfleet sync`, "
                  "then `dvc repro` again")
    import importlib

    from shrinkfleet import runlog
    from tasks.common import context

    # Under `shrinkfleet run` the run's log (SHRINKFLEET_RUN_LOG); under a bare `dvc repro`, the project's.
    runlog.install(None if os.environ.get(runlog.LOG_ENV) else root / runlog.RUN_LOG)

    module = importlib.import_module(f"tasks.{name}")
    start = time.perf_counter()
    try:
        summary = module.run(context(root, params), target)
    except (ConfigError, DatasetError) as exc:
        _fail(str(exc))
    runlog.debug_line("stage", f"{pipeline.stage_name(name, target)} result: {summary!r}")
    console.print(f"{pipeline.stage_name(name, target)}: done in {time.perf_counter() - start:.1f}s"
                  f"{_brief(summary)}", highlight=False)


def _brief(summary: object) -> str:
    """A stage's result for a person: its few scalar numbers and words, ``(sparsity 0.50, from student)``.

    The whole result (nested layers, lists) goes to the run log only.
    """
    if not isinstance(summary, dict):
        return ""
    parts = []
    for key, value in summary.items():
        if isinstance(value, bool) or value in (None, ""):
            continue
        if isinstance(value, float):
            parts.append(f"{key} {value:.3g}")
        elif isinstance(value, int | str) and len(str(value)) <= 40:
            parts.append(f"{key} {value}")
    return f" ({', '.join(parts)})" if parts else ""


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
def validate(models: ModelsOpt = None, as_json: JsonOpt = False, params: ParamsOpt = None,
             root: RootOpt = Path(".")) -> None:
    """Check params.yaml and everything a run needs, without running or writing anything.

    Keys, types and ranges; every dataset file, loaded and checked; the output folders; the
    MLflow server in MLFLOW_TRACKING_URI; S3 credentials when remote storage is configured.
    --models checks what a run of those members needs; --json prints
    ``{"params", "fleet", "models", "problems"}`` (exit 2 when there are problems). A file that
    does not parse is reported as usual, on stderr.
    """
    root, params = _paths(root, params)
    fleet = _load(params)
    names = selected(fleet, models)
    problems = preflight(fleet, params, root, names)
    if as_json:
        print_json({"params": str(params), "fleet": fleet.fleet, "models": names, "problems": problems})
        raise typer.Exit(2 if problems else 0)
    if problems:
        _fail("\n  ".join([f"{params}:", *problems]))
    console.print(f"{params}: fleet [cyan]{fleet.fleet}[/] is valid: {len(names)} model(s) "
                  f"({', '.join(names)}) on {len(fleet.datasets_in_use())} dataset(s)")
    from shrinkfleet import pipeline, versioning

    if versioning.is_dvc_repo(root) and params == root / "params.yaml" and (behind := pipeline.changes(root, fleet)):
        err.print(f"[yellow]note:[/] dvc.yaml is behind {params.name} ({escape(pipeline.summary(behind))}); "
                  "the next `shrinkfleet run` (or `shrinkfleet sync`) rewrites it")


@app.command()
def report(
    models: Annotated[str | None, typer.Option("--models", "--model", "-m",
                                               help="Comma-separated models (default: all).")] = None,
    since: Annotated[str | None, typer.Option(help="Only runs this recent: 30m, 12h, 7d, 2w (default: all).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Folder for fleet.md, fleet.html and plots/ (default: reports/rebuilt-<time>; "
        "reports itself replaces the last run's report).")] = None,
    wide: WideOpt = False,
    params: ParamsOpt = None,
    root: RootOpt = Path("."),
) -> None:
    """Rebuild the fleet report from MLflow and print the variant table.

    The same report a run writes: each model's latest finished run (within
    --since) gives its variants and the gate's verdicts, the registry what
    production serves, params.yaml the fleet's order and gates. It goes to a
    new folder, so the run's own report stays as it was, unless --out names
    reports/.
    """
    import datetime as dt

    from shrinkfleet import report as rep
    from shrinkfleet import times, tracking
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
        from shrinkfleet.config import did_you_mean

        hints = "".join(did_you_mean(m, fleet.model_names()) for m in unknown)
        _fail(f"--models: {', '.join(unknown)} not in {params.name}{hints} (fleet: {', '.join(fleet.model_names())})")
    names = wanted or fleet.model_names()
    experiment_id = tracking.setup(root, fleet.fleet)
    docs = rep.docs_from_mlflow(experiment_id, names, cutoff)
    if not docs:
        window = f" in the last {since}" if since else ""
        _fail(f"no finished model runs{window} in MLflow ({tracking.tracking_uri(root)}): run `shrinkfleet run` first",
              code=1)
    ws = Workspace(root)
    now = dt.datetime.now(dt.UTC)
    folder = (out if out.is_absolute() else root / out) if out else ws.reports / f"rebuilt-{now:%Y%m%d-%H%M%S}"
    trends = rep.trends_from_mlflow(experiment_id, list(docs), cutoff)
    verdicts, served = rep.verdicts_of(docs), rep.served_variants(list(docs))
    latest = max(d["time"] for d in docs.values())
    path = rep.write_report(ws, docs, {}, {
        "fleet": fleet.fleet, "rebuilt from": tracking.tracking_uri(root),
        "latest run": times.shown(latest), "window": since or "all runs",
        "models": ", ".join(docs)}, outcomes={m: {"gate": verdicts[m]} for m in docs}, trends=trends,
        served=served, gates={m: fleet.resolve(m).gate.model_dump() for m in docs},
        moves=rep.moves_from_registry(list(docs)), out=folder, pareto_x=fleet.report.pareto_x)
    from shrinkfleet.cli.run import variant_rows

    header, rows = variant_rows(docs, verdicts, {m: rep.served_here(d, served.get(m)) for m, d in docs.items()}, wide)
    print_table("Fleet variants (from MLflow)", header, rows, left=("gate",), wide=wide, group="model",
                legend="* on the Pareto front" + ("   ◆ production serves it" if "prod" in header else "")
                + ("" if wide else "   (--wide: every column)"))
    for m, doc in docs.items():
        console.print(f"{m}: {rep.production_note(doc, served.get(m), verdicts[m])}", highlight=False)
    replaced = folder.resolve() == ws.reports.resolve()
    console.print(f"\nwrote {path} and {path.with_suffix('.html')}"
                  + (" (replacing the last run's report)" if replaced else ""), highlight=False)


@app.command()
def decode(
    blob: Annotated[Path, typer.Argument(
        metavar="FILE.sfc", help="An entropy-coded variant (models/<model>/variants/<name>.sfc).")],
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

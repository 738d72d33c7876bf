"""What every command shares: the app, the consoles, the options, failing with a message."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand

from shrinkfleet import no_telemetry

no_telemetry()  # before any command imports MLflow or Prefect

class PlainUsageCommand(TyperCommand):
    """A command whose usage line names its arguments as click does: ``MODEL VERSION``, ``[FILE]``.

    (Typer's own usage line wraps every required argument in braces, ``{MODEL} {VERSION}``.)
    """

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or (param.name or "").upper()
                name += "..." if param.nargs != 1 else ""
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class _App(typer.Typer):
    """``typer.Typer`` whose commands default to :class:`PlainUsageCommand`."""

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or PlainUsageCommand, **kwargs)


app = _App(
    name="shrinkfleet",
    help="Compress a whole fleet of models every night: distil, prune, cluster, quantize, entropy-code, evaluate, "
    "track, register.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's own help layout: flags show no `<bool>` placeholder, paragraphs are re-wrapped to the
    # terminal, arguments read `MODEL VERSION` (their metavar) in the usage line.
    rich_markup_mode=None,
)

def _version_callback(value: bool) -> None:
    if value:
        from shrinkfleet import __version__

        typer.echo(f"shrinkfleet {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", help="Print shrinkfleet's version and exit.",
                                          callback=_version_callback, is_eager=True)] = False,
) -> None:
    """Compress a whole fleet of models every night: distil, prune, cluster, quantize, entropy-code, evaluate,
    track, register."""

# Off a terminal (CI logs, `make run | tee`) Rich would assume 80 columns: such output gets 200 unless COLUMNS
# says otherwise (a terminal's own width is always used). Messages are printed whole (soft wrap: the terminal
# folds them, no line break is inserted), so a path, run id or digest in one can be grepped from a log;
# tables (print_table) and prose meant for 80 columns pass soft_wrap=False.
console = (Console(soft_wrap=True) if Console().is_terminal or os.environ.get("COLUMNS", "").isdigit()
           else Console(width=200, soft_wrap=True))
err = Console(stderr=True, soft_wrap=True)

ParamsOpt = Annotated[
    Path | None,
    typer.Option("--params", "-p", help="Fleet definition (default: <root>/params.yaml).", show_default=False),
]
ModelsOpt = Annotated[
    str | None,
    typer.Option("--models", "-m", help="Comma-separated fleet members (default: all).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON) on stdout.")]
WideOpt = Annotated[bool, typer.Option("--wide", help="Every column, however wide the terminal.")]
RootOpt = Annotated[
    Path,
    typer.Option("--root", help="Project folder holding dvc.yaml; artifacts are written under it."),
]


COMPACT_BELOW = 100
"""A console narrower than this gets compact tables: no box, one space between columns."""


def print_table(title: str, header: list[str], rows: list[list[str]], *, names: tuple[str, ...] = ("model", "variant"),
                left: tuple[str, ...] = (), legend: str = "", wide: bool = False, group: str | None = None,
                out: Console | None = None) -> None:
    """Print a table whose name columns (``names``) are never cut, compact on a narrow console.

    Name columns (and times, passed in ``names`` too) neither wrap nor shorten: their minimum
    width is their longest cell; the other columns give way. Below :data:`COMPACT_BELOW`
    columns the table drops its box and padding, so 80 columns hold a model name, a variant
    name and a few numbers; there a ``group`` column (the model of the run table's variants)
    becomes a heading row above its rows instead of a column. A table that cannot fit
    (``wide``: every column unwrapped; else its name columns) is printed wider than the
    console, its lines left for the terminal or ``less -S`` to wrap, rather than cut.
    """
    from rich import box
    from rich.measure import Measurement
    from rich.table import Table

    out = out or console
    compact = out.width < COMPACT_BELOW
    if compact and group in header and len(header) > 2:
        at = header.index(group)
        grouped: list[list[str]] = []
        last = None
        for r in rows:
            if not grouped or r[at] != last:
                last = r[at]
                grouped.append([last] + [""] * (len(header) - 2))
            grouped.append(["  " + r[at + 1], *r[:at], *r[at + 2:]])
        header = [f"{group} / {header[at + 1]}", *header[:at], *header[at + 2:]]
        names = (*names, header[0])
        rows = grouped
    t = Table(title=title, box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD, pad_edge=not compact,
              padding=(0, 1), title_justify="left" if compact else "center")
    for i, col in enumerate(header):
        if col in names:
            width = max([len(col), *(len(r[i]) for r in rows)])
            t.add_column(col, no_wrap=True, min_width=width, overflow="ignore",
                         justify="left" if col in left or col in ("model", "variant") else "right")
        else:
            t.add_column(col, justify="left" if col in left else "right")
    for r in rows:
        t.add_row(*r)
    need = Measurement.get(out, out.options.update_width(10_000), t)
    target = need.maximum if wide else need.minimum
    if target > out.width:
        out = Console(file=out.file, width=target, force_terminal=out.is_terminal, color_system=out.color_system,
                      highlight=False)
    out.print(t, soft_wrap=False)
    if legend:
        out.print(legend, highlight=False, style="dim", soft_wrap=False)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def fleet_member(fleet: Any, model: str, params: Path) -> None:
    """Exit 2 unless ``model`` is one of the fleet's, naming the closest and every member."""
    from shrinkfleet.config import did_you_mean

    names = fleet.model_names()
    if model not in names:
        _fail(f"{model!r} is not a fleet member of {params.name}{did_you_mean(model, names)} "
              f"(the fleet: {', '.join(names)})")


def selected(fleet: Any, models: str | None) -> list[str]:
    """The fleet members ``--models`` names (all when unset), in fleet order; exit 2 on an unknown one."""
    from shrinkfleet.config import ConfigError, select_models

    wanted = [m.strip() for m in models.split(",") if m.strip()] if models else None
    try:
        return select_models(fleet.model_names(), wanted)
    except ConfigError as exc:
        _fail(str(exc))


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout, nothing else (for scripts and ``jq``)."""
    import json

    print(json.dumps(data, indent=2, default=str))


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


def _sync_pipeline(root: Path, params: Path, fleet: Any) -> list[str]:
    """Rewrite dvc.yaml from the fleet when it is behind, saying so; what changed."""
    from shrinkfleet import pipeline

    changed = pipeline.sync(root, fleet)
    if changed:
        err.print(f"[yellow]note:[/] dvc.yaml rewritten from {params.name}: {escape(pipeline.summary(changed))}")
    return changed

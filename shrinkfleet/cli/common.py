"""What every command shares: the app, the consoles, the options, failing with a message."""

from __future__ import annotations

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
        err.print(f"[yellow]note:[/] dvc.yaml rewritten from {params.name}: {escape(pipeline.summary(changed))}",
                  soft_wrap=True)
    return changed

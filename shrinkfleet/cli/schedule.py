"""`shrinkfleet schedule`: the fleet as a nightly Prefect deployment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from shrinkfleet.cli.common import (
    ParamsOpt,
    RootOpt,
    _fail,
    _load,
    _paths,
    app,
    console,
    preflight,
)


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

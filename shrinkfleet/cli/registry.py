"""The registry's commands: `status`, `history`, `promote`, `rollback`, `lineage`, `restore`."""

from __future__ import annotations

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
)


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

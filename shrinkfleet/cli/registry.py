"""The registry's commands: `status`, `history`, `promote`, `rollback`, `lineage`, `restore`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from shrinkfleet.cli.common import (
    JsonOpt,
    ModelsOpt,
    ParamsOpt,
    RootOpt,
    WideOpt,
    _fail,
    _load,
    _paths,
    app,
    console,
    err,
    fleet_member,
    print_json,
    print_table,
    selected,
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


def _git_shown(sha: str) -> str:
    """A version's commit as people read it: ``1a2b3c4d dirty`` (uncommitted changes), ``-`` if unknown."""
    if not sha or sha == "unknown":
        return "-"
    return sha.removesuffix("+dirty")[:8] + (" dirty" if sha.endswith("+dirty") else "")


def _changes_shown(changed: dict[str, tuple[Any, Any]] | str) -> str:
    """The settings that changed since the version before, with their values (``teacher.epochs '2' -> '3'``)."""
    if changed == "unknown":
        return "? (its model run is gone)"
    if changed == "first":
        return "(first version)"
    if not changed:
        return "none"
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())


def _changes_json(changed: dict[str, tuple[Any, Any]] | str) -> Any:
    """:func:`shrinkfleet.registry.settings_changed`'s entry as JSON: ``{key: {"before", "now"}}`` or the word."""
    if isinstance(changed, str):
        return changed
    return {k: {"before": old, "now": new} for k, (old, new) in changed.items()}


def _score(mv: Any) -> str:
    acc, mae = _metric(mv, "accuracy"), _metric(mv, "mae")
    return f"{acc * 100:.2f}" if acc is not None else f"MAE {mae:.4g}" if mae is not None else ""


def _version_json(mv: Any) -> dict[str, Any]:
    """A registry version as plain data: its number, variant, metrics, git sha and times (ISO-8601)."""
    import datetime as dt

    return {
        "version": str(mv.version),
        "variant": mv.tags.get("shrinkfleet.variant", ""),
        "metrics": {m: _metric(mv, m) for m in ("accuracy", "accuracy_drop", "mae", "error_increase", "size_bytes",
                                                  "compression_ratio", "coded_bytes", "coded_ratio", "sparsity",
                                                  "latency_ms_p50") if _metric(mv, m) is not None},
        "recipe": mv.tags.get("shrinkfleet.recipe", ""),
        "git_sha": mv.tags.get("shrinkfleet.git_sha", "").removesuffix("+dirty"),
        "git_dirty": mv.tags.get("shrinkfleet.git_sha", "").endswith("+dirty"),
        "created": dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, dt.UTC).isoformat(),
        "promoted_at": mv.tags.get("shrinkfleet.promoted_at") or None,
        "rolled_back_at": mv.tags.get("shrinkfleet.rolled_back_at") or None,
    }


def _registry_call(fn, *args, **kwargs):
    from shrinkfleet.registry import RegistryError
    from shrinkfleet.restore import RestoreError

    try:
        return fn(*args, **kwargs)
    except (RegistryError, RestoreError) as exc:
        _fail(str(exc), code=1)


def _served_note(root: Path, fleet: Any, model: str, mv: Any) -> str:
    """Why production is not the Pareto front's smallest, from the last run's metrics ("" when it is)."""
    from shrinkfleet import report
    from shrinkfleet.workspace import Workspace

    docs = report.load_metrics(Workspace(root), [model])
    if model not in docs or model not in fleet.models:
        return ""
    return report.served_note(docs[model], mv.tags.get("shrinkfleet.variant"), fleet.resolve(model).gate)


@app.command()
def status(
    models: ModelsOpt = None,
    wide: WideOpt = False,
    as_json: JsonOpt = False,
    params: ParamsOpt = None,
    root: RootOpt = Path("."),
) -> None:
    """One line per fleet member: the version and variant production serves, its accuracy and bytes.

    With --wide also the ratio, when it was promoted, how many versions exist and the git sha.
    A line under the table explains a member whose production variant is not its Pareto
    front's smallest (the gate's objective, or the smallest failing the gate, decided).
    """
    from shrinkfleet import registry, times

    root, params = _paths(root, params)
    fleet = _load(params)
    names = selected(fleet, models)
    _registry_setup(root)
    rows, data, notes = [], [], []
    for m in names:
        mv = registry.production(m)
        n = len(registry.versions(m))
        if mv is None:
            data.append({"model": m, "production": None, "versions": n})
            rows.append([m, "-", "never promoted", "", "", "", "", "", "", str(n)])
            continue
        data.append({"model": m, "production": _version_json(mv), "versions": n})
        coded, sparsity = _metric(mv, "coded_bytes"), _metric(mv, "sparsity")
        ratio = _metric(mv, "coded_ratio")
        size = _metric(mv, "size_bytes")
        rows.append([m, f"v{mv.version}", mv.tags.get("shrinkfleet.variant", ""), _score(mv),
                     f"{coded:,.0f}" if coded is not None else "", f"{sparsity:.0%}" if sparsity is not None else "",
                     f"{size:,.0f}" if size is not None else "", f"{ratio:.1f}x" if ratio is not None else "",
                     times.shown(mv.tags.get("shrinkfleet.promoted_at")), str(n),
                     _git_shown(mv.tags.get("shrinkfleet.git_sha", ""))])
        if note := _served_note(root, fleet, m, mv):
            notes.append(note)
            data[-1]["note"] = note
    if as_json:
        print_json(data)
        return
    header = ["model", "prod", "variant", "acc % | MAE", "coded", "sparsity", "bytes", "coded ratio", "promoted",
              "versions", "git"]
    keep = len(header) if wide else 5
    print_table("Production (alias production)", header[:keep], [r[:keep] for r in rows],
                names=("model", "prod", "variant", "promoted"), left=("prod", "promoted", "git"), wide=wide,
                legend="" if wide else "(--wide: sparsity, bytes, coded ratio, promoted, versions, git)")
    for note in notes:
        console.print(note, highlight=False)


@app.command()
def history(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="A fleet member (its registered model).")],
    wide: WideOpt = False,
    as_json: JsonOpt = False,
    params: ParamsOpt = None,
    root: RootOpt = Path("."),
) -> None:
    """Every registered version of a model and every move of its production alias.

    MODEL must be a fleet member, or a model the registry still holds versions of; anything
    else stops with exit 2 naming the fleet's members. --wide adds the ratio, git sha, who
    moved production and the run's trigger.
    """
    from shrinkfleet import registry, times

    root, params = _paths(root, params)
    fleet = _load(params)
    _registry_setup(root)
    vs = registry.versions(model)
    if model not in fleet.models and not vs:
        fleet_member(fleet, model, params)
    prod = registry.production(model)
    events = registry.events(model)
    if as_json:
        changes = registry.settings_changed(vs)
        print_json({"model": model, "production": str(prod.version) if prod else None,
                    "versions": [{**_version_json(mv), "settings_changed": _changes_json(changes[str(mv.version)])}
                                 for mv in vs], "moves": events})
        return
    if model not in fleet.models:
        err.print(f"[yellow]note:[/] {model} is not in {params.name} any more; its registered versions:")
    if not vs:
        console.print(f"{model}: no registered versions yet (run `shrinkfleet run` first)")
        return
    rows, lines = [], []
    changes = registry.settings_changed(vs)
    for n, mv in enumerate(vs):
        state = "◆ prod" if prod is not None and str(prod.version) == str(mv.version) else ""
        if mv.tags.get("shrinkfleet.rolled_back_at"):
            state = (state + " rolled back").strip()
        coded, sparsity = _metric(mv, "coded_bytes"), _metric(mv, "sparsity")
        size, ratio = _metric(mv, "size_bytes"), _metric(mv, "coded_ratio")
        git = _git_shown(mv.tags.get("shrinkfleet.git_sha", ""))
        changed = changes[str(mv.version)]
        rows.append([f"v{mv.version}", mv.tags.get("shrinkfleet.variant", ""), _score(mv),
                     f"{coded:,.0f}" if coded is not None else "", f"{sparsity:.0%}" if sparsity is not None else "",
                     state, git, times.shown(mv.creation_timestamp), _changes_shown(changed),
                     f"{size:,.0f}" if size is not None else "", f"{ratio:.1f}x" if ratio is not None else ""])
        if n:
            before = _git_shown(vs[n - 1].tags.get("shrinkfleet.git_sha", ""))
            code = f"git {git}" + (f" (was {before})" if before != git else " (same)")
            lines.append(f"v{mv.version} (vs v{vs[n - 1].version}): {code}; settings: {_changes_shown(changed)}")
    header = ["version", "variant", "acc % | MAE", "coded", "sparsity", "state", "git", "created", "settings changed",
              "bytes", "coded ratio"]
    keep = len(header) if wide else 6
    print_table(f"{model}: versions", header[:keep], [r[:keep] for r in rows],
                names=("version", "variant", "state", "git", "created"),
                left=("state", "git", "created", "settings changed"), wide=wide,
                legend="◆ production serves it" + ("" if wide else "   (--wide: git, created, settings, bytes)"))
    if lines and not wide:
        # (wrapped at the terminal's width: these lines are prose for people, --json is for scripts)
        console.print("What changed from one version to the next (git commit; settings of its model run):",
                      highlight=False, soft_wrap=False)
        for line in lines:
            console.print(f"  {line}", highlight=False, soft_wrap=False)
    moves = [[times.shown(e["time"]), e["action"], f"v{e['from_version']}" if e["from_version"] else "-",
              f"v{e['to_version']}", e["reason"], e["actor"], e["trigger"]] for e in events]
    header = ["time", "action", "from", "to", "reason", "by", "trigger"]
    keep = len(header) if wide else 5
    print_table(f"{model}: moves of alias production", header[:keep], [r[:keep] for r in moves],
                names=("time", "action", "from", "to"), left=("reason", "by", "trigger"), wide=wide,
                legend="" if wide else "(--wide: who moved production, trigger)")


@app.command()
def promote(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="A fleet member.")],
    version: Annotated[str, typer.Argument(metavar="VERSION", help="The version to put in production.")],
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
                   "macs": gate_cfg.max_macs is not None,
                   gate.latency_metric(gate_cfg): gate_cfg.max_latency_ms_p50 is not None}
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
    model: Annotated[str, typer.Argument(metavar="MODEL", help="A fleet member.")],
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
    spec: Annotated[str, typer.Argument(
        metavar="MODEL[@ALIAS|:VERSION]", help="model, model@alias or model:version (default @production).")],
    as_json: JsonOpt = False,
    params: ParamsOpt = None,
    root: RootOpt = Path("."),
) -> None:
    """Where a version came from: dataset -> teacher -> student -> pruned -> variant -> version.

    MODEL must be a fleet member or a model the registry holds (else exit 2, naming the fleet's).
    """
    from shrinkfleet import registry
    from shrinkfleet.lineage import lineage as build

    root, params = _paths(root, params)
    fleet = _load(params)
    _registry_setup(root)
    model, ref = _split_ref(spec)
    if model not in fleet.models and not registry.versions(model):
        fleet_member(fleet, model, params)
    info = _registry_call(build, model, ref)
    if as_json:
        print_json(info)
        return
    d = info["dataset"]
    console.print(f"[bold]{model} v{info['version']}[/] {' '.join('@' + a for a in info['aliases'])}  "
                  f"git {info['git_sha']}  content {info['content_sha256'][:23]}…", highlight=False)
    console.print(f"  dataset {d['name']}: digest {d['digest']}  DVC {d['path']} {d['dvc_md5']}",
                  highlight=False)
    for step in info["chain"]:
        acc = (f"{step['accuracy'] * 100:.2f}%" if step["accuracy"] is not None
               else f"MAE {step['mae']:.4g}" if step.get("mae") is not None else "")
        console.print(f"  └─ {step['variant']:<16} run {step['run_id']}  {acc:>7}  {step['recipe']}",
                      highlight=False)
        console.print(f"       {step['artifact']}  md5 {step['dvc_md5']}", highlight=False)
    console.print(f"  fleet run {info['fleet_run']['run_id']} (trigger {info['fleet_run']['trigger']}, "
                  f"Prefect flow run {info['fleet_run']['prefect_flow_run_id']})", highlight=False)
    changed = info["params_changed_from_defaults"]
    console.print("  settings that differ from the defaults: "
                  + (", ".join(f"{k}={v}" for k, v in changed.items()) or "none"), highlight=False)


@app.command()
def restore(
    spec: Annotated[str, typer.Argument(
        metavar="MODEL[@ALIAS|:VERSION]", help="model, model@alias or model:version (default @production).")],
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

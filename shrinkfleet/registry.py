"""The MLflow Model Registry side: one registered model per fleet member, alias ``production``.

- A gate-passing candidate becomes a new version only when its content (flatbuffer +
  preprocessing) differs from every existing version; a no-change nightly run creates none.
- Alias ``production`` moves to the candidate, unless the same content was rolled back
  before: a person judged it bad, so only ``shrinkfleet promote`` brings it back.
- Versions are never deleted. Every alias move is recorded as a run in the experiment
  ``shrinkfleet/registry`` (model, from, to, action, reason, actor, trigger, time), so the
  history survives any later move.
"""

from __future__ import annotations

import datetime as dt
import functools
import getpass
import hashlib
import json
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from shrinkfleet import times

PRODUCTION = "production"
EVENTS_EXPERIMENT = "shrinkfleet/registry"
T = "shrinkfleet"  # tag prefix


def _serialised(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` under the registry lock: read production, move it, record it, with no move in between."""
    from shrinkfleet.locks import registry_lock

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with registry_lock(mlflow.get_tracking_uri()):
            return fn(*args, **kwargs)

    return wrapper


class RegistryError(RuntimeError):
    """A registry command cannot do what was asked; the message says why and what to do."""


@dataclass
class Registration:
    """What the gate and the registry did for one model in one fleet run."""

    model: str
    candidate: str | None
    version: str | None = None  # in production after this run (None: nothing ever promoted)
    created: bool = False
    promoted: bool = False
    previous: str | None = None
    reason: str = ""
    gate: dict[str, str] = field(default_factory=dict)
    serving: str | None = None  # this run's variant that production serves (None: an earlier run's, or none)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def content_hash(tflite: Path, preprocessing: dict[str, Any]) -> str:
    """SHA-256 of what serving depends on: the flatbuffer and the input preprocessing."""
    h = hashlib.sha256(tflite.read_bytes())
    keep = {k: preprocessing[k] for k in ("normalization", "input_shape", "num_classes", "output", "target")
            if k in preprocessing}
    h.update(json.dumps(keep, sort_keys=True).encode())
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------- reading


def has_content(model: str, digest: str) -> bool:
    """Whether a version of ``model`` already holds this content (then no pyfunc needs logging)."""
    return any(v.tags.get(f"{T}.content_sha256") == digest for v in versions(model))


def _client() -> MlflowClient:
    return MlflowClient()


def versions(model: str) -> list[Any]:
    """Every version of ``model``, oldest first ([] when it was never registered)."""
    try:
        found = _client().search_model_versions(f"name = '{model}'", max_results=10_000)
    except MlflowException:
        return []
    return sorted(found, key=lambda v: int(str(v.version)))


def settings_changed(vs: list[Any]) -> dict[str, dict[str, tuple[Any, Any]] | str]:
    """What each version's settings changed since the version before it, by version.

    A version's settings are the parameters its model run logged in MLflow (every resolved
    setting, ``section.key``; its ``shrinkfleet.run.model`` tag names the run). The value is a
    ``{key: (before, now)}`` dict (empty: same settings), ``"first"`` for the oldest version, or
    ``"unknown"`` when either run's parameters cannot be read (a deleted run).
    """
    params: dict[str, dict[str, str] | None] = {}
    client = _client()
    for mv in vs:
        run_id = mv.tags.get(f"{T}.run.model")
        try:
            params[str(mv.version)] = client.get_run(run_id).data.params if run_id else None
        except MlflowException:
            params[str(mv.version)] = None
    out: dict[str, dict[str, tuple[Any, Any]] | str] = {}
    before: dict[str, str] | None = None
    for n, mv in enumerate(vs):
        now = params[str(mv.version)]
        if n == 0:
            out[str(mv.version)] = "first"
        elif now is None or before is None:
            out[str(mv.version)] = "unknown"
        else:
            out[str(mv.version)] = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now))
                                    if before.get(k) != now.get(k)}
        before = now
    return out


def production(model: str) -> Any | None:
    """The version alias ``production`` points to, or None."""
    try:
        return _client().get_model_version_by_alias(model, PRODUCTION)
    except MlflowException:
        return None


def get_version(model: str, ref: str | None) -> Any:
    """Resolve ``None`` / ``@alias`` / ``alias`` / ``:N`` / ``N`` to a model version.

    Raises:
        RegistryError: the model, alias or version does not exist.
    """
    client = _client()
    try:
        client.get_registered_model(model)
    except MlflowException:
        raise RegistryError(f"{model}: not in the registry (no version was ever promoted)") from None
    ref = (ref or PRODUCTION).lstrip("@:")
    try:
        if ref.isdigit():
            return client.get_model_version(model, ref)
        return client.get_model_version_by_alias(model, ref)
    except MlflowException:
        known = ", ".join(str(v.version) for v in versions(model)) or "none"
        raise RegistryError(f"{model}: no version or alias {ref!r} (versions: {known})") from None


def events(model: str | None = None) -> list[dict[str, Any]]:
    """Recorded alias moves, oldest first."""
    client = _client()
    exp = client.get_experiment_by_name(EVENTS_EXPERIMENT)
    if exp is None:
        return []
    query = f"tags.`{T}.model` = '{model}'" if model else ""
    runs = client.search_runs([exp.experiment_id], filter_string=query, max_results=50_000,
                              order_by=["attributes.start_time ASC"])
    keys = ("model", "action", "from_version", "to_version", "reason", "actor", "trigger", "time")
    return [{k: r.data.tags.get(f"{T}.{k}", "") for k in keys} | {"event_run_id": r.info.run_id} for r in runs]


# ----------------------------------------------------------------------------- writing


def _record(model: str, action: str, from_version: str | None, to_version: str, reason: str, trigger: str) -> None:
    client = _client()
    exp = client.get_experiment_by_name(EVENTS_EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EVENTS_EXPERIMENT)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    tags = {"model": model, "action": action, "from_version": from_version or "", "to_version": to_version,
            "reason": reason[:4000], "actor": actor(), "trigger": trigger, "time": now}
    run = client.create_run(exp_id, tags={f"{T}.{k}": v for k, v in tags.items()},
                            run_name=f"{model}: {action} v{from_version or '-'} -> v{to_version}")
    client.set_terminated(run.info.run_id)


def move_alias(model: str, version: str, action: str, reason: str, trigger: str) -> str | None:
    """Point ``production`` at ``version`` and record the move; returns the previous version."""
    client = _client()
    current = production(model)
    previous = str(current.version) if current else None
    client.set_registered_model_alias(model, PRODUCTION, version)
    client.set_model_version_tag(model, version, f"{T}.promoted_at", dt.datetime.now(dt.UTC).isoformat())
    _record(model, action, previous, version, reason, trigger)
    return previous


def _ensure_registered_model(model: str, description: str) -> None:
    client = _client()
    try:
        client.get_registered_model(model)
    except MlflowException:
        client.create_registered_model(model, description=description,
                                       tags={f"{T}.managed": "true"})


@_serialised
def consider(
    model: str,
    candidate: str | None,
    gate_verdicts: dict[str, str],
    tflite: Path | None,
    preprocessing: dict[str, Any] | None,
    model_uri: str | None,
    version_tags: dict[str, str],
    trigger: str,
) -> Registration:
    """Register the gate's candidate if its content is new, and move production to it.

    Args:
        candidate: the variant the gate chose, or None when none passed.
        gate_verdicts: variant -> "pass" / "fail: ..." (reported, and tagged on the version).
        tflite, preprocessing, model_uri: the candidate's flatbuffer, its dataset meta, and
            the logged pyfunc's URI (``None`` when there is no candidate, or when its content
            is already a version: see :func:`has_content`; only new content is registered).
        version_tags: metrics, recipe, git sha, DVC hashes and run ids to put on a new version.
    """
    reg = Registration(model=model, candidate=candidate, gate=gate_verdicts)
    current = production(model)
    reg.previous = str(current.version) if current else None
    if candidate is None:
        reg.version = reg.previous
        reg.reason = "no variant passed the gate; production " + (
            f"stays at v{current.version}" if current else "is still unset")
        return reg
    assert tflite is not None and preprocessing is not None
    digest = content_hash(tflite, preprocessing)
    same = [v for v in versions(model) if v.tags.get(f"{T}.content_sha256") == digest]
    if current is not None and current.tags.get(f"{T}.content_sha256") == digest:
        reg.version = str(current.version)
        reg.reason = f"unchanged: production v{current.version} has the same content"
        reg.serving = candidate
        return reg
    if same:
        target = same[-1]
        reg.version = str(target.version)
        if target.tags.get(f"{T}.rolled_back_at"):
            when = target.tags[f"{T}.rolled_back_at"]
            reg.reason = (f"{candidate} equals v{target.version}, rolled back at {times.shown(when)}: not promoted "
                          f"again automatically (use `shrinkfleet promote {model} {target.version}`)")
            return reg
    else:
        if model_uri is None:
            raise ValueError(f"{model}: {candidate} is new content, so it needs its logged pyfunc's URI to register")
        _ensure_registered_model(model, f"shrinkfleet fleet member {model}: best gate-passing TFLite variant")
        tags = {**version_tags, f"{T}.content_sha256": digest, f"{T}.variant": candidate}
        from shrinkfleet.runlog import stderr_to_log

        with stderr_to_log("mlflow"):  # ("Registered model ... already exists", "Created version ...")
            mv = mlflow.register_model(model_uri, model, tags=tags)
        reg.version, reg.created = str(mv.version), True
    why = f"gate passed: {candidate} is the best passing variant"
    move_alias(model, reg.version, "promote", why, trigger)
    reg.promoted = True
    reg.serving = candidate
    reg.reason = why + (" (new version)" if reg.created else " (existing version)")
    return reg


@_serialised
def promote(model: str, version: str, reason: str, force: bool, gate_check: Any) -> str | None:
    """Move production to ``version`` by hand; refuses a gate-failing version unless ``force``.

    Args:
        gate_check: callable(version) -> list of failure strings under the current gate.
    """
    mv = get_version(model, version)
    failures = gate_check(mv)
    if failures and not force:
        raise RegistryError(f"{model} v{mv.version} fails the gate ({'; '.join(failures)}); "
                            "use --force with --reason to promote it anyway")
    cur = production(model)
    if cur is not None and str(cur.version) == str(mv.version):
        raise RegistryError(f"{model}: v{mv.version} is already in production")
    why = reason or "promoted by hand"
    if failures:
        why = f"forced past the gate ({'; '.join(failures)}): {why}"
    if mv.tags.get(f"{T}.rolled_back_at"):
        _client().delete_model_version_tag(model, str(mv.version), f"{T}.rolled_back_at")
    return move_alias(model, str(mv.version), "promote", why, "cli")


@_serialised
def rollback(model: str, to: str | None, reason: str) -> tuple[str, str]:
    """Move production back: to ``to``, or to the last earlier production version not rolled back.

    The version moved away from is tagged ``rolled_back_at``: nightly runs will not promote
    the same content again until someone promotes it by hand.

    Returns:
        ``(from_version, to_version)``.

    Raises:
        RegistryError: nothing in production, or no earlier production version to go back to.
    """
    cur = production(model)
    if cur is None:
        get_version(model, None)  # raises the "not in the registry" error when appropriate
        raise RegistryError(f"{model}: nothing is in production, so there is nothing to roll back")
    client = _client()
    if to is None:
        # The most recent earlier production version that was not itself rolled back.
        target = None
        for ev in reversed(events(model)):
            v = ev["from_version"]
            if v and v != str(cur.version) and not client.get_model_version(model, v).tags.get(f"{T}.rolled_back_at"):
                target = v
                break
        if target is None:
            raise RegistryError(f"{model}: v{cur.version} is the first production version; "
                                "there is no earlier one to roll back to")
    else:
        target = str(get_version(model, to).version)
        if target == str(cur.version):
            raise RegistryError(f"{model}: v{target} is already in production")
    now = dt.datetime.now(dt.UTC).isoformat()
    client.set_model_version_tag(model, str(cur.version), f"{T}.rolled_back_at", now)
    if client.get_model_version(model, target).tags.get(f"{T}.rolled_back_at"):
        client.delete_model_version_tag(model, target, f"{T}.rolled_back_at")
    move_alias(model, target, "rollback", reason or f"rolled back from v{cur.version}", "cli")
    return str(cur.version), target

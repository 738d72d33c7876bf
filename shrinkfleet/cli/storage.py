"""Remote storage: `push` and `pull` through DVC's S3 remote."""

from __future__ import annotations

from pathlib import Path

from shrinkfleet.cli.common import (
    ParamsOpt,
    RootOpt,
    _fail,
    _load,
    _paths,
    _remote_storage,
    app,
    console,
)


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

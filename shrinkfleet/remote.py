"""Remote storage on S3 (AWS, MinIO or any S3-compatible store) through boto3.

One bucket holds both kinds of remote bytes, under one prefix::

    s3://<bucket>/<prefix>/dvc      the DVC remote ``shrinkfleet`` (data, models, variants)
    s3://<bucket>/<prefix>/mlflow   artifact root of new MLflow experiments (embedded SQLite store)

Where it is comes from ``storage:`` in params.yaml, overridden by ``SHRINKFLEET_S3_*``
(see :class:`shrinkfleet.config.StorageConfig`). Credentials come only from boto3's own
chain: the environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``) or an AWS profile
(``AWS_PROFILE``). They are never written to ``.dvc/config``, printed or tracked: DVC and
MLflow find them the same way boto3 does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shrinkfleet.config import StorageConfig

REMOTE_NAME = "shrinkfleet"
CREDENTIAL_HELP = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary "
                   "credentials) in the environment, or AWS_PROFILE to a profile in ~/.aws/credentials")


class RemoteError(RuntimeError):
    """Remote storage is unusable (no credentials, no bucket, unreachable endpoint); the message says which."""


@dataclass(frozen=True)
class S3Location:
    """Where the project's remote bytes live."""

    bucket: str
    prefix: str
    endpoint_url: str | None = None
    region: str | None = None

    @property
    def dvc_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/dvc"

    @property
    def mlflow_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/mlflow"

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")


def location(storage: StorageConfig, environ: dict[str, str] | None = None) -> S3Location | None:
    """The configured S3 location (params + environment), or None when no bucket is set.

    Raises:
        ConfigError: an ``SHRINKFLEET_S3_*`` variable holds a bad value.
    """
    env = os.environ if environ is None else environ
    if not (env.get("SHRINKFLEET_S3_BUCKET") or storage.s3_bucket):
        return None  # storage off: AWS_* variables meant for something else are not even looked at
    cfg = storage.with_env(env)
    return S3Location(cfg.s3_bucket, cfg.s3_prefix, cfg.endpoint_url, cfg.region)


def _session(loc: S3Location) -> Any:
    import boto3

    return boto3.session.Session(region_name=loc.region)


def check_credentials(loc: S3Location) -> None:
    """Fail unless boto3 finds credentials (environment or profile); never reads them out.

    Raises:
        RemoteError: none found, or the named profile does not exist; says which variables to set.
    """
    import botocore.exceptions

    try:
        creds = _session(loc).get_credentials()
    except botocore.exceptions.ProfileNotFound as exc:
        raise RemoteError(f"AWS_PROFILE: {exc}; {CREDENTIAL_HELP}") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise RemoteError(f"cannot read S3 credentials ({exc}); {CREDENTIAL_HELP}") from None
    if creds is None or not creds.access_key:
        raise RemoteError(f"no S3 credentials for {loc.describe()}: {CREDENTIAL_HELP}")


def client(loc: S3Location) -> Any:
    """A boto3 S3 client for the location's endpoint and region."""
    return _session(loc).client("s3", endpoint_url=loc.endpoint_url)


def ensure_bucket(loc: S3Location, create: bool = True) -> bool:
    """Make sure the bucket exists (created when missing and ``create``); True if it was created.

    Raises:
        RemoteError: the endpoint cannot be reached, access is denied, or the bucket is missing
            and ``create`` is False.
    """
    import botocore.exceptions

    s3 = client(loc)
    try:
        s3.head_bucket(Bucket=loc.bucket)
        return False
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise RemoteError(f"bucket {loc.bucket}: {code or exc} (check the credentials' permissions)") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise RemoteError(f"cannot reach S3 at {loc.endpoint_url or 'AWS'}: {exc}") from None
    if not create:
        raise RemoteError(f"bucket {loc.bucket} does not exist at {loc.endpoint_url or 'AWS'}")
    kwargs: dict[str, Any] = {"Bucket": loc.bucket}
    region = loc.region or s3.meta.region_name
    if region and region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.create_bucket(**kwargs)
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou",):
            raise RemoteError(f"cannot create bucket {loc.bucket}: {exc}") from None
    return True


def configure_dvc_remote(root: Path, loc: S3Location) -> None:
    """Make ``shrinkfleet`` (``s3://<bucket>/<prefix>/dvc``) the default DVC remote in ``.dvc/config``.

    ``.dvc/config`` is committed, so a clone has the remote too; credentials stay out of it.
    """
    from shrinkfleet import versioning

    with versioning.repo(root) as repo, repo.config.edit("repo") as conf:
        remote: dict[str, Any] = {"url": loc.dvc_url}
        if loc.endpoint_url:
            remote["endpointurl"] = loc.endpoint_url
        if loc.region:
            remote["region"] = loc.region
        conf["remote"][REMOTE_NAME] = remote
        conf["core"]["remote"] = REMOTE_NAME


def prepare(root: Path | None, loc: S3Location, create_bucket: bool = True) -> None:
    """Credentials, bucket and (for a DVC project) the DVC remote, in that order; the first problem raises.

    Raises:
        RemoteError: see :func:`check_credentials` and :func:`ensure_bucket`.
    """
    check_credentials(loc)
    ensure_bucket(loc, create=create_bucket)
    if root is not None and (root / ".dvc").is_dir():
        configure_dvc_remote(root, loc)


def activate(storage: StorageConfig) -> S3Location | None:
    """For a run: the location, with ``MLFLOW_S3_ENDPOINT_URL`` set for this process and its workers.

    Raises:
        RemoteError: a bucket is configured but no credentials are found.
    """
    loc = location(storage)
    if loc is None:
        return None
    check_credentials(loc)
    if loc.endpoint_url:
        # MLflow's S3 artifact client reads its endpoint only from this variable.
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = loc.endpoint_url
    if loc.region and not os.environ.get("AWS_DEFAULT_REGION"):
        os.environ["AWS_DEFAULT_REGION"] = loc.region
    return loc


def push(root: Path) -> int:
    """``dvc push`` to the default remote; returns how many files were uploaded.

    Raises:
        RemoteError: DVC could not upload (the message is DVC's).
    """
    from dvc.exceptions import DvcException

    from shrinkfleet import versioning

    try:
        with versioning.repo(root) as repo:
            return int(repo.push(remote=REMOTE_NAME) or 0)
    except DvcException as exc:
        raise RemoteError(f"dvc push failed: {exc}") from None


def pull(root: Path) -> dict[str, Any]:
    """``dvc pull`` from the default remote; returns DVC's stats (``fetched``, ``added``, ...).

    Raises:
        RemoteError: DVC could not download or check out (the message is DVC's).
    """
    from dvc.exceptions import DvcException

    from shrinkfleet import versioning

    try:
        with versioning.repo(root) as repo:
            return repo.pull(remote=REMOTE_NAME) or {}
    except DvcException as exc:
        raise RemoteError(f"dvc pull failed: {exc}") from None

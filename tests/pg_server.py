"""A throwaway PostgreSQL server for tests, on loopback, in a temporary directory.

`running_postgres()` finds the server binaries, runs `initdb` into a fresh
temporary directory, starts `postgres` on 127.0.0.1 with a free port (and its
unix socket inside that directory), creates a database and yields a
`PostgresServer` whose `url` is a SQLAlchemy URL for it. On exit the server is
stopped (immediate mode: its data is thrown away) and the directory removed.

PostgreSQL refuses to run as root, so as root the server runs as the `postgres`
system user if there is one (Debian's `postgresql` package creates it), else as
`nobody`; privileges are dropped by `subprocess` itself (`user=`/`group=`), so
neither `su` nor `runuser` is needed. As any other user it runs as that user.

Host connections need a random password (SCRAM); only the owner of the socket
directory can use the unix socket. Durability is off (`fsync=off`, ...): the
data is thrown away anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import grp
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict
from urllib.parse import quote

INSTALL_HINT = (
    "the PostgreSQL server binaries (initdb, postgres) were not found; install them "
    "with `apt-get install postgresql` (Debian/Ubuntu), or set CSML_POSTGRES_BINDIR to the "
    "directory that holds them. Set CSML_SKIP_POSTGRES=1 to skip the PostgreSQL tests instead."
)
SUPERUSER = "csml"
DEFAULT_DB = "csml_test"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0

# Settings for a disposable test server: no durability, enough connections for
# several coordinators (each pools up to 30), nothing that needs much /dev/shm.
SERVER_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "64MB",
    "max_parallel_workers_per_gather": "0",
    "logging_collector": "off",
    "log_min_messages": "warning",
    "log_lock_waits": "on",
    "deadlock_timeout": "1s",
    "timezone": "UTC",
}


class PostgresNotFound(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


class PostgresFailed(RuntimeError):
    """initdb or the server failed; the message carries its log."""


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    database: str
    root: Path
    bindir: Path
    version: str
    process: subprocess.Popen[bytes] = field(repr=False)

    def url_for(self, database: str, driver: str = "postgresql+psycopg") -> str:
        """A SQLAlchemy URL for another database on this server."""
        return (
            f"{driver}://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(database, safe='')}"
        )

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the database created at start."""
        return self.url_for(self.database)

    @property
    def dsn(self) -> str:
        """A libpq connection string for the default database (for psycopg)."""
        return self.conninfo(self.database)

    def conninfo(self, database: str) -> str:
        return (
            f"host={self.host} port={self.port} user={self.user} "
            f"password={self.password} dbname={database} connect_timeout=5"
        )

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


# -- finding the binaries ------------------------------------------------------


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin
    return tuple(int(n) for n in re.findall(r"\d+", path.parent.name)) or (0,)


def _candidates() -> Iterator[Path]:
    override = os.environ.get("CSML_POSTGRES_BINDIR")
    if override:  # an explicit choice: nothing else is tried
        yield Path(override)
        return
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                yield Path(out)
    yield from sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for name in ("initdb", "postgres"):
        found = shutil.which(name)
        if found:
            yield Path(found).resolve().parent
    yield Path("/usr/local/pgsql/bin")


def _usable(bindir: Path) -> bool:
    return all(
        (bindir / exe).is_file() and os.access(bindir / exe, os.X_OK)
        for exe in ("initdb", "postgres")
    )


def find_bindir() -> Path:
    """The directory holding `initdb` and `postgres`; PostgresNotFound if there is none."""
    seen: set[Path] = set()
    for bindir in _candidates():
        if bindir in seen:
            continue
        seen.add(bindir)
        if _usable(bindir):
            return bindir
    override = os.environ.get("CSML_POSTGRES_BINDIR")
    if override:
        raise PostgresNotFound(
            f"CSML_POSTGRES_BINDIR={override} has no initdb/postgres; " + INSTALL_HINT
        )
    raise PostgresNotFound(INSTALL_HINT)


# -- running as an unprivileged user -------------------------------------------


@dataclass
class _RunAs:
    uid: int
    gid: int
    name: str

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()


def _run_as() -> _RunAs:
    if os.geteuid() != 0:
        return _RunAs(os.geteuid(), os.getegid(), pwd.getpwuid(os.geteuid()).pw_name)
    for name in (os.environ.get("CSML_POSTGRES_USER"), "postgres", "nobody"):
        if not name:
            continue
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid == 0:
            continue
        return _RunAs(entry.pw_uid, entry.pw_gid, name)
    raise PostgresFailed(
        "running as root, and there is neither a `postgres` nor a `nobody` user to run the "
        "server as (PostgreSQL refuses to run as root); set CSML_POSTGRES_USER"
    )


def _searchable_by(path: Path, who: _RunAs) -> bool:
    """Whether `who` can reach `path` (x on every ancestor)."""
    groups = {who.gid} | {g.gr_gid for g in grp.getgrall() if who.name in g.gr_mem}
    for p in [path, *path.parents]:
        try:
            st = p.stat()
        except OSError:
            return False
        if st.st_uid == who.uid:
            ok = st.st_mode & 0o100
        elif st.st_gid in groups:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return False
    return True


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec hook that stops the server (SIGQUIT) if the test process dies.

    PR_SET_PDEATHSIG fires when the *thread* that started the server ends, so
    start it from the main thread (pytest does). Resolved here, not in the
    child, so the hook only makes one C call after fork.
    """
    if os.uname().sysname != "Linux":
        return None
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    try:
        prctl = ctypes.CDLL(libc_name, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sig = int(signal.SIGQUIT)

    def hook() -> None:
        prctl(pr_set_pdeathsig, sig, 0, 0, 0)

    return hook


# -- starting and stopping -----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _SpawnArgs(TypedDict):
    env: dict[str, str]
    cwd: str
    user: int | None
    group: int | None
    extra_groups: list[int] | None


def _spawn_args(who: _RunAs, root: Path) -> _SpawnArgs:
    """A clean environment; and, when root, the unprivileged user (dropped by subprocess)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(root),
        "LANG": "C",
        "LC_ALL": "C",
        "TZ": "UTC",
    }
    other = not who.is_self
    return _SpawnArgs(
        env=env,
        cwd=str(root),
        user=who.uid if other else None,
        group=who.gid if other else None,
        extra_groups=[] if other else None,
    )


def _initdb(bindir: Path, who: _RunAs, root: Path, password: str) -> Path:
    data = root / "data"
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    os.chmod(pwfile, 0o600)
    if not who.is_self:
        os.chown(pwfile, who.uid, who.gid)
    try:
        result = subprocess.run(
            [
                str(bindir / "initdb"),
                "--pgdata",
                str(data),
                "--username",
                SUPERUSER,
                "--pwfile",
                str(pwfile),
                "--auth-local",
                "trust",
                "--auth-host",
                "scram-sha-256",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            **_spawn_args(who, root),
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        raise PostgresFailed(
            f"initdb (as user {who.name}) failed with exit code {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return data


def _server_version(bindir: Path) -> str:
    out = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, timeout=10
    ).stdout.strip()
    m = re.search(r"\(PostgreSQL\)\s+(\S+)", out)
    return m.group(1) if m else out or "unknown"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Immediate shutdown (SIGQUIT): no checkpoint, as the data is thrown away; then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGQUIT)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
        return
    except subprocess.TimeoutExpired:
        pass
    # The postmaster is stuck: kill its whole session (it leads it).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _wait_ready(server: PostgresServer, deadline: float) -> None:
    import psycopg

    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise PostgresFailed(
                f"postgres exited with code {server.process.returncode} while starting:\n"
                f"{server.log()}"
            )
        try:
            with psycopg.connect(server.conninfo("postgres"), autocommit=True) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError as exc:
            last = exc
            time.sleep(0.05)
    raise PostgresFailed(
        f"postgres did not accept connections in {START_TIMEOUT:.0f} s ({last}):\n{server.log()}"
    )


def _start(bindir: Path, who: _RunAs, root: Path, data: Path, password: str) -> PostgresServer:
    sockets = root / "sockets"
    sockets.mkdir(mode=0o700, exist_ok=True)
    if not who.is_self:
        os.chown(sockets, who.uid, who.gid)
    version = _server_version(bindir)
    last_error: Exception | None = None
    for _ in range(5):  # the free port may be taken between probe and bind: retry
        port = free_port()
        args = [
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-k",
            str(sockets),
        ]
        for key, value in SERVER_SETTINGS.items():
            args += ["-c", f"{key}={value}"]
        with open(root / "postgres.log", "ab") as log:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal must not reach it first
                preexec_fn=_parent_death_signal(),
                **_spawn_args(who, root),
            )
        server = PostgresServer(
            host="127.0.0.1",
            port=port,
            user=SUPERUSER,
            password=password,
            database=DEFAULT_DB,
            root=root,
            bindir=bindir,
            version=version,
            process=proc,
        )
        try:
            _wait_ready(server, time.monotonic() + START_TIMEOUT)
            return server
        except PostgresFailed as exc:
            _stop(proc)
            last_error = exc
            if "already in use" not in str(exc) and "could not bind" not in str(exc):
                raise
    raise PostgresFailed(f"could not find a free port for postgres: {last_error}")


def create_database(server: PostgresServer, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(server.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(server: PostgresServer, name: str) -> None:
    """Drop a database, disconnecting whoever is still on it."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(server.conninfo("postgres"), autocommit=True) as conn:
        try:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        except psycopg.errors.SyntaxError:  # before PostgreSQL 13
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@contextlib.contextmanager
def running_postgres(base_dir: Path | None = None) -> Iterator[PostgresServer]:
    """Start a private server; yields it with a database `csml_test` created.

    Raises PostgresNotFound when there are no server binaries, PostgresFailed
    (with the server's log) when initdb or the server fails.
    """
    bindir = find_bindir()
    who = _run_as()
    base = Path(base_dir or os.environ.get("CSML_POSTGRES_TMPDIR") or tempfile.gettempdir())
    if not who.is_self and not _searchable_by(base, who):
        base = Path("/tmp")  # world-searchable (sticky, 1777)
    root = Path(tempfile.mkdtemp(prefix="csml-pg-", dir=base))
    proc: subprocess.Popen[bytes] | None = None
    try:
        if not who.is_self:
            os.chown(root, who.uid, who.gid)
        password = secrets.token_urlsafe(24)
        data = _initdb(bindir, who, root, password)
        server = _start(bindir, who, root, data, password)
        proc = server.process
        create_database(server, DEFAULT_DB)
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # manual check: python -m tests.pg_server
    with running_postgres() as srv:
        print(f"PostgreSQL {srv.version} as {_run_as().name} at {srv.url} (root {srv.root})")

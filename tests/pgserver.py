"""A throwaway PostgreSQL server for the catalog tests.

initdb and pg_ctl refuse to run as root, so as root they run as the ``postgres`` user
(``runuser``); the data and socket folders are then owned by it. The server listens on
127.0.0.1 on a free port and on a unix socket in its temp folder, with fsync off (a
test database need not survive power loss).

pg_hba: unix-socket and TCP connections are trusted, except TCP connections of the
role ``PASSWORD_ROLE``, which must give ``PASSWORD`` (scram-sha-256): the tests of
password delivery use it.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

PASSWORD_ROLE = "hsmkeys_pw"
PASSWORD = "s3cret-test-only"
SUPERUSER = "postgres"


def pg_bin(tool: str) -> str:
    """The newest installed PostgreSQL's ``tool`` (Debian keeps them out of PATH)."""
    found = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return found[-1]
    on_path = shutil.which(tool)
    if on_path is None:
        raise RuntimeError(
            f"PostgreSQL's {tool} not found under /usr/lib/postgresql/*/bin or on PATH: "
            "run `make system-deps` (installs Debian's postgresql package)"
        )
    return on_path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    root: Path
    port: int
    _as_postgres: bool
    _names: Iterator[int] = field(default_factory=itertools.count)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    def dsn(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.dsn(), autocommit=True)

    def create_database(self) -> str:
        name = f"hsmkeys_test_{os.getpid()}_{next(self._names)}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" OWNER {PASSWORD_ROLE}')
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _run(self, *argv: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        done = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def start(self) -> None:
        self._run(pg_bin("initdb"), "-D", str(self.data_dir), "-A", "trust", "-U", SUPERUSER, "--no-sync")
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n"
        )
        options = (
            f"-k {self.socket_dir} -p {self.port} -h 127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        self._run(
            pg_bin("pg_ctl"), "-D", str(self.data_dir), "-l", str(self.root / "server.log"),
            "-w", "-t", "60", "-o", options, "start",
        )  # fmt: skip
        with self.admin() as conn:
            conn.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{PASSWORD}'")

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run(pg_bin("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop")


@contextlib.contextmanager
def running_server() -> Iterator[PgServer]:
    """Start a server in a fresh temp folder; stop it and remove the folder after."""
    as_postgres = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="hsmkeys-pg-"))
    root.chmod(0o755)  # the postgres user must traverse it
    (root / "data").mkdir(mode=0o700)
    (root / "sock").mkdir(mode=0o755)
    if as_postgres:
        owner = pwd.getpwnam("postgres")
        for path in (root, root / "data", root / "sock"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    server = PgServer(root, _free_port(), as_postgres)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

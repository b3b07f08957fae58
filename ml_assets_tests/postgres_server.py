"""A throwaway PostgreSQL server on loopback for tests: real initdb, real password authentication."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

USER = "ml"
DATABASE = "ml"
BINARIES = ("initdb", "pg_ctl")


def _bin_dir() -> Path | None:
    """A directory holding every server binary: the one on PATH first, else the newest installed version."""
    on_path = shutil.which("pg_ctl")
    installed = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda d: [int(p) if p.isdigit() else 0 for p in Path(d).parent.name.split(".")],
        reverse=True,
    )
    for folder in [*([os.path.dirname(on_path)] if on_path else []), *installed]:
        if all(os.access(os.path.join(folder, b), os.X_OK) for b in BINARIES):
            return Path(folder)
    return None


def postgres_unavailable_reason() -> str | None:
    """Why no server can be started here (None: it can); tests skip with this message."""
    if _bin_dir() is None:
        return (
            f"PostgreSQL server binaries ({', '.join(BINARIES)}) not found on PATH or in "
            "/usr/lib/postgresql/*/bin; install the postgresql server package to run these tests"
        )
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hand_to_postgres_user(base_dir: Path) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the `postgres` OS user, who must reach base_dir."""
    if os.geteuid() != 0:
        return []
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError("running as root, PostgreSQL needs an OS user 'postgres' to run as") from None
    for path in [base_dir, *base_dir.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)
    # Temporary dirs (pytest's included) are private to root: let others traverse them, not list them.
    for parent in base_dir.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)
    return ["runuser", "-u", "postgres", "--"]


@contextmanager
def running_postgres(base_dir: Path) -> Iterator[str]:
    """Start a server whose files all live in base_dir; yields postgresql://user:password@127.0.0.1:port/db."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise RuntimeError(postgres_unavailable_reason())
    base_dir = Path(base_dir).resolve()
    data, sockets, log = base_dir / "data", base_dir / "sockets", base_dir / "server.log"
    sockets.mkdir(parents=True)
    password = secrets.token_urlsafe(16)
    (base_dir / "pwfile").write_text(password + "\n")
    as_owner = _hand_to_postgres_user(base_dir)

    def run(*args: str) -> None:
        done = subprocess.run(
            [*as_owner, str(bin_dir / args[0]), *args[1:]], cwd=base_dir, capture_output=True, text=True
        )
        if done.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed:\n{done.stdout}{done.stderr}{server_log}")

    run(
        "initdb",
        "-D",
        str(data),
        "-U",
        USER,
        "--auth=scram-sha-256",
        f"--pwfile={base_dir / 'pwfile'}",
        "--encoding=UTF8",
        "--locale=C",
        "--no-sync",
    )
    port = free_port()
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(
            f"listen_addresses = '127.0.0.1'\nport = {port}\n"
            f"unix_socket_directories = '{sockets}'\n"
            # Throwaway data: durability only costs time.
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
        )
    run("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "start")
    try:
        with psycopg.connect(
            host="127.0.0.1", port=port, user=USER, password=password, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{DATABASE}"')
        yield f"postgresql://{USER}:{password}@127.0.0.1:{port}/{DATABASE}"
    finally:
        run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")

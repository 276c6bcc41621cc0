"""A PostgreSQL cluster of the tests' own: `initdb` into a temporary
directory owned by the `postgres` user (the server refuses to run as root;
a non-root test run keeps its own user),
a server listening on 127.0.0.1 on a free port with trust authentication,
stopped by its pid when the session ends.

tests/run.sh (ensure_postgres) installs Debian's `postgresql` when the
binaries are missing; they are looked up in $POSTGRES_BIN_DIR, then in
/usr/lib/postgresql/<newest>/bin, then on PATH. The `postgres` session
fixture is imported by the test modules that need it."""

import os
import pathlib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

SERVER_USER = "postgres"


def postgres_bin_dir():
    """The directory holding initdb and postgres, or None."""
    candidates = []
    if os.environ.get("POSTGRES_BIN_DIR"):
        candidates.append(pathlib.Path(os.environ["POSTGRES_BIN_DIR"]))

    def version(path):
        m = re.fullmatch(r"\d+(?:\.\d+)?", path.parent.name)
        return float(m.group(0)) if m else -1.0

    candidates += sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(pathlib.Path(on_path).resolve().parent)
    for c in candidates:
        if (c / "initdb").is_file() and (c / "postgres").is_file():
            return c
    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivatePostgres:
    """One cluster: `start()` runs initdb and the server, `close()` stops the server by pid and removes the
    directory. `dsn(dbname)` is a libpq URL; `sql(...)` runs a statement as the superuser."""

    def __init__(self, bin_dir=None):
        self.bin_dir = pathlib.Path(bin_dir or postgres_bin_dir() or "")
        if not (self.bin_dir / "postgres").is_file():
            raise RuntimeError("PostgreSQL's initdb/postgres not found (tests/run.sh installs Debian's postgresql; "
                               "or set POSTGRES_BIN_DIR)")
        if os.geteuid() == 0:
            # The server refuses to run as root: it runs as the postgres user.
            user = pwd.getpwnam(SERVER_USER)
            self.uid, self.gid = user.pw_uid, user.pw_gid
        else:
            self.uid = self.gid = None
        # Not under pytest's tmp_path: its base directory is private to root, and the server runs as postgres.
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="celeriac-postgres-"))
        if self.uid is not None:
            os.chown(self.root, self.uid, self.gid)
        self.data = self.root / "data"
        self.log_path = self.root / "server.log"
        self.port = None
        self.proc = None
        self._log = None

    def _as_server_user(self, argv, **kwargs):
        env = {"PATH": f"{self.bin_dir}:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(self.root)}
        user = {} if self.uid is None else {"user": self.uid, "group": self.gid, "extra_groups": []}
        return dict(args=[str(a) for a in argv], env=env, cwd=self.root, **user, **kwargs)

    def start(self, timeout=60):
        initdb = subprocess.run(**self._as_server_user(
            [self.bin_dir / "initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
             "--locale=C", "--no-sync"], capture_output=True, text=True, timeout=120))
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed ({initdb.returncode}):\n{initdb.stdout}\n{initdb.stderr}")
        for attempt in range(3):
            self.port = free_port()
            self._log = open(self.log_path, "ab")
            # The server process itself (no wrapper between): its pid is the postmaster's.
            self.proc = subprocess.Popen(**self._as_server_user(
                [self.bin_dir / "postgres", "-D", self.data, "-p", self.port,
                 "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=200"],
                stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True))
            if self._wait_ready(timeout):
                return self
            self._stop_server()
        raise RuntimeError(f"PostgreSQL did not start:\n{self.log()[-3000:]}")

    def _wait_ready(self, timeout):
        import psycopg
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # a port taken in the meantime: tried again on another
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        return False

    def dsn(self, dbname):
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def sql(self, statement, params=None, dbname="postgres"):
        """Runs one statement in autocommit as the superuser; returns the rows (or [] when there are none)."""
        import psycopg
        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _stop_server(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown: disconnects clients, then exits
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGQUIT)  # "immediate": the postmaster kills its backends
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if self._log is not None:
            self._log.close()
        self.proc = None

    def close(self):
        self._stop_server()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """A running PrivatePostgres for the session."""
    try:
        server = PrivatePostgres()
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        server.start()
    except RuntimeError as e:
        server.close()
        pytest.fail(str(e))
    yield server
    server.close()

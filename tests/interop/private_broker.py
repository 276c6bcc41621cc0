"""A RabbitMQ node of the tests' own, for tests that break the broker or
that no other Celery process may reach.

The shared broker on 127.0.0.1:5672 carries every other test (and whatever
else runs on this machine): stopping it, or closing all its connections,
would fail them. A PrivateRabbit is a separate node started from the same
installation, with nothing shared with the default one:

- its AMQP listener, Erlang distribution port and epmd are on free ports
  chosen at start, on 127.0.0.1 (RABBITMQ_NODE_IP_ADDRESS; epmd also binds
  ::1, as it always does); it runs its own epmd, so it neither needs nor
  disturbs the shared node's;
- its node name, config file, enabled-plugins file, env file, database,
  logs, pid file and Erlang cookie (HOME) all live in one directory of its
  own; /etc/rabbitmq and /var/lib/rabbitmq are not read;
- its processes are started by this module and ended by their pids (the
  node's process group, which start_new_session made it lead), never by name.

Other kinds of node (another RabbitMQ version, extra plugins such as OAuth 2)
are the same class with another `server`/`ctl`/`epmd`, `plugins` or `config`.
RabbitMQ 4.x comes from a Debian trixie root made by tests/setup/rabbitmq4.sh:
its wrappers run the root's programs inside it, each in a mount namespace of
its own (so the mounts they make end with the node's processes). See
rabbitmq4_install() for how a test gets them.
"""

import os
import pathlib
import random
import secrets
import signal
import socket
import subprocess
import time

import amqp
import pytest

RABBITMQ_BIN = pathlib.Path(os.environ.get("TEST_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
LOOPBACK = "127.0.0.1"


def free_port():
    """A loopback port nobody listens on, below the kernel's ephemeral range:
    the node keeps its ports across a stop and start, and an outgoing
    connection could take an ephemeral one while it is down."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    for _ in range(100):
        port = random.randrange(10000, ephemeral)
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
        if not _answers(port):
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def _answers(port):
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    except OSError:
        return False


def _tls_config(port, files):
    """rabbitmq.conf lines for a TLS listener on `port` with the PEM files
    in `files` (cacertfile, certfile, keyfile). Clients present no
    certificate: the server's is what the tests check."""
    lines = [f"listeners.ssl.default = {LOOPBACK}:{port}"]
    lines += [f"ssl_options.{key} = {files[key]}" for key in ("cacertfile", "certfile", "keyfile")]
    lines += ["ssl_options.verify = verify_none", "ssl_options.fail_if_no_peer_cert = false"]
    return "\n".join(lines) + "\n"


def _exited(proc):
    """Whether `proc` has exited, without reaping it: while it is an
    unreaped zombie its pid (= its process group's id) cannot be reused."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None
    except ChildProcessError:  # already reaped
        return True


def _end_group(proc, grace):
    """SIGTERM `proc` (which leads a process group of its own), wait up to
    `grace` seconds, SIGKILL whatever is left in its group, then reap it."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while not _exited(proc) and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group, or the whole group if stuck
        except ProcessLookupError:
            pass
    proc.wait()


def _sessions():
    """(pid, session id) of every process."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                yield int(entry), int(fields[3])
            except (OSError, IndexError, ValueError):
                continue


class PrivateRabbit:
    """One RabbitMQ node under `base_dir`. start() it, stop() and start()
    it again for a fault, and close() it at the end.

    `config` adds rabbitmq.conf lines; `advanced` is the node's
    advanced.config (Erlang terms, for settings rabbitmq.conf lacks, such as
    `[{rabbit, [{channel_tick_interval, 500}]}].`). `tls={"cacertfile": ..., "certfile":
    ..., "keyfile": ...}` adds a TLS listener on a free loopback port of its
    own (`tls_port`, `tls_url`) beside the plain one, which the node's login
    check and plain clients keep using."""

    def __init__(self, base_dir, name="private", *, plugins=(), config="", server=None, ctl=None,
                 epmd=None, user="guest", password="guest", tls=None, advanced=""):
        self.base = pathlib.Path(base_dir)
        self.base.mkdir(parents=True, exist_ok=True)
        self.server = str(server or RABBITMQ_BIN / "rabbitmq-server")
        self.ctl_path = str(ctl or RABBITMQ_BIN / "rabbitmqctl")
        self.epmd = str(epmd or "epmd")  # the installation's own, for another Erlang
        self.user, self.password = user, password
        ports = set()
        while len(ports) < (4 if tls else 3):
            ports.add(free_port())
        self.port, self.dist_port, self.epmd_port, *rest = sorted(ports)
        self.tls_port = rest[0] if tls else None
        if tls:
            config = _tls_config(self.tls_port, tls) + config
        self.nodename = f"celeriac-{name}-{self.port}@localhost"
        self.log_path = self.base / "node.log"
        self.boot_seconds = []  # how long each start() took
        self._leaders = []  # pids of the node's and epmd's processes started so far
        self._node = None
        self._epmd = None
        self._write_files(plugins, config, advanced)

    @property
    def url(self):
        return f"amqp://{self.user}:{self.password}@{LOOPBACK}:{self.port}//"

    @property
    def tls_url(self):
        """amqps:// URL of the TLS listener, by host name: the server
        certificate is checked against the name in the URL."""
        assert self.tls_port, "this node has no TLS listener"
        return f"amqps://{self.user}:{self.password}@localhost:{self.tls_port}//"

    @property
    def host(self):
        return f"{LOOPBACK}:{self.port}"

    def _write_files(self, plugins, config, advanced):
        (self.base / "home").mkdir(exist_ok=True)
        cookie = self.base / "home" / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(20))
            cookie.chmod(0o400)
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {LOOPBACK}:{self.port}\n"
            f"{config}\n")
        if advanced:
            (self.base / "advanced.config").write_text(advanced + "\n")
        (self.base / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")
        # Stands in for /etc/rabbitmq/rabbitmq-env.conf, which names the
        # shared node; everything this node needs is in env() instead.
        (self.base / "rabbitmq-env.conf").write_text("# private test node: see env()\n")

    def env(self):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_", "CELERY", "BROKER"))}
        b = self.base
        env.update({
            "HOME": str(b / "home"),  # the Erlang cookie of this node and its rabbitmqctl
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": LOOPBACK,
            # Erlang distribution (this node's and rabbitmqctl's) on loopback only.
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CONF_ENV_FILE": str(b / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(b / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(b / "plugins-expand"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_PID_FILE": str(b / "node.pid"),
            "ERL_CRASH_DUMP": str(b / "erl_crash.dump"),
        })
        return env

    @property
    def running(self):
        return self._node is not None and self._node.poll() is None

    def log(self):
        """What the node printed (its boot, and its errors if it failed)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def broker_log(self):
        """The node's own log file, which has what the node logs once booted."""
        path = self.base / "log" / f"{self.nodename}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout=180):
        """Starts the node (again) and returns once a client can log in."""
        assert not self.running, "already running"
        began = time.monotonic()
        if self._epmd is None or self._epmd.poll() is not None:
            self._epmd = subprocess.Popen(
                [self.epmd, "-port", str(self.epmd_port), "-address", LOOPBACK], cwd=self.base,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            self._leaders.append(self._epmd.pid)
        with open(self.log_path, "ab") as log:
            self._node = subprocess.Popen([self.server], env=self.env(), cwd=self.base, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        self._leaders.append(self._node.pid)
        deadline = began + timeout
        while True:
            if self._node.poll() is not None:
                raise RuntimeError(f"RabbitMQ node {self.nodename} exited with {self._node.returncode}:\n"
                                   + self.log()[-4000:])
            if _answers(self.port) and self._logs_in():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"RabbitMQ node {self.nodename} did not accept a login within {timeout}s:\n"
                                   + self.log()[-4000:])
            time.sleep(0.2)
        self.boot_seconds.append(time.monotonic() - began)
        return self.boot_seconds[-1]

    def server_properties(self):
        """What the node tells an AMQP client about itself (product, version...)."""
        conn = amqp.Connection(host=self.host, userid=self.user, password=self.password,
                               virtual_host="/", connect_timeout=5)
        conn.connect()
        try:
            return {k: v.decode() if isinstance(v, bytes) else v for k, v in conn.server_properties.items()}
        finally:
            conn.close()

    def _logs_in(self):
        # The listener opens before the node accepts logins.
        try:
            conn = amqp.Connection(host=self.host, userid=self.user, password=self.password,
                                   virtual_host="/", connect_timeout=2)
            conn.connect()
            conn.close()
            return True
        except Exception:
            return False

    def stop(self, timeout=60):
        """Stops the node (the rabbitmq-server script turns SIGTERM into an
        orderly stop) and waits until its listener is gone."""
        if self._node is not None:
            _end_group(self._node, timeout)
        deadline = time.monotonic() + 10
        while _answers(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def close(self):
        """Stops the node and its epmd."""
        self.stop()
        if self._epmd is not None:
            _end_group(self._epmd, 5)
            self._epmd = None

    def leftovers(self, wait=5.0):
        """Pids of processes still in a session this node started (the node,
        its Erlang children, epmd), after waiting up to `wait` seconds for
        them to go: none once close() has returned, or something escaped it."""
        deadline = time.monotonic() + wait
        while True:
            left = [pid for pid, sid in _sessions() if sid in self._leaders]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)

    def ctl(self, *args, timeout=120):
        """rabbitmqctl -n <this node> ARGS; returns its stdout."""
        p = subprocess.run([self.ctl_path, "-n", self.nodename, *args], env=self.env(), cwd=self.base,
                           capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} exited with {p.returncode}:\n{p.stdout}{p.stderr}")
        return p.stdout


SETUP_RABBITMQ4 = pathlib.Path(__file__).resolve().parents[1] / "setup" / "rabbitmq4.sh"
_rabbitmq4 = None


def rabbitmq4_install():
    """{"RABBITMQ4_SERVER": ..., "RABBITMQ4_CTL": ..., "RABBITMQ4_EPMD": ...,
    "RABBITMQ4_VERSION": ...}: from the environment when tests/run.sh ran
    tests/setup/rabbitmq4.sh, else from running that script now (it is quick
    once its root exists). Fails the calling test, with the script's own
    message, when the setup failed: a test that needs RabbitMQ 4.x never
    passes or skips without one."""
    global _rabbitmq4
    if _rabbitmq4 is None:
        error = os.environ.get("RABBITMQ4_ERROR")
        if error:
            _rabbitmq4 = error
        elif os.environ.get("RABBITMQ4_SERVER"):
            _rabbitmq4 = {k: v for k, v in os.environ.items() if k.startswith("RABBITMQ4_")}
        else:
            try:
                p = subprocess.run([str(SETUP_RABBITMQ4)], stdin=subprocess.DEVNULL, capture_output=True,
                                   text=True, timeout=3600)
            except subprocess.TimeoutExpired:
                p = subprocess.CompletedProcess([], 1, "", f"{SETUP_RABBITMQ4.name}: did not finish within 3600 s")
            if p.returncode != 0:
                lines = p.stderr.strip().splitlines() or [f"exited with {p.returncode}"]
                _rabbitmq4 = f"{SETUP_RABBITMQ4.name}: {lines[-1]}" if not lines[-1].startswith(
                    SETUP_RABBITMQ4.name) else lines[-1]
            else:
                _rabbitmq4 = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
        if isinstance(_rabbitmq4, dict) and not all(
                _rabbitmq4.get(k) for k in ("RABBITMQ4_SERVER", "RABBITMQ4_CTL", "RABBITMQ4_EPMD")):
            _rabbitmq4 = f"{SETUP_RABBITMQ4.name} gave no RABBITMQ4_SERVER/CTL/EPMD: {_rabbitmq4}"
    if isinstance(_rabbitmq4, str):
        pytest.fail(f"no RabbitMQ 4.x for this test: {_rabbitmq4}", pytrace=False)
    return _rabbitmq4

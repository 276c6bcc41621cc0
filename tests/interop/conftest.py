"""Shared fixtures: a real celeriac worker process, real Python Celery
clients, and raw AMQP access, all against the local RabbitMQ and Redis."""

import os
import pathlib
import signal
import subprocess
import time
import urllib.parse
import uuid

import amqp
import pytest
import redis as redis_lib
from celery import Celery

from private_broker import PrivateRabbit, rabbitmq4_install

ROOT = pathlib.Path(__file__).resolve().parents[2]
BROKER = os.environ.get("TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def worker_binary():
    path = os.environ.get("CELERIAC_BIN") or str(ROOT / "target" / "debug" / "celeriac")
    if not os.path.exists(path):
        pytest.fail(f"celeriac binary not found at {path}: run cargo build or tests/run.sh")
    return path


class Worker:
    """A running `celeriac worker` with its log captured to a file."""

    def __init__(self, args, env, log_path, binary=None):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [binary or worker_binary(), "worker", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        return pathlib.Path(self.log_path).read_text(errors="replace")

    def wait_for_log(self, text, timeout=20.0, count=1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode} before logging {text!r}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"worker did not log {text!r} within {timeout}s:\n{self.log()}")

    def send(self, sig):
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def alive(self):
        return self.proc.poll() is None


@pytest.fixture
def queue_name():
    """A queue no other test uses; deleted afterwards."""
    name = f"celeriac-test-{uuid.uuid4().hex[:10]}"
    yield name
    with amqp_channel() as ch:
        for suffix in ("", ".dlq"):
            try:
                ch.queue_delete(name + suffix)
            except amqp.exceptions.AMQPError:
                pass
        for exchange in (name, name + ".dlx"):
            try:
                ch.exchange_delete(exchange)
            except amqp.exceptions.AMQPError:
                pass


@pytest.fixture
def start_worker(tmp_path, queue_name):
    """start_worker(*args, env=None, queue=None, ready=True) -> Worker."""
    workers = []

    def start(*args, env=None, queue=None, ready=True, broker=BROKER, binary=None):
        # SSL_CERT_FILE/SSL_CERT_DIR would replace the trusted roots (rustls-native-certs): a test sets them.
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("CELERY", "BROKER", "CELERIAC", "SSL_CERT_"))}
        full_env["CELERY_BROKER_URL"] = broker
        full_env["CELERIAC_STATE_DIR"] = str(tmp_path / f"state-{len(workers)}")
        full_env.update(env or {})
        argv = ["-Q", queue or queue_name, "-n", f"w{len(workers)}-{queue_name}@%h", "-l", "INFO",
                "--metrics-bind", "none", *args]
        w = Worker(argv, full_env, tmp_path / f"worker-{len(workers)}.log", binary)
        w.state_dir = full_env["CELERIAC_STATE_DIR"]
        workers.append(w)
        if ready:
            w.wait_for_log("consuming")
        return w

    yield start
    for w in workers:
        if w.alive():
            w.stop(signal.SIGKILL)
        else:
            w.stop()


def celery_app(queue, backend="rpc://", broker=BROKER):
    app = Celery("celeriac-tests", broker=broker, backend=backend)
    app.conf.task_default_queue = queue
    app.conf.broker_connection_retry_on_startup = True
    return app


@pytest.fixture
def rpc_app(queue_name):
    app = celery_app(queue_name, "rpc://")
    yield app
    app.close()


@pytest.fixture
def redis_app(queue_name):
    app = celery_app(queue_name, REDIS_URL)
    yield app
    app.close()


@pytest.fixture
def redis_client():
    client = redis_lib.Redis.from_url(REDIS_URL)
    yield client
    client.close()


class amqp_channel:
    """`with amqp_channel() as ch:` — a raw py-amqp channel on the test broker
    (or on the broker at `url`)."""

    def __init__(self, url=BROKER):
        self.url = urllib.parse.urlsplit(url)

    def __enter__(self):
        u = self.url
        vhost = urllib.parse.unquote(u.path[1:]) or "/"
        self.conn = amqp.Connection(host=f"{u.hostname}:{u.port or 5672}", userid=u.username or "guest",
                                    password=u.password or "guest", virtual_host=vhost)
        self.conn.connect()
        self.ch = self.conn.channel()
        return self.ch

    def __exit__(self, *exc):
        try:
            self.conn.close()
        except Exception:
            pass


def queue_depth(name, broker=BROKER):
    with amqp_channel(broker) as ch:
        _, count, _ = ch.queue_declare(name, passive=True)
        return count


def wait_until(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def node_of(w):
    """The node name a worker announced ("celeriac … <node> ready to start")."""
    return w.log().split(" ready to start")[0].split()[-1]


def own_connections(node):
    """The broker's ids of this worker's connections only: the broker is shared, and each
    celeriac process names its connection "celeriac <node> [control ]pid <pid>"."""
    import subprocess
    out = subprocess.run(["rabbitmqctl", "list_connections", "pid", "client_properties", "--silent"],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    mark = f'{{"connection_name","celeriac {node} '
    return [line.split("\t", 1)[0] for line in out.splitlines() if mark in line]


def process_gone(pid):
    """Whether `pid` has exited (gone, or a zombie nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def child_pids(pid):
    """Direct children of `pid`, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return sorted(out)


def thread_count(pid):
    """Threads of `pid`; 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):  # gone before or while reading
        pass
    return 0


def declare_with_dead_letters(queue):
    with amqp_channel() as ch:
        ch.exchange_declare(queue + ".dlx", "fanout", durable=True, auto_delete=False)
        ch.queue_declare(queue + ".dlq", durable=True, auto_delete=False)
        ch.queue_bind(queue + ".dlq", queue + ".dlx", "")
        ch.queue_declare(queue, durable=True, auto_delete=False, arguments={"x-dead-letter-exchange": queue + ".dlx"})


class Account:
    """Tokens published through `celeriac.test.record`, and what Redis says ran."""

    def __init__(self, app, redis_client):
        self.app, self.redis = app, redis_client
        self.key = f"celeriac-account-{uuid.uuid4().hex[:8]}"
        self.tokens = []

    def send(self, seconds=0.0, **options):
        token = uuid.uuid4().hex[:12]
        self.tokens.append(token)
        return self.app.send_task("celeriac.test.record", (self.key, token, seconds), **options)

    def counts(self):
        raw = self.redis.hgetall(self.key)
        return {k.decode(): int(v) for k, v in raw.items()}

    def completed(self):
        return set(self.counts())

    def duplicates(self):
        return {k: v for k, v in self.counts().items() if v > 1}

    def wait_all(self, timeout=60):
        wait_until(lambda: self.completed() >= set(self.tokens), timeout, "every token completed")

    def close(self):
        self.redis.delete(self.key)


@pytest.fixture
def account(rpc_app, redis_client):
    a = Account(rpc_app, redis_client)
    yield a
    a.close()


def probe(name, state_dir, *args, env=None):
    """Runs a probe binary; returns (exit code, its one line)."""
    binary = pathlib.Path(worker_binary()).with_name(name)
    full_env = {k: v for k, v in os.environ.items() if k not in ("BROKER_REQUESTS_QUEUE", "CELERIAC_STATE_DIR")}
    full_env.update(env or {})
    p = subprocess.run([str(binary), "--state-dir", str(state_dir), *args], capture_output=True, text=True,
                       timeout=10, env=full_env)
    lines = p.stdout.splitlines()
    assert len(lines) == 1, p.stdout + p.stderr
    return p.returncode, lines[0]


def task_processes(w):
    """{pid: state} of the task processes, as the worker's probe state file
    lists them (state is "booting", "consuming", "reconnecting", "draining"...)."""
    import json
    try:
        with open(os.path.join(w.state_dir, "state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return {}
    return {c["pid"]: c["state"] for c in state["children"] if c["pid"]}


def task_pids(w):
    """The task processes' pids, as the worker's probe state file lists them."""
    return sorted(task_processes(w))


def _live_child(pid, parent):
    """Whether `pid` is a running (not zombie) child of `parent`."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] != "Z" and int(fields[1]) == parent


def consuming_pids(w):
    """The task processes that are consuming now: listed as consuming in the
    state file (rewritten within a tick of a change, so it can lag) and
    still running children of the supervisor."""
    procs = task_processes(w)
    return sorted(p for p, state in procs.items() if state == "consuming" and _live_child(p, w.pid))


def wait_for_consuming(w, count, timeout=20.0):
    """Waits until the worker has exactly `count` task processes, every one
    running and consuming, and returns their pids. Right after a fork (a
    recycled or replaced process) the new process has not started its
    runtime yet, and the state file may still list the old one: the pids
    taken at an arbitrary moment can be either."""
    def settled():
        pids = consuming_pids(w)
        return pids if len(pids) == count and len(task_processes(w)) == count else None
    try:
        return wait_until(settled, timeout, f"{count} task processes consuming")
    except AssertionError as e:
        raise AssertionError(f"{e}; the state file lists {task_processes(w)}") from None


# RabbitMQ nodes of the tests' own (see private_broker.py): for faults that
# must not reach the shared broker (stopping it, closing every connection),
# and for tests whose outcome another Celery process on the shared broker
# could change.

@pytest.fixture(scope="session")
def private_rabbit(tmp_path_factory):
    """private_rabbit(name, **options) -> that node, running. One node per
    name for the session, created on first use with `options` as
    PrivateRabbit takes them (plugins, config, server, ctl, tls) and started again
    if a test left it stopped. All are stopped, by pid, when the session ends."""
    nodes = {}

    def get(name, **options):
        node = nodes.get(name)
        if node is None:
            node = nodes[name] = PrivateRabbit(tmp_path_factory.mktemp(f"rabbit-{name}"), name, **options)
        if not node.running:
            node.start()
        return node

    yield get
    for node in nodes.values():
        node.close()


def delete_test_queue(node, queue_name):
    """Deletes the test's queue and exchange from a private node."""
    for delete in ("queue_delete", "exchange_delete"):
        with amqp_channel(node.url) as ch:
            try:
                getattr(ch, delete)(queue_name)
            except amqp.exceptions.AMQPError:
                pass


@pytest.fixture
def private_broker(private_rabbit, queue_name):
    """The default private node, running when the test starts; the test may
    stop and start it. The test's queue is deleted from it afterwards."""
    node = private_rabbit("private")
    yield node
    if node.running:  # else the next test that asks for it starts it again
        delete_test_queue(node, queue_name)


# RabbitMQ 4.3 denies these deprecated features by default; spelled out, a
# 4.0-4.2 node (Debian trixie has 4.0.5) denies them too, so rabbit4 tests
# hold the worker to 4.3's rules on any 4.x. On 4.3 they change nothing.
RABBITMQ_4_3_RULES = "\n".join([
    "deprecated_features.permit.transient_nonexcl_queues = false",
    "deprecated_features.permit.global_qos = false",
])


@pytest.fixture(scope="session")
def rabbitmq4_node(private_rabbit):
    """rabbitmq4_node(name="rabbitmq4") -> a private RabbitMQ 4.x node
    (Debian trixie's, through the wrappers of tests/setup/rabbitmq4.sh) with
    RABBITMQ_4_3_RULES, running; one per name for the session, as
    private_rabbit gives them. Fails the test with the setup script's own
    message if there is no 4.x installation."""
    nodes = {}

    def get(name="rabbitmq4"):
        install = rabbitmq4_install()
        nodes[name] = private_rabbit(name, server=install["RABBITMQ4_SERVER"], ctl=install["RABBITMQ4_CTL"],
                                     epmd=install["RABBITMQ4_EPMD"], config=RABBITMQ_4_3_RULES)
        return nodes[name]

    yield get
    # The wrappers' mounts live in mount namespaces of the nodes' own processes: once those
    # are gone, so are the mounts. Check both.
    if nodes:
        cache = str(pathlib.Path(rabbitmq4_install()["RABBITMQ4_SERVER"]).parent.parent)
        for node in nodes.values():
            node.close()
        left = {name: pids for name, node in nodes.items() if (pids := node.leftovers())}
        mounts = [line for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines()
                  if cache in line]
        assert not left and not mounts, f"RabbitMQ 4.x nodes left processes {left}, mounts {mounts}"


@pytest.fixture
def rabbit4(rabbitmq4_node, queue_name, request):
    """The session's RabbitMQ 4.x node (see rabbitmq4_node), running when the
    test starts. Its version is recorded as the test's `rabbitmq_version`
    property (junit XML). The test's queue is deleted from it afterwards."""
    node = rabbitmq4_node()
    request.node.user_properties.append(("rabbitmq_version", node.server_properties().get("version")))
    yield node
    if node.running:
        delete_test_queue(node, queue_name)

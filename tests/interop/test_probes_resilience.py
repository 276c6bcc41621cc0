"""The probe binaries against a live worker, and the worker riding out a
broker that goes away: readiness follows consumption, liveness follows the
supervisor and never the broker. The broker faults happen on a RabbitMQ node
of the tests' own (the private_broker fixture), never on the shared one."""

import os
import signal
import socket
import threading
import time

import pytest

from conftest import Account, celery_app, child_pids, probe, process_gone, queue_depth, wait_until


def ready(w, *args, env=None):
    return probe("worker-readiness", w.state_dir, *args, env=env)


def live(w, *args):
    return probe("worker-liveness", w.state_dir, *args)


def test_probes_fail_before_start_and_pass_once_consuming(start_worker, tmp_path):
    code, line = probe("worker-readiness", tmp_path / "nothing-here")
    assert code == 1 and "has not started" in line
    code, line = probe("worker-liveness", tmp_path / "nothing-here")
    assert code == 1 and "has not started" in line
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "state.json").write_text('{"version": 1, "pid"')
    code, line = probe("worker-liveness", tmp_path / "corrupt")
    assert code == 1 and "corrupt" in line
    w = start_worker("-c", "2", ready=False)
    wait_until(lambda: ready(w)[0] == 0, 30, "readiness")
    code, line = ready(w)
    assert "2/2 task processes consuming" in line
    assert live(w)[0] == 0
    code, line = ready(w, env={"BROKER_REQUESTS_QUEUE": "some-other-queue"})
    assert code == 1 and "not consuming \"some-other-queue\"" in line


def test_unresolved_queue_reference_fails_readiness_naming_it(start_worker):
    w = start_worker("-c", "1", queue="$(BROKER_REQUESTS_QUEUE)", ready=False)
    wait_until(lambda: live(w)[0] == 0, 30, "liveness")
    code, line = ready(w)
    assert code == 1 and "$(BROKER_REQUESTS_QUEUE)" in line and "unresolved" in line
    assert "looks like an unresolved Kubernetes variable reference" in w.log(), "the worker warns about it too"


def test_draining_fails_readiness_at_once(start_worker, rpc_app):
    w = start_worker("-c", "1", "--result-backend", "rpc://")
    r = rpc_app.send_task("celeriac.sleep", (2,))
    w.wait_for_log(f"[{r.id}] received")
    w.send(signal.SIGTERM)
    wait_until(lambda: ready(w)[0] == 1, 2, "readiness to drop")
    assert "draining" in ready(w)[1]
    assert w.proc.wait(30) == 0
    assert r.get(timeout=5) == 2


def test_stopped_supervisor_fails_liveness(start_worker):
    w = start_worker("-c", "1")
    assert live(w, "--max-age", "2")[0] == 0
    os.kill(w.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: live(w, "--max-age", "2")[0] == 1, 10, "liveness to fail")
        assert "wrote no heartbeat" in live(w, "--max-age", "2")[1]
    finally:
        os.kill(w.pid, signal.SIGCONT)
    wait_until(lambda: live(w, "--max-age", "2")[0] == 0, 10, "liveness to recover")


@pytest.fixture
def private_account(private_broker, queue_name, redis_client):
    """An Account whose tasks go through the private broker."""
    app = celery_app(queue_name, "rpc://", broker=private_broker.url)
    a = Account(app, redis_client)
    yield a
    a.close()
    app.close()


def test_broker_stop_and_start(private_broker, start_worker, private_account):
    account = private_account
    w = start_worker("-c", "2", "--with-test-tasks", "--result-backend", "rpc://", broker=private_broker.url)
    assert account.send(0).get(timeout=15)["count"] == 1
    wait_until(lambda: ready(w)[0] == 0, 10, "readiness before the outage")
    private_broker.stop()
    try:
        wait_until(lambda: ready(w)[0] == 1, 10, "readiness to fail while the broker is down")
        assert "reconnecting" in ready(w)[1]
        time.sleep(3)
        assert live(w)[0] == 0, "liveness does not depend on the broker"
        assert ready(w)[0] == 1
    finally:
        private_broker.start()
    wait_until(lambda: ready(w)[0] == 0, 90, "readiness to come back")
    assert account.send(0).get(timeout=30)["count"] == 1, "tasks flow again"
    log = w.log()
    assert log.count("Connection to broker lost") == 2, "logged once per process, not per retry"
    assert log.count("Reconnected to") == 2


def test_connections_closed_under_acks_late_load_recover_without_loss(private_broker, start_worker, private_account,
                                                                       queue_name):
    account = private_account
    w = start_worker("-c", "2", "--with-test-tasks", "--acks-late", broker=private_broker.url)
    for _ in range(60):
        account.send(0.05)
    time.sleep(0.5)
    # Only this test's worker and client are connected to the private node.
    private_broker.ctl("close_all_connections", "celeriac resilience test")
    account.wait_all(90)
    wait_until(lambda: ready(w)[0] == 0, 30, "readiness after recovery")
    assert account.completed() == set(account.tokens), "every task completed (at least once)"
    assert queue_depth(queue_name, private_broker.url) == 0
    assert w.alive()


class BrokerRelay:
    """A TCP relay on 127.0.0.1 in front of the test broker that can go dark: with the
    worker connected through it, an outage (every relayed connection cut, new ones
    refused) reaches this worker only, never the broker other tests share."""

    def __init__(self, upstream=("127.0.0.1", 5672)):
        self.upstream = upstream
        self.port = None
        self.socks = []
        self.lock = threading.Lock()
        self.listener = None
        self.come_back()

    @property
    def url(self):
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def come_back(self):
        """Accepts connections again, on the same port."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port or 0))
        listener.listen(64)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def go_dark(self):
        """Refuses new connections and cuts every open one."""
        listener, self.listener = self.listener, None
        listener.close()
        with self.lock:
            socks, self.socks = self.socks, []
        for s in socks:
            self._cut(s)

    close = go_dark

    def _accept(self, listener):
        while self.listener is listener:
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self.lock:
                self.socks += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        self._cut(src)
        self._cut(dst)

    @staticmethod
    def _cut(s):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


@pytest.fixture
def relay():
    r = BrokerRelay()
    yield r
    if r.listener is not None:
        r.close()


def recovery(w, timeout=30):
    """Seconds until the task processes consume again, and until the control process
    has its connection back."""
    start = time.monotonic()
    tasks = control = None
    while (tasks is None or control is None) and time.monotonic() - start < timeout:
        now = time.monotonic() - start
        if tasks is None and ready(w)[0] == 0:
            tasks = now
        if control is None and "control connection re-established" in w.log():
            control = now
        time.sleep(0.05)
    return tasks, control


def test_consuming_again_within_2_s_of_the_broker_coming_back(start_worker, rpc_app, relay):
    w = start_worker("-c", "2", "--result-backend", "rpc://", broker=relay.url)
    wait_until(lambda: ready(w)[0] == 0, 30, "readiness")
    relay.go_dark()
    wait_until(lambda: ready(w)[0] == 1, 10, "readiness to fail while the broker is away")
    time.sleep(10)
    relay.come_back()
    tasks, control = recovery(w)
    # Retries are at most 2 s apart; the rest is connecting and declaring on a busy machine.
    assert tasks is not None and tasks < 3, f"task processes consuming again after {tasks} s"
    assert control is not None and control < 3, f"control process connected again after {control} s"
    assert rpc_app.send_task("celeriac.add", (2, 3)).get(timeout=15) == 5


def test_a_worker_stopped_just_after_its_broker_vanished_leaves_no_process(start_worker, relay):
    """SIGTERM right after every broker connection was cut. Each process closes its connection on
    the way out; on a dead socket that close is never answered, so it is bounded: the worker
    exits with every one of its processes, none left waiting for a reply that cannot come."""
    w = start_worker("-c", "2", "--shutdown-timeout", "60", broker=relay.url)
    wait_until(lambda: ready(w)[0] == 0, 30, "readiness")
    # Once away and back first: the connections closed at the end are reconnected ones.
    relay.go_dark()
    wait_until(lambda: ready(w)[0] == 1, 10, "readiness to fail while the broker is away")
    time.sleep(2)  # the relay's old listener lets go of the port
    relay.come_back()
    recovery(w)
    children = child_pids(w.pid)
    assert len(children) == 3, children
    relay.go_dark()
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(timeout=45) == 0, w.log()[-3000:]
    try:
        wait_until(lambda: all(process_gone(p) for p in children), 15, "every process of the worker to exit")
    finally:
        for p in children:
            if not process_gone(p):
                os.kill(p, signal.SIGKILL)

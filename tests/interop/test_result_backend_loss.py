"""A Redis result backend that is unreachable at startup, or lost later, on
a Redis server of the test's own (the shared one is never stopped)."""

import os
import signal
import socket
import subprocess
import time

import pytest
import redis as redis_lib

from conftest import celery_app, probe, task_pids, wait_until, worker_binary


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    def __init__(self, port, tmp_path):
        self.port, self.dir, self.proc = port, tmp_path, None

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis_lib.Redis(port=self.port)
        wait_until(lambda: _pings(client), what="private redis up")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)


def _pings(client):
    try:
        return client.ping()
    except redis_lib.exceptions.ConnectionError:
        return False


@pytest.fixture
def private_redis(tmp_path):
    r = PrivateRedis(free_port(), tmp_path)
    r.start()
    yield r
    r.stop()


def test_results_written_while_redis_is_down_are_not_lost(start_worker, private_redis, queue_name):
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    w = start_worker("-c", "2", "--result-backend", url)
    app = celery_app(queue_name, url)
    assert app.send_task("celeriac.add", (1, 1)).get(timeout=20) == 2
    pids = task_pids(w)
    private_redis.stop()
    # Sent by a client that does not itself need Redis (the worker's backend is what is tested).
    sender = celery_app(queue_name, "rpc://")
    pending = [sender.send_task("celeriac.add", (i, 10)) for i in range(4)]
    sender.close()
    w.wait_for_log("cannot store results, retrying until the backend takes them", timeout=20)
    time.sleep(3)
    assert w.alive() and task_pids(w) == pids, "no task process is killed while Redis is down"
    assert w.log().count("cannot store results") <= 2, "once per process, not per result"
    private_redis.start()
    app.close()
    # A fresh client: the old one's Redis connection died with the server.
    reader = celery_app(queue_name, url)
    assert [reader.AsyncResult(r.id).get(timeout=30) for r in pending] == [10, 11, 12, 13]
    w.wait_for_log("the result backend takes results again", timeout=20)
    reader.close()


def test_an_unreachable_redis_at_startup_is_named_and_ends_the_worker(tmp_path):
    port = free_port()  # nothing listens there
    state = tmp_path / "state"
    began = time.monotonic()
    p = subprocess.Popen(
        [worker_binary(), "worker", "-c", "1", "-Q", "backend-loss", "--metrics-bind", "none", "--state-dir", str(state),
         "--result-backend", f"redis://:hunter2@127.0.0.1:{port}/0", "--boot-timeout", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"})
    try:
        wait_until(lambda: "redis backend" in probe("worker-readiness", state)[1], timeout=10,
                   what="readiness naming the backend")
        code, line = probe("worker-readiness", state)
        assert code == 1 and "hunter2" not in line and "********" in line, line
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
    took = time.monotonic() - began
    lines = err.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 2, err
    assert "still failing after 4s" in lines[-1] and "redis backend" in lines[-1], lines[-1]
    assert "hunter2" not in err + out
    # The bound tells the flag from the default (30 s), not how fast the machine is.
    assert 4 <= took < 20, took

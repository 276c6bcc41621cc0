"""The probe binaries against a live worker, and the worker riding out a
broker that goes away: readiness follows consumption, liveness follows the
supervisor and never the broker. The broker faults happen on a RabbitMQ node
of the tests' own (the private_broker fixture), never on the shared one."""

import os
import signal
import time

import pytest

from conftest import Account, celery_app, probe, queue_depth, wait_until


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

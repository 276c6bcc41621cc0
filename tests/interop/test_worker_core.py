"""Python Celery producers against a celeriac worker: arguments, results,
failures, retries, ETA, expiry, canvas, and the result backends."""

import datetime
import json
import time

import celery.exceptions
import pytest
from celery import chain

from conftest import REDIS_URL, celery_app, queue_depth, wait_until


def stub_tasks(app):
    """Python-side signatures of celeriac's built-in tasks (bodies never run here)."""

    @app.task(name="celeriac.add")
    def add(x, y):
        raise AssertionError("runs in celeriac")

    @app.task(name="celeriac.echo")
    def echo(value):
        raise AssertionError("runs in celeriac")

    return add, echo


def test_send_task_positional(start_worker, rpc_app):
    start_worker("--result-backend", "rpc://")
    assert rpc_app.send_task("celeriac.add", (2, 3)).get(timeout=15) == 5


def test_delay_and_apply_async_with_keywords(start_worker, rpc_app):
    start_worker("--result-backend", "rpc://")
    add, _ = stub_tasks(rpc_app)
    assert add.delay(1, y=2).get(timeout=15) == 3
    assert add.apply_async((1.5,), {"y": 2}).get(timeout=15) == 3.5
    assert add.apply_async(kwargs={"x": 10, "y": -4}).get(timeout=15) == 6


def test_unicode_nested_and_large_payloads(start_worker, rpc_app):
    start_worker("--result-backend", "rpc://")
    _, echo = stub_tasks(rpc_app)
    nested = {"é": ["ünï", "🚀", {"deep": [1, 2.5, None, True, {"x": "日本"}]}], "big": 2**40, "neg": -(2**40)}
    assert echo.delay(nested).get(timeout=15) == nested
    megabyte = "x" * (1024 * 1024)
    assert echo.delay(megabyte).get(timeout=30) == megabyte


def test_failure_reraised_with_class_and_message(start_worker, rpc_app):
    start_worker("--result-backend", "rpc://")
    r = rpc_app.send_task("celeriac.fail", ("boom",), {"kind": "KeyError"})
    with pytest.raises(KeyError) as info:
        r.get(timeout=15)
    assert info.value.args == ("boom",)
    r = rpc_app.send_task("celeriac.fail", ("plain",))
    with pytest.raises(RuntimeError, match="plain"):
        r.get(timeout=15)
    assert r.state == "FAILURE"


def test_wrong_argument_shapes_fail_as_type_error(start_worker, rpc_app):
    start_worker("--result-backend", "rpc://")
    with pytest.raises(TypeError, match="positional"):
        rpc_app.send_task("celeriac.add", (1, 2, 3)).get(timeout=15)
    with pytest.raises(TypeError, match="unexpected keyword"):
        rpc_app.send_task("celeriac.add", (1, 2), {"z": 3}).get(timeout=15)
    with pytest.raises(TypeError):
        rpc_app.send_task("celeriac.add", ("a", [])).get(timeout=15)


def test_unknown_task_is_not_registered_and_rejected(start_worker, rpc_app, queue_name):
    w = start_worker("--result-backend", "rpc://")
    r = rpc_app.send_task("proj.tasks.missing", (1,))
    with pytest.raises(celery.exceptions.NotRegistered):
        r.get(timeout=15)
    w.wait_for_log(f"unregistered task of type 'proj.tasks.missing' (id {r.id})")
    assert queue_depth(queue_name) == 0
    assert rpc_app.send_task("celeriac.add", (1, 1)).get(timeout=15) == 2


def test_retries_until_success_and_until_max(start_worker, rpc_app):
    w = start_worker("--result-backend", "rpc://")
    r = rpc_app.send_task("celeriac.retry", (2,), {"countdown": 0.2})
    assert r.get(timeout=20) == 2
    assert w.log().count(f"[{r.id}] retry: Retry in 0.2s") == 2
    # The default max_retries is 3: the 4th retry becomes the failure.
    r = rpc_app.send_task("celeriac.retry", (10,), {"countdown": 0.05})
    with pytest.raises(RuntimeError, match="attempt 3"):
        r.get(timeout=20)
    assert w.log().count(f"[{r.id}] retry:") == 3


def test_countdown_and_eta_are_honoured(start_worker, redis_app):
    start_worker("--result-backend", REDIS_URL)
    sent = datetime.datetime.now(datetime.timezone.utc)
    r = redis_app.send_task("celeriac.noop", countdown=1.5)
    eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)
    r2 = redis_app.send_task("celeriac.noop", eta=eta)
    assert r.get(timeout=20) is None and r2.get(timeout=20) is None
    done = r.date_done if isinstance(r.date_done, datetime.datetime) else datetime.datetime.fromisoformat(r.date_done)
    done2 = r2.date_done if isinstance(r2.date_done, datetime.datetime) else datetime.datetime.fromisoformat(r2.date_done)
    if done.tzinfo is None:
        done, done2 = done.replace(tzinfo=datetime.timezone.utc), done2.replace(tzinfo=datetime.timezone.utc)
    assert done >= sent + datetime.timedelta(seconds=1.5)
    assert done2 >= eta


def test_expired_tasks_are_revoked(start_worker, rpc_app, queue_name):
    w = start_worker("--result-backend", "rpc://")
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=5)
    r = rpc_app.send_task("celeriac.noop", expires=past)
    with pytest.raises(celery.exceptions.TaskRevokedError, match="expired"):
        r.get(timeout=15)
    # Expires while waiting for its ETA: checked again before running.
    r = rpc_app.send_task("celeriac.noop", countdown=2, expires=1)
    with pytest.raises(celery.exceptions.TaskRevokedError, match="expired"):
        r.get(timeout=15)
    w.wait_for_log(f"Discarding revoked task: celeriac.noop[{r.id}]")
    assert queue_depth(queue_name) == 0


def test_chain_and_link_run_follow_ups(start_worker, rpc_app):
    start_worker("--result-backend", "rpc://")
    add, echo = stub_tasks(rpc_app)
    assert chain(add.s(1, 2), add.s(3), add.si(10, 10)).apply_async().get(timeout=20) == 20
    assert chain(add.s(1, 2), add.s(3), add.s(4)).apply_async().get(timeout=20) == 10


def test_redis_backend_documents(start_worker, redis_app, redis_client):
    start_worker("--result-backend", REDIS_URL)
    ok = redis_app.send_task("celeriac.add", (20, 22))
    assert ok.get(timeout=15) == 42
    stored = json.loads(redis_client.get(f"celery-task-meta-{ok.id}"))
    assert stored["status"] == "SUCCESS" and stored["result"] == 42 and stored["task_id"] == ok.id
    assert list(stored) == ["status", "result", "traceback", "children", "date_done", "task_id"]
    assert 86000 < redis_client.ttl(f"celery-task-meta-{ok.id}") <= 86400
    bad = redis_app.send_task("celeriac.fail", ("nope",), {"kind": "ValueError"})
    with pytest.raises(ValueError, match="nope"):
        bad.get(timeout=15)
    stored = json.loads(redis_client.get(f"celery-task-meta-{bad.id}"))
    assert stored["result"] == {"exc_type": "ValueError", "exc_message": ["nope"], "exc_module": "builtins"}


def test_ignore_result_stores_nothing(start_worker, redis_client, queue_name):
    w = start_worker("--result-backend", REDIS_URL)
    app = celery_app(queue_name, REDIS_URL)

    @app.task(name="celeriac.add", ignore_result=True)
    def add(x, y):
        raise AssertionError

    r = add.delay(1, 2)
    w.wait_for_log(f"[{r.id}] succeeded")
    assert redis_client.get(f"celery-task-meta-{r.id}") is None
    app.close()


def test_track_started_shows_started(start_worker, redis_app):
    start_worker("--result-backend", REDIS_URL, "--track-started")
    r = redis_app.send_task("celeriac.sleep", (1.5,))
    wait_until(lambda: r.state == "STARTED", what="STARTED state")
    assert r.info["hostname"].startswith("w0-")
    assert r.get(timeout=15) == 1.5


def test_acks_late_flow(start_worker, rpc_app, queue_name):
    start_worker("--result-backend", "rpc://", "--acks-late")
    results = [rpc_app.send_task("celeriac.add", (i, i)) for i in range(20)]
    assert [r.get(timeout=15) for r in results] == [2 * i for i in range(20)]
    assert queue_depth(queue_name) == 0


def test_example_crate_defines_its_own_tasks(start_worker, rpc_app):
    import pathlib

    binary = pathlib.Path(__file__).resolve().parents[2] / "target" / "debug" / "custom-tasks"
    assert binary.exists(), "cargo build --workspace builds examples/custom-tasks"
    start_worker("--result-backend", "rpc://", binary=str(binary))
    lines = [{"price": 9.5, "qty": 2}, {"price": 1.25, "qty": 4}]
    assert rpc_app.send_task("shop.tasks.invoice_total", (lines,), {"vat": 0.2}).get(timeout=15) == 28.8
    with pytest.raises(ValueError, match="at least one line"):
        rpc_app.send_task("shop.tasks.invoice_total", ([],)).get(timeout=15)
    assert rpc_app.send_task("shop.tasks.slugify", ("Hello, Celery World!",)).get(timeout=15) == "hello-celery-world"
    assert rpc_app.send_task("shop.tasks.slugify", ("  ",)).get(timeout=15) == ""
    assert rpc_app.send_task("celeriac.add", (1, 2)).get(timeout=15) == 3


def test_held_eta_tasks_do_not_starve_the_queue(start_worker, redis_app):
    # -c 1 --prefetch-multiplier 2: without raising the prefetch, two ETA
    # tasks would fill the window and block everything behind them.
    start_worker("--result-backend", REDIS_URL, "-c", "1", "--prefetch-multiplier", "2")
    eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=6)
    later = [redis_app.send_task("celeriac.noop", eta=eta) for _ in range(6)]
    now = [redis_app.send_task("celeriac.add", (i, i)) for i in range(4)]
    assert [r.get(timeout=15) for r in now] == [0, 2, 4, 6]
    for r in now:
        done = datetime.datetime.fromisoformat(str(r.date_done)) if not isinstance(r.date_done, datetime.datetime) else r.date_done
        if done.tzinfo is None:
            done = done.replace(tzinfo=datetime.timezone.utc)
        assert done < eta, "an immediate task waited for the held ETA tasks"
    assert all(r.get(timeout=20) is None for r in later)


def test_sigterm_drains_single_worker(start_worker, rpc_app, queue_name):
    w = start_worker("--result-backend", "rpc://", "-c", "1")
    running = rpc_app.send_task("celeriac.sleep", (1.5,))
    w.wait_for_log(f"[{running.id}] received")
    queued = [rpc_app.send_task("celeriac.add", (i, 1)) for i in range(3)]
    time.sleep(0.3)
    assert w.stop() == 0
    assert running.get(timeout=5) == 1.5, "the running task finished before exit"
    assert queue_depth(queue_name) == 3, "prefetched tasks went back to the queue"
    start_worker("--result-backend", "rpc://")
    assert [r.get(timeout=15) for r in queued] == [1, 2, 3]

"""A task that retries runs in several task processes, each sending its own
events. Monitors (Flower, `celery events`) apply a task's events in the order
they arrive and only merge an older `task-received` into a newer state, so a
process must send what it holds about a task before another process can
receive that task again: otherwise Flower shows `retries: 0` for a task that
retried. Checked with Celery's own event State, as Flower uses it."""

import threading
import time
import uuid

from celery.events.state import State

from conftest import BROKER, celery_app


def test_retried_tasks_show_their_retries_in_celerys_event_state(start_worker, queue_name):
    w = start_worker("-c", "2", "-E", "--result-backend", "rpc://")
    app = celery_app(queue_name)
    node = f"w0-{queue_name}@"
    state = State()
    ready = threading.Event()
    stop = threading.Event()

    def capture():
        with app.connection_for_read(BROKER) as conn:
            def on_event(event):
                if event.get("hostname", "").startswith(node):
                    state.event(event)
            recv = app.events.Receiver(conn, handlers={"*": on_event}, queue_prefix=f"order-{uuid.uuid4().hex[:6]}")
            ready.set()
            for _ in recv.itercapture(limit=None, timeout=None, wakeup=False):
                if stop.is_set():
                    break

    t = threading.Thread(target=capture, daemon=True)
    t.start()
    assert ready.wait(10)
    time.sleep(1.0)  # the receiver's queue is bound
    results = [app.send_task("celeriac.retry", (2,), {"countdown": 0}) for _ in range(20)]
    assert [r.get(timeout=60) for r in results] == [2] * 20
    deadline = time.monotonic() + 15
    def settled():
        tasks = [state.tasks.get(r.id) for r in results]
        return all(t is not None and t.state == "SUCCESS" for t in tasks)
    while time.monotonic() < deadline and not settled():
        time.sleep(0.2)
    stop.set()
    states = {r.id: getattr(state.tasks.get(r.id), "state", None) for r in results}
    assert settled(), {i: s for i, s in states.items() if s != "SUCCESS"}
    wrong = {r.id: state.tasks[r.id].retries for r in results if state.tasks[r.id].retries != 2}
    assert wrong == {}, f"tasks whose retries Flower would show wrong: {wrong}"
    app.close()
    w.stop()

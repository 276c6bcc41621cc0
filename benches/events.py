"""Task events: their cost on throughput (celeriac with and without -E, and
Python Celery with -E, in one run), and the latency from publishing a task to
seeing its task-succeeded event at a steady 1,000 tasks/s.

Usage: .venv/bin/python benches/events.py [--tasks N] [--rate R] [--seconds S]
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import amqp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402
from throughput import ROOT, run_worker  # noqa: E402


def worker_argv(kind, q, events):
    ev = ["-E"] if events else []
    if kind == "celeriac":
        return [str(ROOT / "target/release/celeriac"), "worker", "-Q", q, "-c", "2", "-n", f"ev-rs-{q}@%h",
                "-l", "INFO", "--metrics-bind", "none", *ev]
    return [str(ROOT / ".venv/bin/celery"), "-A", "celery_app", "worker", "-P", "prefork", "-c", "2", "-Q", q,
            "-n", f"ev-py-{q}@%h", "-l", "INFO", "--without-mingle", "--without-gossip", *ev]


def throughput(kind, events, n, env):
    q = f"bench-ev-{uuid.uuid4().hex[:8]}"
    return run_worker(kind, worker_argv(kind, q, events), q, n, env, "] received", "] succeeded")


def latency(kind, rate, seconds, env):
    """Publishes at `rate`/s for `seconds`; returns publish->task-succeeded latencies (ms)."""
    q = f"bench-lat-{uuid.uuid4().hex[:8]}"
    common.declare(q)
    conn, ch = common.channel()
    ch.exchange_declare("celeryev", "topic", durable=True, auto_delete=False)
    evq = f"bench-lat-events-{uuid.uuid4().hex[:8]}"
    ch.queue_declare(evq, exclusive=True, auto_delete=True)
    ch.queue_bind(evq, "celeryev", "task.#")
    seen = {}

    def on_event(message):
        now = time.perf_counter()
        body = json.loads(message.body)
        for e in body if isinstance(body, list) else [body]:
            if e.get("type") == "task-succeeded":
                seen.setdefault(e["uuid"], now)

    ch.basic_consume(evq, callback=on_event, no_ack=True)
    log = open(tempfile.mktemp(suffix=".log"), "wb")
    worker = subprocess.Popen(worker_argv(kind, q, True), stdout=log, stderr=log, env=env, cwd=ROOT / "benches")
    sent = {}
    try:
        watch = common.LogWatch(log.name)
        watch.wait("ready" if kind == "celery" else "consuming", 1, 60, worker)
        time.sleep(2.0)
        pub_conn, pub = common.channel()
        stop = time.perf_counter() + seconds
        interval = 1.0 / rate
        next_at = time.perf_counter()

        def drain():
            while time.perf_counter() < stop + 5:
                try:
                    conn.drain_events(timeout=0.2)
                except socket_timeout():
                    pass

        t = threading.Thread(target=drain, daemon=True)
        t.start()
        while time.perf_counter() < stop:
            msg = common.task_message("celeriac.noop", ())
            tid = msg.properties["correlation_id"]
            sent[tid] = time.perf_counter()
            pub.basic_publish(msg, exchange="", routing_key=q)
            next_at += interval
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        t.join()
        pub_conn.close()
    finally:
        common.stop(worker)
        common.delete(q)
        conn.close()
    lat = sorted((seen[t] - sent[t]) * 1000 for t in sent if t in seen)
    return lat, len(sent)


def socket_timeout():
    import socket
    return socket.timeout


def pct(values, p):
    return values[min(len(values) - 1, int(len(values) * p / 100))] if values else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=10000)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10)
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "BROKER_", "CELERIAC_"))}
    env["CELERY_BROKER_URL"] = common.BROKER_URL
    env["CELERIAC_STATE_DIR"] = tempfile.mkdtemp(prefix="bench-state-")
    off = throughput("celeriac", False, a.tasks, env)
    on = throughput("celeriac", True, a.tasks, env)
    py = throughput("celery", True, a.tasks, env)
    print(f"\nDrain {a.tasks} no-op tasks, -c 2\n")
    print("| worker | tasks/s | CPU per task |")
    print("|---|---:|---:|")
    print(f"| celeriac, events off | {off['tasks_s']:,.0f} | {off['cpu_us']:.0f} µs |")
    print(f"| celeriac, events on (-E) | {on['tasks_s']:,.0f} | {on['cpu_us']:.0f} µs |")
    print(f"| Celery prefork, events on (-E) | {py['tasks_s']:,.0f} | {py['cpu_us']:.0f} µs |")
    print(f"\nevents cost celeriac {100 * (1 - on['tasks_s'] / off['tasks_s']):.1f} % of its throughput; "
          f"with events celeriac is {on['tasks_s'] / py['tasks_s']:.1f}x Celery's tasks/s\n")
    print(f"Publish -> task-succeeded event at {a.rate} tasks/s for {a.seconds:.0f} s\n")
    print("| worker | events seen | p50 | p99 |")
    print("|---|---:|---:|---:|")
    for kind in ("celeriac", "celery"):
        lat, sent = latency(kind, a.rate, a.seconds, env)
        print(f"| {kind} | {len(lat)}/{sent} | {pct(lat, 50):.2f} ms | {pct(lat, 99):.2f} ms |")


if __name__ == "__main__":
    main()

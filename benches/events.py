"""Task events: their cost on throughput (celeriac with and without -E, and
Python Celery with -E, in one run), and the latency from publishing a task to
seeing its task-succeeded event at a steady 1,000 tasks/s, beside the floor of
that path on this machine (benches/raw_broker.rs --echo-events, when built).

Usage: .venv/bin/python benches/events.py [--tasks N] [--repeat K] [--rate R] [--seconds S]
"""

import argparse
import json
import multiprocessing
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import amqp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402
from throughput import ROOT, raw_broker_path, run_worker  # noqa: E402


def worker_argv(kind, q, events, count=0):
    ev = ["-E"] if events else []
    if kind == "floor":
        return [raw_broker_path(), q, str(count), "8", "--echo-events"]
    if kind == "celeriac":
        return [str(ROOT / "target/release/celeriac"), "worker", "-Q", q, "-c", "2", "-n", f"ev-rs-{q}@%h",
                "-l", "INFO", "--metrics-bind", "none", *ev]
    return [str(ROOT / ".venv/bin/celery"), "-A", "celery_app", "worker", "-P", "prefork", "-c", "2", "-Q", q,
            "-n", f"ev-py-{q}@%h", "-l", "INFO", "--without-mingle", "--without-gossip", *ev]


def throughput(kind, events, n, env):
    q = f"bench-ev-{uuid.uuid4().hex[:8]}"
    return run_worker(kind, worker_argv(kind, q, events), q, n, env, "] received", "] succeeded")


def watch_events(queue, ready, stop, out):
    """Runs in a process of its own (so the publisher never holds up its
    clock reads): notes when each task-succeeded event arrives."""
    conn, ch = common.channel()
    seen = {}

    def on_event(message):
        now = time.monotonic()
        body = json.loads(message.body)
        for e in body if isinstance(body, list) else [body]:
            if e.get("type") == "task-succeeded":
                seen.setdefault(e["uuid"], now)

    ch.basic_consume(queue, callback=on_event, no_ack=True)
    ready.set()
    while not stop.is_set():
        try:
            conn.drain_events(timeout=0.2)
        except socket.timeout:
            pass
    conn.close()
    out.send(seen)


def latency(kind, rate, seconds, env):
    """Publishes at `rate`/s for `seconds`; returns publish->task-succeeded latencies (ms)."""
    q = f"bench-lat-{uuid.uuid4().hex[:8]}"
    common.declare(q)
    evq = f"bench-lat-events-{uuid.uuid4().hex[:8]}"
    conn, ch = common.channel()
    ch.exchange_declare("celeryev", "topic", durable=True, auto_delete=False)
    # Deleted by the broker when the watcher goes, even if this run is cut short.
    ch.queue_declare(evq, auto_delete=True)
    ch.queue_bind(evq, "celeryev", "task.#")
    conn.close()
    ready, stop = multiprocessing.Event(), multiprocessing.Event()
    results, out = multiprocessing.Pipe(duplex=False)
    watcher = multiprocessing.Process(target=watch_events, args=(evq, ready, stop, out), daemon=True)
    watcher.start()
    ready.wait(30)
    # Messages are built before the clock starts, so the pace is the broker's and the worker's.
    messages = [common.task_message("celeriac.noop", ()) for _ in range(int(rate * seconds))]
    log = open(tempfile.mktemp(suffix=".log"), "wb")
    worker = subprocess.Popen(worker_argv(kind, q, True, len(messages)), stdout=log, stderr=log, env=env, cwd=ROOT / "benches")
    sent = {}
    seen = {}
    try:
        watch = common.LogWatch(log.name)
        watch.wait("ready" if kind == "celery" else "consuming", 1, 60, worker)
        time.sleep(2.0)
        pub_conn, pub = common.channel()
        interval = 1.0 / rate
        next_at = time.monotonic()
        for msg in messages:
            tid = msg.properties["correlation_id"]
            sent[tid] = time.monotonic()
            pub.basic_publish(msg, exchange="", routing_key=q)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        pub_conn.close()
        time.sleep(5)
        stop.set()
        if results.poll(30):
            seen = results.recv()
        watcher.join(10)
    finally:
        common.stop(worker)
        common.delete(q)
        conn, ch = common.channel()
        try:
            ch.queue_delete(evq)
        except amqp.exceptions.AMQPError:
            pass  # already gone with the watcher
        conn.close()
    lat = sorted((seen[t] - sent[t]) * 1000 for t in sent if t in seen)
    return lat, len(sent)


def pct(values, p):
    return values[min(len(values) - 1, int(len(values) * p / 100))] if values else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=10000)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved throughput runs per worker")
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "BROKER_", "CELERIAC_"))}
    env["CELERY_BROKER_URL"] = common.BROKER_URL
    env["CELERIAC_STATE_DIR"] = tempfile.mkdtemp(prefix="bench-state-")
    # Interleaved repetitions, so a slow moment of the machine does not land on one side only.
    runs = {"off": [], "on": [], "py": []}
    for _ in range(a.repeat):
        runs["off"].append(throughput("celeriac", False, a.tasks, env))
        runs["on"].append(throughput("celeriac", True, a.tasks, env))
        runs["py"].append(throughput("celery", True, a.tasks, env))
    off, on, py = ({k: statistics.median(r[k] for r in runs[side]) for k in ("tasks_s", "cpu_us")}
                   for side in ("off", "on", "py"))
    print(f"\nDrain {a.tasks} no-op tasks, -c 2, median of {a.repeat} interleaved runs (range in brackets)\n")
    print("| worker | tasks/s | CPU per task |")
    print("|---|---:|---:|")
    for side, label in (("off", "celeriac, events off"), ("on", "celeriac, events on (-E)"),
                        ("py", "Celery prefork, events on (-E)")):
        lo, hi = min(x["tasks_s"] for x in runs[side]), max(x["tasks_s"] for x in runs[side])
        med = off if side == "off" else on if side == "on" else py
        print(f"| {label} | {med['tasks_s']:,.0f} [{lo:,.0f}–{hi:,.0f}] | {med['cpu_us']:.0f} µs |")
    print(f"\nevents cost celeriac {100 * (1 - on['tasks_s'] / off['tasks_s']):.1f} % of its throughput "
          f"({on['cpu_us'] - off['cpu_us']:.0f} µs more CPU per task); "
          f"with events celeriac is {on['tasks_s'] / py['tasks_s']:.1f}x Celery's tasks/s\n")
    kinds = ["celeriac", "celery"] + (["floor"] if raw_broker_path() else [])
    pooled = {kind: ([], 0) for kind in kinds}
    for _ in range(a.repeat):
        for kind in kinds:
            lat, sent = latency(kind, a.rate, a.seconds, env)
            pooled[kind] = (pooled[kind][0] + lat, pooled[kind][1] + sent)
    print(f"Publish -> task-succeeded event at {a.rate} tasks/s, {a.repeat} interleaved runs of {a.seconds:.0f} s\n")
    print("| worker | events seen | p50 | p99 |")
    print("|---|---:|---:|---:|")
    for kind in kinds:
        lat, sent = sorted(pooled[kind][0]), pooled[kind][1]
        label = {"floor": "bare lapin, one event per message (floor)"}.get(kind, kind)
        print(f"| {label} | {len(lat)}/{sent} | {pct(lat, 50):.2f} ms | {pct(lat, 99):.2f} ms |")


if __name__ == "__main__":
    main()

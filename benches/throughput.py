"""Drain a pre-filled queue of N no-op tasks with celeriac and with Python
`celery worker -P prefork -c 2`, in the same run, and print tasks/s, worker
CPU per task and RSS side by side, with ratios.

Usage: .venv/bin/python benches/throughput.py [--tasks N] [--concurrency C]
Needs RabbitMQ on 127.0.0.1:5672 and a release build (cargo build --release).
"""

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_worker(name, argv, queue, n, env, received_marker, done_marker):
    common.declare(queue)
    common.prefill(queue, n)
    log_path = tempfile.mktemp(prefix=f"bench-{name}-", suffix=".log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT / "benches")
    watch = common.LogWatch(log_path)
    try:
        watch.wait(received_marker, 1, 120, proc, poll=0.005)
        cpu0 = common.cpu_seconds(proc.pid)
        lines = watch.wait(done_marker, n, 600, proc)
        cpu1 = common.cpu_seconds(proc.pid)
        time.sleep(1.0)
        rss = common.rss_bytes(proc.pid)
        pss = common.pss_bytes(proc.pid)
    finally:
        common.stop(proc)
        common.delete(queue)
    first = next(common.stamp_seconds(l) for l in lines if received_marker in l)
    last = [common.stamp_seconds(l) for l in lines if done_marker in l][-1]
    elapsed = max(last - first, 1e-6)
    os.unlink(log_path)
    return {"tasks_s": n / elapsed, "cpu_us": (cpu1 - cpu0) / n * 1e6, "rss_mb": rss / 2**20, "pss_mb": pss / 2**20, "elapsed": elapsed}


def raw_broker_path():
    """The built benches/raw_broker.rs, or None (with a hint printed)."""
    import glob
    built = [p for p in glob.glob(str(ROOT / "target" / "release" / "deps" / "raw_broker-*")) if not p.endswith(".d")]
    if not built:
        print("(build benches/raw_broker.rs with `cargo bench --bench raw_broker --no-run` to see the floor)")
        return None
    return max(built, key=os.path.getmtime)


def raw_floor(n):
    """The bare lapin consumer from benches/raw_broker.rs on the same workload, if built."""
    import json
    path = raw_broker_path()
    if path is None:
        return None
    q = f"bench-{uuid.uuid4().hex[:8]}"
    common.declare(q)
    common.prefill(q, n)
    try:
        out = subprocess.run([path, q, str(n), "4"], capture_output=True, text=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        common.delete(q)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--celeriac", default=str(ROOT / "target" / "release" / "celeriac"))
    ap.add_argument("--celery", default=str(ROOT / ".venv" / "bin" / "celery"))
    ap.add_argument("--events", action="store_true", help="run both workers with -E")
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "BROKER_", "CELERIAC_"))}
    env["CELERY_BROKER_URL"] = common.BROKER_URL
    env["CELERIAC_STATE_DIR"] = tempfile.mkdtemp(prefix="bench-state-")
    events = ["-E"] if a.events else []
    results = {}
    q = f"bench-{uuid.uuid4().hex[:8]}"
    results["celeriac"] = run_worker(
        "celeriac", [a.celeriac, "worker", "-Q", q, "-c", str(a.concurrency), "-n", f"bench-rs-{q}@%h", "-l", "INFO", *events],
        q, a.tasks, env, "] received", "] succeeded")
    q = f"bench-{uuid.uuid4().hex[:8]}"
    results["celery"] = run_worker(
        "celery", [a.celery, "-A", "celery_app", "worker", "-P", "prefork", "-c", str(a.concurrency), "-Q", q,
                   "-n", f"bench-py-{q}@%h", "-l", "INFO", "--without-mingle", "--without-gossip", *events],
        q, a.tasks, env, "] received", "] succeeded")
    raw = raw_floor(a.tasks)
    rs, py = results["celeriac"], results["celery"]
    print(f"\nDrain {a.tasks} no-op tasks, concurrency {a.concurrency}, events {'on' if a.events else 'off'}\n")
    print("| metric | celeriac | Celery (prefork) | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| tasks/s | {rs['tasks_s']:,.0f} | {py['tasks_s']:,.0f} | {common.ratio(rs['tasks_s'], py['tasks_s'])} faster |")
    print(f"| worker CPU per task | {rs['cpu_us']:.1f} µs | {py['cpu_us']:.1f} µs | {common.ratio(py['cpu_us'], rs['cpu_us'])} less |")
    if raw:
        print(f"| bare lapin consume+ack, 1 process (floor) | {raw['tasks_s']:,.0f} | | |")
        print(f"| bare lapin CPU per message (floor) | {raw['cpu_us']:.1f} µs | | |")
    print(f"| worker RSS after drain (sum over processes) | {rs['rss_mb']:.1f} MiB | {py['rss_mb']:.1f} MiB | {common.ratio(py['rss_mb'], rs['rss_mb'])} less |")
    print(f"| worker PSS after drain (shared pages once) | {rs['pss_mb']:.1f} MiB | {py['pss_mb']:.1f} MiB | {common.ratio(py['pss_mb'], rs['pss_mb'])} less |")


if __name__ == "__main__":
    main()

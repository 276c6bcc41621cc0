"""Python tasks: the same Celery app (benches/pyapp/benchapp.py) run by
`celery -A benchapp worker -P prefork -c 2 -E` and by `celeriac -A benchapp
worker -c 2 -E`, interleaved in one run: tasks/s and worker CPU per task for
a no-op task and for a task doing about 1 ms of pure-Python work, PSS summed
over the worker's processes (idle, and after the no-op run), and the time
from launch to ready.

Usage: .venv/bin/python benches/python_tasks.py [--tasks N] [--work-tasks M] [--repeat K]
Needs RabbitMQ on 127.0.0.1:5672 and `celeriac` installed in the venv with
a release build (`pip install .`).
"""

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "benches" / "pyapp"
VENV = pathlib.Path(sys.executable).parent


def argv(kind, queue):
    if kind == "celeriac":
        return [str(VENV / "celeriac"), "-A", "benchapp", "worker", "-Q", queue, "-c", "2", "-E",
                "-n", f"py-rs-{queue}@%h", "-l", "INFO", "--metrics-bind", "none",
                "--state-dir", tempfile.mkdtemp(prefix="bench-state-")]
    return [str(VENV / "celery"), "-A", "benchapp", "worker", "-P", "prefork", "-c", "2", "-E", "-Q", queue,
            "-n", f"py-py-{queue}@%h", "-l", "INFO", "--without-mingle", "--without-gossip"]


READY = {"celeriac": ("consuming", 2), "celery": (" ready.", 1)}
DONE = "succeeded"


def env():
    e = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY", "CELERIAC", "BROKER"))}
    e["PYTHONPATH"] = str(APP_DIR)
    return e


def start(kind, queue):
    log_path = tempfile.mktemp(prefix=f"bench-py-{kind}-", suffix=".log")
    log = open(log_path, "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(argv(kind, queue), stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=APP_DIR)
    return proc, common.LogWatch(log_path), t0, log_path


def idle(kind):
    """Launch → ready, and PSS once idle."""
    q = f"bench-py-{uuid.uuid4().hex[:8]}"
    common.declare(q)
    proc, watch, t0, path = start(kind, q)
    try:
        needle, count = READY[kind]
        watch.wait(needle, count, 120, proc, poll=0.002)
        ready = time.monotonic() - t0
        time.sleep(2.0)
        pss = common.pss_bytes(proc.pid)
    finally:
        common.stop(proc)
        common.delete(q)
        os.unlink(path)
    return {"ready_s": ready, "idle_pss_mb": pss / 2**20}


def drain(kind, task, n):
    """Drains n pre-filled tasks: tasks/s, CPU per task, PSS after."""
    q = f"bench-py-{uuid.uuid4().hex[:8]}"
    common.declare(q)
    common.prefill(q, n, task=task)
    proc, watch, t0, path = start(kind, q)
    try:
        watch.wait("received", 1, 120, proc, poll=0.002)
        cpu0 = common.cpu_seconds(proc.pid)
        lines = watch.wait(DONE, n, 900, proc)
        cpu1 = common.cpu_seconds(proc.pid)
        time.sleep(1.0)
        pss = common.pss_bytes(proc.pid)
    finally:
        common.stop(proc)
        common.delete(q)
        os.unlink(path)
    first = next(common.stamp_seconds(l) for l in lines if "received" in l)
    last = [common.stamp_seconds(l) for l in lines if DONE in l][-1]
    elapsed = max(last - first, 1e-6)
    return {"tasks_s": n / elapsed, "cpu_us": (cpu1 - cpu0) / n * 1e6, "pss_mb": pss / 2**20}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=20000)
    p.add_argument("--work-tasks", type=int, default=5000)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    runs = {k: [] for k in ("celeriac", "celery")}
    for i in range(a.repeat):
        for kind in ("celeriac", "celery") if i % 2 == 0 else ("celery", "celeriac"):
            r = idle(kind)
            noop = drain(kind, "bench.noop", a.tasks)
            work = drain(kind, "bench.work", a.work_tasks)
            r.update({"noop_" + k: v for k, v in noop.items()})
            r.update({"work_" + k: v for k, v in work.items()})
            runs[kind].append(r)
            print(kind, {k: round(v, 3) for k, v in r.items()}, flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    rows = [
        ("no-op tasks/s", "noop_tasks_s", True),
        ("no-op CPU µs/task", "noop_cpu_us", False),
        ("1 ms task tasks/s", "work_tasks_s", True),
        ("1 ms task CPU µs/task", "work_cpu_us", False),
        ("PSS idle, MiB", "idle_pss_mb", False),
        (f"PSS after {a.tasks:,} tasks, MiB", "noop_pss_mb", False),
        ("launch → ready, s", "ready_s", False),
    ]
    print(f"\nmedians of {a.repeat} interleaved runs, -c 2 -E, app benches/pyapp/benchapp.py")
    print(f"| | celeriac | Celery | ratio |\n|---|---:|---:|---:|")
    for label, key, higher in rows:
        c, p_ = med["celeriac"][key], med["celery"][key]
        ratio = c / p_ if higher else p_ / c
        word = "×" if higher else "× less"
        print(f"| {label} | {c:,.1f} | {p_:,.1f} | {ratio:.1f}{word} |")


if __name__ == "__main__":
    main()

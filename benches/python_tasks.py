"""Python tasks: the same Celery app run by `celery -A <app> worker -P prefork
-c 2 -E` and by `celeriac -A <app> worker -c 2 -E`, interleaved in one run, as
ratios. Two apps:

- benchapp (benches/pyapp/benchapp.py, imports tornado, jsonschema and yaml):
  tasks/s and worker CPU per task for a no-op task and for a task doing about
  1 ms of pure-Python work;
- django (benches/djangoapp: Django + PostgreSQL, persistent connections:
  CONN_MAX_AGE = 600 and CELERY_DB_REUSE_MAX, without which Celery 5.7's
  Django fixup closes the connection before and after every task; set
  BENCH_DB_REUSE_MAX=0 for that): a task reading one row through the ORM
  (`Item.objects.get(pk=...)`, a different row each task), against a private
  PostgreSQL cluster this script starts (initdb into a temporary directory).

For each: PSS summed over the worker's processes (idle, and after the no-op
run or the Django run), the app's own PSS (one plain Python process that
imports the app, its task modules, and finalizes it, measured alone), the
worker's tree PSS minus that ("what the worker adds above the app"), the
time from launch to ready, and the idle cost: CPU (% of one core, time on a
CPU from /proc/<pid>/task/<tid>/schedstat) and wake-ups per second (voluntary
context switches of every thread) of the whole tree, connected and consuming
an empty queue for --idle-seconds (benches/idle.py breaks it down per
process and thread). CPU is the worker's process tree only (not the
PostgreSQL server's backends). celeriac's probe state directory is made in
--state-root (/dev/shm: the chart mounts it on tmpfs).

Usage: .venv/bin/python benches/python_tasks.py [--apps benchapp,django] [--tasks N] [--work-tasks M]
       [--django-tasks D] [--rows R] [--repeat K] [--idle-seconds S] [--state-root DIR]
Needs RabbitMQ on 127.0.0.1:5672, `celeriac` installed in the venv with a
release build (`pip install .`), and for the Django app PostgreSQL's binaries
(/usr/lib/postgresql/*/bin, or $POSTGRES_BIN_DIR), Django and psycopg.
benches/python_memory.py breaks the memory down per process.
"""

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402
import idle as idle_bench  # noqa: E402
import pyworkers  # noqa: E402
from pyworkers import APPS, DONE, Worker  # noqa: E402

FOREIGN = set()  # other Celery/celeriac processes seen while measuring


def idle_cost(pid, seconds):
    """CPU (% of one core) and wake-ups per second of the process tree over `seconds`."""
    pids = common.tree(pid)
    before = idle_bench.snapshot(pids)
    time.sleep(seconds)
    after = idle_bench.snapshot(pids)
    if set(common.tree(pid)) != set(pids):
        raise RuntimeError("the worker's processes changed while idle")
    threads = [t for per_thread in idle_bench.rates(before, after).values() for t in per_thread]
    return sum(t[3] for t in threads), sum(t[1] for t in threads)


def idle(kind, app, a, extra_env=None):
    """Launch → ready, PSS once idle, and the idle cost."""
    with Worker(kind, app, extra_env, state_root=a.state_root) as w:
        ready = w.wait_ready()
        time.sleep(2.0)
        pss = common.pss_bytes(w.proc.pid)
        FOREIGN.update(pyworkers.foreign_workers(w.proc.pid))
        cpu, wake = idle_cost(w.proc.pid, a.idle_seconds)
    return {"ready_s": ready, "idle_pss_mb": pss / 2**20, "idle_cpu_pct": cpu, "idle_wakeups_s": wake}


def drain(kind, app, a, task, n, args_of=lambda i: (), extra_env=None):
    """Drains n pre-filled tasks: tasks/s, CPU per task, PSS after."""
    with Worker(kind, app, extra_env, prefill=lambda q: pyworkers.prefill(q, task, args_of, n),
                state_root=a.state_root) as w:
        w.watch.wait("received", 1, 120, w.proc, poll=0.002)
        cpu0 = common.cpu_seconds(w.proc.pid)
        lines = w.watch.wait(DONE, n, 900, w.proc)
        cpu1 = common.cpu_seconds(w.proc.pid)
        time.sleep(1.0)
        pss = common.pss_bytes(w.proc.pid)
        FOREIGN.update(pyworkers.foreign_workers(w.proc.pid))
    first = next(common.stamp_seconds(l) for l in lines if "received" in l)
    last = [common.stamp_seconds(l) for l in lines if DONE in l][-1]
    elapsed = max(last - first, 1e-6)
    return {"tasks_s": n / elapsed, "cpu_us": (cpu1 - cpu0) / n * 1e6, "pss_mb": pss / 2**20}


def run_app(key, kind, a, db):
    app = APPS[key]
    extra = db.env if db else None
    r = idle(kind, app, a, extra)
    if key == "benchapp":
        noop = drain(kind, app, a, "bench.noop", a.tasks)
        work = drain(kind, app, a, "bench.work", a.work_tasks)
        r.update({"noop_" + k: v for k, v in noop.items()})
        r.update({"work_" + k: v for k, v in work.items()})
        r["after_pss_mb"] = r["noop_pss_mb"]
    else:
        pks = db.pks
        read = drain(kind, app, a, "djbench.read_row", a.django_tasks, lambda i: (pks[i % len(pks)],), extra)
        r.update({"read_" + k: v for k, v in read.items()})
        r["after_pss_mb"] = r["read_pss_mb"]
    return r


def rows_of(key, a):
    if key == "benchapp":
        load = [
            ("no-op tasks/s", "noop_tasks_s", True),
            ("no-op CPU µs/task", "noop_cpu_us", False),
            ("1 ms task tasks/s", "work_tasks_s", True),
            ("1 ms task CPU µs/task", "work_cpu_us", False),
            ("PSS idle, MiB", "idle_pss_mb", False),
            (f"PSS after {a.tasks:,} tasks, MiB", "noop_pss_mb", False),
        ]
        after = f"after {a.tasks:,} no-op tasks"
    else:
        load = [
            ("one-row ORM read tasks/s", "read_tasks_s", True),
            ("one-row ORM read CPU µs/task", "read_cpu_us", False),
            ("PSS idle, MiB", "idle_pss_mb", False),
            (f"PSS after {a.django_tasks:,} tasks, MiB", "read_pss_mb", False),
        ]
        after = f"after {a.django_tasks:,} tasks"
    return load + [
        (f"idle {a.idle_seconds:.0f} s: CPU, % of one core", "idle_cpu_pct", False),
        (f"idle {a.idle_seconds:.0f} s: wake-ups/s", "idle_wakeups_s", False),
        ("launch → ready, s", "ready_s", False),
        ("worker tree PSS − app PSS, idle, MiB", "above_idle_mb", False),
        (f"worker tree PSS − app PSS, {after}, MiB", "above_after_mb", False),
    ]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--apps", default="benchapp,django",
                   help="comma-separated: benchapp (benches/pyapp), django (benches/djangoapp + PostgreSQL)")
    p.add_argument("--tasks", type=int, default=20000, help="benchapp: no-op tasks per run")
    p.add_argument("--work-tasks", type=int, default=5000, help="benchapp: ~1 ms tasks per run")
    p.add_argument("--django-tasks", type=int, default=10000, help="django: one-row read tasks per run")
    p.add_argument("--rows", type=int, default=1000, help="django: rows in the table read")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--idle-seconds", type=float, default=20.0, help="idle time measured per worker and run")
    p.add_argument("--state-root", default="/dev/shm" if pathlib.Path("/dev/shm").is_dir() else None,
                   help="where celeriac's probe state directory is made (default /dev/shm: tmpfs, as the chart "
                        "mounts it)")
    a = p.parse_args()
    keys = [k.strip() for k in a.apps.split(",") if k.strip()]
    for k in keys:
        if k not in APPS:
            p.error(f"unknown app {k!r} (known: {', '.join(APPS)})")
    db = pyworkers.DjangoDatabase(a.rows) if "django" in keys else None
    try:
        runs = {k: {kind: [] for kind in ("celeriac", "celery")} for k in keys}
        alone = {k: [] for k in keys}
        for i in range(a.repeat):
            for key in keys:
                # The app alone, with no worker running (shared file pages would be split with it).
                alone[key].append(pyworkers.app_alone_pss(APPS[key], db.env if db and key == "django" else None)
                                  / 2**20)
                print(key, "app alone", {"pss_mb": round(alone[key][-1], 3)}, flush=True)
                for kind in ("celeriac", "celery") if i % 2 == 0 else ("celery", "celeriac"):
                    r = run_app(key, kind, a, db if key == "django" else None)
                    r["app_pss_mb"] = alone[key][-1]
                    r["above_idle_mb"] = r["idle_pss_mb"] - r["app_pss_mb"]
                    r["above_after_mb"] = r["after_pss_mb"] - r["app_pss_mb"]
                    runs[key][kind].append(r)
                    print(key, kind, {k: round(v, 3) for k, v in r.items()}, flush=True)
    finally:
        if db:
            db.close()
    for key in keys:
        med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs[key].items()}
        print(f"\nmedians of {a.repeat} interleaved runs, -c 2 -E, {APPS[key].label}")
        print("| | celeriac | Celery | ratio |\n|---|---:|---:|---:|")
        for label, k, higher in rows_of(key, a):
            c, p_ = med["celeriac"][k], med["celery"][k]
            ratio = c / p_ if higher else p_ / c
            word = "×" if higher else "× less"
            if not higher and ratio < 1:
                ratio, word = c / p_, "× more"
            digits = 3 if k == "idle_cpu_pct" else 1
            print(f"| {label} | {c:,.{digits}f} | {p_:,.{digits}f} | {ratio:.1f}{word} |")
        print(f"| the app alone (import + finalize, one process), PSS MiB | {statistics.median(alone[key]):,.1f} | | |")
    if FOREIGN:
        print(f"\nnote: {len(FOREIGN)} other Celery/celeriac processes ran during the measurements: they took CPU, "
              "and file pages they share with the workers lowered the workers' PSS")


if __name__ == "__main__":
    main()

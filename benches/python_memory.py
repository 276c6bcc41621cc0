"""Memory of a Python worker, per process: `celeriac -A <app> worker -c 2 -E`
and `celery -A <app> worker -P prefork -c 2 -E`, one after the other, each
measured once idle after the fork and once after a load of tasks.

For every process of each worker (celeriac: supervisor, control process, task
processes; Celery: main process, pool processes) it prints PSS and
Private_Dirty from /proc/<pid>/smaps_rollup, then the tree's PSS and the tree's
PSS minus the app's own (one plain Python process that imports the app and
its task modules and finalizes it, measured alone first). For the first task
(pool) process it sorts the private memory (Private_Clean + Private_Dirty,
from /proc/<pid>/smaps) by kind of mapping — heap (brk), malloc arenas of
threads, anonymous (Python's obmalloc arenas and mmap'd malloc blocks), stacks,
shared libraries — telling the pages copied on write from those in mappings
made after the fork, and lists the biggest private mappings. It also sums
PSS by kind of mapping over the whole tree against the app alone: where
"tree minus app" goes.

Usage: .venv/bin/python benches/python_memory.py [--app benchapp|django] [--tasks N] [--top K]
       [--only celeriac|celery] [--settle S]
The load is N no-op tasks (benchapp) or N one-row ORM reads (django, against a
private PostgreSQL cluster started here, as benches/python_tasks.py does).
"""

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import pyworkers  # noqa: E402
from pyworkers import APPS, DONE, Worker, mib  # noqa: E402

FOREIGN = set()  # other Celery/celeriac processes seen while measuring
KINDS_ORDER = ["heap", "malloc arena of a thread", "anonymous", "stack", "lib .so (all)", "python binary",
               "shared memory", "other file"]


def snapshot(w):
    """([(role, pid, smaps_rollup)], mappings of the first task/pool process, [mappings of each process])."""
    roles = w.roles()
    per = [(role, pid, pyworkers.rollup(pid)) for role, pid in roles]
    maps = {pid: pyworkers.mappings(pid) for _, pid in roles}
    first = next(pid for role, pid in roles if role in ("task 1", "pool 1"))
    pyworkers.mark_new(maps[first], maps[w.proc.pid])
    return per, maps[first], list(maps.values())


def measure(kind, key, n, settle, db):
    app = APPS[key]
    extra = db.env if db else None
    with Worker(kind, app, extra) as w:
        w.wait_ready()
        time.sleep(settle)
        idle = snapshot(w)
        FOREIGN.update(pyworkers.foreign_workers(w.proc.pid))
        if key == "django":
            pks = db.pks
            pyworkers.prefill(w.queue, "djbench.read_row", lambda i: (pks[i % len(pks)],), n)
        else:
            pyworkers.prefill(w.queue, "bench.noop", lambda i: (), n)
        w.watch.wait(DONE, n, 900, w.proc)
        time.sleep(1.0)
        after = snapshot(w)
        FOREIGN.update(pyworkers.foreign_workers(w.proc.pid))
    return idle, after


def report(kind, key, n, app, idle, after, top):
    app_pss, app_maps = app
    (per0, maps0, all0), (per1, maps1, all1) = idle, after
    load = f"{n:,} {'one-row reads' if key == 'django' else 'no-op tasks'}"
    print(f"\n{kind} -A {APPS[key].module} worker -c 2 -E (MiB; after = after {load})")
    print("| process | pid | PSS idle | Private_Dirty idle | PSS after | Private_Dirty after |")
    print("|---|---:|---:|---:|---:|---:|")
    after_by_pid = {pid: r for _, pid, r in per1}
    tot = [0, 0, 0, 0]
    for role, pid, r0 in per0:
        r1 = after_by_pid.get(pid, {})
        vals = [r0.get("Pss", 0), r0.get("Private_Dirty", 0), r1.get("Pss", 0), r1.get("Private_Dirty", 0)]
        tot = [a + b for a, b in zip(tot, vals)]
        print(f"| {role} | {pid} | " + " | ".join(f"{mib(v):.1f}" for v in vals) + " |")
    print(f"| **tree** | | {mib(tot[0]):.1f} | {mib(tot[1]):.1f} | {mib(tot[2]):.1f} | {mib(tot[3]):.1f} |")
    print(f"| the app alone (one process) | | {mib(app_pss):.1f} | | | |")
    print(f"| **tree PSS − app PSS** | | {mib(tot[0] - app_pss):.1f} | | {mib(tot[2] - app_pss):.1f} | |")
    a, t0, t1 = (pyworkers.pss_by_coarse_kind(x) for x in ([app_maps], all0, all1))
    print("\nPSS by kind of mapping, summed over the worker's processes, against the app alone (MiB)")
    print("| kind | app alone | tree idle | tree − app idle | tree after | tree − app after |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in sorted(set(a) | set(t0) | set(t1), key=lambda k: -(t1.get(k, 0) - a.get(k, 0))):
        va, v0, v1 = a.get(k, 0), t0.get(k, 0), t1.get(k, 0)
        if max(va, v0, v1) >= 2**20 // 20:
            print(f"| {k} | {mib(va):.1f} | {mib(v0):.1f} | {mib(v0 - va):+.1f} | {mib(v1):.1f} | {mib(v1 - va):+.1f} |")
    who = "task 1" if kind == "celeriac" else "pool 1"
    k0, k1 = pyworkers.by_kind(maps0), pyworkers.by_kind(maps1)
    print(f"\n{kind} {who}: private memory (Private_Clean + Private_Dirty) by kind of mapping, MiB "
          f"(new: in mappings its parent does not have, made after the fork; the rest is copied on write)")
    print("| kind | private idle | private after | of which new | PSS after |\n|---|---:|---:|---:|---:|")
    kinds = [k for k in KINDS_ORDER if k in k0 or k in k1]
    kinds += sorted((k for k in set(k0) | set(k1) if k not in kinds and not k.startswith("lib ")),
                    key=lambda k: -k1.get(k, (0, 0))[0])
    libs = sorted((k for k in set(k1) if k.startswith("lib ") and k != "lib .so (all)"),
                  key=lambda k: -k1[k][0])[:5]
    for k in kinds + libs:
        p0 = k0.get(k, (0, 0, 0))[0]
        p1, s1, n1 = k1.get(k, (0, 0, 0))
        if p0 or p1 or s1 >= 2**20 // 10:
            print(f"| {'  ' if k in libs else ''}{k} | {mib(p0):.2f} | {mib(p1):.2f} | {mib(n1):.2f} | {mib(s1):.2f} |")
    total0 = sum(m["Private"] for m in maps0)
    total1 = sum(m["Private"] for m in maps1)
    new1 = sum(m["Private"] for m in maps1 if m["new"])
    print(f"| **all** | {mib(total0):.2f} | {mib(total1):.2f} | {mib(new1):.2f} | "
          f"{mib(sum(m['Pss'] for m in maps1)):.2f} |")
    print(f"\n{kind} {who}: the {top} biggest private mappings after the load")
    print("| mapping | perms | size, MiB | private, MiB | kind | made |\n|---|---|---:|---:|---|---|")
    for m in sorted(maps1, key=lambda m: -m["Private"])[:top]:
        print(f"| {m['start']:012x}-{m['end']:012x} | {m['perms']} | {mib(m['end'] - m['start']):.2f} | "
              f"{mib(m['Private']):.2f} | {m['kind']} | {'after the fork' if m['new'] else 'inherited'} |")
    return tot[0] - app_pss, tot[2] - app_pss


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--app", choices=sorted(APPS), default="benchapp")
    p.add_argument("--tasks", type=int, default=5000, help="tasks run between the two measurements")
    p.add_argument("--top", type=int, default=8, help="biggest private mappings listed")
    p.add_argument("--settle", type=float, default=2.0, help="idle seconds after ready, before measuring")
    p.add_argument("--only", choices=["celeriac", "celery"])
    p.add_argument("--rows", type=int, default=1000, help="django: rows in the table read")
    a = p.parse_args()
    db = pyworkers.DjangoDatabase(a.rows) if a.app == "django" else None
    try:
        app = pyworkers.app_alone_pss(APPS[a.app], db.env if db else None, a.settle, detail=True)
        above = {}
        for kind in [a.only] if a.only else ["celeriac", "celery"]:
            idle, after = measure(kind, a.app, a.tasks, a.settle, db)
            above[kind] = report(kind, a.app, a.tasks, app, idle, after, a.top)
    finally:
        if db:
            db.close()
    if len(above) == 2:
        (r0, r1), (c0, c1) = above["celeriac"], above["celery"]
        print(f"\nworker tree PSS − app PSS: idle celeriac {mib(r0):.1f} MiB vs Celery {mib(c0):.1f} MiB "
              f"({r0 / c0:.2f} of Celery's); after the load {mib(r1):.1f} vs {mib(c1):.1f} MiB "
              f"({r1 / c1:.2f} of Celery's)")
    if FOREIGN:
        print(f"\nnote: {len(FOREIGN)} other Celery/celeriac processes ran meanwhile: file pages they share with the "
              "workers (libpython, celeriac's _native.abi3.so) lowered the workers' PSS")


if __name__ == "__main__":
    main()

"""Idle cost: the same Celery app run by `celeriac -A <app> worker -c 2 -E`
and by `celery -A <app> worker -P prefork -c 2 -E`, one after the other in
one run, each left idle (connected, consuming an empty queue) for a while.
For every process of each worker it prints wake-ups per second (voluntary
context switches, summed over the process's threads: each is one sleep that
something ended) and CPU % of one core (time on a CPU from
/proc/<pid>/task/<tid>/schedstat, or utime + stime where the kernel has no
schedstat), then the totals and their ratio.

Usage: .venv/bin/python benches/idle.py [--seconds N] [--settle S] [--app fixtureapp|proj]
       [--threads] [--only celeriac|celery] [--state-root DIR]

The chart mounts celeriac's state directory on tmpfs; on a disk file system
(ext4 /tmp) each rewrite of the probe file costs more: compare with
--state-root /dev/shm.
Needs RabbitMQ on 127.0.0.1:5672 (and Redis on 127.0.0.1:6379 for fixtureapp's
result backend) and `celeriac` installed in the venv.

Celery runs with --without-mingle --without-gossip: gossip would have it
consume every other worker's heartbeats on the shared broker (celeriac has
no gossip). Both send worker-heartbeat events every 2 s (their default).
"""

import argparse
import json
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
VENV = pathlib.Path(sys.executable).parent
APPS = {
    "fixtureapp": ROOT / "tests" / "interop" / "pyapps",
    "proj": ROOT / "examples" / "python-app",
}


def threads(pid):
    """{tid: (name, CPU seconds, voluntary switches, involuntary switches)} of a live process."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            ticks = (int(fields[11]) + int(fields[12])) / common.CLK_TCK
            try:
                # Nanoseconds on a CPU: far finer than the clock ticks of stat.
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    ticks = int(f.read().split()[0]) / 1e9
            except (OSError, ValueError, IndexError):
                pass
            vol = invol = 0
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol = int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        invol = int(line.split()[1])
        except (OSError, ValueError):
            continue
        out[int(tid)] = (name, ticks, vol, invol)
    return out


def snapshot(pids):
    return {pid: threads(pid) for pid in pids}, time.monotonic()


def rates(before, after):
    """{pid: [(thread name, voluntary switches/s, involuntary/s, CPU %)]} between two snapshots."""
    (b, t0), (a, t1) = before, after
    elapsed = t1 - t0
    out = {}
    for pid, now in a.items():
        rows = out[pid] = []
        for tid, (name, ticks, vol, invol) in now.items():
            _, ticks0, vol0, invol0 = b.get(pid, {}).get(tid, (name, 0, 0, 0))
            rows.append((name, (vol - vol0) / elapsed, (invol - invol0) / elapsed, (ticks - ticks0) / elapsed * 100))
    return out


def roles(kind, root, state_dir):
    """[(role, pid)] of a worker's processes."""
    kids = [p for p in common.tree(root) if p != root]
    if kind == "celery":
        return [("main", root)] + [(f"pool {i + 1}", p) for i, p in enumerate(sorted(kids))]
    with open(pathlib.Path(state_dir) / "state.json") as f:
        tasks = [c["pid"] for c in json.load(f)["children"] if c["pid"]]
    out = [("supervisor", root)]
    out += [(f"task {i + 1}", p) for i, p in enumerate(sorted(tasks))]
    out += [("control", p) for p in kids if p not in tasks]
    return out


def argv(kind, app, queue, state_dir):
    if kind == "celeriac":
        return [str(VENV / "celeriac"), "-A", app, "worker", "-Q", queue, "-c", "2", "-E",
                "-n", f"idle-rs-{queue}@%h", "-l", "INFO", "--metrics-bind", "none",
                "--state-dir", state_dir]
    return [str(VENV / "celery"), "-A", app, "worker", "-P", "prefork", "-c", "2", "-E", "-Q", queue,
            "-n", f"idle-py-{queue}@%h", "-l", "INFO", "--without-mingle", "--without-gossip"]


READY = {"celeriac": ("consuming", 2), "celery": (" ready.", 1)}


def measure(kind, app, seconds, settle, state_root=None):
    queue = f"bench-idle-{uuid.uuid4().hex[:8]}"
    state_dir = tempfile.mkdtemp(prefix="bench-idle-state-", dir=state_root)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY", "CELERIAC", "BROKER"))}
    env["PYTHONPATH"] = str(APPS[app])
    env["FIXTUREAPP_QUEUE"] = queue
    log_path = tempfile.mktemp(prefix=f"bench-idle-{kind}-", suffix=".log")
    common.declare(queue)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv(kind, app, queue, state_dir), stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=APPS[app])
    watch = common.LogWatch(log_path)
    try:
        needle, count = READY[kind]
        watch.wait(needle, count, 120, proc)
        time.sleep(settle)
        who = roles(kind, proc.pid, state_dir)
        before = snapshot([p for _, p in who])
        time.sleep(seconds)
        after = snapshot([p for _, p in who])
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited during the measurement")
    finally:
        common.stop(proc)
        common.delete(queue)
        os.unlink(log_path)
    per_pid = rates(before, after)
    return [(role, pid, per_pid[pid]) for role, pid in who]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0, help="idle time measured per worker")
    ap.add_argument("--settle", type=float, default=5.0, help="idle time before measuring")
    ap.add_argument("--app", choices=sorted(APPS), default="fixtureapp")
    ap.add_argument("--threads", action="store_true", help="also print every thread")
    ap.add_argument("--only", choices=["celeriac", "celery"], help="measure one worker only")
    ap.add_argument("--state-root", default=None,
                    help="where celeriac's probe state directory is made (default: the temporary "
                         "directory; the chart mounts it on tmpfs: try /dev/shm)")
    args = ap.parse_args()
    totals = {}
    kinds = [args.only] if args.only else ["celeriac", "celery"]
    for kind in kinds:
        rows = measure(kind, args.app, args.seconds, args.settle, args.state_root)
        print(f"\n{kind} -A {args.app} worker -c 2 -E, idle {args.seconds:.0f} s:")
        print(f"  {'process':<12} {'wake-ups/s':>10} {'CPU %':>7}")
        wake = cpu = 0.0
        for role, pid, per_thread in rows:
            w = sum(t[1] for t in per_thread)
            c = sum(t[3] for t in per_thread)
            wake, cpu = wake + w, cpu + c
            print(f"  {role:<12} {w:>10.1f} {c:>7.3f}")
            if args.threads:
                for name, vol, invol, tc in sorted(per_thread, key=lambda t: -t[1]):
                    if vol or invol or tc:
                        print(f"    {name:<16} {vol:>6.1f} (+{invol:.1f} involuntary) {tc:>7.3f}")
        print(f"  {'total':<12} {wake:>10.1f} {cpu:>7.3f}")
        totals[kind] = (wake, cpu)
    if len(totals) == 2:
        (rw, rc), (pw, pc) = totals["celeriac"], totals["celery"]
        print(f"\nceleriac / celery: wake-ups {rw:.1f}/s vs {pw:.1f}/s ({rw / pw:.2f}×), "
              f"CPU {rc:.3f} % vs {pc:.3f} % ({rc / pc if pc else float('nan'):.2f}×)")


if __name__ == "__main__":
    main()

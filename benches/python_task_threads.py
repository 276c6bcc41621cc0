"""Per-thread CPU and context switches per task of `celeriac -A benchapp
worker -c C -E` draining N tasks (docs/design/python-task-cost.md).

The N tasks are published first; the worker starts on another, empty queue,
its CPU counters are read once it is idle, and then it is told to consume the
full queue (`add_consumer`, as `celery control add_consumer` sends it); the
counters are read again once the N tasks succeeded. So every task counted ran
between the two readings, drained from a full queue as in
benches/python_tasks.py. "exited threads" is
what the processes' totals hold beyond their live threads (threads that
ended between the readings).

Usage: .venv/bin/python benches/python_task_threads.py [N] [task] [C]
With PERF_OUT=file, `perf record` samples the task and control processes during the drain
(PERF_ARGS, default `-g`; `--call-graph=dwarf` for stacks through libc and libpython).
Needs RabbitMQ on 127.0.0.1:5672 and celeriac installed in the venv.
"""
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")
HERE = pathlib.Path(__file__).parent


def cpu(path):
    fields = open(path).read().rsplit(")", 1)[1].split()
    return int(fields[11]) / HZ, int(fields[12]) / HZ


def snap(pids):
    """{(pid, tid): (name, user s, system s, switches)} and {pid: (user s, system s)}."""
    threads, procs = {}, {}
    for pid in pids:
        try:
            procs[pid] = cpu(f"/proc/{pid}/stat")
        except OSError:
            continue
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                name = open(f"/proc/{pid}/task/{t}/comm").read().strip()
                user, system = cpu(f"/proc/{pid}/task/{t}/stat")
                status = open(f"/proc/{pid}/task/{t}/status").read().splitlines()
            except OSError:
                continue
            switches = sum(int(line.split()[1]) for line in status if "ctxt_switches" in line)
            threads[(pid, t)] = (name, user, system, switches)
    return threads, procs


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    task = sys.argv[2] if len(sys.argv) > 2 else "bench.noop"
    concurrency = sys.argv[3] if len(sys.argv) > 3 else "1"
    q = f"prof-{uuid.uuid4().hex[:6]}"
    idle_q = f"{q}-idle"
    common.declare(q)
    common.declare(idle_q)
    common.prefill(q, n, task=task)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY", "CELERIAC", "BROKER"))}
    env["PYTHONPATH"] = str(HERE / "pyapp")
    log_path = os.path.join(tempfile.mkdtemp(prefix="bench-threads-"), "worker.log")
    argv = [str(pathlib.Path(sys.executable).parent / "celeriac"), "-A", "benchapp", "worker", "-Q", idle_q, "-n", f"{q}@%h",
            "-c", concurrency, "-E", "-l", "INFO", "--metrics-bind", "none",
            "--state-dir", tempfile.mkdtemp(prefix="bench-state-")]
    with open(log_path, "wb") as log:
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(HERE / "pyapp"))
    watch = common.LogWatch(log_path)
    try:
        watch.wait("consuming", int(concurrency), 60, p)
        time.sleep(1.0)
        pids = [p.pid] + [int(x) for x in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                                          text=True).stdout.split()]
        a_threads, a_procs = snap(pids)
        perf = None
        if os.environ.get("PERF_OUT"):
            # `perf record -g` on the forked processes while they drain (an unstripped build
            # shows Rust's symbols; docs/design/python-task-cost.md).
            perf = subprocess.Popen(["perf", "record", *os.environ.get("PERF_ARGS", "-g").split(), "-o", os.environ["PERF_OUT"], "-p", ",".join(map(str, pids[1:]))],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        t0 = time.time()
        from celery import Celery

        control = Celery("bench", broker=common.BROKER_URL)
        control.control.add_consumer(q, destination=[f"{q}@{socket.gethostname()}"], reply=True, timeout=10)
        control.close()
        watch.wait("succeeded", n, 600, p, poll=0.2)
        elapsed = time.time() - t0
        b_threads, b_procs = snap(pids)
        if perf is not None:
            perf.send_signal(2)
            perf.wait()
    finally:
        p.terminate()
        p.wait()
        common.delete(q)
        common.delete(idle_q)
    print(f"{n} tasks in {elapsed:.1f} s, -c {concurrency}")
    total = 0.0
    for key, (name, u1, s1, c1) in sorted(b_threads.items()):
        _, u0, s0, c0 = a_threads.get(key, (name, 0, 0, 0))
        if (u1 - u0) + (s1 - s0) == 0 and c1 == c0:
            continue
        role = "supervisor" if key[0] == p.pid else f"pid {key[0]}"
        total += (u1 - u0) + (s1 - s0)
        print(f"{role:12s} {name:15s} user {(u1 - u0) / n * 1e6:7.1f} µs/task  "
              f"system {(s1 - s0) / n * 1e6:7.1f} µs/task  switches/task {(c1 - c0) / n:5.2f}")
    procs = sum(sum(b_procs[pid]) - sum(a_procs.get(pid, (0, 0))) for pid in b_procs)
    print(f"exited threads: {(procs - total) / n * 1e6:7.1f} µs/task")
    print(f"total: {procs / n * 1e6:.1f} µs/task")


if __name__ == "__main__":
    main()

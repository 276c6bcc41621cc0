"""Instructions per no-op task, `celeriac -A benchapp worker` beside `celery
worker`, counted by valgrind's callgrind: a figure that does not move with
the machine's load, for changes too small to see through the noise of CPU
time on a shared 2-core machine (docs/design/python-task-cost.md).

What it counts: the instructions executed in user space by every process of
the worker's tree (supervisor or main process, task or pool processes,
control process; all threads), per task: each worker runs twice, once for N
tasks and once for 5N, from launch to exit, and the difference is divided by
4N (launch, idle and shutdown cancel out). What it does not count: the
kernel's work (system calls, context switches, wake-ups), which is where much
of celeriac's remaining cost is; read the CPU figures of
benches/python_tasks.py and benches/python_task_threads.py for that.

Both workers run `-c 1 -E -l INFO` on a pre-filled queue: each starts on an
empty queue, waits 5 s once it is ready, is told to consume the full queue
(`add_consumer`), and is stopped (SIGTERM) once the tasks succeeded; every
process writes its counts when it exits. (`callgrind_control` does not reach
the forked processes, so counters cannot be zeroed in place.) Under valgrind
each worker runs 20-80x slower; N = 500 takes a few minutes.

Usage: .venv/bin/python benches/python_task_instructions.py [N] [celeriac,celery]
Needs valgrind, RabbitMQ on 127.0.0.1:5672, celeriac and Celery in the venv.
"""
import glob
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

HERE = pathlib.Path(__file__).parent


def worker_argv(which, queue, name, state_dir):
    bindir = pathlib.Path(sys.executable).parent
    if which == "celeriac":
        return [str(bindir / "python"), str(bindir / "celeriac"), "-A", "benchapp", "worker", "-Q", queue,
                "-n", name, "-c", "1", "-E", "-l", "INFO", "--metrics-bind", "none", "--state-dir", state_dir]
    return [str(bindir / "python"), str(bindir / "celery"), "-A", "benchapp", "worker", "-Q", queue, "-n", name,
            "-c", "1", "-E", "-l", "INFO", "-P", "prefork", "--without-mingle", "--without-gossip",
            "--without-heartbeat"]


def instructions(dump_dir):
    """Sum of the `totals:` lines of every process's dump."""
    total = 0
    for path in glob.glob(os.path.join(dump_dir, "cg.*")):
        with open(path) as f:
            for line in f:
                if line.startswith("totals:"):
                    total += int(line.split()[1])
    return total


def measure(which, n):
    q = f"instr-{uuid.uuid4().hex[:6]}"
    idle_q = f"{q}-idle"
    common.declare(q)
    common.declare(idle_q)
    common.prefill(q, n, task="bench.noop")
    dump_dir = tempfile.mkdtemp(prefix="bench-callgrind-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY", "CELERIAC", "BROKER"))}
    env.update(common.lean_trace_switch())
    env["PYTHONPATH"] = str(HERE / "pyapp")
    name = f"{q}@{socket.gethostname()}"
    argv = ["valgrind", "--tool=callgrind", "--quiet", f"--callgrind-out-file={dump_dir}/cg.%p",
            "--dump-instr=no", "--dump-line=no", "--compress-strings=no"]
    argv += worker_argv(which, idle_q, name, tempfile.mkdtemp(prefix="bench-state-"))
    log_path = os.path.join(dump_dir, "worker.log")
    with open(log_path, "wb") as log:
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(HERE / "pyapp"))
    watch = common.LogWatch(log_path)
    try:
        watch.wait("ready" if which == "celery" else "consuming", 1, 600, p)
        time.sleep(5.0)
        processes = len(common.tree(p.pid))
        from celery import Celery

        control = Celery("bench", broker=common.BROKER_URL)
        control.control.add_consumer(q, destination=[name], reply=True, timeout=120)
        control.close()
        watch.wait("succeeded", n, 3600, p, poll=0.5)
        p.terminate()
        p.wait(600)
        time.sleep(2.0)  # the forked processes write their dumps as they exit
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        common.delete(q)
        common.delete(idle_q)
    return instructions(dump_dir), processes


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    which = sys.argv[2].split(",") if len(sys.argv) > 2 else ["celeriac", "celery"]
    results = {}
    for w in which:
        small, processes = measure(w, n)
        large, _ = measure(w, 5 * n)
        per_task = (large - small) / (4 * n)
        results[w] = per_task
        print(f"{w:9s} {per_task / 1000:8.1f} thousand instructions per no-op task "
              f"({processes} processes; {small / 1e9:.2f} G for {n} tasks, {large / 1e9:.2f} G for {5 * n})",
              flush=True)
    if len(results) == 2:
        print(f"celeriac / Celery: {results['celeriac'] / results['celery']:.3f} "
              f"({results['celery'] / results['celeriac']:.1f}x fewer)")


if __name__ == "__main__":
    main()

"""Per-thread CPU and context switches per task of `celeriac -A benchapp
worker -c 1 -E` draining N pre-filled tasks (docs/design/python-task-cost.md).

Usage: .venv/bin/python benches/python_task_threads.py [N] [task]
Needs RabbitMQ on 127.0.0.1:5672 and celeriac installed in the venv.
"""
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import uuid
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common
HZ = os.sysconf("SC_CLK_TCK")
def snap(pids):
    out = {}
    for pid in pids:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                comm = open(f"/proc/{pid}/task/{t}/comm").read().strip()
                st = open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()
                cs = {l.split(":")[0]: int(l.split()[1]) for l in open(f"/proc/{pid}/task/{t}/status") if "ctxt" in l}
            except OSError:
                continue
            out[(pid, t)] = (comm, int(st[11]) / HZ, int(st[12]) / HZ, cs["voluntary_ctxt_switches"] + cs["nonvoluntary_ctxt_switches"])
    return out
task = sys.argv[2] if len(sys.argv) > 2 else "bench.noop"
q = f"prof-{uuid.uuid4().hex[:6]}"
n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
common.declare(q); common.prefill(q, n, task=task)
env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY", "CELERIAC", "BROKER"))}
env["PYTHONPATH"] = str(pathlib.Path(__file__).parent / "pyapp")
log = open(os.path.join(tempfile.mkdtemp(prefix="bench-threads-"), "worker.log"), "wb")
p = subprocess.Popen([str(pathlib.Path(sys.executable).parent / "celeriac"), "-A", "benchapp", "worker", "-Q", q, "-c", "1", "-E", "-l", "INFO",
    "--metrics-bind", "none", "--state-dir", tempfile.mkdtemp(prefix="bench-state-")], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(pathlib.Path(__file__).parent / "pyapp"))
time.sleep(1.5)
pids = [p.pid] + [int(x) for x in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()]
a = snap(pids)
t0 = time.time()
while common.depth(q) > 0 and time.time() - t0 < 120:
    time.sleep(0.1)
time.sleep(0.5)
b = snap(pids)
print(f"{n} tasks in {time.time()-t0:.1f}s")
for k in b:
    comm0, u0, s0, c0 = a.get(k, (b[k][0], 0, 0, 0))
    comm, u1, s1, c1 = b[k]
    print(f"pid {k[0]} {'sup' if k[0]==p.pid else ''} {comm:15s} user {((u1-u0)/n*1e6):7.1f} us/task  sys {((s1-s0)/n*1e6):7.1f} us/task  switches/task {(c1-c0)/n:5.2f}")
p.terminate(); p.wait(); common.delete(q)

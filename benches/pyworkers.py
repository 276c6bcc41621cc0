"""Shared by benches/python_tasks.py and benches/python_memory.py: the bench
apps (benches/pyapp/benchapp.py, and the Django + PostgreSQL project in
benches/djangoapp), launching `celery -A <app> worker` and `celeriac -A <app>
worker` on a queue of their own, the processes of each worker by role, a
private PostgreSQL cluster for the Django app, and memory from /proc:
smaps_rollup per process, the mappings of one process by kind, and the PSS of
the app alone (one plain Python process that imports and finalizes it)."""

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402
import idle  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
VENV = pathlib.Path(sys.executable).parent


@dataclasses.dataclass
class App:
    module: str  # what -A names
    path: pathlib.Path  # PYTHONPATH and working directory
    label: str


APPS = {
    "benchapp": App("benchapp", ROOT / "benches" / "pyapp", "app benches/pyapp/benchapp.py"),
    "django": App("djbench", ROOT / "benches" / "djangoapp",
                  "Django + PostgreSQL app benches/djangoapp, " + (
                      "a new connection per task (BENCH_DB_REUSE_MAX=0: Celery's Django fixup closes it "
                      "around every task)" if os.environ.get("BENCH_DB_REUSE_MAX") == "0" else
                      "persistent connections (CONN_MAX_AGE = 600, CELERY_DB_REUSE_MAX)")),
}

READY = idle.READY
DONE = "succeeded"


def argv(kind, app, queue, state_dir):
    c = "2"
    if kind == "celeriac":
        return [str(VENV / "celeriac"), "-A", app.module, "worker", "-Q", queue, "-c", c, "-E",
                "-n", f"py-rs-{queue}@%h", "-l", "INFO", "--metrics-bind", "none", "--state-dir", state_dir]
    return [str(VENV / "celery"), "-A", app.module, "worker", "-P", "prefork", "-c", c, "-E", "-Q", queue,
            "-n", f"py-py-{queue}@%h", "-l", "INFO", "--without-mingle", "--without-gossip"]


def env(app, extra=None):
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("CELERY", "CELERIAC", "BROKER", "DJANGO_SETTINGS"))}
    e.update(common.lean_trace_switch())
    e["PYTHONPATH"] = str(app.path)
    e.update(extra or {})
    return e


class Worker:
    """One worker on a fresh queue (declared here, deleted by close())."""

    def __init__(self, kind, app, extra_env=None, prefill=None, state_root=None):
        self.kind, self.app = kind, app
        self.queue = f"bench-py-{uuid.uuid4().hex[:8]}"
        common.declare(self.queue)
        if prefill:
            prefill(self.queue)
        self.state_dir = tempfile.mkdtemp(prefix="bench-state-", dir=state_root)
        self.log_path = tempfile.mktemp(prefix=f"bench-py-{kind}-", suffix=".log")
        with open(self.log_path, "wb") as log:
            self.t0 = time.monotonic()
            self.proc = subprocess.Popen(argv(kind, app, self.queue, self.state_dir), stdout=log,
                                         stderr=subprocess.STDOUT, env=env(app, extra_env), cwd=app.path)
        self.watch = common.LogWatch(self.log_path)

    def wait_ready(self, timeout=120):
        needle, count = READY[self.kind]
        self.watch.wait(needle, count, timeout, self.proc, poll=0.002)
        return time.monotonic() - self.t0

    def roles(self):
        """[(role, pid)]: celery's main and pool processes; celeriac's supervisor, control and task processes."""
        # idle.roles lists celeriac's task processes before its control process: put control first.
        return sorted(idle.roles(self.kind, self.proc.pid, self.state_dir), key=lambda r: r[0].startswith("task "))

    def close(self):
        common.stop(self.proc)
        common.delete(self.queue)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        try:
            os.unlink(self.log_path)
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def prefill(queue, task, args_of, n):
    """n messages of `task`; message i gets args_of(i)."""
    conn, ch = common.channel()
    for i in range(n):
        ch.basic_publish(common.task_message(task, args_of(i)), exchange="", routing_key=queue)
    conn.close()


# --- PostgreSQL for the Django app -------------------------------------------------------------

class DjangoDatabase:
    """A private PostgreSQL cluster (tests/interop/private_postgres.py: initdb into a temporary directory,
    a free port, trust authentication) with a database `bench` holding `rows` rows of rows.Item.
    `env` is what the workers need (BENCH_DATABASE_URL); `pks` the rows' primary keys."""

    def __init__(self, rows=1000):
        sys.path.insert(0, str(ROOT / "tests" / "interop"))
        from private_postgres import PrivatePostgres
        self.server = PrivatePostgres().start()
        try:
            self.server.sql("CREATE DATABASE bench")
            self.env = {"BENCH_DATABASE_URL": self.server.dsn("bench")}
            setup = (
                "import django, json; django.setup()\n"
                "from django.core.management import call_command\n"
                "call_command('migrate', run_syncdb=True, verbosity=0)\n"
                "from rows.models import Item\n"
                f"Item.objects.bulk_create([Item(sku=f'sku-{{i}}', name=f'Item {{i}}', stock=i) for i in range({rows})],"
                " batch_size=1000)\n"
                "print(json.dumps(list(Item.objects.values_list('pk', flat=True))))\n")
            out = subprocess.run([sys.executable, "-c", setup], env=env(APPS["django"], {
                **self.env, "DJANGO_SETTINGS_MODULE": "djbench.settings"}), cwd=APPS["django"].path,
                capture_output=True, text=True, check=True)
            self.pks = json.loads(out.stdout.strip().splitlines()[-1])
        except BaseException:
            self.server.close()
            raise

    def close(self):
        self.server.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- memory ------------------------------------------------------------------------------------

def rollup(pid):
    """/proc/<pid>/smaps_rollup as {field: bytes} (Rss, Pss, Private_Dirty, ...); {} once the process is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:
        pass
    return out


APP_ALONE = """
import sys
from celery.app.utils import find_app
app = find_app(sys.argv[1])
app.loader.import_default_modules()   # the task modules (Django: django.setup() first, by Celery's fixup)
app.finalize(auto=True)
print("ready", flush=True)
sys.stdin.read()                      # kept alive while measured
"""


def app_alone_pss(app, extra_env=None, settle=2.0, detail=False):
    """PSS (bytes) of one plain Python process that imports the app, imports its task modules and finalizes it;
    with detail, (PSS, its mappings() too). Measure it while no worker runs: file pages a worker shares with it
    would be split between them."""
    proc = subprocess.Popen([sys.executable, "-c", APP_ALONE, app.module], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env(app, extra_env), cwd=app.path, text=True)
    try:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the app alone did not load ({app.module}): exit {proc.wait()}")
        time.sleep(settle)
        pss = rollup(proc.pid)["Pss"]
        return (pss, mappings(proc.pid)) if detail else pss
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


HEAP_MAX = 64 << 20  # glibc: a thread's malloc arena is a heap of this size, aligned to it


def thread_stack_pointers(pid):
    """Stack pointers of the process's threads that are blocked in a system call (/proc/<pid>/task/*/syscall)."""
    sps = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return sps
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                parts = f.read().split()
            if parts and parts[0] != "running" and len(parts) >= 3:
                sps.append(int(parts[-2], 16))
        except (OSError, ValueError):
            continue
    return sps


def mappings(pid):
    """[{start, end, perms, path, kind, Pss, Private, Private_Dirty, Rss}] from /proc/<pid>/smaps, each
    mapping given a kind: heap (brk: the main thread's malloc: Python's blocks over 512 bytes, the main
    thread's Rust allocations), malloc arena of a thread (glibc: where the Rust runtime threads allocate),
    stack, anonymous (Python's obmalloc arenas, malloc's mmap'd blocks, other anonymous memory), lib <name>.so,
    python binary, shared memory (shared anonymous mappings too), other file."""
    maps, cur = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                cur = {"start": start, "end": end, "perms": head[1],
                       "path": head[5].strip() if len(head) > 5 else "", "Pss": 0, "Private": 0,
                       "Private_Dirty": 0, "Rss": 0}
                maps.append(cur)
            elif cur is not None and len(head) >= 2 and head[0].endswith(":"):
                key = head[0][:-1]
                if key in ("Pss", "Rss", "Private_Dirty"):
                    cur[key] = int(head[1]) * 1024
                if key in ("Private_Clean", "Private_Dirty"):
                    cur["Private"] += int(head[1]) * 1024
    sps = thread_stack_pointers(pid)
    exe = os.path.realpath(f"/proc/{pid}/exe")
    for i, m in enumerate(maps):
        path = m["path"]
        prev = maps[i - 1] if i else None
        nxt = maps[i + 1] if i + 1 < len(maps) else None
        if path == "[heap]":
            kind = "heap"
        elif path == "[stack]" or any(m["start"] <= sp < m["end"] for sp in sps):
            kind = "stack"
        elif path.startswith("["):
            kind = "kernel " + path
        elif not path:
            if (m["start"] % HEAP_MAX == 0 and nxt is not None and nxt["start"] == m["end"]
                    and nxt["perms"].startswith("---") and not nxt["path"]):
                kind = "malloc arena of a thread"
            elif (prev is not None and prev["end"] == m["start"] and prev["perms"].startswith("---")
                  and not prev["path"] and m["perms"].startswith("rw")
                  and 64 << 10 <= m["end"] - m["start"] <= 16 << 20 and m["start"] % HEAP_MAX != 0):
                kind = "stack"  # a thread's stack above its guard page (a running thread has no syscall SP)
            else:
                kind = "anonymous"
        elif ".so" in os.path.basename(path):
            kind = "lib " + os.path.basename(path)
        elif os.path.realpath(path.split(" (deleted)")[0]) == exe:
            kind = "python binary"
        elif path.startswith(("/dev/shm", "/memfd:", "/SYSV", "/dev/zero")):
            kind = "shared memory"  # /dev/zero (deleted): a MAP_SHARED anonymous region (celeriac's shared state)
        else:
            kind = "other file"
        m["kind"] = kind
    return maps


def mark_new(maps, parent_maps):
    """Sets m["new"] on each mapping: True when no mapping of the parent overlaps it (made after the fork)."""
    spans = sorted((m["start"], m["end"]) for m in parent_maps)
    for m in maps:
        m["new"] = not any(s < m["end"] and m["start"] < e for s, e in spans)
    return maps


def by_kind(maps):
    """{kind: (private bytes, PSS bytes, private bytes in mappings made after the fork)}; libraries are also
    summed as 'lib .so (all)' besides their own rows."""
    out = {}
    for m in maps:
        for k in ((m["kind"], "lib .so (all)") if m["kind"].startswith("lib ") else (m["kind"],)):
            p, s, n = out.get(k, (0, 0, 0))
            out[k] = (p + m["Private"], s + m["Pss"], n + (m["Private"] if m.get("new") else 0))
    return out


def coarse(kind):
    """The kind of a mapping in a few groups: celeriac's own library and libpython apart from other libraries."""
    if kind == "lib _native.abi3.so":
        return "lib _native.abi3.so (celeriac's Rust code)"
    if kind.startswith("lib libpython"):
        return "lib libpython"
    if kind.startswith("lib "):
        return "other lib .so"
    if kind.startswith("kernel "):
        return "kernel ([vdso] etc.)"
    return kind


def pss_by_coarse_kind(maps_list):
    """{coarse kind: PSS bytes} summed over the mappings of several processes."""
    out = {}
    for maps in maps_list:
        for m in maps:
            k = coarse(m["kind"])
            out[k] = out.get(k, 0) + m["Pss"]
    return out


def foreign_workers(root):
    """Pids of other Celery or celeriac processes on the machine (outside the tree of `root`): they share file
    pages with the measured worker (so its PSS reads lower) and take CPU."""
    ours = set(common.tree(root)) | {os.getpid()}
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in ours:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        # `celery ...`, `python .../celeriac ...`, or a pool process renamed `[celeryd: ...]`.
        if any(os.path.basename(a) in (b"celery", b"celeriac") for a in args[:3]) or args[0].startswith(b"[celeryd"):
            out.append(int(entry))
    return out


def mib(b):
    return b / 2**20

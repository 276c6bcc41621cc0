"""Shared helpers for the side-by-side benchmarks: process-tree CPU and RSS
from /proc, raw AMQP pre-filling, and log timestamps."""

import json
import os
import re
import subprocess
import time
import uuid

import amqp

BROKER_HOST = os.environ.get("BENCH_AMQP_HOST", "127.0.0.1:5672")
BROKER_URL = f"amqp://guest:guest@{BROKER_HOST}//"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def tree(pid):
    """pid and all its descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except OSError:
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid):
    """User+system CPU of the process tree (live processes)."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            continue
    return total / CLK_TCK


def rss_bytes(pid):
    """Resident memory of the process tree (sum of RSS)."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            continue
    return total


def pss_bytes(pid):
    """Proportional set size of the process tree: shared pages counted once,
    which is what the memory cgroup of a container is charged."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def channel():
    conn = amqp.Connection(host=BROKER_HOST, userid="guest", password="guest")
    conn.connect()
    return conn, conn.channel()


def declare(queue):
    conn, ch = channel()
    ch.exchange_declare(queue, "direct", durable=True, auto_delete=False)
    ch.queue_declare(queue, durable=True, auto_delete=False)
    ch.queue_bind(queue, queue, queue)
    conn.close()


def delete(queue):
    conn, ch = channel()
    try:
        ch.queue_delete(queue)
        ch.exchange_delete(queue)
    finally:
        conn.close()


def task_message(task, args, kwargs=None, **headers):
    task_id = str(uuid.uuid4())
    h = {
        "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
        "root_id": task_id, "parent_id": None, "argsrepr": repr(tuple(args)), "kwargsrepr": "{}",
        "origin": "bench@localhost", "ignore_result": True, "replaced_task_nesting": 0,
        "stamped_headers": None, "stamps": {},
    }
    h.update(headers)
    body = json.dumps([list(args), kwargs or {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return amqp.Message(body, content_type="application/json", content_encoding="utf-8",
                        application_headers=h, delivery_mode=2, priority=0, correlation_id=task_id)


def prefill(queue, n, task="celeriac.noop", args=()):
    conn, ch = channel()
    for _ in range(n):
        ch.basic_publish(task_message(task, args), exchange="", routing_key=queue)
    conn.close()


def depth(queue):
    conn, ch = channel()
    try:
        return ch.queue_declare(queue, passive=True)[1]
    finally:
        conn.close()


STAMP = re.compile(r"(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[.,]\d+)")


def stamp_seconds(line):
    """Epoch seconds from a celeriac (RFC 3339, UTC) or Celery ('YYYY-MM-DD HH:MM:SS,mmm', local) log line."""
    m = STAMP.search(line)
    if not m:
        return None
    text = m.group(1).replace(",", ".").replace("T", " ")
    day, clock = text.split(" ")
    secs = time.mktime(time.strptime(f"{day} {clock.split('.')[0]}", "%Y-%m-%d %H:%M:%S"))
    if "T" in m.group(1):  # UTC
        secs -= time.timezone if time.localtime().tm_isdst == 0 else time.altzone
    frac = "0." + clock.split(".")[1]
    return secs + float(frac)


class LogWatch:
    """Follows a log file incrementally (cheap to poll while a benchmark runs)."""

    def __init__(self, path):
        self.path, self.offset, self.text, self.counts = path, 0, [], {}

    def _read(self):
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        # Keep a partial last line for the next read.
        cut = chunk.rfind(b"\n") + 1
        self.offset += cut
        for line in chunk[:cut].decode(errors="replace").splitlines():
            self.text.append(line)
            for needle in self.counts:
                if needle in line:
                    self.counts[needle] += 1

    def wait(self, needle, count, timeout, proc=None, poll=0.05):
        if needle not in self.counts:
            self.counts[needle] = sum(needle in l for l in self.text)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read()
            if self.counts[needle] >= count:
                return self.text
            if proc is not None and proc.poll() is not None:
                self._read()
                raise RuntimeError(f"worker exited early:\n" + "\n".join(self.text[-40:]))
            time.sleep(poll)
        raise TimeoutError(f"{needle!r} x{count} not seen in {self.path} within {timeout}s")


def stop(proc, timeout=60):
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def ratio(a, b):
    return f"{a / b:.1f}×" if b else "n/a"


def lean_trace_switch():
    """``CELERIAC_LEAN_TRACE`` from this environment, for the celeriac workers a bench starts
    (``CELERIAC_LEAN_TRACE=0``: the lean trace path off, for an A/B run)."""
    value = os.environ.get("CELERIAC_LEAN_TRACE")
    return {} if value is None else {"CELERIAC_LEAN_TRACE": value}

"""Cost of one Kubernetes exec probe: celeriac's probe binaries against a
live celeriac worker, next to `celery inspect ping -d <node>` against a live
Python Celery worker, in the same run. Wall time is measured around each run,
peak RSS by GNU `/usr/bin/time -v`: what kubelet's exec would spend.

Usage: .venv/bin/python benches/probes.py [--runs N]
Needs RabbitMQ, `cargo build --release`, and /usr/bin/time (Debian's `time`).
"""

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def timed(argv, env=None):
    """(exit code, wall seconds, peak RSS KiB) of one probe. Wall time is taken
    around a direct run (GNU time reports only hundredths); peak RSS comes
    from a second run under `/usr/bin/time -v`."""
    start = time.perf_counter()
    code = subprocess.run(argv, capture_output=True, env=env).returncode
    wall = time.perf_counter() - start
    p = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, env=env)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return code, wall, rss


def summary(samples):
    walls = sorted(s[1] for s in samples)
    return {
        "ok": all(s[0] == 0 for s in samples),
        "median_ms": statistics.median(walls) * 1000,
        "p95_ms": walls[int(len(walls) * 0.95) - 1] * 1000,
        "rss_mib": max(s[2] for s in samples) / 1024,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--celery-runs", type=int, default=10)
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "BROKER_", "CELERIAC_"))}
    env["CELERY_BROKER_URL"] = common.BROKER_URL
    state = tempfile.mkdtemp(prefix="bench-probe-state-")
    q = f"bench-probe-{uuid.uuid4().hex[:8]}"
    rs_node, py_node = f"bench-rs-{q}@localhost", f"bench-py-{q}@localhost"
    log = open(tempfile.mktemp(suffix=".log"), "wb")
    worker = subprocess.Popen([str(ROOT / "target/release/celeriac"), "worker", "-Q", q, "-c", "2", "-n", rs_node,
                               "--state-dir", state, "--metrics-bind", "none"], stdout=log, stderr=log, env=env)
    pyworker = subprocess.Popen([str(ROOT / ".venv/bin/celery"), "-A", "celery_app", "worker", "-P", "prefork", "-c", "2",
                                 "-Q", q + "-py", "-n", py_node, "--without-mingle", "--without-gossip"],
                                stdout=log, stderr=log, env=env, cwd=ROOT / "benches")
    try:
        readiness = [str(ROOT / "target/release/worker-readiness"), "--state-dir", state]
        liveness = [str(ROOT / "target/release/worker-liveness"), "--state-dir", state]
        deadline = time.monotonic() + 60
        while subprocess.run(readiness, capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit("celeriac worker did not become ready")
            time.sleep(0.2)
        ping = [str(ROOT / ".venv/bin/celery"), "-b", common.BROKER_URL, "inspect", "ping", "-d", py_node]
        deadline = time.monotonic() + 60
        while subprocess.run(ping, capture_output=True, env=env, cwd="/").returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit("celery worker did not answer ping")
            time.sleep(0.5)
        results = {
            "worker-readiness": summary([timed(readiness) for _ in range(a.runs)]),
            "worker-liveness": summary([timed(liveness) for _ in range(a.runs)]),
            "celery inspect ping -d": summary([timed(ping, env) for _ in range(a.celery_runs)]),
        }
    finally:
        for p in (worker, pyworker):
            common.stop(p)
        for name in (q, q + "-py"):
            try:
                common.delete(name)
            except Exception:
                pass
    base = results["celery inspect ping -d"]
    print(f"\nOne exec probe ({a.runs} runs each for celeriac, {a.celery_runs} for Celery)\n")
    print("| probe | succeeded | median wall | p95 wall | peak RSS | vs Celery (wall / RSS) |")
    print("|---|---|---:|---:|---:|---:|")
    for name, r in results.items():
        ratio = "—" if name.startswith("celery") else f"{base['median_ms'] / r['median_ms']:.0f}× / {base['rss_mib'] / r['rss_mib']:.0f}×"
        print(f"| `{name}` | {'yes' if r['ok'] else 'NO'} | {r['median_ms']:.1f} ms | {r['p95_ms']:.1f} ms | "
              f"{r['rss_mib']:.2f} MiB | {ratio} |")


if __name__ == "__main__":
    main()

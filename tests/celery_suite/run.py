"""Celery's own integration suite (t/integration of the Celery 5.7.0 sdist) as
a conformance test for celeriac.

The suite runs twice, each time against an external worker process that
imports the suite's tasks (celery_suite_app.py): once `celery -A
celery_suite_app worker -P prefork`, once `celeriac -A celery_suite_app worker`.
The gate: every test that passes against `celery worker` must pass against
celeriac, except the tests listed in celeriac_inherent_failures.txt (by
design) and celeriac_open_failures.txt (known gaps, each with its diagnosis,
to be fixed: reported on every run, and a listed test that passes is named
so the list only shrinks).
external_worker_limits.txt lists the tests that cannot pass against any
external worker (they fail against `celery worker` too), with the reason.

Celery's sdist is fetched with pip at test time into .cache/celery-suite/ (git
ignored), with the per-test report (report.json, report.txt) and each run's
worker log. The broker is a RabbitMQ vhost of its own, made anew for each run;
the result backend is Redis db 11, flushed before each run.

Usage: .venv/bin/python tests/celery_suite/run.py [--worker celery|celeriac ...]
                                                  [--timeout S] [-- pytest args]
Exit status: 0 when the gate holds, 1 otherwise."""

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import redis

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
CACHE = ROOT / ".cache" / "celery-suite"
CELERY_VERSION = "5.7.0"
SUITE = CACHE / f"celery-{CELERY_VERSION}"
VHOST = "celeriac-celery-suite"
BROKER = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
BACKEND = "redis://127.0.0.1:6379/11"
VENV_BIN = pathlib.Path(sys.executable).parent
PROGRAMS = {
    "celery": VENV_BIN / "celery",
    "celeriac": pathlib.Path(os.environ.get("CELERIAC_PY_BIN") or VENV_BIN / "celeriac"),
}
PASSES, SKIPS = ("passed", "xpass"), ("skipped", "xfail")
# Suite files left out, with the reason: no worker is involved in them, and they cannot pass here.
IGNORED = {
    "t/integration/test_backend.py": "the Azure Block Blob result backend: needs the azure SDK and a storage account",
    "t/integration/test_backend_leak_in_fixture_teardown.py":
        "starts celery.contrib.testing's embedded worker 20 times in the test process: longer than the "
        "per-test timeout on 2 cores",
    "t/integration/test_mem_leak_in_exception_handling.py":
        "eager tasks in the test process; measures memory growth with tracemalloc unless psutil is installed, "
        "and then fails on any growth above 10% of a near-zero baseline",
}
# Tests left out unless --slow, with the reason: together they take about 6 minutes per worker.
SLOW = {
    "t/integration/test_canvas.py::test_chord::test_disabling_flag_allow_error_cb_on_chord_header":
        "150 s: seven chords, each waiting 10 s twice for callbacks that must not come",
    "t/integration/test_canvas.py::test_chord::test_enabling_flag_allow_error_cb_on_chord_header":
        "85 s: the same, on fewer chords",
    "t/integration/test_canvas.py::test_chord::test_flag_allow_error_cb_on_chord_header_on_upgraded_chord":
        "65 s: the same, on fewer chords",
    "t/integration/test_canvas.py::test_chord::test_error_propagates_from_chord":
        "60 s: marked xfail by the suite for Redis result backends (Celery issue 6437); waits out its timeout",
}
SLOW_TIMEOUT = 300


def say(text):
    print(f"== celery suite: {text}", file=sys.stderr, flush=True)


def fetch_suite():
    """Celery's sdist, downloaded once, with its t/ tree extracted beside it."""
    if (SUITE / "t" / "integration" / "conftest.py").exists():
        return
    download = CACHE / "download"
    sdist = download / f"celery-{CELERY_VERSION}.tar.gz"
    if not sdist.exists():
        say(f"downloading the celery {CELERY_VERSION} sdist")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                        "--no-binary", ":all:", "-d", str(download), f"celery=={CELERY_VERSION}"], check=True)
    prefix = f"celery-{CELERY_VERSION}/t/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        tar.extractall(CACHE, members=members, filter="data")


def rabbitmqctl(*args, check=True):
    return subprocess.run(["rabbitmqctl", "-q", *args], check=check, capture_output=True, text=True)


def fresh_broker_and_backend():
    """An empty vhost of our own for the broker, an empty Redis db for results."""
    rabbitmqctl("delete_vhost", VHOST, check=False)
    rabbitmqctl("add_vhost", VHOST)
    rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    client = redis.Redis.from_url(BACKEND)
    client.flushdb()
    client.close()


def clean_env():
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("CELERY", "BROKER", "CELERIAC", "RESULT_BACKEND", "SSL_CERT_", "PYTEST"))}


def kill_worker(pid_file):
    """The external worker, should pytest have died without stopping it."""
    try:
        pid = int(pid_file.read_text())
        os.killpg(pid, signal.SIGKILL)
        say(f"killed the worker left running (pid {pid})")
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pass


def run_side(kind, timeout, per_test_timeout, pytest_args, deselect):
    """One pytest run of the suite against `kind`'s worker: {nodeid: outcome entry}, error or None."""
    program = PROGRAMS[kind]
    if not program.exists():
        return {}, f"{program} is missing (tests/run.sh installs celeriac into the venv with `pip install .`)"
    out = CACHE / kind
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    results, pid_file = out / "results.json", out / "worker.pid"
    env = clean_env()
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": f"{SUITE}{os.pathsep}{HERE}",
        "TEST_BROKER": BROKER,
        "TEST_BACKEND": BACKEND,
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": "6379",
        "CELERIAC_STATE_DIR": str(out / "celeriac-state"),
        "CELERIAC_METRICS_BIND": "none",
        "CONFORMANCE_PROGRAM": str(program),
        "CONFORMANCE_WORKER_LOG": str(out / "worker.log"),
        "CONFORMANCE_WORKER_PID": str(pid_file),
        "CONFORMANCE_RESULTS": str(results),
        "CONFORMANCE_TIMEOUT": str(per_test_timeout),
        "CONFORMANCE_SLOW_TESTS": "\n".join(SLOW),
        "CONFORMANCE_SLOW_TIMEOUT": str(SLOW_TIMEOUT),
    })
    fresh_broker_and_backend()
    argv = [sys.executable, "-m", "pytest", "-c", str(HERE / "pytest.ini"), "--rootdir", str(SUITE),
            "-p", "celery_suite_plugin", "-p", "no:cacheprovider", "-q", "-rfE", "--timeout", str(per_test_timeout),
            "--durations=15", *(pytest_args or ["t/integration", *(f"--ignore={path}" for path in IGNORED)]),
            *(f"--deselect={nodeid}" for nodeid in deselect)]
    say(f"{kind}: pytest against `{program.name} -A celery_suite_app worker` (log: {out / 'pytest.log'})")
    started = time.monotonic()
    with open(out / "pytest.log", "wb") as log:
        proc = subprocess.Popen(argv, cwd=SUITE, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    kill_worker(pid_file)
    elapsed = time.monotonic() - started
    say(f"{kind}: pytest exited with {code} after {elapsed:.0f} s")
    outcomes = json.loads(results.read_text()) if results.exists() else {}
    if code is None:
        return outcomes, f"pytest did not finish within {timeout} s"
    if code not in (0, 1):  # 2 interrupted, 3 internal error, 4 usage error, 5 no tests
        return outcomes, f"pytest exited with {code} (see {out / 'pytest.log'})"
    if not outcomes:
        return outcomes, "no test outcome was recorded"
    return outcomes, None


def read_list(name):
    """{nodeid: reason} from a list file: `nodeid -- reason` lines, # comments."""
    entries = {}
    for line in (HERE / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            nodeid, _, reason = line.partition(" -- ")
            entries[nodeid.strip()] = reason.strip()
    return entries


def counts(outcomes):
    values = [e["outcome"] for e in outcomes.values()]
    passed = sum(values.count(p) for p in PASSES)
    skipped = sum(values.count(s) for s in SKIPS)
    return passed, len(values) - passed - skipped, skipped


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="append", choices=sorted(PROGRAMS),
                        help="run against this worker only (repeatable; default: both)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds one test may take (default 60)")
    parser.add_argument("--run-timeout", type=float, default=1800, help="seconds one pytest run may take")
    parser.add_argument("--all", action="store_true",
                        help="run the tests of external_worker_limits.txt too (left out by default: they cannot pass)")
    parser.add_argument("--slow", action="store_true",
                        help=f"run the slow tests too (SLOW in this file; each may take {SLOW_TIMEOUT} s)")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest instead of t/integration")
    args = parser.parse_args()
    kinds = args.worker or ["celery", "celeriac"]

    CACHE.mkdir(parents=True, exist_ok=True)
    fetch_suite()
    limits, inherent = read_list("external_worker_limits.txt"), read_list("celeriac_inherent_failures.txt")
    known = read_list("celeriac_open_failures.txt")
    deselect = ([] if args.all else sorted(limits)) + ([] if args.slow else sorted(SLOW))
    runs, errors, seconds = {}, [], {}
    for kind in kinds:
        started = time.monotonic()
        runs[kind], error = run_side(kind, args.run_timeout, args.timeout, args.pytest_args, deselect)
        seconds[kind] = round(time.monotonic() - started)
        if error:
            errors.append(f"{kind}: {error}")

    tests = sorted(set().union(*(r.keys() for r in runs.values())))
    report = {t: {k: runs[k].get(t, {}).get("outcome") or "not run" for k in kinds} for t in tests}
    lines = [f"{'  '.join(f'{v[k]:8}' for k in kinds)}  {t}" for t, v in report.items()]
    for kind in kinds:
        passed, failed, skipped = counts(runs[kind])
        lines.append(f"{kind} worker ({seconds[kind]} s): passed {passed}, failed {failed}, skipped {skipped}")

    violations, open_failures = [], []
    if len(kinds) == 2:
        celery, celeriac = runs["celery"], runs["celeriac"]
        for t in tests:
            if t in celery and celery[t]["outcome"] in PASSES \
                    and celeriac.get(t, {}).get("outcome") not in PASSES and t not in inherent:
                (open_failures if t in known else violations).append(t)
        fixed = [t for t in known if celeriac.get(t, {}).get("outcome") in PASSES]
        for t in open_failures:
            lines.append(f"OPEN (celeriac_open_failures.txt, to fix): fails against celeriac: {t}")
        if fixed:
            lines.append("listed in celeriac_open_failures.txt but passed against celeriac (take them off the list): "
                         + ", ".join(fixed))
        stale = [t for t in limits if celery.get(t, {}).get("outcome") in PASSES]
        unlisted = [t for t in tests if celery.get(t, {}).get("outcome") not in (*PASSES, *SKIPS)
                    and t not in limits]
        if stale:
            lines.append("listed in external_worker_limits.txt but passed against celery worker: " + ", ".join(stale))
        if unlisted:
            lines.append("failed against celery worker, not in external_worker_limits.txt: " + ", ".join(unlisted))
        for t in violations:
            entry = celeriac.get(t, {})
            detail = (entry.get("subtest_failures") or [entry.get("message", "")])[0]
            lines.append(f"GATE: passes against celery worker, {entry.get('outcome', 'not run')} against "
                         f"celeriac: {t}\n{detail[-1500:]}")
    lines.extend(f"ERROR {e}" for e in errors)

    (CACHE / "report.json").write_text(json.dumps({"tests": report, "seconds": seconds, "errors": errors,
                                                   "gate_violations": violations,
                                                   "details": runs}, indent=1, sort_keys=True))
    (CACHE / "report.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[len(tests):]))
    say(f"per-test report: {CACHE / 'report.txt'}")
    if len(kinds) == 2:
        gated = (sum(1 for t in tests if runs["celery"].get(t, {}).get("outcome") in PASSES)
                 - len(violations) - len(open_failures))
        print(f"open celeriac failures (celeriac_open_failures.txt): {len(open_failures)}")
        print(f"gate: {gated} passed, {len(violations)} failed")
    return 1 if violations or errors else 0


if __name__ == "__main__":
    sys.exit(main())

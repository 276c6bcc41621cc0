"""Celery's command line, option by option: every option that `celery worker
--help` and `celery --help` list (Celery 5.7, from the test venv) is either
accepted by celeriac — the worker starts with it — or refused with exit 64
and one line that names it and says what to do instead. A Celery release
that adds an option fails this test until the option is handled."""

import re
import subprocess
import sys
import pathlib

import pytest

from conftest import worker_binary

CELERY = pathlib.Path(sys.executable).parent / "celery"
UNREACHABLE = "amqp://guest:guest@127.0.0.1:1//"

# A value for each option that takes one (an example a user would write).
VALUES = {
    "--hostname": "w1@%h", "--statedb": "/tmp/worker.state", "--loglevel": "INFO", "--optimization": "fair",
    "--prefetch-multiplier": "1", "--concurrency": "1", "--pool": "prefork", "--time-limit": "60",
    "--soft-time-limit": "50", "--max-tasks-per-child": "100", "--pool-start-method": "fork",
    "--max-memory-per-child": "200000", "--queues": "celery", "--exclude-queues": "other",
    "--include": "proj.tasks", "--heartbeat-interval": "5", "--autoscale": "10,3",
    "--schedule-filename": "/tmp/beat-schedule", "--scheduler": "celery.beat:PersistentScheduler",
    "--logfile": "/tmp/worker.log", "--pidfile": "/tmp/worker.pid", "--uid": "1000", "--gid": "1000",
    "--umask": "0022", "--executable": "/usr/bin/python3", "--app": "proj", "--broker": UNREACHABLE,
    "--result-backend": "rpc://", "--loader": "default", "--config": "celeryconfig", "--workdir": "/tmp",
}

# What celeriac does with each: "accept" runs the worker, "refuse" exits 64.
EXPECTED = {
    "--hostname": "accept", "--detach": "refuse", "--statedb": "refuse", "--loglevel": "accept",
    "--optimization": "accept", "--prefetch-multiplier": "accept", "--disable-prefetch": "refuse",
    "--concurrency": "accept", "--pool": "accept", "--task-events": "accept", "--time-limit": "accept",
    "--soft-time-limit": "accept", "--max-tasks-per-child": "accept", "--pool-start-method": "accept",
    "--max-memory-per-child": "accept", "--purge": "refuse", "--queues": "accept",
    "--exclude-queues": "accept", "--include": "refuse", "--without-gossip": "accept",
    "--without-mingle": "accept", "--without-heartbeat": "accept", "--heartbeat-interval": "accept",
    "--autoscale": "refuse", "--beat": "refuse", "--schedule-filename": "refuse", "--scheduler": "refuse",
    "--logfile": "refuse", "--pidfile": "refuse", "--uid": "refuse", "--gid": "refuse", "--umask": "accept",
    "--executable": "refuse", "--app": "refuse", "--broker": "accept", "--result-backend": "accept",
    "--loader": "refuse", "--config": "refuse", "--workdir": "accept", "--no-color": "accept",
    "--quiet": "accept", "--skip-checks": "accept", "--version": "print", "--help": "print",
}


def options_of(*argv):
    """(long option, its short option or None, takes a value) for each option in a help text."""
    text = subprocess.run([str(CELERY), *argv, "--help"], capture_output=True, text=True, timeout=60).stdout
    found = []
    for line in text.splitlines():
        m = re.match(r"^\s+((?:-\w, )?--[a-z][\w-]*(?:, --[a-z][\w-]*)*)(\s+(?!\s)\S.*)?$", line)
        if not m:
            continue
        names = [n.strip() for n in m.group(1).split(",")]
        short = next((n for n in names if re.fullmatch(r"-\w", n)), None)
        long = next(n for n in names if n.startswith("--"))
        rest = (m.group(2) or "").strip()
        takes_value = bool(rest) and (rest.startswith(("[", "<")) or rest.split()[0].isupper())
        found.append((long, short, takes_value))
    return found


WORKER = options_of("worker")
GLOBAL = options_of()


def test_the_help_texts_were_read():
    assert len(WORKER) >= 30 and any(o[0] == "--autoscale" for o in WORKER), WORKER
    assert {"--app", "--broker", "--workdir"} <= {o[0] for o in GLOBAL}, GLOBAL


def run(args, tmp_path, global_option=False):
    # Celery takes its global options before the subcommand (celeriac takes them on either side).
    before, after = (args, []) if global_option else ([], args)
    return subprocess.run(
        [worker_binary(), *before, "worker", *after, "-b", UNREACHABLE, "--boot-timeout", "0", "--metrics-bind", "none",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "CELERIAC_LOGLEVEL": "ERROR"},
    )


@pytest.mark.parametrize("option", WORKER + GLOBAL, ids=lambda o: o[0])
def test_every_celery_option_is_accepted_or_refused_in_one_line(option, tmp_path):
    long, short, takes_value = option
    assert long in EXPECTED, f"Celery has an option celeriac does not handle yet: {long}"
    for spelling in [long] + ([short] if short else []):
        args = [spelling] + ([VALUES[long]] if takes_value else [])
        p = run(args, tmp_path, global_option=option in GLOBAL)
        want = EXPECTED[long]
        if want == "print":
            assert p.returncode == 0 and p.stdout.strip(), p
        elif want == "refuse":
            lines = p.stderr.strip().splitlines()
            assert p.returncode == 64 and len(lines) == 1, p
            assert long in lines[0] or (long == "--discard" and "--purge" in lines[0]), lines[0]
            assert "not supported by celeriac" in lines[0] or "not available" in lines[0], lines[0]
        else:
            # Accepted: the worker starts, finds no broker within --boot-timeout 0, and exits 1.
            assert p.returncode == 1, (args, p.returncode, p.stderr[-800:])
            assert "cannot start task processes" in p.stderr, p.stderr[-800:]

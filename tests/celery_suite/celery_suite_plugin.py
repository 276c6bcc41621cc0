"""pytest plugin that runs Celery's integration suite against an external worker.

Loaded with `-p celery_suite_plugin` by tests/celery_suite/run.py, before the
suite's conftest is imported. It

- replaces the suite's embedded session worker (a WorkController in a thread of
  the test process) by an external worker process: CONFORMANCE_PROGRAM
  (`celery` or `celeriac`) with `-A celery_suite_app worker -P prefork -c 1`,
  named as the embedded worker would be (anon_nodename() of this process),
  started when a test first needs it, started again after a test it died in
  (the test's entry says so), and stopped when the session ends;
- caps the per-test timeout and the reruns the suite's markers ask for, so a
  hang or a steady failure costs minutes, not hours;
- points the suite's own Redis keys at the result backend's db
  (celery_suite_redis.py), as the worker's app does;
- makes the `manager` fixture's wait for an idle worker after each test ask
  that one worker and return on its reply, instead of listening a full second
  for any number of workers (the same check, without the wait);
- writes each test's outcome to CONFORMANCE_RESULTS (JSON) for run.py."""

import json
import os
import pathlib
import signal
import subprocess
import time

import pytest

import celery.contrib.pytest as celery_pytest
from celery.contrib.testing.manager import Manager
from celery.result import _set_task_join_will_block
from celery.utils.nodenames import anon_nodename
from kombu.exceptions import ContentDisallowed

from celery_suite_redis import use_backend_db
from t.integration import tasks as suite_tasks

TIMEOUT = float(os.environ.get("CONFORMANCE_TIMEOUT", "60"))
SLOW_TESTS = set(os.environ.get("CONFORMANCE_SLOW_TESTS", "").split())
SLOW_TIMEOUT = float(os.environ.get("CONFORMANCE_SLOW_TIMEOUT", "300"))
RERUNS = int(os.environ.get("CONFORMANCE_RERUNS", "1"))
READY_TIMEOUT = 60

# Celery's fixtures (celery_parameters, use_celery_app_trap, ...), which the suite's conftest
# imports only in part: Celery's own test setup gets them from a plugin package.
pytest_plugins = ["celery.contrib.pytest"]


class ExternalWorker:
    """The worker process; `hostname` is the node name the suite expects."""

    def __init__(self, program, hostname, log_path, pid_path):
        self.hostname = hostname
        self.pid_path = pathlib.Path(pid_path)
        self.log_path = pathlib.Path(log_path)
        argv = [program, "-A", "celery_suite_app", "worker", "-P", "prefork", "-c", "1", "-n", hostname,
                "--without-mingle", "--without-gossip", "--without-heartbeat", "-l", "INFO"]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid_path.write_text(str(self.proc.pid))

    def wait_ready(self, app):
        """Ready = it answers a control ping and runs the testing ping task."""
        from celery.contrib.testing.tasks import ping

        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}; see {self.log_path}")
            if app.control.ping([self.hostname], timeout=1.0):
                assert ping.apply_async(app=app).get(timeout=30) == "pong"
                return
        raise RuntimeError(f"worker not ready within {READY_TIMEOUT}s; see {self.log_path}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of it: the main process, or task processes it left behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.pid_path.unlink(missing_ok=True)
        self._log.close()


_session = {}  # the running ExternalWorker and the app that checks it


def start_worker(app):
    worker = ExternalWorker(os.environ["CONFORMANCE_PROGRAM"], anon_nodename(),
                            os.environ["CONFORMANCE_WORKER_LOG"], os.environ["CONFORMANCE_WORKER_PID"])
    _session.update(worker=worker, app=app)
    worker.wait_ready(app)
    return worker


@pytest.fixture(scope="session")
def celery_session_worker(celery_session_app):
    try:
        yield start_worker(celery_session_app)
    finally:
        _session.pop("worker").stop()


# The suite's conftest imports its session worker from this module: hand it ours.
celery_pytest.celery_session_worker = celery_session_worker
# Before the suite's test modules import it from the task module.
use_backend_db(suite_tasks)


def wait_until_idle(manager):
    """The manager's idle wait: purge the queue, then ask the worker until it runs no task."""
    worker = _session.get("worker")
    if worker is None:
        return
    control = manager.app.control
    with manager.app.connection() as connection:
        while control.purge(connection=connection):
            pass
        inspect = control.inspect(destination=[worker.hostname], limit=1, connection=connection)
        while True:
            try:
                replies = inspect.active()
            except ContentDisallowed:  # a test left the app refusing JSON replies
                return
            if not replies or not any(replies.values()):
                return
            time.sleep(0.1)


Manager.wait_until_idle = wait_until_idle


@pytest.fixture(autouse=True)
def _not_in_a_worker():
    # A test that builds a WorkController in this process marks it as a worker, where
    # result.get() refuses to block; the embedded worker's start clears the mark once.
    _set_task_join_will_block(False)


_deadline = {}  # when the running test's timeout expires


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _deadline["at"] = time.monotonic() + item.get_closest_marker("timeout").args[0]


@pytest.hookimpl(wrapper=True)
def pytest_timeout_set_timer(item, settings):
    # pytest-timeout's alarm fires once, and a subtest swallows what it raises: it fires
    # again every few seconds, and a test past its timeout starts no more subtests.
    result = yield
    remaining, _ = signal.getitimer(signal.ITIMER_REAL)
    if remaining:
        signal.setitimer(signal.ITIMER_REAL, remaining, 5.0)
    return result


def _subtest_in_time(start_subtest):
    def subtest(self, *args, **kwargs):
        if time.monotonic() > _deadline.get("at", float("inf")):
            pytest.fail("Timeout: the test's time is up, no more subtests", pytrace=False)
        return start_subtest(self, *args, **kwargs)
    return subtest


if hasattr(pytest, "Subtests"):  # pytest >= 9 has subtests of its own
    pytest.Subtests.test = _subtest_in_time(pytest.Subtests.test)


def pytest_collection_modifyitems(items):
    for item in items:
        cap = SLOW_TIMEOUT if item.nodeid in SLOW_TESTS else TIMEOUT
        marked = item.get_closest_marker("timeout")
        timeout = cap if marked is None else min(cap, float(marked.args[0] if marked.args
                                                            else marked.kwargs.get("timeout", cap)))
        item.add_marker(pytest.mark.timeout(timeout), append=False)
        flaky = item.get_closest_marker("flaky")
        if flaky is not None:
            kwargs = dict(flaky.kwargs, reruns=min(RERUNS, flaky.kwargs.get("reruns", 0)),
                          reruns_delay=min(1, flaky.kwargs.get("reruns_delay", 0)))
            item.add_marker(pytest.mark.flaky(**kwargs), append=False)


_outcomes = {}


def pytest_runtest_logreport(report):
    entry = _outcomes.setdefault(report.nodeid, {"outcome": None, "reruns": 0, "duration": 0.0})
    if hasattr(report, "context"):  # a subtest's report: its test's reports follow
        if report.failed:
            entry.setdefault("subtest_failures", []).append(
                f"[{report.context.msg}] {report.longreprtext[-1500:]}")
        return
    entry["duration"] = round(entry["duration"] + report.duration, 3)
    if report.outcome == "rerun":
        entry["reruns"] += 1
        entry["rerun_message"] = report.longreprtext[-3000:]
        return
    xfail = hasattr(report, "wasxfail")
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if report.passed:
            entry["outcome"] = "xpass" if xfail else "passed"
        elif report.skipped:
            entry["outcome"] = "xfail" if xfail else "skipped"
        else:
            entry["outcome"] = "failed" if report.when == "call" else "error"
    elif report.when == "teardown" and report.failed and entry["outcome"] in (None, "passed"):
        entry["outcome"] = "error"
    if report.failed:
        entry["message"] = report.longreprtext[-3000:]
    if report.when == "teardown":
        worker = _session.get("worker")
        if worker is not None and worker.proc.poll() is not None:
            # One test that kills the worker must not fail every test after it.
            entry["worker_died"] = worker.proc.returncode
            worker.stop()
            try:
                start_worker(_session["app"])
            except (RuntimeError, AssertionError, OSError) as e:
                entry["worker_restart_failed"] = repr(e)
        write_outcomes()


def write_outcomes():
    path = os.environ.get("CONFORMANCE_RESULTS")
    if path:
        pathlib.Path(path).write_text(json.dumps(_outcomes, indent=1, sort_keys=True))


def pytest_sessionfinish(session):
    write_outcomes()

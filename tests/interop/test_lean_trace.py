"""The lean trace path (`celeriac._lean`) against Celery's own tracer, call by call.

lean_compare.py runs the same requests of the example project through the tracer Celery
builds for a task and through the lean path built from it, in one process of its own, and
reports for each call: what the tracer returned (state, value, the repr celeriac logs),
the traceback it kept, every task signal in order with what it carried (the einfo's
traceback, the request, the current task), the document stored in Redis and the stacks
afterwards. Each case must be equal on both sides, and the lean path must have run the
call itself where the request allows it (else the comparison would be Celery against
Celery). The differential suites (test_python_tasks.py, test_django_tasks.py) hold the
same path against `celery worker`.

Run: .venv/bin/python -m pytest -q tests/interop/test_lean_trace.py"""

import json
import re
import subprocess
import sys
import uuid

import pytest

from conftest import BROKER, REDIS_URL, ROOT, amqp_channel
from pyapp_harness import PROJECT, clean_env

SCRIPT = ROOT / "tests" / "interop" / "lean_compare.py"
CASES = (
    "success_stored", "success_ignored_by_the_request", "success_ignore_result_task", "request_seen_by_the_task",
    "failure", "failure_ignored_result", "retry", "retries_exhausted", "reject", "ignore", "unencodable_result",
    "unserializable_exception", "wrong_arguments", "with_a_link", "kwargs_not_a_mapping", "track_started",
    "track_started_result_ignored", "internal_error",
)
# The one difference: an error outside the task's body (internal_error; in a worker, a soft time
# limit that fires just after the task returned) is reported from the lean path's frame, where
# Celery's tracer reports it from trace_task. The rest of the traceback, and all else, is equal.
TRACER_FRAME = re.compile(r'File \\"[^"\\]*/(celery/app/trace\.py|celeriac/_lean\.py)\\", line \d+, in (trace_task|lean)')


@pytest.fixture(scope="module")
def compared():
    queue = f"lean-compare-{uuid.uuid4().hex[:8]}"
    env = clean_env()
    env.update(PYTHONPATH=str(PROJECT), CELERY_BROKER_URL=BROKER, CELERY_RESULT_BACKEND=REDIS_URL)
    try:
        done = subprocess.run([sys.executable, str(SCRIPT), queue], env=env, capture_output=True, text=True,
                              timeout=120)
    finally:
        with amqp_channel() as ch:
            ch.queue_delete(queue)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("case", CASES)
def test_the_lean_path_does_what_celerys_tracer_does(compared, case):
    sides = compared["cases"][case]
    celery, lean = sides["celery"], dict(sides["lean"])
    handed_over = lean.pop("handed_to_celery_tracer_first")
    if case == "internal_error":
        celery_text, lean_text = json.dumps(celery), json.dumps(lean)
        assert "celery/app/trace.py" in celery_text and "celeriac/_lean.py" in lean_text
        celery, lean = (json.loads(TRACER_FRAME.sub("<the tracer's frame>", t)) for t in (celery_text, lean_text))
    assert handed_over is not sides["expected_lean"], (
        "the lean path ran the call itself" if sides["expected_lean"] else "the call went to Celery's tracer")
    different = {k: (celery[k], lean.get(k)) for k in celery if celery[k] != lean.get(k)}
    assert not different, json.dumps(different, indent=1)[:4000]
    assert celery["request_stack"] == 0 and celery["task_stack"] == 0


def test_the_comparison_sees_what_happened(compared):
    """The cases did what their names say under Celery's tracer (so equal means something)."""
    c = {name: s["celery"] for name, s in compared["cases"].items()}
    assert c["success_stored"]["stored"]["status"] == "SUCCESS" and c["success_stored"]["stored"]["result"] == 5
    assert c["success_ignored_by_the_request"]["stored"] is None
    assert c["failure"]["state"] == "FAILURE" and "PaymentDeclined" in c["failure"]["traceback"]
    assert c["failure"]["stored"]["traceback"] == c["failure"]["traceback"]
    assert [s["signal"] for s in c["failure"]["signals"]] == ["task_prerun", "task_failure", "task_postrun"]
    assert c["retry"]["state"] == "RETRY" and c["reject"]["state"] == "REJECTED" and c["ignore"]["state"] == "IGNORED"
    assert c["unencodable_result"]["state"] == "FAILURE" and "EncodeError" in c["unencodable_result"]["retval"]
    assert c["track_started"]["signals"][0]["signal"] == "task_prerun"
    assert c["request_seen_by_the_task"]["Rstr"].count("acme") == 2, "the custom header, as header and attribute"
    assert c["with_a_link"]["stored"]["children"], "the link was sent"
    assert c["internal_error"]["state"] == "FAILURE" and "bookkeeping after the task" in c["internal_error"]["retval"]


def test_every_task_of_the_project_has_a_lean_path_and_the_others_say_why(compared):
    why = compared["lean_tasks"]
    assert why.pop("lean.after_return") == "a custom after_return"
    assert why.pop("lean.unreadable") == "building it failed: LookupError('track_started is not set here')"
    assert why and all(v is None for v in why.values()), why


def test_a_result_of_none_is_shown_as_celery_shows_it(compared):
    """The lean path writes "None" for a None result without calling saferepr."""
    assert compared["saferepr_none"] == "None"

"""Remote control of a Python app's worker, `celery worker` as the judge:

- the app's own `@inspect_command`/`@control_command` handlers answer, with
  the app and the node name in `state`, and keep their state between calls
  (celeriac runs them in its control process, which never forks);
- a handler that raises answers `{"error": repr(exc)}`, and the worker goes on;
- `inspect conf`, `report` and `registered` (with task attributes) read the app;
- `revoke` of tasks no process runs records REVOKED in the app's backend,
  except for a task another worker started;
- `revoke_by_stamped_headers` discards tasks stamped with a revoked value, and
  with `terminate` stops a running task stamped so.

One intentional difference (docs/python-apps.md) is asserted on both workers:
`state.consumer` (there is no Celery consumer in celeriac).

Both workers run tests/interop/pyapps/controlapp, each on a queue and node of
its own; every reply is compared after the node and queue names are replaced."""

import json
import re
import pathlib
import signal
import sys
import uuid

import pytest
from celery import Celery, states
from celery.canvas import StampingVisitor

from conftest import BROKER, REDIS_URL, wait_until
from pyapp_harness import AppWorker, clean_env

APPS = pathlib.Path(__file__).parent / "pyapps"
BIN = pathlib.Path(sys.executable).parent
PROGRAMS = {"celery": BIN / "celery", "celeriac": BIN / "celeriac"}
SIDES = ("celery", "celeriac")


class Side:
    def __init__(self, kind, tmp):
        self.kind = kind
        self.queue = f"ctl-{kind}-{uuid.uuid4().hex[:8]}"
        self.node = f"{kind}-{self.queue}@localhost"
        env = clean_env()
        env.update(CONTROLAPP_QUEUE=self.queue, CONTROLAPP_BROKER=BROKER, CONTROLAPP_BACKEND=REDIS_URL,
                   CELERIAC_STATE_DIR=str(tmp / f"state-{kind}"), CELERIAC_METRICS_BIND="none")
        argv = ["-A", "controlapp", "--workdir", str(APPS), "worker", "--pool", "prefork", "-c", "2", "-l", "INFO",
                "-n", self.node, "--without-mingle", "--without-gossip"]
        self.worker = AppWorker(PROGRAMS[kind], argv, env, tmp / f"{kind}.log", cwd=str(APPS))
        self.client = Celery(f"controlapp-client-{kind}", broker=BROKER, backend=REDIS_URL)
        self.client.conf.update(task_default_queue=self.queue, accept_content=["json"])

    def ask(self, method, timeout=5.0, **arguments):
        """The node's reply to `method`, with its own names replaced."""
        replies = self.client.control.broadcast(method, arguments=arguments, destination=[self.node], reply=True,
                                                timeout=timeout)
        answers = [r[self.node] for r in replies if self.node in r]
        assert len(answers) == 1, f"{self.kind}: {method} got {replies!r}\n{self.worker.log()[-2000:]}"
        return self.normalized(answers[0])

    def normalized(self, value):
        text = json.dumps(value).replace(self.node, "<node>").replace(self.queue, "<queue>")
        return json.loads(text.replace(f"{self.kind}-<queue>", "<node-name>"))

    def close(self):
        if self.worker.alive():
            self.worker.stop(signal.SIGTERM, timeout=60)
        self.client.close()


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("control")
    started = {kind: Side(kind, tmp) for kind in SIDES}
    try:
        for side in started.values():
            def answers(side=side):
                if not side.worker.alive():
                    raise AssertionError(f"{side.kind} worker exited:\n{side.worker.log()[-3000:]}")
                return side.client.control.ping(destination=[side.node], timeout=0.5)
            wait_until(answers, 90, f"{side.kind} answering ping")
        yield started
    finally:
        for side in started.values():
            side.close()


def both(sides, method, **arguments):
    answers = {kind: side.ask(method, **arguments) for kind, side in sides.items()}
    for answer in answers.values():
        # `include` is a set made a tuple: its order is the process's string hashing.
        if isinstance(answer, dict) and isinstance(answer.get("include"), list):
            answer["include"].sort()
        if isinstance(answer, dict) and isinstance(answer.get("ok"), str):
            answer["ok"] = re.sub(r"(?<=include: \n    )\((.*)\)", lambda m: f"({', '.join(sorted(m[1].split(', ')))})",
                                  answer["ok"])
    assert answers["celeriac"] == answers["celery"], f"{method}: {json.dumps(answers, indent=1)[:4000]}"
    return answers["celery"]


def test_the_apps_inspect_command_reads_the_app_and_the_node(sides):
    answer = both(sides, "app_motto")
    assert answer == {"motto": "roots first", "node": "<node>",
                      "tasks": ["controlapp.add", "controlapp.nap", "controlapp.plain"]}, answer


def test_the_apps_control_command_keeps_its_state_between_calls(sides):
    assert both(sides, "turn_dial", by=2) == {"ok": "dial at 2"}
    assert both(sides, "turn_dial", by=3) == {"ok": "dial at 5"}


def test_a_handler_that_raises_answers_its_error_and_the_worker_goes_on(sides):
    assert both(sides, "broken_handler") == {"error": "RuntimeError('broken on purpose')"}
    assert both(sides, "ping") == {"ok": "pong"}
    assert "broken on purpose" in sides["celeriac"].worker.log(), "the error is logged with its traceback"
    for side in sides.values():
        assert side.client.send_task("controlapp.add", (2, 3)).get(timeout=20) == 5


def test_conf_report_and_registered_read_the_app(sides):
    conf = both(sides, "conf")
    assert conf["controlapp_motto"] == "roots first" and conf["task_default_queue"] == "<queue>", conf
    assert conf["include"] == ["celery.app.builtins", "controlapp.celery"], conf
    assert "guest:guest" not in json.dumps(conf), "the broker password is masked"
    report = both(sides, "report")["ok"]
    assert report.lstrip().startswith("software -> celery:") and "controlapp_motto: 'roots first'" in report, report
    assert both(sides, "registered") == ["controlapp.add [rate_limit=10/s]", "controlapp.nap", "controlapp.plain"]
    assert both(sides, "registered", taskinfoitems=["name", "rate_limit"]) == [
        "controlapp.add [name=controlapp.add rate_limit=10/s]", "controlapp.nap [name=controlapp.nap]",
        "controlapp.plain [name=controlapp.plain]"]


def test_revoke_records_revoked_for_tasks_no_worker_started(sides):
    outcome = {}
    for kind, side in sides.items():
        backend = side.client.backend
        started_elsewhere, waiting, done = (str(uuid.uuid4()) for _ in range(3))
        backend.store_result(started_elsewhere, {"hostname": "other@host"}, states.STARTED)
        backend.store_result(done, 7, states.SUCCESS)
        reply = side.ask("revoke", task_id=[started_elsewhere, waiting, done])
        outcome[kind] = {"replied": sorted(reply), "started elsewhere": backend.get_state(started_elsewhere),
                         "never seen": backend.get_state(waiting), "done": backend.get_state(done)}
    assert outcome["celery"] == {"replied": ["ok"], "started elsewhere": "STARTED", "never seen": "REVOKED",
                                 "done": "SUCCESS"}, outcome
    assert outcome["celeriac"] == outcome["celery"]


class Stamp(StampingVisitor):
    def __init__(self, value):
        self.value = value

    def on_signature(self, sig, **headers):
        return {"monitoring_id": self.value}


def test_revoke_by_stamped_headers_discards_tasks_stamped_with_a_revoked_value(sides):
    revoked, other = uuid.uuid4().hex, uuid.uuid4().hex
    reply = both(sides, "revoke_by_stamped_headers", headers={"monitoring_id": [revoked, 4242]})
    assert reply == {"ok": f"headers {{'monitoring_id': ['{revoked}', 4242]}} flagged as revoked, but not terminated"}
    assert both(sides, "revoke_by_stamped_headers", headers=["tenant=acme"]) == {
        "ok": "headers {'tenant': 'acme'} flagged as revoked, but not terminated"}
    outcome = {}
    for kind, side in sides.items():
        results = {}
        for name, value in (("revoked", revoked), ("revoked int", 4242), ("other", other), ("int as text", "4242")):
            sig = side.client.signature("controlapp.add", args=(1, 1))
            sig.stamp(visitor=Stamp(value))
            results[name] = sig.apply_async()
        results["plain"] = side.client.send_task("controlapp.add", (1, 1))
        for r in results.values():
            wait_until(lambda r=r: r.state in states.READY_STATES, 20, f"{kind}: {r.id} done")
        outcome[kind] = {name: r.state for name, r in results.items()}
    assert outcome["celery"] == {"revoked": "REVOKED", "revoked int": "REVOKED", "other": "SUCCESS",
                                 "int as text": "SUCCESS", "plain": "SUCCESS"}, outcome
    assert outcome["celeriac"] == outcome["celery"]


def test_intentional_difference_state_consumer_is_absent_in_app_handlers(sides):
    assert sides["celery"].ask("consumer_kind") == "Consumer:TaskPool"
    error = sides["celeriac"].ask("consumer_kind")["error"]
    assert error.startswith("AttributeError(") and "state.consumer.pool" in error, error


def test_revoke_by_stamped_headers_with_terminate_stops_the_running_task_stamped_so(sides):
    value = uuid.uuid4().hex
    outcome = {}
    for kind, side in sides.items():
        sig = side.client.signature("controlapp.nap", args=(5,))
        sig.stamp(visitor=Stamp(value))
        r = sig.apply_async()
        other = side.client.send_task("controlapp.nap", (1,))
        wait_until(lambda: len(side.ask("active")) == 2, 20, f"{kind}: both naps running")
        reply = side.ask("revoke_by_stamped_headers", headers={"monitoring_id": value}, terminate=True,
                         signal="SIGKILL")
        for res in (r, other):
            wait_until(lambda res=res: res.state in states.READY_STATES, 30, f"{kind}: {res.id} done")
        outcome[kind] = (reply, r.state, other.state)
    assert outcome["celery"] == (
        {"ok": f"headers defaultdict(<class 'set'>, {{'monitoring_id': {{'{value}'}}}}) revoked"},
        "REVOKED", "SUCCESS"), outcome
    assert outcome["celeriac"] == outcome["celery"]

"""The chart's container, run for real: the command, args, env and probe
commands come from `helm template`, `$(VAR)` references are expanded as
kubelet does, and the result runs against the local RabbitMQ with the probe
binaries, then drains on SIGTERM inside terminationGracePeriodSeconds."""

import os
import pathlib
import re
import shutil
import signal
import subprocess
import time

import pytest
import yaml

from conftest import BROKER, ROOT, queue_depth, wait_until


def helm():
    path = os.environ.get("HELM") or str(ROOT / "target" / "tools" / "bin" / "helm")
    if not os.path.exists(path):
        pytest.fail("helm not found: run tests/setup/helm.sh or set HELM")
    return path


def rendered_pod():
    out = subprocess.run([helm(), "template", "workers", str(ROOT / "chart")], capture_output=True, text=True,
                         check=True).stdout
    [deployment] = [d for d in yaml.safe_load_all(out) if d and d.get("kind") == "Deployment"]
    return deployment["spec"]["template"]["spec"]


def expand(value, env):
    """Kubelet's $(VAR) expansion: known variables are replaced, unknown ones
    stay as written, and $$ escapes a dollar."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


def local(path):
    """The image puts the binaries in /usr/local/bin; here they are in target/debug."""
    binary = pathlib.Path(os.environ.get("CELERIAC_BIN") or ROOT / "target" / "debug" / "celeriac")
    return str(binary.with_name(pathlib.Path(path).name))


def test_rendered_container_runs_probes_and_drains(tmp_path, queue_name, rpc_app):
    pod = rendered_pod()
    [container] = pod["containers"]
    grace = pod["terminationGracePeriodSeconds"]
    state_dir = str(tmp_path / "state")
    # What configmap-api-workers and secret-api-workers would hold.
    env_from = {"BROKER_REQUESTS_QUEUE": queue_name, "CELERY_BROKER_URL": BROKER, "CELERY_RESULT_BACKEND": "rpc://"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY", "BROKER", "CELERIAC"))}
    env.update(env_from)
    for item in container.get("env", []):
        env[item["name"]] = expand(item["value"], env)
    # The pod's emptyDir at /var/run/celeriac becomes a temporary directory.
    fix = lambda s: s.replace("/var/run/celeriac", state_dir)
    env = {k: fix(v) for k, v in env.items()}
    argv = [local(container["command"][0])] + [fix(expand(a, env)) for a in container["args"]]
    assert queue_name in argv, "the queue reference was expanded"
    probes = {name: [local(container[name]["exec"]["command"][0])] + container[name]["exec"]["command"][1:]
              for name in ("startupProbe", "readinessProbe", "livenessProbe")}

    def probe(name):
        return subprocess.run(probes[name], capture_output=True, text=True, env=env, timeout=10)

    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: probe("startupProbe").returncode == 0, 60, "startup probe")
        wait_until(lambda: probe("readinessProbe").returncode == 0, 60, "readiness probe")
        assert probe("livenessProbe").returncode == 0
        running = [rpc_app.send_task("celeriac.sleep", (2,)) for _ in range(2)]
        quick = [rpc_app.send_task("celeriac.add", (i, i)) for i in range(20)]
        time.sleep(0.5)
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        wait_until(lambda: probe("readinessProbe").returncode == 1, 5, "readiness to drop on SIGTERM")
        code = worker.wait(grace)
        assert code == 0
        assert time.monotonic() - started < grace
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    # Nothing lost: every task either finished or is back in the queue.
    finished = [r for r in running + quick if r.ready()]
    assert len(finished) + queue_depth(queue_name) == len(running + quick)
    assert all(r.get(timeout=5) == 2 for r in running), "running tasks finished before exit"
    drain = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        assert [r.get(timeout=30) for r in quick] == [2 * i for i in range(20)]
    finally:
        drain.send_signal(signal.SIGTERM)
        assert drain.wait(grace) == 0

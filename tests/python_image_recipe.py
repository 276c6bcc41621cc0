"""Checks, without a Docker engine, the "your Python image + celeriac" recipe
(examples/python-app/Dockerfile): its wheel stage's `pip wheel` line, run in
the build context as `.dockerignore` filters it, gives a wheel; installed
with the app stage's `pip install --no-deps` into a fresh environment that
holds only Celery and the project's code (standing in for the team's image),
it puts `celeriac` and the native probes on that environment's PATH, and the
image's command (`celeriac -A proj worker --pool prefork --events`) runs the
project's tasks, answers its readiness probe and drains on SIGTERM.

Usage: .venv/bin/python tests/python_image_recipe.py   (run by tests/run.sh)
Needs RabbitMQ and Redis on localhost, and PyPI for Celery.
"""

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from docker_context_build import ignored  # noqa: E402

DOCKERFILE = ROOT / "examples" / "python-app" / "Dockerfile"


def stage_lines():
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def main():
    lines = stage_lines()
    wheel_run = next(l for l in lines if l.startswith("RUN ") and "pip wheel" in l)
    wheel_args = wheel_run.split("pip wheel", 1)[1].split()  # e.g. --no-deps -w /wheels .
    celery_spec = re.search(r'pip install --no-cache-dir "([^"]+)"', "\n".join(lines)).group(1)
    cmd = re.search(r"^CMD (\[.*\])", "\n".join(lines), re.M).group(1)
    command = [a.strip().strip('"') for a in cmd.strip("[]").split(",")]
    assert command[:3] == ["-A", "proj", "worker"], command
    patterns = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    with tempfile.TemporaryDirectory(prefix="celeriac-recipe-") as tmp:
        tmp = pathlib.Path(tmp)
        context, wheels, image, app = tmp / "context", tmp / "wheels", tmp / "image", tmp / "app"
        for f in files:
            if not ignored(f, patterns) and (ROOT / f).is_file():
                dest = context / f
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, dest)
        # Stage 1, in the filtered context (the repository's target dir keeps it incremental).
        args = [str(wheels) if a == "/wheels" else a for a in wheel_args]
        env = dict(os.environ, CARGO_TARGET_DIR=str(ROOT / "target"))
        print(f"== wheel stage: pip wheel {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", *args], cwd=context, env=env, check=True)
        built = list(wheels.glob("celeriac-*.whl"))
        assert len(built) == 1, f"the wheel stage made {built}"
        # Stage 2: an environment with Celery and the project only, then the wheel.
        subprocess.run([sys.executable, "-m", "venv", str(image)], check=True)
        pip = [str(image / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, celery_spec], check=True)
        shutil.copytree(ROOT / "examples" / "python-app" / "proj", app / "proj")
        subprocess.run([*pip, "--no-deps", str(built[0])], check=True)
        for name in ("celeriac", "worker-readiness", "worker-liveness"):
            assert (image / "bin" / name).is_file(), f"{name} is not on the image's PATH"
        assert (image / "bin" / "worker-readiness").read_bytes()[:4] == b"\x7fELF", "the probe is native"
        # The image's command.
        queue = f"recipe-{uuid.uuid4().hex[:8]}"
        state = tmp / "state"
        wenv = {"PATH": f"{image / 'bin'}:/usr/bin:/bin", "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
                "CELERY_RESULT_BACKEND": "redis://127.0.0.1:6379/0", "PROJ_TASK_QUEUE": queue,
                "CELERIAC_STATE_DIR": str(state), "CELERIAC_METRICS_BIND": "none"}
        log = open(tmp / "worker.log", "wb")
        worker = subprocess.Popen(["celeriac", *command, "-c", "1", "-l", "INFO"], cwd=app, env=wenv,
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            client = ("import sys; sys.path.insert(0, '.'); from proj.celery import app; "
                      "print(app.send_task('proj.billing.tasks.add', (20, 22)).get(timeout=60))")
            out = subprocess.run([str(image / "bin" / "python"), "-c", client], cwd=app, env=wenv,
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0 and out.stdout.strip() == "42", (out, (tmp / "worker.log").read_text())
            deadline = time.monotonic() + 20
            while True:
                probe = subprocess.run(["worker-readiness", "--state-dir", str(state)], env=wenv,
                                       capture_output=True, text=True)
                if probe.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert probe.returncode == 0, probe
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(60) == 0, (tmp / "worker.log").read_text()
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
            log.close()
            subprocess.run([sys.executable, "-c", f"import amqp; c = amqp.Connection(); c.connect(); "
                            f"ch = c.channel(); ch.queue_delete('{queue}'); ch.exchange_delete('{queue}')"],
                           capture_output=True)
    print("1 passed, 0 failed: the Python image recipe builds a wheel, installs beside Celery and runs the app")


if __name__ == "__main__":
    sys.exit(main())

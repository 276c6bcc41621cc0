"""Checks, without a Docker engine, the "your Python image + celeriac" recipe
(examples/python-app/Dockerfile), in two stages that CI runs apart:

  build OUTDIR   the wheel stage: its `pip wheel` line (with its environment
                 assignments: maturin's `--zig --compatibility manylinux2014`),
                 run in the build context as `.dockerignore` filters it; prints
                 the wheel's path. tests/run.sh builds CI's one wheel this way
                 and tests that wheel everywhere (tests/wheel_check.py, .venv,
                 CPython 3.13), so the recipe's build line is the one tested.
  run WHEEL      the app stage: the wheel installed with `pip install --no-deps`
                 into a fresh environment that holds only Celery and the
                 project's code (standing in for the team's image) puts
                 `celeriac` and the native probes on that environment's PATH,
                 and the image's command (`celeriac -A proj worker --pool
                 prefork --events`) runs the project's tasks, answers both
                 probes and drains on SIGTERM.

Without arguments, both: the whole recipe, as `docker build` would run it.

Usage: .venv/bin/python tests/python_image_recipe.py [build OUTDIR | run WHEEL]
Needs RabbitMQ and Redis on localhost (run), and PyPI (Celery; maturin, ziglang
and cargo-zigbuild for the build).
"""

import os
import pathlib
import re
import shlex
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
# The wheel stage's cargo output: a directory of its own, so the portable (zig, glibc 2.17)
# build neither thrashes nor reuses target/release, and stays incremental from run to run.
TARGET_DIR = ROOT / "target" / "zig"
# The build context, at a fixed path: cargo's fingerprints of the workspace crates include
# their paths, so a new temporary directory each run would rebuild them all.
CONTEXT = TARGET_DIR / "context"


def stage_lines():
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def wheel_command():
    """The wheel stage's `pip wheel` command: (its VAR=value assignments, its pip wheel arguments)."""
    run = next(l for l in stage_lines() if l.startswith("RUN ") and "pip wheel" in l)
    step = next(s for s in run[len("RUN "):].split("&&") if "pip wheel" in s)
    words = shlex.split(step)
    env = {}
    while "=" in words[0] and not words[0].startswith("/"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[0].endswith("pip") and words[1] == "wheel", f"unexpected wheel step: {step}"
    return env, words[2:]  # e.g. {"MATURIN_PEP517_ARGS": "--zig ..."}, ["--no-deps", "-w", "/wheels", "."]


def lay_out_context():
    """The files `COPY . .` takes: not ignored by .dockerignore (tracked or not, as Docker sees them)."""
    patterns = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    files = sorted({f for f in listed if f and not ignored(f, patterns) and (ROOT / f).is_file()})
    shutil.rmtree(CONTEXT, ignore_errors=True)
    for f in files:
        dest = CONTEXT / f
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest)  # mtimes kept: unchanged sources stay fresh for cargo
    return files


def build(outdir):
    """Stage 1: the Dockerfile's `pip wheel` line in the filtered context; returns the wheel."""
    env_assignments, wheel_args = wheel_command()
    outdir = pathlib.Path(outdir).resolve()
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    lay_out_context()
    args = [str(outdir) if a == "/wheels" else a for a in wheel_args]
    env = dict(os.environ, CARGO_TARGET_DIR=str(TARGET_DIR), **env_assignments)
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env_assignments.items())
    print(f"== wheel stage: {shown} pip wheel {' '.join(args)}", file=sys.stderr, flush=True)
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", *args],
                   cwd=CONTEXT, env=env, check=True, stdout=sys.stderr)
    built = list(outdir.glob("celeriac-*.whl"))
    assert len(built) == 1, f"the wheel stage made {built}"
    print(f"== built {built[0].name} in {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)
    return built[0]


def run(wheel):
    """Stage 2: an environment with Celery and the project only, then the wheel; the image's command."""
    lines = "\n".join(stage_lines())
    celery_spec = re.search(r'pip install --no-cache-dir "([^"]+)"', lines).group(1)
    install = re.search(r"^RUN (pip install [^\n]*--no-deps[^\n]*?/wheels/celeriac-\*\.whl)", lines, re.M)
    assert install, "the app stage installs no /wheels/celeriac-*.whl with --no-deps"
    cmd = re.search(r"^CMD (\[.*\])", lines, re.M).group(1)
    command = [a.strip().strip('"') for a in cmd.strip("[]").split(",")]
    assert command[:3] == ["-A", "proj", "worker"], command
    with tempfile.TemporaryDirectory(prefix="celeriac-recipe-") as tmp:
        tmp = pathlib.Path(tmp)
        image, app = tmp / "image", tmp / "app"
        subprocess.run([sys.executable, "-m", "venv", str(image)], check=True)
        pip = [str(image / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, celery_spec], check=True)
        shutil.copytree(ROOT / "examples" / "python-app" / "proj", app / "proj")
        subprocess.run([*pip, "--no-deps", str(wheel)], check=True)
        for name in ("celeriac", "worker-readiness", "worker-liveness"):
            assert (image / "bin" / name).is_file(), f"{name} is not on the image's PATH"
        for name in ("worker-readiness", "worker-liveness"):
            assert (image / "bin" / name).read_bytes()[:4] == b"\x7fELF", f"{name} is not native"
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
            for name in ("worker-readiness", "worker-liveness"):
                deadline = time.monotonic() + 20
                while True:
                    probe = subprocess.run([name, "--state-dir", str(state)], env=wenv, capture_output=True, text=True)
                    if probe.returncode == 0 or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                assert probe.returncode == 0, (name, probe)
            # The drain: SIGTERM while a task runs; the task still finishes and the worker exits 0.
            drain = ("import os, signal, sys, time; sys.path.insert(0, '.'); from proj.celery import app; "
                     "r = app.send_task('proj.limits.tasks.tracked', (3,)); t = time.monotonic() + 60\n"
                     "while r.state != 'STARTED' and time.monotonic() < t: time.sleep(0.1)\n"
                     f"os.kill({worker.pid}, signal.SIGTERM); print(r.get(timeout=60))")
            out = subprocess.run([str(image / "bin" / "python"), "-c", drain], cwd=app, env=wenv,
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0 and out.stdout.strip() == "tracked", (out, (tmp / "worker.log").read_text())
            assert worker.wait(60) == 0, (tmp / "worker.log").read_text()
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
            log.close()
            subprocess.run([sys.executable, "-c", f"import amqp; c = amqp.Connection(); c.connect(); "
                            f"ch = c.channel(); ch.queue_delete('{queue}'); ch.exchange_delete('{queue}')"],
                           capture_output=True)


def main(argv):
    if argv[:1] == ["build"] and len(argv) == 2:
        print(build(argv[1]))
    elif argv[:1] == ["run"] and len(argv) == 2:
        run(pathlib.Path(argv[1]).resolve())
        print(f"1 passed, 0 failed: {pathlib.Path(argv[1]).name} installs beside Celery alone and runs the app")
    elif not argv:
        with tempfile.TemporaryDirectory(prefix="celeriac-recipe-wheels-") as wheels:
            run(build(wheels))
        print("1 passed, 0 failed: the Python image recipe builds a wheel, installs beside Celery and runs the app")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])

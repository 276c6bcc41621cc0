#!/usr/bin/env bash
# Runs every test celeriac has, on a fresh machine too:
#   1. makes sure RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379) answer,
#      installing them from Debian's packages and starting them if needed, that
#      PostgreSQL's binaries are installed (the Django tests run a cluster of their own), and
#      that a RabbitMQ 4.x installation exists for the tests that start a 4.x
#      node of their own (tests/setup/rabbitmq4.sh: a Debian trixie root);
#   2. creates the Python venv (.venv) with Celery, Flower and the test tools,
#      and a CPython 3.13 for the Python-task tests (tests/setup/python313.sh:
#      a Debian trixie root, built once);
#   3. fetches helm for the chart tests; lints the release workflow;
#   4. builds the workspace and, once, the portable wheel users install (the
#      recipe's wheel stage: zig, manylinux2014, abi3), checks its tags and
#      linked libraries and installs that same wheel into .venv; runs the Rust
#      tests (unit + fixture tests), the image recipe with that wheel, the
#      interop tests against real Python Celery and the chart tests, then the
#      Python-task tests again on CPython 3.13 with the same wheel.
# Usage: tests/run.sh [extra pytest args]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

say() { printf '== %s\n' "$*" >&2; }

answers() { # host port
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

wait_for() { # name host port seconds
    local i
    for ((i = 0; i < $4 * 2; i++)); do
        answers "$2" "$3" && return 0
        sleep 0.5
    done
    echo "$1 did not start on $2:$3 within $4 s" >&2
    return 1
}

apt_install() {
    say "installing $* from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq "$@" >&2
}

ensure_rabbitmq() {
    if answers 127.0.0.1 5672; then return 0; fi
    command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
    say "starting RabbitMQ"
    rabbitmq-server -detached >&2 || true
    wait_for RabbitMQ 127.0.0.1 5672 120
    # The broker answers before it accepts logins; wait until it is fully up.
    rabbitmqctl await_startup >/dev/null 2>&1 || sleep 5
}

ensure_rabbitmq4() {
    # RabbitMQ 4.x for the rabbit4 fixture: Debian trixie's rabbitmq-server in a root that
    # tests/setup/rabbitmq4.sh builds once (about a minute) and reuses. The fixture starts
    # the node itself, on free loopback ports. If the setup fails, the other tests still run
    # and each test that needs 4.x fails with the script's message (RABBITMQ4_ERROR).
    local out errors
    errors="$(mktemp)"
    say "RabbitMQ 4.x: tests/setup/rabbitmq4.sh"
    if out="$(tests/setup/rabbitmq4.sh </dev/null 2>"$errors")"; then
        cat "$errors" >&2
        unset RABBITMQ4_ERROR
        while IFS='=' read -r key value; do
            case "$key" in RABBITMQ4_*) export "$key=$value" ;; esac
        done <<<"$out"
        say "RabbitMQ 4.x: Debian rabbitmq-server ${RABBITMQ4_VERSION:-?}"
    else
        cat "$errors" >&2
        RABBITMQ4_ERROR="$(tail -n 1 "$errors")"
        export RABBITMQ4_ERROR="${RABBITMQ4_ERROR:-tests/setup/rabbitmq4.sh failed}"
        unset RABBITMQ4_SERVER RABBITMQ4_CTL RABBITMQ4_EPMD RABBITMQ4_VERSION
        say "no RabbitMQ 4.x; the tests that need it will fail"
    fi
    rm -f "$errors"
}

ensure_redis() {
    if answers 127.0.0.1 6379; then return 0; fi
    command -v redis-server >/dev/null || apt_install redis-server
    say "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >&2
    wait_for Redis 127.0.0.1 6379 30
}

ensure_venv() {
    local stamp=".venv/.requirements.sha256"
    local want
    want="$(sha256sum tests/requirements.txt | cut -d' ' -f1)"
    if [[ -x .venv/bin/python && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return 0; fi
    say "creating the Python venv (.venv)"
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check -r tests/requirements.txt >&2
    echo "$want" >"$stamp"
}

ensure_postgres() {
    # PostgreSQL's server binaries for the Django tests: tests/interop/private_postgres.py runs
    # a cluster of its own (initdb into a temporary directory, a free port on 127.0.0.1), so
    # nothing is started here. Debian's packages put them in /usr/lib/postgresql/<version>/bin.
    local bin
    for bin in /usr/lib/postgresql/*/bin; do
        [[ -x "$bin/initdb" && -x "$bin/postgres" ]] && return 0
    done
    apt_install postgresql
}

ensure_promtool() {
    command -v promtool >/dev/null && return 0
    # Debian's prometheus package carries promtool; its server is not wanted.
    apt_install --no-install-recommends prometheus
    pkill -x prometheus 2>/dev/null || true
}

ensure_gnu_time() {
    # GNU time measures the probes' peak RSS (test_python_package.py).
    [[ -x /usr/bin/time ]] || apt_install time
}

ensure_wheel_tools() {
    # auditwheel (and its pyelftools) for tests/wheel_check.py, in a venv of their own.
    local venv=target/tools/wheel-venv want="auditwheel>=6.1,<7"
    if [[ -x "$venv/bin/python" && "$(cat "$venv/.requirements" 2>/dev/null)" == "$want" ]]; then return 0; fi
    say "creating $venv with $want"
    rm -rf "$venv"
    .venv/bin/python -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$want" >&2
    echo "$want" >"$venv/.requirements"
}

ensure_python313() {
    # CPython 3.13 for the Python-task tests: Debian trixie's python3.13 in a root that
    # tests/setup/python313.sh builds once (about 40 s) and reuses, with a venv of the test tools.
    # If the setup fails, the other tests still run and the 3.13 step fails with its message.
    local out errors
    errors="$(mktemp)"
    say "CPython 3.13: tests/setup/python313.sh"
    if out="$(tests/setup/python313.sh </dev/null 2>"$errors")"; then
        cat "$errors" >&2
        PY313_ERROR=""
        while IFS='=' read -r key value; do
            case "$key" in PY313_*) printf -v "$key" '%s' "$value" ;; esac
        done <<<"$out"
        say "CPython 3.13: Python ${PY313_VERSION:-?} in a Debian trixie root"
    else
        cat "$errors" >&2
        PY313_ERROR="$(tail -n 1 "$errors")"
        PY313_ERROR="${PY313_ERROR:-tests/setup/python313.sh failed}"
    fi
    rm -f "$errors"
}

ensure_rabbitmq
ensure_rabbitmq4
ensure_gnu_time
ensure_redis
ensure_postgres
ensure_promtool
ensure_venv
ensure_wheel_tools
ensure_python313
HELM="$(tests/setup/helm.sh)"
export HELM

say "the release workflow: actionlint and yamllint (tests/setup/actionlint.sh)"
tests/setup/actionlint.sh

say "building"
cargo build --workspace --all-targets --locked
export CELERIAC_BIN="$root/target/debug/celeriac"

# The one wheel every Python test below installs: the image recipe's wheel stage
# (examples/python-app/Dockerfile's `pip wheel` line, maturin with --zig --compatibility
# manylinux2014, in the build context .dockerignore leaves; cargo output in target/zig).
say "the portable wheel: the Python image recipe's wheel stage (tests/python_image_recipe.py build)"
wheel="$(.venv/bin/python tests/python_image_recipe.py build target/zig/wheelhouse)"

say "the wheel's tags and linked libraries (tests/wheel_check.py)"
target/tools/wheel-venv/bin/python tests/wheel_check.py "$wheel"

say "the Python package: that wheel, pip install --no-deps into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$wheel" >&2

say "Rust tests"
cargo test --workspace --locked

say "the Dockerfile's build stage, in its own build context"
.venv/bin/python tests/docker_context_build.py

say "the Python image recipe's app stage with that wheel: a fresh venv with Celery alone, without a Docker engine"
.venv/bin/python tests/python_image_recipe.py run "$wheel"

status=0
say "interop and chart tests"
.venv/bin/python -m pytest -q -p no:cacheprovider tests/interop tests/chart "$@" || status=$?

# Celery's own integration suite (t/integration of the Celery 5.7.0 sdist, which it fetches with
# pip into .cache/), run once against `celery worker` and once against celeriac: celeriac must
# pass every test that Celery's worker passes (tests/celery_suite/README.md).
say "Celery's integration suite against celery worker and celeriac (tests/celery_suite/run.py)"
.venv/bin/python tests/celery_suite/run.py || status=$?

# The same wheel on CPython 3.13: the differential suite, the Python worker's own tests and the
# installed package's. Not the probes' 2 MiB peak-RSS bound: the probes run no Python, and their
# peak depends on the C library (trixie's glibc 2.41 maps about 250 KiB more than bookworm's
# 2.36); the 3.11 run above asserts it.
say "CPython 3.13: the Python-task tests with the same wheel"
if [[ -n "${PY313_ERROR:-}" ]]; then
    echo "CPython 3.13: $PY313_ERROR" >&2
    status=1
else
    "$PY313_RUN" "$PY313_PYTHON" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$wheel" >&2
    "$PY313_RUN" "$PY313_PYTHON" -m pytest -q -p no:cacheprovider \
        tests/interop/test_python_tasks.py tests/interop/test_lean_trace.py tests/interop/test_python_worker.py \
        tests/interop/test_python_package.py \
        --deselect tests/interop/test_python_package.py::test_the_installed_probes_peak_under_2_mib || status=$?
fi
exit "$status"

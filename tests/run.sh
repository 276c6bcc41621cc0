#!/usr/bin/env bash
# Runs every test celeriac has, on a fresh machine too:
#   1. makes sure RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379) answer,
#      installing them from Debian's packages and starting them if needed, that
#      PostgreSQL's binaries are installed (the Django tests run a cluster of their own), and
#      that a RabbitMQ 4.x installation exists for the tests that start a 4.x
#      node of their own (tests/setup/rabbitmq4.sh: a Debian trixie root);
#   2. creates the Python venv (.venv) with Celery, Flower and the test tools;
#   3. fetches helm for the chart tests;
#   4. builds the workspace and the Python package (pip install . into .venv),
#      runs the Rust tests (unit + fixture tests), then the interop tests
#      against real Python Celery and the chart tests.
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

ensure_rabbitmq
ensure_rabbitmq4
ensure_gnu_time
ensure_redis
ensure_postgres
ensure_promtool
ensure_venv
HELM="$(tests/setup/helm.sh)"
export HELM

say "building"
cargo build --workspace --all-targets --locked
export CELERIAC_BIN="$root/target/debug/celeriac"

say "the Python package: pip install . into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps . >&2

say "Rust tests"
cargo test --workspace --locked

say "the Dockerfile's build stage, in its own build context"
.venv/bin/python tests/docker_context_build.py

say "the Python image recipe (examples/python-app/Dockerfile), without a Docker engine"
.venv/bin/python tests/python_image_recipe.py

say "interop and chart tests"
.venv/bin/python -m pytest -q -p no:cacheprovider tests/interop tests/chart "$@"

#!/usr/bin/env bash
# Provide CPython 3.13 for the Python-task tests, from Debian's packages only.
#
# This machine's Python is 3.11; Debian trixie's python3.13 comes from the same package registry,
# so, as tests/setup/rabbitmq4.sh does for RabbitMQ 4, we build a small trixie root with
# debootstrap (minbase + python3.13, python3.13-venv, GNU time) and run the tests inside it. The
# root holds a venv, /opt/celeriac-py313, with the test tools from PyPI (Celery, redis, pytest,
# OpenTelemetry: what tests/interop/test_python_*.py import, and nothing of celeriac's); the
# celeriac wheel under test is installed into it with --no-deps by the caller, each run.
#
# Idempotent: the root is built once under $PY313_CACHE (default
# /var/cache/celeriac-test/trixie-python313) and reused while its stamp file says it is complete;
# the venv is rebuilt when the requirement list below changes; the wrapper is rewritten each run.
#
# Prints on stdout, one KEY=VALUE a line (everything else goes to stderr or the log):
#   PY313_RUN      wrapper: `$PY313_RUN PROGRAM ARGS...` runs PROGRAM (a path inside the root)
#                  in the current directory, inside the root
#   PY313_PYTHON   the venv's python, as a path inside the root
#   PY313_VERSION  its version (python3.13 --version)
# On failure: exit status 1 and one line on stderr that says what failed and where the log is.
#
# The wrapper (bin/in-py313) works as rabbitmq4.sh's does: unshare --mount gives the program a
# mount namespace of its own; there, and only there, it mounts /proc and a fresh /dev/shm (the
# semaphores of Celery's billiard pool), binds the host's /tmp, the current directory and $HOME
# at the same paths, then chroots into the root. The network namespace is the host's, so the
# broker and Redis on 127.0.0.1 answer as they do outside. The mounts end with the namespace:
# ending the program is the whole cleanup (`findmnt | grep trixie-python313` prints nothing).
#
# Needs root (debootstrap, chroot, mount namespaces). Works unattended (CI=true, no stdin).
#
# Environment:
#   PY313_CACHE    where the root and the wrapper live
#   PY313_SUITE    Debian suite to bootstrap (default trixie)
#   PY313_MIRROR   Debian mirror URL (default: the one this machine's apt uses for its own
#                  release's main component)
set -Eeuo pipefail

cache="${PY313_CACHE:-/var/cache/celeriac-test/trixie-python313}"
suite="${PY313_SUITE:-trixie}"
root="$cache/root"
bin="$cache/bin"
stamp="$cache/complete"
log="$cache/setup.log"
venv=/opt/celeriac-py313
# The test tools, with tests/requirements.txt's floors. A change here rebuilds the venv.
requirements=(
    "celery[redis]>=5.5" "redis>=5.0" "pytest>=8.0"
    "opentelemetry-sdk>=1.30" "opentelemetry-instrumentation-celery>=0.51b0"
)

fail() {
    echo "python313.sh: $*" >&2
    exit 1
}

[[ "$(id -u)" == 0 ]] || fail "must run as root (debootstrap, chroot and mount namespaces need it)"
mkdir -p "$cache" 2>/dev/null || fail "cannot create the cache directory $cache"

exec 9>"$cache/.lock"
flock -w 1800 9 || fail "another python313.sh held $cache/.lock for 30 minutes"

step="starting"
trap 'echo "python313.sh: failed while $step: $(tail -n 1 "$log" 2>/dev/null) (log: $log)" >&2' ERR

build_root() {
    export DEBIAN_FRONTEND=noninteractive
    if ! command -v debootstrap >/dev/null; then
        step="installing debootstrap from Debian's packages"
        echo "python313.sh: $step" >&2
        apt-get update -qq >>"$log" 2>&1
        apt-get install -y -qq --no-install-recommends debootstrap >>"$log" 2>&1
    fi

    step="finding this machine's Debian mirror"
    local mirror="${PY313_MIRROR:-}"
    if [[ -z "$mirror" ]]; then
        local codename attempt
        codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
        for attempt in 1 2; do
            mirror="$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 2>>"$log" |
                awk -v s="$codename" '$2 == s && $3 == "main" { print $1; exit }')"
            [[ -z "$mirror" && $attempt == 1 ]] || break
            apt-get update -qq >>"$log" 2>&1
        done
        [[ -n "$mirror" ]] || fail "no Debian mirror for '$codename main' in apt's sources; set PY313_MIRROR"
    fi

    local new="$cache/root.new"
    if grep -qF " $new" /proc/self/mountinfo; then
        fail "something is mounted under $new: unmount it first"
    fi
    rm -rf "$new"

    step="bootstrapping Debian $suite with python3.13 from $mirror"
    echo "python313.sh: $step (first run only)" >&2
    unshare --mount --propagation private --pid --fork --kill-child -- \
        debootstrap --variant=minbase --include=python3.13,python3.13-venv,time \
        --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        "$suite" "$new" "$mirror" >>"$log" 2>&1

    step="checking the new root"
    rm -f "$new"/var/cache/apt/archives/*.deb
    [[ -x "$new/usr/bin/python3.13" ]] || fail "debootstrap finished but $new has no python3.13 (log: $log)"
    grep -qw localhost "$new/etc/hosts" 2>/dev/null ||
        printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >>"$new/etc/hosts"
    rm -rf "$root"
    mv "$new" "$root"
}

write_wrapper() {
    step="writing the wrapper in $bin"
    mkdir -p "$bin"
    cat >"$bin/in-py313.new" <<EOF
#!/bin/sh
# Written by tests/setup/python313.sh: runs PROGRAM (a path inside $root) there, in the
# current directory, in a mount namespace of its own (see that script for what is mounted).
root='$root'
EOF
    cat >>"$bin/in-py313.new" <<'EOF'
[ $# -ge 1 ] || { echo "usage: in-py313 PROGRAM [ARGS...]" >&2; exit 2; }
dir=$(pwd -P)
# Every step is an exec: the program keeps this script's pid.
exec unshare --mount --propagation private -- /bin/sh -ec '
root=$1 dir=$2; shift 2
mount -t proc proc "$root/proc"
mkdir -p "$root/dev/shm"
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
mount --bind /tmp "$root/tmp"
for d in "$dir" "${HOME:-/}"; do
    case "$d" in /|/tmp|/tmp/*) continue ;; esac
    mkdir -p "$root$d"
    mount --bind "$d" "$root$d"
done
exec chroot "$root" /usr/bin/env -C "$dir" LC_ALL=C.UTF-8 "$@"
' in-py313 "$root" "$dir" "$@"
EOF
    chmod 0755 "$bin/in-py313.new"
    if cmp -s "$bin/in-py313.new" "$bin/in-py313"; then
        rm -f "$bin/in-py313.new"
    else
        mv -f "$bin/in-py313.new" "$bin/in-py313"
    fi
}

build_venv() {
    # pip inside the root reaches PyPI as this machine does: its DNS, its CA bundle (pip may be
    # told to use the system's, PIP_CERT) and its pip configuration.
    step="creating $venv in the root"
    echo "python313.sh: $step with ${requirements[*]}" >&2
    cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>>"$log" || true
    [[ ! -f /etc/pip.conf ]] || cp -L /etc/pip.conf "$root/etc/pip.conf"
    rm -rf "$root$venv"
    unshare --mount --propagation private -- /bin/sh -ec '
root=$1 venv=$2; shift 2
mount -t proc proc "$root/proc"
if [ -d /etc/ssl/certs ]; then
    mkdir -p "$root/etc/ssl/certs"
    mount --bind -o ro /etc/ssl/certs "$root/etc/ssl/certs"
fi
chroot "$root" /usr/bin/python3.13 -m venv "$venv"
chroot "$root" /usr/bin/env LC_ALL=C.UTF-8 "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@"
' build-venv "$root" "$venv" "${requirements[@]}" >>"$log" 2>&1
    printf '%s\n' "${requirements[@]}" >"$root$venv/.requirements"
}

if [[ ! -f "$stamp" || ! -x "$root/usr/bin/python3.13" ]]; then
    rm -f "$stamp"
    : >"$log"
    began=$SECONDS
    build_root
    step="reading the installed version"
    version="$(chroot "$root" /usr/bin/python3.13 --version 2>>"$log" | cut -d' ' -f2)"
    echo "python313.sh: Python $version, root built in $((SECONDS - began)) s ($(du -sh "$root" | cut -f1))" >&2
    printf 'PY313_VERSION=%s\n' "$version" >"$stamp"
fi
if [[ "$(cat "$root$venv/.requirements" 2>/dev/null)" != "$(printf '%s\n' "${requirements[@]}")" ]]; then
    began=$SECONDS
    build_venv
    echo "python313.sh: venv built in $((SECONDS - began)) s" >&2
fi
write_wrapper

version="$(sed -n 's/^PY313_VERSION=//p' "$stamp")"
[[ -n "$version" ]] || fail "$stamp names no version: delete it to rebuild the root"
printf 'PY313_RUN=%s\nPY313_PYTHON=%s\nPY313_VERSION=%s\n' "$bin/in-py313" "$venv/bin/python" "$version"

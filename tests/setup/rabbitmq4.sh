#!/usr/bin/env bash
# Provide a RabbitMQ 4.x installation for the tests, from Debian's packages only.
#
# This machine runs Debian bookworm, whose rabbitmq-server is 3.10. Debian trixie's is 4.x and
# comes from the same package registry, so we build a small trixie root with debootstrap
# (minbase + rabbitmq-server and its Erlang) and run the broker's programs inside it.
#
# Idempotent: the root is built once under $RABBITMQ4_CACHE (default
# /var/cache/celeriac-test/trixie-rabbitmq) and reused while its stamp file says it is complete;
# only the small wrapper scripts are rewritten on each run. The first run downloads about 80 MB
# of packages and took 42 to 102 s here (a 300 MB root); later runs take well under a second.
#
# Prints on stdout, one KEY=VALUE a line (everything else goes to stderr or the log):
#   RABBITMQ4_SERVER   wrapper that runs the root's rabbitmq-server
#   RABBITMQ4_CTL      wrapper that runs the root's rabbitmqctl
#   RABBITMQ4_EPMD     wrapper that runs the root's epmd
#   RABBITMQ4_VERSION  the Debian version of the root's rabbitmq-server package
# On failure: exit status 1 and one line on stderr that says what failed and where the log is.
#
# How a wrapper runs a program (bin/in-root, one script behind every name in bin/):
#   unshare --mount gives the program a mount namespace of its own; in it, and only there, the
#   wrapper mounts /proc on <root>/proc (Erlang reads it), binds the host's /tmp on <root>/tmp
#   and binds the current directory and $HOME at the same paths (a test node keeps its config,
#   data and Erlang cookie there; outside /tmp this leaves an empty mount-point directory in
#   <root>), then chroots into <root>. debootstrap created the few device
#   nodes Erlang needs in <root>/dev, so /dev is not mounted. The mounts are never visible
#   outside the namespace and the kernel drops them with it, when its last process exits:
#   ending the node's processes (PrivateRabbit ends its process group by pid) is the whole
#   cleanup, and a killed test run leaves no mount behind either. Check with
#   `findmnt | grep trixie-rabbitmq`, which must print nothing.
#
# Needs root (debootstrap, chroot, mount namespaces). Works unattended (CI=true, no stdin).
#
# Environment:
#   RABBITMQ4_CACHE    where the root and the wrappers live
#   RABBITMQ4_SUITE    Debian suite to bootstrap (default trixie)
#   RABBITMQ4_MIRROR   Debian mirror URL (default: the one this machine's apt uses for its own
#                      release's main component)
set -Eeuo pipefail

cache="${RABBITMQ4_CACHE:-/var/cache/celeriac-test/trixie-rabbitmq}"
suite="${RABBITMQ4_SUITE:-trixie}"
root="$cache/root"
bin="$cache/bin"
stamp="$cache/complete"
log="$cache/setup.log"

fail() {
    echo "rabbitmq4.sh: $*" >&2
    exit 1
}

[[ "$(id -u)" == 0 ]] || fail "must run as root (debootstrap, chroot and mount namespaces need it)"
mkdir -p "$cache" 2>/dev/null || fail "cannot create the cache directory $cache"

# One setup at a time: the fixture and tests/run.sh may both call this.
exec 9>"$cache/.lock"
flock -w 1800 9 || fail "another rabbitmq4.sh held $cache/.lock for 30 minutes"

step="starting"
# The last line of the log usually says why (debootstrap's "E: ..." line).
trap 'echo "rabbitmq4.sh: failed while $step: $(tail -n 1 "$log" 2>/dev/null) (log: $log)" >&2' ERR

build_root() {
    export DEBIAN_FRONTEND=noninteractive
    if ! command -v debootstrap >/dev/null; then
        step="installing debootstrap from Debian's packages"
        echo "rabbitmq4.sh: $step" >&2
        apt-get update -qq >>"$log" 2>&1
        apt-get install -y -qq --no-install-recommends debootstrap >>"$log" 2>&1
    fi

    step="finding this machine's Debian mirror"
    local mirror="${RABBITMQ4_MIRROR:-}"
    if [[ -z "$mirror" ]]; then
        local codename
        codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
        # apt lists only the sources it has package lists for: update once if it has none.
        local attempt
        for attempt in 1 2; do
            mirror="$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 2>>"$log" |
                awk -v s="$codename" '$2 == s && $3 == "main" { print $1; exit }')"
            [[ -z "$mirror" && $attempt == 1 ]] || break
            apt-get update -qq >>"$log" 2>&1
        done
        [[ -n "$mirror" ]] || fail "no Debian mirror for '$codename main' in apt's sources; set RABBITMQ4_MIRROR"
    fi

    local new="$cache/root.new"
    # A previous attempt that died half way: nothing can be mounted under it (its mounts lived
    # in a namespace of their own), so it is safe to delete.
    if grep -qF " $new" /proc/self/mountinfo; then
        fail "something is mounted under $new: unmount it first"
    fi
    rm -rf "$new"

    step="bootstrapping Debian $suite with rabbitmq-server from $mirror"
    echo "rabbitmq4.sh: $step (first run only; downloads about 80 MB)" >&2
    # A private mount namespace and pid namespace: whatever debootstrap mounts or starts
    # (package scripts) ends with it, even if it is killed.
    unshare --mount --propagation private --pid --fork --kill-child -- \
        debootstrap --variant=minbase --include=rabbitmq-server \
        --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        "$suite" "$new" "$mirror" >>"$log" 2>&1

    step="checking the new root"
    echo "rabbitmq4.sh: downloaded $(du -csh "$new"/var/cache/apt/archives/*.deb | tail -n 1 | cut -f1) of packages" >&2
    rm -f "$new"/var/cache/apt/archives/*.deb
    [[ -x "$new/usr/lib/rabbitmq/bin/rabbitmq-server" ]] || fail "debootstrap finished but $new has no rabbitmq-server (log: $log)"
    # Erlang resolves the node's host name, localhost, through /etc/hosts.
    grep -qw localhost "$new/etc/hosts" 2>/dev/null ||
        printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >>"$new/etc/hosts"
    rm -rf "$root"
    mv "$new" "$root"
}

write_wrappers() {
    step="writing the wrappers in $bin"
    mkdir -p "$bin"
    cat >"$bin/in-root.new" <<EOF
#!/bin/sh
# Written by tests/setup/rabbitmq4.sh: runs the program named like this link inside
# $root, in a mount namespace of its own (see that script for why and what is mounted).
root='$root'
EOF
    cat >>"$bin/in-root.new" <<'EOF'
name=$(basename "$0")
case "$name" in
    rabbitmq-server|rabbitmqctl|rabbitmq-plugins|rabbitmq-diagnostics) prog=/usr/lib/rabbitmq/bin/$name ;;
    epmd|erl) prog=/usr/bin/$name ;;
    *) echo "in-root: unknown program $name" >&2; exit 2 ;;
esac
dir=$(pwd -P)
# The program keeps the pid of this script (every step below is an exec), so signalling
# it or its process group reaches the program itself.
exec unshare --mount --propagation private -- /bin/sh -ec '
root=$1 dir=$2 prog=$3; shift 3
mount -t proc proc "$root/proc"
mount --bind /tmp "$root/tmp"
for d in "$dir" "${HOME:-/}"; do
    case "$d" in /|/tmp|/tmp/*) continue ;; esac
    mkdir -p "$root$d"
    mount --bind "$d" "$root$d"
done
exec chroot "$root" /usr/bin/env -C "$dir" LC_ALL=C.UTF-8 "$prog" "$@"
' in-root "$root" "$dir" "$prog" "$@"
EOF
    chmod 0755 "$bin/in-root.new"
    # Replaced only when changed, and atomically: a node of another test run may be using it.
    if cmp -s "$bin/in-root.new" "$bin/in-root"; then
        rm -f "$bin/in-root.new"
    else
        mv -f "$bin/in-root.new" "$bin/in-root"
    fi
    local name
    for name in rabbitmq-server rabbitmqctl rabbitmq-plugins rabbitmq-diagnostics epmd erl; do
        [[ "$(readlink "$bin/$name" 2>/dev/null)" == in-root ]] || ln -sfn in-root "$bin/$name"
    done
}

if [[ ! -f "$stamp" || ! -x "$root/usr/lib/rabbitmq/bin/rabbitmq-server" ]]; then
    rm -f "$stamp"
    : >"$log"
    began=$SECONDS
    build_root
    step="reading the installed version"
    version="$(chroot "$root" dpkg-query -W -f '${Version}' rabbitmq-server 2>>"$log")"
    erts="$(chroot "$root" dpkg-query -W -f '${Version}' erlang-base 2>>"$log")"
    echo "rabbitmq4.sh: rabbitmq-server $version on erlang-base $erts, root built in $((SECONDS - began)) s ($(du -sh "$root" | cut -f1))" >&2
    printf 'RABBITMQ4_VERSION=%s\nERLANG_VERSION=%s\n' "$version" "$erts" >"$stamp"
fi
write_wrappers

version="$(sed -n 's/^RABBITMQ4_VERSION=//p' "$stamp")"
[[ -n "$version" ]] || fail "$stamp names no version: delete it to rebuild the root"
printf 'RABBITMQ4_SERVER=%s\nRABBITMQ4_CTL=%s\nRABBITMQ4_EPMD=%s\nRABBITMQ4_VERSION=%s\n' \
    "$bin/rabbitmq-server" "$bin/rabbitmqctl" "$bin/epmd" "$version"

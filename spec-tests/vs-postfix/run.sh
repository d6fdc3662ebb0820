#!/usr/bin/env bash
# The mta against Postfix + OpenDKIM, the same load on both, one after the
# other in the same run (docs/performance.md, "Against Postfix + OpenDKIM").
#
#   spec-tests/vs-postfix/run.sh            full: 1, 10, 100 KiB; a warm-up round, then
#                                           3 interleaved rounds (mta, Postfix, mta Ed25519)
#   spec-tests/vs-postfix/run.sh --smoke    200 messages of 10 KiB, one round: proves it works
#   spec-tests/vs-postfix/run.sh stop       stops whatever an earlier run left behind
#
# Options: --bin-dir DIR (where `mta` and `bench` are; default target/release),
# --results DIR (default $STATE/results/<time>), and after `--` anything for
# compare.py (e.g. -- --sizes 10 --runs 5). Each run also writes pooled.md;
# spec-tests/vs-postfix/pool.py DIR... pools the rounds of several runs.
#
# As root. Installs postfix and opendkim from Debian's packages if missing
# (non-interactively, no service started, units left disabled), runs an
# instance of each of its own from $STATE (default /var/lib/mta-vs-postfix:
# configuration, queue, keys, logs, results), only on 127.0.0.1, and stops
# both on the way out, whatever happens. Debian's /etc/postfix is not used.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
STATE=${VS_POSTFIX_STATE:-/var/lib/mta-vs-postfix}
LISTEN_PORT=${VS_POSTFIX_LISTEN_PORT:-2525}
SINK_PORT=${VS_POSTFIX_SINK_PORT:-2626}
BIN_DIR=$REPO/target/release
RESULTS=""
MODE=full
PACKAGES=(postfix opendkim)
PF_CONF=$STATE/postfix
DRIVER_PID=""

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

listening() { ss -Hltn "sport = :$1" | grep -q "127.0.0.1:$1"; }

# ------------------------------------------------------------ packages
install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    command -v ss >/dev/null 2>&1 || missing+=(iproute2)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        # No configuration: the package writes no main.cf and starts nothing.
        echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
        # And no package may start a service while we install (a Docker
        # image usually has this file already).
        local policy=""
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            policy=/usr/sbin/policy-rc.d
            printf '#!/bin/sh\nexit 101\n' > "$policy"
            chmod 755 "$policy"
        fi
        local rc=0
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
            || { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
                 apt-get install -y -q --no-install-recommends "${missing[@]}"; } || rc=$?
        [ -z "$policy" ] || rm -f "$policy"
        [ "$rc" = 0 ] || die "apt-get install ${missing[*]} failed"
    fi
    disable_system_services
}

# The packages enable their units; this benchmark runs its own instances
# and leaves Debian's disabled and stopped.
disable_system_services() {
    local s
    for s in postfix opendkim; do
        if [ -d /run/systemd/system ]; then
            systemctl disable --now "$s.service" >/dev/null 2>&1 || true
        elif command -v deb-systemd-helper >/dev/null 2>&1; then
            deb-systemd-helper disable "$s.service" >/dev/null 2>&1 || true
        fi
        if [ -e "/etc/init.d/$s" ] && command -v update-rc.d >/dev/null 2>&1; then
            update-rc.d "$s" disable >/dev/null 2>&1 || true
        fi
    done
}

# ------------------------------------------------------------ configuration
render() {  # render TEMPLATE DEST
    sed -e "s|@STATE@|$STATE|g" -e "s|@LISTEN_PORT@|$LISTEN_PORT|g" -e "s|@SINK_PORT@|$SINK_PORT|g" \
        "$1" > "$2.tmp"
    mv "$2.tmp" "$2"
}

setup() {
    mkdir -p "$PF_CONF" "$STATE"/{spool,data,log,run/opendkim,dkim,tmp,results}
    render "$HERE/conf/main.cf.in" "$PF_CONF/main.cf"
    render "$HERE/conf/master.cf.in" "$PF_CONF/master.cf"
    render "$HERE/conf/opendkim.conf.in" "$STATE/opendkim.conf"
    # Postfix's daemons read dynamicmaps.cf and postfix-files from
    # meta_directory (Debian: /etc/postfix), which the package provides.
    chown postfix "$STATE/data"
    chown opendkim:postfix "$STATE/run/opendkim"
    chmod 750 "$STATE/run/opendkim"
    # OpenDKIM's key, made once: RSA-2048, readable by opendkim alone.
    local key=$STATE/dkim/pf.private
    if [ ! -s "$key" ]; then
        openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$key.tmp" 2>/dev/null
        mv "$key.tmp" "$key"
    fi
    chown opendkim:opendkim "$key"
    chmod 600 "$key"
    printf 'pf._domainkey.bench.example\tv=DKIM1; k=rsa; p=%s\n' \
        "$(openssl pkey -in "$key" -pubout -outform DER 2>/dev/null | base64 -w0)" > "$STATE/dkim/records.txt"
    postfix -c "$PF_CONF" check >/dev/null
}

# ------------------------------------------------------------ services
start_services() {
    local p
    for p in "$LISTEN_PORT" "$SINK_PORT"; do
        listening "$p" && die "127.0.0.1:$p is already in use"
    done
    rm -f "$STATE/run/opendkim/opendkim.sock"
    opendkim -f -x "$STATE/opendkim.conf" >>"$STATE/log/opendkim.log" 2>&1 &
    echo $! > "$STATE/run/opendkim.pid"
    for _ in $(seq 1 100); do [ -S "$STATE/run/opendkim/opendkim.sock" ] && break; sleep 0.1; done
    [ -S "$STATE/run/opendkim/opendkim.sock" ] || die "OpenDKIM did not create its socket ($STATE/log/opendkim.log)"
    postfix -c "$PF_CONF" start >/dev/null 2>&1 || die "postfix start failed ($STATE/log/postfix.log)"
    for _ in $(seq 1 100); do listening "$LISTEN_PORT" && break; sleep 0.1; done
    listening "$LISTEN_PORT" || die "Postfix is not listening on 127.0.0.1:$LISTEN_PORT"
    log "Postfix $(postconf -c "$PF_CONF" -h mail_version) on 127.0.0.1:$LISTEN_PORT, OpenDKIM $(dpkg-query -W -f='${Version}' opendkim), relaying to 127.0.0.1:$SINK_PORT"
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

stop_pid() {  # stop_pid PID NAME: TERM, then KILL after 10 s
    local pid=$1
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do alive "$pid" || return 0; sleep 0.1; done
    log "$2 ($pid) did not stop: killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

stop_all() {
    local pid
    # The driver and everything it started (bench, our daemon) share one
    # process group, the driver's.
    if [ -n "$DRIVER_PID" ] || [ -s "$STATE/run/driver.pid" ]; then
        pid=${DRIVER_PID:-$(cat "$STATE/run/driver.pid")}
        if alive "$pid"; then
            kill -TERM -- "-$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
            kill -KILL -- "-$pid" 2>/dev/null || true
        fi
        rm -f "$STATE/run/driver.pid"
    fi
    if [ -s "$STATE/spool/pid/master.pid" ]; then
        pid=$(tr -d ' \n' < "$STATE/spool/pid/master.pid")
        if alive "$pid"; then
            postfix -c "$PF_CONF" stop >/dev/null 2>&1 || true
            for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
            if alive "$pid"; then
                log "Postfix's master ($pid) did not stop: killing it and its children"
                pkill -KILL -P "$pid" 2>/dev/null || true
                kill -KILL "$pid" 2>/dev/null || true
            fi
        fi
    fi
    if [ -s "$STATE/run/opendkim.pid" ]; then
        stop_pid "$(cat "$STATE/run/opendkim.pid")" OpenDKIM
        rm -f "$STATE/run/opendkim.pid"
    fi
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_all
    disable_system_services
    exit "$rc"
}

# ------------------------------------------------------------ main
main() {
    local cmd=run extra=()
    while (($#)); do
        case $1 in
            --smoke) MODE=smoke ;;
            --bin-dir) BIN_DIR=$(cd "$2" && pwd); shift ;;
            --results) RESULTS=$2; shift ;;
            stop) cmd=stop ;;
            --) shift; extra=("$@"); break ;;
            *) die "unknown argument $1 (see the top of $0)" ;;
        esac
        shift
    done
    [ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts Postfix)"
    if [ "$cmd" = stop ]; then stop_all; return 0; fi
    if [ ! -x "$BIN_DIR/mta" ] || [ ! -x "$BIN_DIR/bench" ]; then
        die "no mta and bench in $BIN_DIR: cargo build --release -p mta -p spec-tests"
    fi
    python3 -c 'import dkim' 2>/dev/null || die "python3 cannot import dkim (pip install dkimpy pynacl)"

    install_packages
    stop_all   # what an earlier run may have left
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    setup
    start_services
    postsuper -c "$PF_CONF" -d ALL >/dev/null 2>&1 || true
    : "${RESULTS:=$STATE/results/$(date +%Y%m%d-%H%M%S)-$MODE}"
    mkdir -p "$RESULTS"
    local args=(--bench "$BIN_DIR/bench" --mta "$BIN_DIR/mta"
        --server "127.0.0.1:$LISTEN_PORT" --sink "127.0.0.1:$SINK_PORT"
        --postfix-pidfile "$STATE/spool/pid/master.pid" --opendkim-pidfile "$STATE/run/opendkim.pid"
        --postfix-queue "$STATE/spool" --postfix-log "$STATE/log/postfix.log"
        --postfix-dkim-records "$STATE/dkim/records.txt" --results "$RESULTS")
    if [ "$MODE" = smoke ]; then
        args+=(--sizes 10 --messages "10=200" --warmup 20 --runs 1 --no-warmup-round --quiet-wait 0 --run-timeout 120)
    else
        args+=(--ed25519)
    fi
    {
        echo "date: $(date -Is)"
        echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo "kernel: $(uname -r); debian $(cat /etc/debian_version)"
        echo "cpus: $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
        echo "postfix: $(postconf -c "$PF_CONF" -h mail_version); opendkim: $(dpkg-query -W -f='${Version}' opendkim)"
        echo "queue filesystem: $(df -T "$STATE" | awk 'NR==2{print $1" "$2}'); mta data: TMPDIR=$STATE/tmp"
        echo "compare.py ${args[*]} ${extra[*]}"
    } > "$RESULTS/environment.txt"
    # Our daemon's data directory (bench makes it under TMPDIR) on the same
    # file system as Postfix's queue, so both fsync to the same disk.
    export TMPDIR=$STATE/tmp PYTHONDONTWRITEBYTECODE=1
    # A process group of its own, so that cleanup reaches bench and our
    # daemon too.
    setsid python3 "$HERE/compare.py" "${args[@]}" "${extra[@]}" &
    DRIVER_PID=$!
    echo "$DRIVER_PID" > "$STATE/run/driver.pid"
    local rc=0
    wait "$DRIVER_PID" || rc=$?
    DRIVER_PID=""
    rm -f "$STATE/run/driver.pid"
    [ "$rc" = 0 ] || die "the comparison failed (exit $rc); see $RESULTS"
    # The pooled medians read what compare.py wrote: the smoke run checks
    # that they still agree.
    python3 "$HERE/pool.py" "$RESULTS" > "$RESULTS/pooled.md" \
        || die "pool.py could not read $RESULTS/results.json"
    log "results in $RESULTS"
}

main "$@"

#!/usr/bin/env bash
# Runs every test of the workspace: formatting, lints, unit, conformance and
# end-to-end tests. Installs what the tests need first (idempotently), so it
# works on a fresh Debian machine with the Rust toolchain. CI runs exactly
# this (.ci/run).
#
# Some tests mount a small tmpfs (disk-full) and so need root, as CI has.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Independent peers the tests talk to: swaks (with TLS), Python's smtplib,
# dkimpy (with PyNaCl for Ed25519) as a DKIM verifier, openssl for keys made
# the way other tools make them.
missing=()
command -v swaks >/dev/null 2>&1 || missing+=(swaks)
perl -MNet::SSLeay -e 1 >/dev/null 2>&1 || missing+=(libnet-ssleay-perl)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing test dependencies: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  sudo_if_needed apt-get install -y -q --no-install-recommends "${missing[@]}" \
    || { sudo_if_needed apt-get update -q && sudo_if_needed apt-get install -y -q --no-install-recommends "${missing[@]}"; }
fi

# dkimpy (with PyNaCl) verifies DKIM; aiosmtpd is an independent receiving
# MX for the delivery tests; prometheus-client's parser reads /metrics in
# the metrics test. Debian's own python3 refuses pip installs outside a
# virtualenv (PEP 668): fall back to --break-system-packages there.
if ! python3 -c 'import dkim, nacl, aiosmtpd, prometheus_client.parser' >/dev/null 2>&1; then
  echo "installing test dependencies: dkimpy pynacl aiosmtpd prometheus-client (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check dkimpy pynacl aiosmtpd prometheus-client \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages dkimpy pynacl aiosmtpd prometheus-client
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The unit file, where systemd's tools are installed (ExecStart pointed at
# the binary just built, since /usr/bin/mta need not exist here): it must
# verify, and its exposure score must stay at 2.0 or below ("OK").
if command -v systemd-analyze >/dev/null 2>&1; then
  cargo build -p mta --locked --quiet
  unit_dir=$(mktemp -d)
  sed "s#/usr/bin/mta#$PWD/target/debug/mta#g" systemd/mta.service > "$unit_dir/mta.service"
  systemd-analyze verify "$unit_dir/mta.service"
  echo "systemd-analyze verify systemd/mta.service: ok"
  security=$(systemd-analyze security --offline=true "$unit_dir/mta.service" 2>&1 || true)
  score=$(printf '%s\n' "$security" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9][0-9.]*\).*/\1/p')
  rm -rf "$unit_dir"
  if [ -z "$score" ]; then
    printf '%s\n' "$security"
    echo "systemd-analyze security printed no exposure level for systemd/mta.service" >&2
    exit 1
  fi
  if ! awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }'; then
    printf '%s\n' "$security"
    echo "systemd/mta.service: exposure $score is above 2.0; tighten the hardening (see the lines marked ✗ above)" >&2
    exit 1
  fi
  echo "systemd-analyze security systemd/mta.service: $score (at most 2.0)"
fi
# The sysusers and tmpfiles files, applied to an empty root.
if command -v systemd-sysusers >/dev/null 2>&1 && command -v systemd-tmpfiles >/dev/null 2>&1; then
  root=$(mktemp -d)
  mkdir -p "$root/etc"
  out=$(systemd-sysusers --root="$root" "$PWD/systemd/mta.sysusers" 2>&1) \
    || { printf '%s\n' "$out" >&2; rm -rf "$root"; exit 1; }
  systemd-tmpfiles --root="$root" --create "$PWD/systemd/mta.tmpfiles"
  [ -d "$root/var/lib/mta" ] && [ -d "$root/var/log/mta" ] && [ -L "$root/var/log/mta/transactions" ] \
    || { echo "systemd/mta.tmpfiles did not create /var/lib/mta, /var/log/mta and its link" >&2; rm -rf "$root"; exit 1; }
  rm -rf "$root"
  echo "systemd-sysusers and systemd-tmpfiles on systemd/: ok"
fi

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi


# Fuzzing (docs/fuzzing.md): each libFuzzer target of spec-tests/fuzz for a
# bounded time, on stable Rust. Its build reuses the dependencies the tests
# above built, and instruments only the code under test. An input that
# breaks an invariant fails the run; fuzz.sh prints where it was written
# and how to keep it as a regression (tests/fuzz_regressions.rs replays
# those, and the seeds, in the test run above).
cargo fmt --manifest-path spec-tests/fuzz/Cargo.toml -- --check
spec-tests/fuzz/fuzz.sh smoke "${FUZZ_SECONDS:-40}"

# The comparison with Postfix + OpenDKIM as a smoke run (200 messages of
# 10 KiB each way, DKIM verified on both): proves the harness works end to
# end, packages included; no figure is checked. The full comparison is run
# by hand (docs/performance.md). Needs root: it installs postfix and
# opendkim and starts them (on 127.0.0.1, stopped and disabled after).
if [ "$(id -u)" -eq 0 ]; then
  cargo build -p mta -p spec-tests --locked --quiet
  spec-tests/vs-postfix/run.sh --smoke --bin-dir target/debug
else
  echo "skipping spec-tests/vs-postfix/run.sh --smoke: needs root"
fi

#!/usr/bin/env bash
# Builds and runs the mta's libFuzzer targets on stable Rust (docs/fuzzing.md).
#
#   fuzz.sh build                 build every target, instrumented
#   fuzz.sh run TARGET [ARGS...]  fuzz TARGET until stopped (or as ARGS say:
#                                 -max_total_time=3600 -jobs=2 -workers=2 ...)
#   fuzz.sh smoke [SECONDS]       build, then fuzz each target for SECONDS
#                                 (default 40); fails if any input breaks an
#                                 invariant. spec-tests/run-tests.sh runs this.
#   fuzz.sh list                  the targets
#
# Inputs libFuzzer finds interesting go to target/fuzz/corpus/TARGET (the
# committed seeds in corpus/TARGET are read, never written); an input that
# breaks an invariant is written to target/fuzz/artifacts/TARGET/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
targets=(smtp_session data_reader config)

# The workspace's target directory: the fuzz build reuses every dependency
# the workspace has built (see the profiles in Cargo.toml).
export CARGO_TARGET_DIR="$root/target"
bin_dir="$CARGO_TARGET_DIR/debug"
work="$CARGO_TARGET_DIR/fuzz"

# FUZZ_OPT: the mta's opt-level. 0 builds fastest with the instrumentation
# (the bounded run in the test command); 1 or 2 run faster, for long runs.
build() {
  RUSTC_WRAPPER="$here/rustc-wrapper" cargo build --manifest-path "$here/Cargo.toml" --locked --bins \
    --config "profile.dev.package.mta.opt-level=${FUZZ_OPT:-0}" "$@"
}

dict_for() {
  case "$1" in
    smtp_session) echo "$here/dict/smtp.dict" ;;
    data_reader) echo "$here/dict/data.dict" ;;
    config) echo "$here/dict/toml.dict" ;;
  esac
}

# Runs one target with its seeds and dictionary; extra arguments go to libFuzzer.
fuzz() {
  local target=$1
  shift
  mkdir -p "$work/corpus/$target" "$work/artifacts/$target"
  "$bin_dir/$target" \
    -dict="$(dict_for "$target")" \
    -artifact_prefix="$work/artifacts/$target/" \
    -max_len=8192 -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 \
    -print_final_stats=1 \
    "$@" \
    "$work/corpus/$target" "$here/corpus/$target"
}

known() {
  local t
  for t in "${targets[@]}"; do [ "$t" = "$1" ] && return 0; done
  echo "unknown target '$1'; the targets: ${targets[*]}" >&2
  exit 2
}

case "${1:-}" in
  build)
    shift
    build "$@"
    ;;
  run)
    [ $# -ge 2 ] || { echo "usage: $0 run TARGET [libFuzzer options]" >&2; exit 2; }
    known "$2"
    target=$2
    shift 2
    build --quiet
    fuzz "$target" "$@"
    ;;
  smoke)
    seconds=${2:-40}
    build --quiet
    failed=()
    for target in "${targets[@]}"; do
      echo "fuzzing $target for ${seconds}s"
      log="$work/$target.log"
      mkdir -p "$work"
      # A new artifact directory per run, so only this run's finds are reported.
      rm -rf "$work/artifacts/$target"
      if fuzz "$target" -max_total_time="$seconds" >"$log" 2>&1; then
        grep -E '^#[0-9]+[[:space:]]+DONE|^stat::number_of_executed_units|^stat::average_exec_per_sec' "$log" || true
      else
        tail -n 40 "$log"
        failed+=("$target")
      fi
    done
    if [ ${#failed[@]} -gt 0 ]; then
      for target in "${failed[@]}"; do
        for input in "$work/artifacts/$target"/*; do
          [ -e "$input" ] || continue
          cat >&2 <<EOF
fuzz target $target: an input broke an invariant: $input
  see it fail again:   $bin_dir/$target $input
  minimise it:         $bin_dir/$target -minimize_crash=1 -runs=100000 -exact_artifact_path=min.bin $input
  keep it as a test:   cp min.bin $here/regressions/$target/<what-it-found>
                       (tests/fuzz_regressions.rs replays it in every test run), then fix the bug
EOF
        done
      done
      echo "fuzzing failed: ${failed[*]} (logs in $work/<target>.log)" >&2
      exit 1
    fi
    ;;
  list)
    printf '%s\n' "${targets[@]}"
    ;;
  *)
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac

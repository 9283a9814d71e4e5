#!/usr/bin/env bash
# Runs the libFuzzer targets in fuzz/ (one per decoder of untrusted bytes) for a while
# each, and says per target how many inputs ran, for how long, and what was found.
#
#   scripts/fuzz.sh [--seconds N] [TARGET...]     N defaults to 60; targets to all
#
# Needs the nightly toolchain (sanitizers); installs cargo-fuzz if it is missing.
# Committed seeds in fuzz/corpus/<target>/ are only read: what the fuzzer learns goes
# to a working corpus beside the build, and a crashing input to fuzz/artifacts/<target>/.
# Exits 1 if any target found a crash, an out-of-memory or a timeout.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60
targets=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --seconds) seconds="${2:-}"; shift 2 || { echo "fuzz.sh: --seconds needs a value" >&2; exit 2; } ;;
    --seconds=*) seconds="${1#*=}"; shift ;;
    -h | --help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "fuzz.sh: unknown option \`$1\`" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [[ "$seconds" -eq 0 ]]; then
  echo "fuzz.sh: --seconds wants a whole number of seconds, not \`$seconds\`" >&2
  exit 2
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
# Its own target dir: sanitizer builds would otherwise throw away the main one's.
: "${KILN_FUZZ_TARGET_DIR:=$HOME/.cache/kiln/fuzz-target}"
export CARGO_TARGET_DIR="$KILN_FUZZ_TARGET_DIR"

if [[ ${#targets[@]} -eq 0 ]]; then
  mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir fuzz)
fi
# -a: optimized, but with overflow checks and debug assertions, so an arithmetic
# overflow on hostile input is a finding rather than a silent wrap.
cargo +nightly fuzz build -a --fuzz-dir fuzz

logs="$CARGO_TARGET_DIR/fuzz-logs"
mkdir -p "$logs"
found=0
printf '%-16s %14s %8s  %s\n' target runs seconds finding
for t in "${targets[@]}"; do
  work="$CARGO_TARGET_DIR/fuzz-corpus/$t"
  mkdir -p "$work" "fuzz/corpus/$t"
  log="$logs/$t.log"
  start=$(date +%s)
  set +e
  cargo +nightly fuzz run -a --fuzz-dir fuzz "$t" "$work" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1
  status=$?
  set -e
  elapsed=$(($(date +%s) - start))
  # libFuzzer's own count of the time spent fuzzing, when it got to say it.
  done_in=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  elapsed=${done_in:-$elapsed}
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  if [[ -z "$runs" ]]; then
    # No final stats (the run died): the last progress line has the count.
    runs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
  fi
  unit=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
  if [[ -n "$unit" ]]; then
    finding="$(basename "$unit" | cut -d- -f1): $unit (log: $log)"
    found=1
  elif [[ $status -ne 0 ]]; then
    finding="fuzzer exited $status without a test unit (log: $log)"
    found=1
  else
    finding=none
  fi
  printf '%-16s %14s %8s  %s\n' "$t" "${runs:-?}" "$elapsed" "$finding"
done
exit "$found"

#!/usr/bin/env bash
# The chaos soak (issue 15): a small fleet on this machine (kilnd natively and under
# qemu-user, a real mosquitto, kiln watch) with faults injected at random from a seed,
# and the invariants checked while it runs and at the end. See docs/src/testing.md, "Chaos soak".
#   scripts/soak.sh [--minutes N] [--seed S] [--devices D] [--no-build]
# (--no-build: kilnd and kiln are already built, as in scripts/test.sh)
# Exit codes: 0 passed, 1 an invariant broke (the seed and the faults before it are
# printed; the same seed replays the same faults), 64 bad arguments, 70 the soak
# could not run. Needs root (each device's data dir is a small tmpfs).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
export CARGO_TARGET_DIR

usage() {
  echo "soak.sh: error: $1 (usage: scripts/soak.sh [--minutes N] [--seed S] [--devices D])" >&2
  exit 64
}
minutes=10 seed=20261130 devices=3 build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes|--seed|--devices)
      [ $# -ge 2 ] || usage "$1 needs a value"
      name=${1#--} value=$2
      shift 2
      ;;
    --no-build) build=0; shift; continue ;;
    *) usage "unknown argument \`$1\`" ;;
  esac
  case "$name" in
    minutes)
      if ! { [[ "$value" =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk "BEGIN { exit !($value > 0 && $value <= 1440) }"; }; then
        usage "--minutes takes a number of minutes above 0 and at most 1440, got \`$value\`"
      fi
      minutes=$value ;;
    seed)
      [[ "$value" =~ ^[0-9]{1,19}$ ]] || usage "--seed takes a whole number below 10^19, got \`$value\`"
      seed=$value ;;
    devices)
      [[ "$value" =~ ^[1-9]$ ]] || usage "--devices takes 1 to 9, got \`$value\`"
      devices=$value ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "soak.sh: error: the soak mounts a tmpfs per device and needs root" >&2; exit 70; }

if [ "$build" = 1 ]; then
  scripts/build.sh
fi
cargo build --locked --quiet -p kiln-e2e --bin soak
exec "$CARGO_TARGET_DIR/debug/soak" --minutes "$minutes" --seed "$seed" --devices "$devices"

#!/usr/bin/env bash
# The fleet side at scale (docs/src/measurements/2026-11-30.md, "Fleet scale"): simulated devices (kilnd-sim: kilnd's
# link, update agent, store and telemetry spool per device, the worker simulated)
# against a real mosquitto, driven by the kiln users install (host profile), measured.
#   scripts/fleet-scale.sh [--devices N] [--brokers N] [--mirror] [--telemetry-ms MS] [--no-build]
# (--no-build: kilnd-sim is already built, as by scripts/build.sh)
# --brokers 3 (or more): a nats-server cluster on loopback instead (docs/src/brokers.md),
# the devices spread over its nodes, one node killed in the middle of the rollout.
# --mirror: the first push (a full update) takes its artifacts from an HTTP mirror
# (Debian's nginx) instead of the broker, which then carries only control
# (docs/src/transfers.md).
# The suite runs the same at 100 devices (e2e tests/scale.rs, tests/cluster.rs).
# Exit codes: 0 measured, 64 bad arguments, 101 a step failed (printed).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
export CARGO_TARGET_DIR

usage() {
  echo "fleet-scale.sh: error: $1 (usage: scripts/fleet-scale.sh [--devices N] [--brokers N] [--mirror] [--telemetry-ms MS] [--no-build])" >&2
  exit 64
}
devices=1000 brokers=1 build=1 passed=() # flags handed to the harness as they are
while [ $# -gt 0 ]; do
  case "$1" in
    --devices)
      [ $# -ge 2 ] || usage "--devices needs a value"
      [[ "$2" =~ ^[1-9][0-9]{0,4}$ ]] || usage "--devices takes 1 to 99999, got \`$2\`"
      devices=$2; shift 2 ;;
    --brokers)
      [ $# -ge 2 ] || usage "--brokers needs a value"
      [[ "$2" =~ ^(1|[3-9])$ ]] || usage "--brokers takes 1 (mosquitto) or 3 to 9 (a nats-server cluster), got \`$2\`"
      brokers=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --mirror) passed+=(--mirror); shift ;;
    --telemetry-ms)
      [ $# -ge 2 ] || usage "--telemetry-ms needs a value"
      [[ "$2" =~ ^[1-9][0-9]{2,6}$ ]] || usage "--telemetry-ms takes 100 to 9999999, got \`$2\`"
      passed+=(--telemetry-ms "$2"); shift 2 ;;
    *) usage "unknown argument \`$1\`" ;;
  esac
done
if [ "$build" = 1 ]; then
  scripts/build.sh
fi
echo "build: kiln (host profile)" >&2
cargo build --locked --quiet -p kiln-compiler --profile host
cargo build --locked --quiet -p kiln-e2e --bin fleet_scale
# A socket per device in kilnd-sim and in the broker.
ulimit -n "$(ulimit -Hn)"
exec "$CARGO_TARGET_DIR/debug/fleet_scale" --devices "$devices" --brokers "$brokers" \
  --kiln "$CARGO_TARGET_DIR/host/kiln" "${passed[@]}"

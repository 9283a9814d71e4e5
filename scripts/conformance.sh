#!/usr/bin/env bash
# The whole WebAssembly spec suite through kiln's pipeline on every target:
# compile + sign every module on this host, replay each script inside that target's
# kilnd (aarch64 and riscv64 under qemu-user). Prints one table per target.
#
#   scripts/conformance.sh [SUITE_DIR] [kiln conformance flags: --json, --print-known]
#
# Exit code 0 when no target has a failure missing from conformance/expectations.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
export CARGO_TARGET_DIR
suite=../shared/wasm-testsuite
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  suite=$1
  shift
fi

scripts/build.sh

status=0
for profile in x86_64-linux aarch64-linux riscv64-linux; do
  triple=$(sed -n 's/^triple = "\(.*\)"/\1/p' "targets/$profile.toml")
  "$CARGO_TARGET_DIR/debug/kiln" conformance "$suite" --target "$profile" \
    --kilnd "$CARGO_TARGET_DIR/$triple/release/kilnd-test" \
    --expectations conformance/expectations.toml "$@" || status=1
done
exit $status

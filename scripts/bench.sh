#!/usr/bin/env bash
# The benchmark: builds what it needs (scripts/build.sh), then measures kiln on this
# machine and prints markdown tables (the README quotes them). Not part of the tests.
#   scripts/bench.sh [--runs N] [--targets x86_64-linux,aarch64-linux,riscv64-linux]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
export CARGO_TARGET_DIR

scripts/build.sh >&2
cargo run --locked --quiet -p kiln-e2e --bin bench -- "$@"

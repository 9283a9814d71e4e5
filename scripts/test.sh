#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what is missing, builds kilnd for
# x86_64, aarch64 and riscv64, then runs every test (devices under qemu-user).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
export CARGO_TARGET_DIR

scripts/build.sh
cargo fmt --all -- --check
# Host crates and end-to-end tests; kiln-runtime is not a default member, so its
# features are never unified with the compiler's.
cargo test --locked

#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh), then builds everything the demo and the
# tests use, each profile once, into one target dir:
#   - kilnd for every device triple, each in its own cargo invocation (-p kiln-runtime
#     alone, so feature unification can never link the host's compiler into it): the
#     shipped build as `kilnd`, and the tests' build with the test-only features
#     (conformance replayer, crash points) as `kilnd-test`. Both share every
#     dependency; only kiln-runtime itself is compiled twice;
#   - the host tool `kiln`;
#   - the Rust example modules for wasm32-wasip1 (hello, a WASI command; sensor-filter,
#     a reactor written with the kiln-guest SDK).
# Prints the stripped size of each kilnd.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
export CARGO_TARGET_DIR
scripts/setup.sh

for triple in x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu riscv64gc-unknown-linux-gnu; do
  echo "build: kilnd for $triple"
  out="$CARGO_TARGET_DIR/$triple/release"
  cargo build --locked --quiet -p kiln-runtime --release --target "$triple" \
    --features conformance,test-hooks
  cp "$out/kilnd" "$out/kilnd-test.tmp" && mv "$out/kilnd-test.tmp" "$out/kilnd-test"
  cargo build --locked --quiet -p kiln-runtime --release --target "$triple"
done
echo "build: kiln (host)"
cargo build --locked --quiet -p kiln-compiler
echo "build: example modules for wasm32-wasip1"
for example in hello sensor-filter; do
  cargo build --locked --quiet --release --target wasm32-wasip1 \
    --manifest-path "examples/$example/Cargo.toml" --target-dir "$CARGO_TARGET_DIR/examples"
done

for triple in x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu riscv64gc-unknown-linux-gnu; do
  printf 'build: kilnd %-30s %s bytes (stripped, release)\n' "$triple" \
    "$(stat -c %s "$CARGO_TARGET_DIR/$triple/release/kilnd")"
done

#!/usr/bin/env bash
# The benchmark: builds what it needs, installs the peer runtimes it compares against
# (scripts/peers.sh), then measures kiln on this machine, prints markdown tables, and
# writes them as the book's dated page docs/src/measurements/YYYY-MM-DD.md (listed in
# docs/src/SUMMARY.md and docs/src/measurements.md; --no-page skips it). Not part of
# the tests.
#   scripts/bench.sh [--runs N] [--targets x86_64-linux,aarch64-linux,riscv64-linux]
#                    [--only size,compile,start,speed,metering,update,telemetry,transfer] [--module-mb 49]
#                    [--no-page] [--book docs/src]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
export CARGO_TARGET_DIR

scripts/build.sh >&2
scripts/peers.sh >&2
# The release kiln users install (`cargo install --path compiler --profile host`).
echo "build: kiln (host profile)" >&2
cargo build --locked --quiet -p kiln-compiler --profile host
# The workloads and hello, from one source each: for wasm32-wasip1 and natively for
# every device triple (run under qemu-user like kilnd).
echo "build: workloads for wasm32-wasip1" >&2
cargo build --locked --quiet --release --target wasm32-wasip1 \
  --manifest-path examples/workloads/Cargo.toml --target-dir "$CARGO_TARGET_DIR/examples"
# The same with one more function, for the transfer section's "one function added".
cargo build --locked --quiet --release --target wasm32-wasip1 --features extra-workload \
  --manifest-path examples/workloads/Cargo.toml --target-dir "$CARGO_TARGET_DIR/examples-extra"
for triple in x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu riscv64gc-unknown-linux-gnu; do
  for example in workloads hello; do
    echo "build: $example natively for $triple" >&2
    cargo build --locked --quiet --release --target "$triple" \
      --manifest-path "examples/$example/Cargo.toml" --target-dir "$CARGO_TARGET_DIR/examples"
  done
done
KILN_BENCH_COMMAND="scripts/bench.sh $*" cargo run --locked --quiet -p kiln-e2e --bin bench -- "$@"

#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what is missing, builds kilnd for
# x86_64, aarch64 and riscv64, then runs every test (devices under qemu-user, and an
# arm64 board under full-system qemu).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
export CARGO_TARGET_DIR

scripts/build.sh
# The conformance subset reads the spec-suite files vendored in conformance/testsuite;
# where a full copy of the suite sits beside the clone (as on CI), it reads that.
if [ -z "${KILN_WASM_TESTSUITE:-}" ] && [ -d ../shared/wasm-testsuite ]; then
  KILN_WASM_TESTSUITE="$(cd ../shared/wasm-testsuite && pwd)"
  export KILN_WASM_TESTSUITE
fi
cargo fmt --all -- --check
# The guest SDK and the Rust examples live outside the host workspace (wasm32 only).
for crate in guest examples/hello examples/sensor-filter examples/nmea examples/workloads; do
  cargo fmt --manifest-path "$crate/Cargo.toml" -- --check
done
cargo clippy --locked --quiet --manifest-path guest/Cargo.toml --target wasm32-wasip1 \
  --target-dir "$CARGO_TARGET_DIR/examples" -- -D warnings
# The book (docs/): it builds; its links and anchors, and each command's page against
# the command's --help, are checked by `cargo test -p kiln-dist --test book` below.
mdbook build docs
# Host crates and end-to-end tests; kiln-runtime is not a default member, so its
# features are never unified with the compiler's.
cargo test --locked
# kilnd's own unit and property tests (config, line capture, the update agent's
# model-based test with a fixed seed and case count), built alone like kilnd, with the
# test-only features the tests' kilnd has.
cargo test --locked -p kiln-runtime --lib --features conformance,test-hooks
cargo test --locked -p kiln-runtime --doc
# The differential corpus's quick part (docs/src/corpus.md): two registry programs on
# x86_64, aarch64 and riscv64, byte for byte against wasmtime (about two minutes).
scripts/corpus.sh --quick
# The chaos soak for one minute with a fixed seed (docs/src/testing.md, "Chaos soak"): three devices
# (native, aarch64 and riscv64 under qemu-user), faults from the seed, invariants held.
scripts/soak.sh --no-build --minutes 1 --seed 20261130
# The arm64 board, short (docs/src/boards.md): a Debian image with systemd under
# qemu-system-aarch64 (built once and cached), the .deb installed, the device
# provisioned at first boot, one update and one power cut in the middle of the next.
scripts/package.sh --targets arm64 >/dev/null
scripts/board.sh --short --no-build

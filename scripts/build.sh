#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh), then builds everything the demo and the
# tests use, each profile once, into one target dir:
#   - kilnd for every device triple, each by scripts/kilnd-build.sh (-p kiln-runtime
#     alone, so feature unification can never link the host's compiler into it;
#     static-pie where glibc allows, but the lean build): the
#     shipped build as `kilnd`, and the tests' build with the test-only features
#     (conformance replayer, crash points) as `kilnd-test`. Both share every
#     dependency; only kiln-runtime itself is compiled twice. For aarch64 also the
#     lean kilnd without WASI, as `kilnd-lean`;
#   - the host tool `kiln`;
#   - the Rust example modules for wasm32-wasip1 (hello, a WASI command; sensor-filter,
#     a reactor written with the kiln-guest SDK);
#   - the C example modules (examples/c, written with the C SDK guest/c/kiln.h), with
#     clang-19 and wasi-libc (scripts/c-examples.sh), and the Zig ones (examples/zig,
#     scripts/zig-examples.sh, Zig from PyPI);
#   - the WASI testsuite's 46 wasm32-wasip1 Rust tests (conformance/wasi).
# Prints the stripped size of each kilnd.
#
# scripts/build.sh --demo builds only what scripts/demo.sh runs: the shipped kilnd for
# aarch64 and riscv64 and the example modules (the demo installs its own kiln), so a
# newcomer waits for nothing the demo does not start.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
export CARGO_TARGET_DIR
demo=0
case "${1:-}" in
  --demo) demo=1 ;;
  "") ;;
  *) echo "build.sh: unknown argument \`$1\` (usage: scripts/build.sh [--demo])" >&2; exit 64 ;;
esac
if [ "$demo" = 1 ]; then scripts/setup.sh --demo; else scripts/setup.sh; fi

# keep: BUILT-NAME copies the kilnd just built aside (the next build overwrites it).
keep() { cp "$out/kilnd" "$out/$1.tmp" && mv "$out/$1.tmp" "$out/$1"; }
if [ "$demo" = 1 ]; then
  # What the demo runs, with what each step costs cold on a 2-core machine (each kilnd
  # triple is a wasmer build); warm, each takes seconds.
  step=0
  for triple in aarch64-unknown-linux-gnu riscv64gc-unknown-linux-gnu; do
    step=$((step + 1))
    echo "build: [$step/3] kilnd for $triple (cold: about 7 minutes; warm: seconds)"
    scripts/kilnd-build.sh "$triple"
  done
  echo "build: [3/3] example modules for wasm32-wasip1 (cold: about a minute)"
  for example in hello sensor-filter; do
    cargo build --locked --quiet --release --target wasm32-wasip1 \
      --manifest-path "examples/$example/Cargo.toml" --target-dir "$CARGO_TARGET_DIR/examples"
  done
  exit 0
fi
for triple in x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu riscv64gc-unknown-linux-gnu; do
  echo "build: kilnd for $triple"
  out="$CARGO_TARGET_DIR/$triple/release"
  # The lean kilnd (no WASI), built and tested on one emulated target: each lean build
  # is one more wasmer build (see e2e's LEAN_DEVICES).
  if [ "$triple" = aarch64-unknown-linux-gnu ]; then
    scripts/kilnd-build.sh "$triple" --dynamic --no-default-features --features tls
    keep kilnd-lean
  fi
  scripts/kilnd-build.sh "$triple" --features conformance,test-hooks
  keep kilnd-test
  # The simulated fleet (kilnd-sim) runs on the build machine only, and never ships.
  if [ "$triple" = x86_64-unknown-linux-gnu ]; then
    cargo build --locked --quiet -p kiln-runtime --release --target "$triple" \
      --features conformance,test-hooks --bin kilnd-sim
  fi
  scripts/kilnd-build.sh "$triple"
done
echo "build: kiln (host)"
cargo build --locked --quiet -p kiln-compiler
echo "build: example modules for wasm32-wasip1"
for example in hello sensor-filter nmea; do
  cargo build --locked --quiet --release --target wasm32-wasip1 \
    --manifest-path "examples/$example/Cargo.toml" --target-dir "$CARGO_TARGET_DIR/examples"
done
echo "build: C example modules for wasm32-wasi"
scripts/c-examples.sh
echo "build: Zig example modules for wasm32"
scripts/zig-examples.sh
echo "build: the WASI testsuite for wasm32-wasip1"
scripts/wasi-testsuite.sh --build

for triple in x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu riscv64gc-unknown-linux-gnu; do
  printf 'build: kilnd %-30s %s bytes (stripped, release)\n' "$triple" \
    "$(stat -c %s "$CARGO_TARGET_DIR/$triple/release/kilnd")"
done
printf 'build: kilnd-lean %-25s %s bytes (stripped, release, no WASI)\n' aarch64-unknown-linux-gnu \
  "$(stat -c %s "$CARGO_TARGET_DIR/aarch64-unknown-linux-gnu/release/kilnd-lean")"

#!/usr/bin/env bash
# The C example modules (examples/c/*.c, written with the C SDK guest/c/kiln.h), built
# with Debian's clang-19, lld and wasi-libc (scripts/setup.sh installs them) as
# reactors into $CARGO_TARGET_DIR/examples/wasm32-wasip1/release/c/, beside the Rust
# examples: sensor-filter.c becomes c/sensor_filter.wasm. scripts/build.sh runs this;
# docs/src/c-sdk.md explains each flag. Rebuilds a module only when its source or the
# header is newer. Prints each module's size.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
out="$CARGO_TARGET_DIR/examples/wasm32-wasip1/release/c"

clang=$(command -v clang-19 || true)
if [ -z "$clang" ] || [ ! -e /usr/lib/wasm32-wasi/libc.a ]; then
  echo "c-examples.sh: clang-19 and wasi-libc are needed to build the C examples: run scripts/setup.sh" >&2
  exit 69
fi
mkdir -p "$out"
for src in examples/c/*.c; do
  wasm="$out/$(basename "$src" .c | tr - _).wasm"
  if [ ! "$wasm" -nt "$src" ] || [ ! "$wasm" -nt guest/c/kiln.h ]; then
    "$clang" --target=wasm32-wasi -mexec-model=reactor -O2 -s -Wall -Wextra -Werror \
      -I guest/c "$src" -o "$wasm.tmp"
    mv "$wasm.tmp" "$wasm"
  fi
  printf 'c-examples: %-40s %s bytes\n' "${wasm#"$CARGO_TARGET_DIR"/}" "$(stat -c %s "$wasm")"
done

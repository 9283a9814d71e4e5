#!/usr/bin/env bash
# The Zig example modules (examples/zig/*.zig, written against the kiln host ABI
# directly), built with Zig from its PyPI package (`ziglang`, installed into
# $KILN_TOOLS, default ~/.cache/kiln/tools; Debian packages no Zig; TinyGo is on neither
# PyPI nor npm) for wasm32-freestanding into
# $CARGO_TARGET_DIR/examples/wasm32-wasip1/release/zig/, beside the C and Rust
# examples. scripts/build.sh runs this; --install only installs Zig (setup.sh).
# Rebuilds a module only when its source is newer. Prints each module's size.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
tools="${KILN_TOOLS:-$HOME/.cache/kiln/tools}"
zig="$tools/python/ziglang/zig"
if [ ! -x "$zig" ]; then
  echo "zig-examples: installing Zig from PyPI (ziglang)"
  python3 -m pip install --quiet --disable-pip-version-check --target "$tools/python" 'ziglang==0.17.1'
fi
[ "${1:-}" = "--install" ] && exit 0
out="$CARGO_TARGET_DIR/examples/wasm32-wasip1/release/zig"
mkdir -p "$out"
for src in examples/zig/*.zig; do
  wasm="$out/$(basename "$src" .zig).wasm"
  if [ ! "$wasm" -nt "$src" ]; then
    # Zig keeps its cache beside the output, not in the source tree.
    "$zig" build-exe "$src" -target wasm32-freestanding -fno-entry -rdynamic -O ReleaseSmall \
      --cache-dir "$out/.cache" --global-cache-dir "$out/.cache" -femit-bin="$wasm.tmp"
    mv "$wasm.tmp" "$wasm"
  fi
  printf 'zig-examples: %-40s %s bytes\n' "${wasm#"$CARGO_TARGET_DIR"/}" "$(stat -c %s "$wasm")"
done

#!/usr/bin/env bash
# The demo: a module compiled on this x86_64 host runs on emulated aarch64 and riscv64
# devices, and a device refuses an artifact built for the other architecture.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
export CARGO_TARGET_DIR

scripts/build.sh

kiln="$CARGO_TARGET_DIR/debug/kiln"
hello="$CARGO_TARGET_DIR/examples/wasm32-wasip1/release/hello.wasm"
out=demo-out
rm -rf "$out" && mkdir -p "$out/data"
echo "temperature=21.5" > "$out/data/config.txt"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
device() { # device PROFILE ARGS... : run kilnd the way the board would, under qemu
  local qemu
  case "$1" in
    aarch64-linux) qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu); triple=aarch64-unknown-linux-gnu ;;
    riscv64-linux) qemu=(qemu-riscv64 -L /usr/riscv64-linux-gnu); triple=riscv64gc-unknown-linux-gnu ;;
  esac
  shift
  step "${qemu[@]}" "$CARGO_TARGET_DIR/$triple/release/kilnd" "$@"
}

step "$kiln" keygen -o "$out/fleet.key"
for target in aarch64-linux riscv64-linux; do
  step "$kiln" compile "$hello" --target "$target" --sign "$out/fleet.key" -o "$out/hello-$target.kiln"
  step "$kiln" compile examples/compute.wat --target "$target" --sign "$out/fleet.key" -o "$out/compute-$target.kiln"
done
step "$kiln" inspect "$out/hello-riscv64-linux.kiln" --trust "$out/fleet.pub"

for target in aarch64-linux riscv64-linux; do
  set +e
  device "$target" run "$out/hello-$target.kiln" --trust "$out/fleet.pub" \
    --dir "$out/data:/data" --env GREETING=hello -- "$target" --read /data/config.txt --exit 3
  echo "(exit code $?)"
  set -e
  device "$target" run "$out/compute-$target.kiln" --trust "$out/fleet.pub"
done

echo
echo "A riscv64 artifact on an aarch64 device is refused before any byte is loaded:"
set +e
device aarch64-linux run "$out/compute-riscv64-linux.kiln" --trust "$out/fleet.pub"
echo "(exit code $?)"
set -e
echo
echo "demo: artifacts and keys are in $out/"

#!/usr/bin/env bash
# Static kilnd for firmware images without glibc (issue 16): builds the shipped kilnd
# for x86_64-unknown-linux-musl and aarch64-unknown-linux-musl, prints their sizes,
# and proves each runs: `kilnd run` of the hello example and `kilnd serve` of the
# sensor-filter reactor (through the zygote), both compiled for the `-gnu` target
# profiles (a musl kilnd runs the same artifacts; see protocol/src/compat.rs), natively
# and under qemu-user. Not part of scripts/test.sh: each target is one more wasmer
# build (about 10 minutes cold on 2 cores).
#   scripts/musl.sh [--no-build]
# riscv64gc-unknown-linux-musl is left out: rustup has no standard library for it
# on this machine's toolchain channel.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
export CARGO_TARGET_DIR
build=1
[ "${1:-}" = --no-build ] && build=0

triples=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl)
if [ "$build" = 1 ]; then
  scripts/build.sh
  rustup target add "${triples[@]}"
  for triple in "${triples[@]}"; do
    echo "musl: kilnd for $triple"
    scripts/kilnd-build.sh "$triple"
  done
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
kiln=$CARGO_TARGET_DIR/debug/kiln
"$kiln" keygen --output "$work/musl.key" >/dev/null 2>&1
examples=$CARGO_TARGET_DIR/examples/wasm32-wasip1/release
for triple in "${triples[@]}"; do
  arch=${triple%%-*}
  profile=$arch-linux
  bin=$CARGO_TARGET_DIR/$triple/release/kilnd
  run=("$bin")
  [ "$arch" = x86_64 ] || run=("qemu-$arch" "$bin")
  for example in hello sensor_filter; do
    "$kiln" compile "$examples/$example.wasm" --target "$profile" --sign "$work/musl.key" \
      -o "$work/$example-$arch.kiln" 2>/dev/null
  done
  out=$("${run[@]}" run "$work/hello-$arch.kiln" --trust "$work/musl.pub")
  [[ "$out" == "hello, world!"* ]] || { echo "musl: $triple: kilnd run printed \`$out\`" >&2; exit 1; }
  cat >"$work/kilnd-$arch.toml" <<EOF
trust = ["$work/musl.pub"]
worker_launcher = [$([ "$arch" = x86_64 ] || echo "\"qemu-$arch\"")]
[[module]]
name = "sensor"
artifact = "$work/sensor_filter-$arch.kiln"
tick_ms = 100
EOF
  timeout 20 "${run[@]}" serve --config "$work/kilnd-$arch.toml" >"$work/serve-$arch.jsonl" 2>"$work/serve-$arch.log" &
  pid=$!
  for _ in $(seq 100); do
    [ "$(grep -c '"telemetry"' "$work/serve-$arch.jsonl" || true)" -ge 3 ] && break
    sleep 0.2
  done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  grep -q '"telemetry"' "$work/serve-$arch.jsonl" || {
    echo "musl: $triple: kilnd serve ran no module" >&2
    cat "$work/serve-$arch.log" >&2
    exit 1
  }
  start=$(grep -m1 '"started"' "$work/serve-$arch.jsonl" | grep -o '"start_ms":[0-9.]*' | cut -d: -f2)
  printf 'musl: kilnd %-28s %9s bytes (static, stripped); runs hello and serves sensor-filter (first start %s ms)\n' \
    "$triple" "$(stat -c %s "$bin")" "$start"
done

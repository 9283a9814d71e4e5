#!/usr/bin/env bash
# Builds kilnd for one device triple as it ships: `-p kiln-runtime` alone (so feature
# unification never links the host's compiler into it), release profile, and linked
# statically where glibc allows a static position-independent executable:
#   scripts/kilnd-build.sh TRIPLE [--dynamic] [CARGO ARGS...]   e.g. --no-default-features
#
# Static (glibc's static-pie) on x86_64 and aarch64: an exec of kilnd runs no dynamic
# loader (no libc and libgcc_s to map, ~200 symbols to bind, relocated pages to copy),
# the zygote's forks copy fewer mappings, and the device needs no particular glibc.
# It costs about 0.8-1 MB of glibc's code in the binary; the image is still placed at
# a random address (PIE). Host names resolve through /etc/hosts and DNS, which glibc
# builds in; other NSS modules (mdns, systemd's `resolve`) are not loaded. What it
# gains and the rest: docs/src/architecture.md (how kilnd is linked).
# --dynamic links against the device's glibc instead: the lean kilnd, for images short
# of flash that carry glibc anyway. riscv64 is always dynamic: Debian's riscv64 glibc
# has no rcrt1.o, and a static kilnd there would lose PIE.
#
# Only the final link is static: `-C target-feature=+crt-static` goes to the kilnd
# binary's crate alone (`cargo rustc ... -- FLAGS`), and the libc crate's and std's
# link attributes are resolved there. Every dependency is compiled as for a dynamic
# build, so the static and dynamic variants share one build of wasmer, and the flag
# never reaches the host's proc macros (as a `target.x86_64-...` rustflags entry in
# .cargo/config.toml would). On aarch64 the target's linker, scripts/aarch64-linux-gnu-cc,
# turns rustc's static non-PIE link into a static-pie.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: scripts/kilnd-build.sh TRIPLE [--dynamic] [CARGO ARGS...]" >&2; exit 64; }
triple="$1"
shift
static=0
case "$triple" in
  x86_64-unknown-linux-gnu | aarch64-unknown-linux-gnu) static=1 ;;
esac
if [ "${1:-}" = --dynamic ]; then
  static=0
  shift
fi
build=(--locked --quiet -p kiln-runtime --release --target "$triple" --bin kilnd "$@")
if [ "$static" = 1 ]; then
  exec cargo rustc "${build[@]}" -- -C target-feature=+crt-static
fi
exec cargo build "${build[@]}"

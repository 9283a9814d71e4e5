#!/usr/bin/env bash
# Builds kilnd for one device triple as it ships: `-p kiln-runtime` alone (so feature
# unification never links the host's compiler into it), release profile, and linked
# statically where glibc allows a static position-independent executable:
#   scripts/kilnd-build.sh TRIPLE [CARGO BUILD ARGS...]   e.g. --no-default-features
#
# Static (glibc's static-pie) on x86_64 and aarch64: an exec of kilnd runs no dynamic
# loader (no libc and libgcc_s to map, ~200 symbols to bind, relocated pages to copy),
# the zygote's forks copy fewer mappings, and the device needs no particular glibc.
# It costs about 1 MB of glibc's code in the binary; the image is still placed at a
# random address (PIE). Host names resolve through /etc/hosts and DNS, which glibc
# builds in; other NSS modules (mdns, systemd's `resolve`) are not loaded. What it
# gains and the rest: docs/src/architecture.md (how kilnd is linked).
# riscv64 stays dynamically linked: Debian's riscv64 glibc has no rcrt1.o, and a
# static kilnd there would lose PIE.
#
# Passed per invocation rather than in .cargo/config.toml: a `target.x86_64-...`
# rustflags entry there would also apply to every host build without --target
# (proc macros cannot be built static). The flags are part of cargo's fingerprint:
# build every variant of a triple through this script, or each switch rebuilds wasmer.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: scripts/kilnd-build.sh TRIPLE [CARGO BUILD ARGS...]" >&2; exit 64; }
triple="$1"
shift
case "$triple" in
  # rustc links x86_64 as a static-pie itself; for aarch64 it asks for a static non-PIE
  # executable, which the target's linker (scripts/aarch64-linux-gnu-cc) turns into
  # a static-pie.
  x86_64-unknown-linux-gnu | aarch64-unknown-linux-gnu) flags="-C target-feature=+crt-static" ;;
  *) flags="" ;;
esac
RUSTFLAGS="$flags" exec cargo build --locked --quiet -p kiln-runtime --release --target "$triple" "$@"

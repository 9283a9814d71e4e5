#!/usr/bin/env bash
# Installs what Kiln needs on Debian/Ubuntu, and only what is missing (idempotent):
# cross gcc for aarch64 and riscv64, qemu-user, mosquitto, openssl (the TLS tests make
# a throwaway PKI with it), and the rustup targets. The package tests also use dpkg,
# systemd-analyze (systemd), man (man-db, for the unit's man: links), strace (the
# unit's syscall filter against what kilnd really calls) and shellcheck. The fleet
# tests run against a second broker too: aedes (Node.js), from the npm registry at the
# versions e2e/aedes/package-lock.json pins. The dashboard test drives Debian's
# Chromium with chromedriver. The book (docs/) is built with mdBook, from crates.io.
# The WASI testsuite's C tests and the C SDK's examples (examples/c) are built with
# Debian's clang-19, lld-19 and wasi-libc.
# The cluster tests run Debian's nats-server; the mirror tests Debian's nginx.
# The boards (scripts/board.sh) need qemu-system-arm and -misc, qemu-user-static, qemu-utils,
# mmdebstrap, dosfstools, mtools and ssh.
#
# scripts/setup.sh --demo installs only what the demo needs (cross gcc, qemu-user,
# mosquitto, openssl, the rustup targets): none of the test suite's tools.
set -euo pipefail

demo=0
[ "${1:-}" = "--demo" ] && demo=1
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

packages=()
have aarch64-linux-gnu-gcc || packages+=(gcc-aarch64-linux-gnu)
# The static-pie kilnd (scripts/kilnd-build.sh) links glibc's libc.a and rcrt1.o, which
# only the -dev packages carry.
[ -e /usr/aarch64-linux-gnu/lib/rcrt1.o ] || packages+=(libc6-dev-arm64-cross)
[ -e /usr/lib/x86_64-linux-gnu/rcrt1.o ] || packages+=(libc6-dev)
have riscv64-linux-gnu-gcc || packages+=(gcc-riscv64-linux-gnu)
[ -e /usr/riscv64-linux-gnu/lib/libc.so.6 ] || packages+=(libc6-dev-riscv64-cross)
{ have qemu-aarch64 && have qemu-riscv64 && have qemu-x86_64; } || packages+=(qemu-user)
have mosquitto || packages+=(mosquitto)
have openssl || packages+=(openssl)
if [ "$demo" = 0 ]; then
have systemd-analyze || packages+=(systemd)
have man || packages+=(man-db)
have strace || packages+=(strace)
have shellcheck || packages+=(shellcheck)
have dpkg-deb || packages+=(dpkg)
{ have node && have npm; } || packages+=(nodejs npm)
# The WASI testsuite's C tests and the C examples: Debian's clang, lld, wasi-libc and
# its wasm32 runtime.
{ have clang-19 && have wasm-ld-19 && [ -e /usr/lib/wasm32-wasi/libc.a ] \
  && [ -e /usr/lib/llvm-19/lib/clang/19/lib/wasi/libclang_rt.builtins-wasm32.a ]; } \
  || packages+=(clang-19 lld-19 wasi-libc libclang-rt-19-dev-wasm32)
# The boards (scripts/board.sh): full-system qemu for aarch64 and riscv64 (with
# OpenSBI), mmdebstrap and qemu-user-static to build their Debian images (mmdebstrap
# needs arch-test, only a recommendation of its package, to build a foreign
# architecture's), the FAT tools for the boot partition, and ssh to reach them.
{ have qemu-system-aarch64 && have qemu-system-riscv64 && have qemu-aarch64-static \
  && have qemu-riscv64-static && have mmdebstrap && have arch-test && have mkfs.vfat \
  && have mcopy && have ssh && have mkfs.ext4; } \
  || packages+=(qemu-system-arm qemu-system-misc qemu-user-static mmdebstrap arch-test dosfstools mtools openssh-client e2fsprogs)
# The dashboard's browser test: headless Chromium driven over WebDriver.
{ have chromium && have chromedriver; } || packages+=(chromium chromium-driver)
# Beyond one broker: a 3-node nats-server cluster (its MQTT side) and nginx serving
# artifact chunks over HTTPS as a mirror.
have nats-server || packages+=(nats-server)
have nginx || packages+=(nginx-light)
# Zig for its example module (scripts/zig-examples.sh installs Zig itself from PyPI,
# the package registry that carries it; Debian does not).
python3 -m pip --version >/dev/null 2>&1 || packages+=(python3-pip)
fi

if [ ${#packages[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${packages[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

# Debian 12's qemu-system-arm removes a newer qemu-utils from backports, and qemu-img
# with it; the board needs qemu-img, so it comes back at Debian 12's version.
if [ "$demo" = 0 ] && ! have qemu-img; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing qemu-utils"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends qemu-utils >/dev/null
fi

installed=$(rustup target list --installed)
for target in aarch64-unknown-linux-gnu riscv64gc-unknown-linux-gnu wasm32-wasip1; do
  grep -qx "$target" <<<"$installed" || rustup target add "$target"
done

[ "$demo" = 1 ] && exit 0

aedes="$(dirname "$0")/../e2e/aedes"
if [ ! -f "$aedes/node_modules/aedes/package.json" ]; then
  echo "setup: installing aedes (npm ci in e2e/aedes)"
  (cd "$aedes" && npm ci --no-audit --no-fund --silent)
fi

# The book (docs/, `mdbook build docs`): mdBook from crates.io at a pinned version,
# since Debian 12 does not package it. Without its `serve` and `watch` features it
# builds in about 4 minutes on 2 cores.
mdbook_version=0.5.4
if [ "$(mdbook --version 2>/dev/null)" != "mdbook v$mdbook_version" ]; then
  echo "setup: installing mdbook $mdbook_version (cargo install)"
  cargo install --locked --quiet mdbook --version "$mdbook_version" \
    --no-default-features --features search
fi
# Zig, from its PyPI package (Debian has none; TinyGo is in neither).
[ "$demo" = 1 ] || "$(dirname "$0")/zig-examples.sh" --install

#!/usr/bin/env bash
# The kernel's GPIO and I2C simulators for the arm64 board image, built against the
# exact kernel the image runs. Debian's kernels do not build them (CONFIG_GPIO_SIM and
# CONFIG_I2C_STUB are unset in 6.1 and 6.12), so this builds gpio-sim and i2c-stub as
# out-of-tree modules: the image kernel's headers and kbuild from the Debian archive,
# the drivers' sources from Debian's linux-source package of the same version,
# cross-compiled with Debian's gcc-12 for aarch64 (the compiler the kernel was built
# with). gpio-sim needs the kernel's interrupt simulator (kernel/irq/irq_sim.c, which
# Debian's kernel leaves out too): it is linked into the module, calling
# generic_handle_irq() where the in-tree code calls a function the kernel does not
# export to modules.
#
#   scripts/board-modules.sh IMAGE_DIR
#
# IMAGE_DIR is a board image scripts/board.sh built (its packages.txt names the
# kernel). Prints the directory holding gpio-sim.ko and i2c-stub.ko, cached under
# IMAGE_DIR/modules/. Exit codes: 2 usage; 3 not an arm64 Debian 12 image; 4 a download
# or the build failed; 5 a tool is missing.
set -euo pipefail
[ $# -eq 1 ] || { sed -n 13p "$0" | sed 's/^# *//' >&2; exit 2; }
image=$1
die() { code="$1"; shift; echo "board-modules: error: $*" >&2; exit "$code"; }
log() { echo "board-modules: $*" >&2; }
out="$image/modules"
if [ -e "$out/gpio-sim.ko" ] && [ -e "$out/i2c-stub.ko" ]; then
  echo "$out"
  exit 0
fi
for tool in curl xz dpkg-deb make aarch64-linux-gnu-gcc-12; do
  command -v "$tool" >/dev/null || die 5 "$tool is missing (scripts/setup.sh installs it)"
done
# The kernel package: linux-image-6.1.0-50-arm64 6.1.176-1.
read -r kpkg kver < <(grep -E '^linux-image-[0-9.]+-[0-9]+-arm64 ' "$image/packages.txt" || true) ||
  die 3 "$image/packages.txt names no linux-image-*-arm64"
abi=${kpkg#linux-image-}
abi=${abi%-arm64}
series=${abi%%-*}
series=${series%.0}
mirror=http://deb.debian.org/debian
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log "kernel $abi-arm64 $kver: fetching its headers, kbuild and source"
# Where each package of that version is in the archive.
for arch in arm64 all amd64; do
  curl -fsS "$mirror/dists/bookworm/main/binary-$arch/Packages.xz" | xz -dc >>"$work/Packages" ||
    die 4 "cannot fetch the bookworm $arch package index"
done
fetch() {
  local file
  file=$(awk -v p="$1" -v v="$kver" -v a="$2" '
    $0 == "Package: " p { f = 1; ok = 0 }
    f && /^Version:/ { ok = ($2 == v) }
    f && /^Architecture:/ { ok = ok && ($2 == a) }
    f && /^Filename:/ { if (ok) { print $2; exit } f = 0 }' "$work/Packages")
  [ -n "$file" ] || die 4 "$1 $kver ($2) is not in the bookworm archive"
  curl -fsS -o "$work/pkg.deb" "$mirror/$file" || die 4 "cannot fetch $file"
  dpkg-deb -x "$work/pkg.deb" "$work/root"
  rm "$work/pkg.deb"
}
fetch "linux-headers-$abi-arm64" arm64
fetch "linux-headers-$abi-common" all
fetch "linux-kbuild-$series" amd64
fetch "linux-source-$series" all
headers="$work/root/usr/src/linux-headers-$abi-arm64"
# The headers include their common half by its installed path.
sed -i "s|include /usr/src/|include $work/root/usr/src/|" "$headers/Makefile"
src="linux-source-$series"
tar -xJf "$work/root/usr/src/$src.tar.xz" -C "$work" \
  "$src/drivers/gpio/gpio-sim.c" "$src/drivers/gpio/gpiolib.h" \
  "$src/drivers/i2c/i2c-stub.c" "$src/kernel/irq/irq_sim.c" ||
  die 4 "the drivers are not in $src.tar.xz"
mkdir -p "$work/build"
cp "$work/$src/drivers/gpio/gpio-sim.c" "$work/build/gpio-sim-core.c"
cp "$work/$src/drivers/gpio/gpiolib.h" "$work/$src/drivers/i2c/i2c-stub.c" \
  "$work/$src/kernel/irq/irq_sim.c" "$work/build/"
grep -q 'handle_simple_irq(irq_to_desc(irqnum));' "$work/build/irq_sim.c" ||
  die 4 "irq_sim.c of $kver is not the one this script adapts"
sed -i 's/handle_simple_irq(irq_to_desc(irqnum));/generic_handle_irq(irqnum);/' "$work/build/irq_sim.c"
printf 'obj-m := gpio-sim.o i2c-stub.o\ngpio-sim-y := gpio-sim-core.o irq_sim.o\n' >"$work/build/Kbuild"
log "building gpio-sim.ko and i2c-stub.ko"
make -s -C "$headers" M="$work/build" ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- modules \
  >"$work/make.log" 2>&1 || { tail -20 "$work/make.log" >&2; die 4 "the module build failed"; }
mkdir -p "$out.tmp"
cp "$work/build/gpio-sim.ko" "$work/build/i2c-stub.ko" "$out.tmp/"
rm -rf "$out"
mv "$out.tmp" "$out"
log "built for $abi-arm64 in $out"
echo "$out"

#!/usr/bin/env bash
# A board in the loop: a Debian image with systemd, booted under full-system emulation
# (qemu-system-aarch64 or qemu-system-riscv64, -M virt), with the kilnd .deb installed
# and the device provisioned from its boot partition, and scenarios run against it
# from the host with `kiln` (e2e/tests/board.rs).
#
#   scripts/board.sh [--arch A] [--short] [--test NAME] [--cuts N] [--seed S] [--image-only] [--no-build]
#
#   --arch A      arm64 (default: Debian 12) or riscv64 (Debian 13, booted by OpenSBI)
#   --short       one boot, one update, one power cut (what .ci/run runs)
#   --test NAME   only the scenarios whose name contains NAME (e.g. gpio)
#   --cuts N      power cuts in the power-cut scenario (default 100, riscv64 10; --short: 1)
#   --seed S      the seed that places the cuts (default 20261206)
#   --image-only  build (or find) the cached image and stop
#   --no-build    do not run scripts/build.sh and scripts/package.sh first
#
# The image is built once and cached under ~/.cache/kiln/board/ (XDG_CACHE_HOME), keyed
# by a hash of the recipe below: Debian from the Debian archive with mmdebstrap (its
# maintainer scripts run under qemu-user through binfmt_misc, which this script
# registers when it is not), Debian's own kernel and initramfs, an ext4 root file
# system made with mkfs.ext4 -d, and an ssh key for the host. Each scenario boots a
# copy-on-write overlay of it, so the cached image is never changed.
#
# Exit codes: 2 bad command line; 3 the image cannot be built; 5 a tool is missing;
# otherwise cargo test's.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
export CARGO_TARGET_DIR

arch=arm64
short=0
cuts=""
seed=20261206
image_only=0
build=1
only=""
usage() { sed -n '7,15p' "$0" | sed 's/^# *//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) [ $# -ge 2 ] || usage; arch="$2"; shift 2 ;;
    --short) short=1; shift ;;
    --test) [ $# -ge 2 ] || usage; only="$2"; shift 2 ;;
    --cuts) [ $# -ge 2 ] || usage; cuts="$2"; shift 2 ;;
    --seed) [ $# -ge 2 ] || usage; seed="$2"; shift 2 ;;
    --image-only) image_only=1; shift ;;
    --no-build) build=0; shift ;;
    -h | --help) usage ;;
    *) echo "board: unknown argument \`$1\`" >&2; usage ;;
  esac
done
case "$arch" in
  arm64) qarch=aarch64 suite=bookworm default_cuts=100 ;;
  riscv64) qarch=riscv64 suite=trixie default_cuts=10 ;;
  *) echo "board: --arch takes arm64 or riscv64, not \`$arch\`" >&2; exit 2 ;;
esac
[ -n "$cuts" ] || { [ "$short" = 1 ] && cuts=1 || cuts=$default_cuts; }
case "$cuts$seed" in *[!0-9]*) echo "board: --cuts and --seed take numbers" >&2; exit 2 ;; esac

die() { code="$1"; shift; echo "board: error: $*" >&2; exit "$code"; }
log() { echo "board: $*" >&2; }

# --- tools ------------------------------------------------------------------------
# The board's tools (qemu-system-arm and -misc, qemu-user-static, qemu-utils, mmdebstrap,
# the FAT tools, ssh) are scripts/setup.sh's to install, like every other tool of the suite.
for tool in "qemu-system-$qarch" "qemu-$qarch-static" qemu-img mmdebstrap mkfs.vfat mcopy ssh mkfs.ext4; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || { scripts/setup.sh; break; }
done

# --- the image --------------------------------------------------------------------
# Everything that decides the image's bytes is in this function, and its text keys the
# cache: an edit here builds a new image.
mirror=http://deb.debian.org/debian
# (`login` is essential in Debian 12 but not in 13: without it the serial console's
# getty has no /bin/login to run.)
packages=systemd-sysv,udev,kmod,linux-image-$arch,openssh-server,iproute2,procps,dosfstools,login
build_image() {
  local out="$1" root="$1/root"
  ssh-keygen -q -t ed25519 -N "" -C "kiln-board" -f "$out/id_ed25519"
  # The guest's customisation: its network (DHCP on qemu's user network, where the
  # host is 10.0.2.2), the boot partition (FAT, as on a Raspberry Pi: kilnd's
  # provisioning bundle goes there), ssh for the host's key, no timers that would
  # wake up during a measurement.
  cat >"$out/customize.sh" <<'EOF'
set -eu
root="$1"; key="$2"
echo board >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 board\n' >"$root/etc/hosts"
printf '/dev/vda / ext4 errors=remount-ro 0 1\nLABEL=KILNBOOT /boot/firmware vfat defaults,nofail,umask=0077 0 0\n' >"$root/etc/fstab"
mkdir -p "$root/boot/firmware" "$root/root/.ssh" "$root/etc/systemd/network" "$root/var/log/journal"
printf '[Match]\nName=en* eth*\n[Network]\nDHCP=ipv4\n' >"$root/etc/systemd/network/10-wired.network"
install -m 0600 "$key" "$root/root/.ssh/authorized_keys"
chroot "$root" systemctl enable systemd-networkd.service >/dev/null 2>&1
chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
  fstrim.timer systemd-networkd-wait-online.service getty-static.service >/dev/null 2>&1
chroot "$root" passwd -d root >/dev/null
EOF
  # The initramfs holds only what the virt board needs to mount its root (MODULES=list):
  # Debian's default (most modules) takes many minutes under qemu-user and boots slower.
  cat >"$out/initramfs.sh" <<'EOF'
set -eu
mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"
printf 'MODULES=list\nCOMPRESS=gzip\n' >"$1/etc/initramfs-tools/conf.d/kiln-board"
printf 'virtio_pci\nvirtio_mmio\nvirtio_blk\next4\n' >"$1/usr/share/initramfs-tools/modules.d/kiln-board"
EOF
  mmdebstrap --quiet --architectures="$arch" --variant=apt --mode=root \
    --include="$packages" \
    --essential-hook="sh $out/initramfs.sh \"\$1\"" \
    --customize-hook="sh $out/customize.sh \"\$1\" $out/id_ed25519.pub" \
    "$suite" "$root" "$mirror" >"$out/mmdebstrap.log" 2>&1 ||
    { tail -20 "$out/mmdebstrap.log" >&2; return 1; }
  # (Called in an `||` list, so `set -e` is off in here: every step checks itself.)
  local kernel
  # (arm64's kernel is vmlinuz-VERSION, riscv64's vmlinux-VERSION.)
  kernel=$(cd "$root/boot" && ls vmlinu[xz]-*) || return 1
  cp "$root/boot/$kernel" "$out/vmlinuz" || return 1
  cp "$root/boot/initrd.img-${kernel#vmlinu?-}" "$out/initrd.img" || return 1
  echo "$arch" >"$out/arch" || return 1
  # shellcheck disable=SC2016 # dpkg-query's format, not the shell's
  chroot "$root" dpkg-query -W -f '${Package} ${Version}\n' >"$out/packages.txt" || return 1
  mkfs.ext4 -q -L kilnroot -d "$root" "$out/rootfs.img" 2G || return 1
  rm -rf "$root"
}

cache="${XDG_CACHE_HOME:-$HOME/.cache}/kiln/board"
recipe=$(printf '%s\n%s\n%s\n%s\n%s\n' "$arch" "$suite" "$mirror" "$packages" "$(declare -f build_image)" |
  sha256sum | cut -c1-12)
image="$cache/$arch-$recipe"
if [ ! -f "$image/rootfs.img" ]; then
  [ "$(id -u)" -eq 0 ] || die 3 "building the board image needs root (mmdebstrap --mode=root, binfmt_misc)"
  # Foreign maintainer scripts run under qemu-user: register it for the board's binaries
  # (F: the interpreter is opened now, so it works inside the chroot).
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc ||
      die 3 "cannot mount binfmt_misc, which mmdebstrap needs to configure an $arch root"
  fi
  if [ ! -e "/proc/sys/fs/binfmt_misc/qemu-$qarch" ]; then
    sed "s|:/usr/libexec/qemu-binfmt/$qarch-binfmt-P:.*\$|:/usr/bin/qemu-$qarch-static:F|" \
      "/usr/lib/binfmt.d/qemu-$qarch.conf" >/proc/sys/fs/binfmt_misc/register ||
      die 3 "cannot register qemu-$qarch-static with binfmt_misc"
  fi
  log "building the $arch image in $image (once; about 5 minutes on 2 cores)"
  started=$(date +%s)
  rm -rf "$image.tmp"
  mkdir -p "$image.tmp"
  build_image "$image.tmp" || die 3 "the image build failed (mmdebstrap log: $image.tmp/mmdebstrap.log)"
  echo "built $(date -u +%FT%TZ) in $(($(date +%s) - started)) s" >"$image.tmp/built.txt"
  rm -rf "$image"
  mv "$image.tmp" "$image"
  # Older images of other recipes are not needed any more.
  find "$cache" -mindepth 1 -maxdepth 1 -name "$arch-*" ! -path "$image" -exec rm -rf {} +
fi
log "image: $image ($(cat "$image/built.txt"))"
[ "$image_only" = 1 ] && exit 0

# --- what runs on it --------------------------------------------------------------
if [ "$build" = 1 ]; then
  scripts/build.sh
  scripts/package.sh --targets "$arch" >/dev/null
fi
deb=$(find "$CARGO_TARGET_DIR/packages" -maxdepth 1 -name "kilnd_*_$arch.deb" 2>/dev/null | sort | tail -1)
[ -n "$deb" ] || die 5 "no $arch .deb in $CARGO_TARGET_DIR/packages: run scripts/build.sh && scripts/package.sh"

export KILN_BOARD_IMAGE="$image" KILN_BOARD_DEB="$deb" KILN_BOARD_CUTS="$cuts" KILN_BOARD_SEED="$seed"
# gpio-sim and i2c-stub for the hardware scenario (arm64): Debian's kernel lacks them.
if [ "$arch" = arm64 ] && [ "$short" = 0 ]; then
  KILN_BOARD_MODULES=$(scripts/board-modules.sh "$image") || die 3 "the kernel's GPIO and I2C simulators could not be built"
  export KILN_BOARD_MODULES
fi
# The full run skips the short test: each of its steps is part of a longer scenario.
args=("board::$only" -- --ignored --test-threads=1 --nocapture --skip board::short)
[ "$short" = 1 ] && args=(board::short -- --ignored --nocapture)
exec cargo test --locked -p kiln-e2e --test e2e "${args[@]}"

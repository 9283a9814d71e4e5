#!/usr/bin/env bash
# Builds the .deb packages of kilnd, one per Debian architecture:
#
#   scripts/build.sh && scripts/package.sh [--targets amd64,arm64,riscv64] [--out DIR]
#                                          [--docs DIR]
#
# It packs the shipped kilnd that scripts/build.sh built for each triple (it builds
# nothing itself), the systemd units (kilnd.service, and kilnd-provision.service, which
# installs a provisioning bundle from the boot partition at first boot), sysusers.d and tmpfiles.d entries and the
# commented /etc/kiln/kilnd.toml from dist/, the man pages and shell completions that
# `cargo run -p kiln-dist -- docs` generates from the clap definitions (or that
# --docs DIR already holds: DIR/man/*.1, DIR/completions/*), and the maintainer
# scripts from dist/debian/. Output: DIR/kilnd_VERSION_ARCH.deb, by default in
# $CARGO_TARGET_DIR/packages/.
#
# Why dpkg-deb and not cargo-deb: kilnd must be built alone, per triple, by
# scripts/build.sh (`-p kiln-runtime`, so no host feature is unified into it), and
# cargo-deb wants to run that build itself. dpkg-deb is Debian's own packer; it packs
# exactly the binary that was built and tested, plus the files listed here.
#
# The packages are reproducible: the same inputs give the same bytes. Every file's
# mtime is SOURCE_DATE_EPOCH (default: the last commit's time), owners are root:root
# (--root-owner-group), modes are set explicitly, man pages are gzipped with -n, and
# dpkg-deb sorts the members and takes its timestamps from SOURCE_DATE_EPOCH.
#
# Exit codes: 2 bad command line; 3 a kilnd binary is missing (run scripts/build.sh);
# 4 the man pages and completions cannot be generated; 5 a tool or input is missing.
set -euo pipefail
umask 022
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
export CARGO_TARGET_DIR

targets="amd64,arm64,riscv64"
out="$CARGO_TARGET_DIR/packages"
docs=""
usage() { sed -n '4,5p' "$0" | sed 's/^# *//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --targets) [ $# -ge 2 ] || usage; targets="$2"; shift 2 ;;
    --out) [ $# -ge 2 ] || usage; out="$2"; shift 2 ;;
    --docs) [ $# -ge 2 ] || usage; docs="$2"; shift 2 ;;
    -h | --help) usage ;;
    *) echo "package: unknown argument \`$1\`" >&2; usage ;;
  esac
done

die() { code="$1"; shift; echo "package: error: $*" >&2; exit "$code"; }

for tool in dpkg-deb objdump gzip; do
  command -v "$tool" >/dev/null || die 5 "\`$tool\` is not installed (scripts/setup.sh installs it)"
done

triple_of() {
  case "$1" in
    amd64) echo x86_64-unknown-linux-gnu ;;
    arm64) echo aarch64-unknown-linux-gnu ;;
    riscv64) echo riscv64gc-unknown-linux-gnu ;;
    *) die 2 "unknown architecture \`$1\` (amd64, arm64, riscv64)" ;;
  esac
}

IFS=, read -r -a arches <<<"$targets"
[ "${#arches[@]}" -gt 0 ] || usage
# Every binary first: a missing one is named before anything is written.
for arch in "${arches[@]}"; do
  bin="$CARGO_TARGET_DIR/$(triple_of "$arch")/release/kilnd"
  [ -x "$bin" ] || die 3 "$bin is missing: build kilnd with scripts/build.sh first (this script packs what it built)"
done

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || die 5 "no version in [workspace.package] of Cargo.toml"
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null) ||
    die 5 "not a git checkout: set SOURCE_DATE_EPOCH"
fi
export SOURCE_DATE_EPOCH

work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-package.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Man pages and completions: architecture independent, generated once.
if [ -z "$docs" ]; then
  if [ ! -f dist/Cargo.toml ]; then
    die 4 "dist/Cargo.toml is missing: the generator of man pages and completions (crate kiln-dist) is not in this tree"
  fi
  docs="$work/docs"
  cargo run --locked --quiet -p kiln-dist -- docs --out "$docs" ||
    die 4 "\`cargo run -p kiln-dist -- docs --out $docs\` failed"
fi
for f in man/kilnd.1 completions/kilnd.bash completions/_kilnd completions/kilnd.fish; do
  [ -f "$docs/$f" ] || die 4 "$docs/$f is missing: the docs generator did not write it"
done

mkdir -p "$out"
for arch in "${arches[@]}"; do
  triple=$(triple_of "$arch")
  bin="$CARGO_TARGET_DIR/$triple/release/kilnd"
  root="$work/$arch"
  deb="$out/kilnd_${version}_${arch}.deb"

  install -D -m 0755 "$bin" "$root/usr/bin/kilnd"
  install -D -m 0644 dist/systemd/kilnd.service "$root/usr/lib/systemd/system/kilnd.service"
  install -D -m 0644 dist/systemd/kilnd-provision.service \
    "$root/usr/lib/systemd/system/kilnd-provision.service"
  install -D -m 0644 dist/systemd/kilnd.sysusers "$root/usr/lib/sysusers.d/kilnd.conf"
  install -D -m 0644 dist/systemd/kilnd.tmpfiles "$root/usr/lib/tmpfiles.d/kilnd.conf"
  install -D -m 0644 dist/kilnd.toml "$root/etc/kiln/kilnd.toml"
  install -d -m 0755 "$root/etc/kiln/trust"
  install -d -m 0755 "$root/usr/share/man/man1"
  for page in "$docs"/man/kilnd*.1; do
    gzip -9 -n -c "$page" >"$root/usr/share/man/man1/$(basename "$page").gz"
  done
  install -D -m 0644 "$docs/completions/kilnd.bash" "$root/usr/share/bash-completion/completions/kilnd"
  install -D -m 0644 "$docs/completions/_kilnd" "$root/usr/share/zsh/vendor-completions/_kilnd"
  install -D -m 0644 "$docs/completions/kilnd.fish" "$root/usr/share/fish/vendor_completions.d/kilnd.fish"
  # The crates linked into kilnd, with their licenses (proc macros run only at build
  # time; path crates lose their checkout path so the file is reproducible).
  { echo " ."
    cargo tree --locked --offline --quiet -p kiln-runtime --target "$triple" -e normal \
      --prefix none --format '{p}|{l}' | grep -v '(proc-macro)' |
      sed -e 's/ (\*)$//' -e 's/ (\/[^)]*)//' | LC_ALL=C sort -u |
      awk -F'|' '{ sub(/ v/, " ", $1); printf " %s: %s\n", $1, ($2 == "" ? "see its license file" : $2) }'
  } >"$work/bundled-$arch" || die 5 "cargo tree cannot list the crates linked into kilnd for $triple"
  install -d -m 0755 "$root/usr/share/doc/kilnd"
  sed -e "s/@TRIPLE@/$triple/" -e "/^@BUNDLED@\$/{r $work/bundled-$arch" -e 'd;}' \
    dist/debian/copyright.in >"$root/usr/share/doc/kilnd/copyright"
  chmod 0644 "$root/usr/share/doc/kilnd/copyright"
  printf 'kilnd (%s) unstable; urgency=medium\n\n  * Release %s.\n\n -- Kiln developers <kiln@example.invalid>  %s\n' \
    "$version" "$version" "$(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")" |
    gzip -9 -n >"$root/usr/share/doc/kilnd/changelog.gz"
  chmod 0644 "$root"/usr/share/man/man1/*.gz "$root/usr/share/doc/kilnd/changelog.gz"

  # Depends: for a dynamically linked kilnd (riscv64), the newest glibc and libgcc_s
  # symbol versions it uses, read from its dynamic symbol table (GLIBC_2.34 -> libc6
  # (>= 2.34)). A static kilnd (x86_64, aarch64: scripts/kilnd-build.sh) has no
  # program interpreter and needs no library, so its package depends on none.
  depends=""
  if readelf -lW "$bin" | grep -q 'Requesting program interpreter'; then
    symbols=$(objdump -T "$bin")
    glibc=$(grep -o 'GLIBC_[0-9][0-9.]*' <<<"$symbols" | sed 's/GLIBC_//' | sort -Vu | tail -n1)
    gcc=$(grep -o 'GCC_[0-9][0-9.]*' <<<"$symbols" | sed 's/GCC_//' | sort -Vu | tail -n1 |
      cut -d. -f1-2)
    [ -n "$glibc" ] || die 5 "$bin has no GLIBC symbol versions: not a glibc build?"
    depends="libc6 (>= $glibc)${gcc:+, libgcc-s1 (>= $gcc)}"
  fi

  install -d -m 0755 "$root/DEBIAN"
  # Installed-Size as dpkg-gencontrol counts it: KiB per file, rounded up, plus one
  # per directory.
  installed=$(cd "$root" && find . -path ./DEBIAN -prune -o \( -type f -printf '%s\n' \) \
    -o \( -type d -printf '1024\n' \) |
    awk '{ kib += int(($1 + 1023) / 1024) } END { print kib }')
  if [ -n "$depends" ]; then drop_depends=(); else drop_depends=(-e '/^Depends: @DEPENDS@$/d'); fi
  sed "${drop_depends[@]}" -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" \
    -e "s/@DEPENDS@/$depends/" -e "s/@INSTALLED_SIZE@/$installed/" dist/debian/control.in \
    >"$root/DEBIAN/control"
  install -m 0644 dist/debian/conffiles "$root/DEBIAN/conffiles"
  for script in postinst prerm postrm; do
    install -m 0755 "dist/debian/$script" "$root/DEBIAN/$script"
  done
  (cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
    xargs -0 md5sum) >"$root/DEBIAN/md5sums"
  chmod 0644 "$root/DEBIAN/md5sums"

  find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  dpkg-deb --build --root-owner-group -Zxz "$root" "$deb.tmp" >/dev/null
  mv "$deb.tmp" "$deb"
  printf 'package: %-40s %9s bytes, installed %s KiB, Depends: %s\n' \
    "$deb" "$(stat -c %s "$deb")" "$installed" "${depends:-(none: static)}"
done

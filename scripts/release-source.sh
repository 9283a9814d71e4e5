#!/usr/bin/env bash
# Makes the release source that a Yocto or Buildroot build fetches, and the release
# copies of their recipes with its version and checksums filled in:
#
#   scripts/release-source.sh [--out DIR] [--site URL] [--no-vendor]
#
# This is the one way a release gets its recipes: the files in dist/yocto and
# dist/buildroot are templates (a recipe cannot hold the checksum of a tarball that
# contains it). Output, by default in $CARGO_TARGET_DIR/release-source/:
#
#   kiln-VERSION.tar.gz           `git archive` of HEAD under kiln-VERSION/ (VERSION from
#                                 [workspace.package] of Cargo.toml); what Yocto fetches
#   kiln-VERSION-vendored.tar.gz  the same tree with every crate of Cargo.lock in VENDOR/
#                                 (`cargo vendor`, which replaces .cargo/config.toml as
#                                 Buildroot's own vendoring does); what Buildroot fetches.
#                                 Buildroot checks the hash of the archive after its
#                                 vendoring step, which it skips for an archive that has
#                                 VENDOR/: so this hash is known here, and no Buildroot
#                                 version or cargo version changes it
#   SHA256SUMS                    of both archives
#   meta-kiln/                    the layer, its recipe named kilnd_VERSION.bb with SRC_URI
#                                 and SRC_URI[sha256sum] filled in, and kilnd-crates.inc:
#                                 every crate of Cargo.lock as crate://crates.io/NAME/VERSION
#                                 with Cargo.lock's checksum (written here, so nobody runs
#                                 `bitbake -c update_crates`)
#   buildroot/                    a BR2_EXTERNAL tree (name KILN) whose package/kilnd has
#                                 KILND_VERSION and KILND_SITE filled in and kilnd.hash
#                                 (the vendored archive and LICENSE)
#
# --site URL is where the archives will be published (default: the workspace's
# `repository` + /releases/download/vVERSION). --no-vendor skips the vendored archive
# and the Buildroot package: no network, seconds (dist/tests/release_source.rs).
#
# Every crate of Cargo.lock is listed, not only those kilnd links: cargo resolves the
# whole workspace's lock file against the vendored crates, also for `-p kiln-runtime`,
# and stops at the first one missing.
#
# Reproducible: archive members are sorted, their mtime is the commit's (git archive of
# a commit; SOURCE_DATE_EPOCH for the vendored one), owners are root, gzip runs with -n.
# Only what HEAD holds goes in: uncommitted changes are left out (with a note).
#
# Exit codes: 2 bad command line; 3 not a git checkout with a commit; 4 vendoring the
# crates failed (cargo vendor needs static.crates.io or a full local cache); 5 a tool
# or input is missing; 6 a recipe template lacks a placeholder this script fills, or
# Cargo.lock has a crate that is not from crates.io.
set -euo pipefail
umask 022
caller="$PWD"
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"

out="$CARGO_TARGET_DIR/release-source"
site=""
vendor=1
usage() { sed -n '5p' "$0" | sed 's/^# *//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || usage; out="$2"; shift 2 ;;
    --site) [ $# -ge 2 ] || usage; site="${2%/}"; shift 2 ;;
    --no-vendor) vendor=0; shift ;;
    -h | --help) usage ;;
    *) echo "release-source: unknown argument \`$1\`" >&2; usage ;;
  esac
done

die() { code="$1"; shift; echo "release-source: error: $*" >&2; exit "$code"; }
case "$out" in /*) ;; *) out="$caller/$out" ;; esac # relative to where it was run

for tool in git gzip tar sha256sum awk; do
  command -v "$tool" >/dev/null || die 5 "\`$tool\` is not installed"
done
[ "$vendor" = 0 ] || command -v cargo >/dev/null || die 5 "\`cargo\` is not installed (it vendors the crates)"
commit=$(git rev-parse --verify -q HEAD 2>/dev/null) || die 3 "not a git checkout with a commit (the source is \`git archive\` of HEAD)"

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || die 5 "no version in [workspace.package] of Cargo.toml"
if [ -z "$site" ]; then
  repository=$(sed -n '/^\[workspace.package\]/,/^\[/s/^repository *= *"\(.*\)"/\1/p' Cargo.toml)
  [ -n "$repository" ] || die 5 "no repository in [workspace.package] of Cargo.toml: give --site URL"
  site="${repository%/}/releases/download/v$version"
fi
: "${SOURCE_DATE_EPOCH:=$(git log -1 --format=%ct "$commit")}"
export SOURCE_DATE_EPOCH
[ -z "$(git status --porcelain --untracked-files=no)" ] ||
  echo "release-source: note: uncommitted changes are not in the archive (it is HEAD, $commit)" >&2

layer=dist/yocto/meta-kiln
package=dist/buildroot/package/kilnd
recipe="$layer/recipes-kiln/kilnd/kilnd_0.1.0.bb"
for f in Cargo.lock LICENSE "$recipe" "$layer/conf/layer.conf" "$package/kilnd.mk" "$package/Config.in"; do
  git cat-file -e "$commit:$f" 2>/dev/null || die 5 "$f is not in HEAD"
done

work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-release-source.XXXXXX")
trap 'rm -rf "$work"' EXIT
name="kiln-$version"
mkdir -p "$out"

# The plain archive: git archive of the commit sorts its members and stamps them with
# the commit's time; gzip -n leaves out the name and time gzip would add.
git archive --format=tar --prefix="$name/" "$commit" | gzip -9 -n >"$work/$name.tar.gz"
sha=$(sha256sum "$work/$name.tar.gz" | cut -d' ' -f1)
mv "$work/$name.tar.gz" "$out/$name.tar.gz"
sums="$sha  $name.tar.gz"
# The recipes come from the archive's tree, so they match the source they fetch.
mkdir -p "$work/tree"
tar -xzf "$out/$name.tar.gz" -C "$work/tree"
tree="$work/tree/$name"

# fill FILE SED-ARGS...: the placeholders @NAME@ of a template, each required. The
# template's own comment (from `# TEMPLATE:` to the next line that is no comment) gives
# way to a line naming where the copy comes from.
fill() {
  file="$1"; shift
  awk -v note="# Release copy for kiln $version (commit ${commit:0:12}), written by scripts/release-source.sh." '
    /^# TEMPLATE:/ { print note; skip = 1; next }
    skip && /^#/ { next }
    { skip = 0; print }' "$file.in" | sed "$@" >"$file"
  rm "$file.in"
  ! grep -n '@[A-Z0-9_]*@' "$file" >"$work/left" ||
    die 6 "${file#"$out"/} keeps a placeholder after filling: $(head -n1 "$work/left")"
}
need() { grep -q "$2" "$1" || die 6 "${1#"$tree"/} has no $2 for this script to fill (is it still the template?)"; }

# Yocto: the layer, the recipe named after the version, and the crates.
need "$tree/$recipe" @SITE@
need "$tree/$recipe" @SHA256@
rm -rf "$out/meta-kiln"
cp -R "$tree/$layer" "$out/meta-kiln"
rm "$out/meta-kiln/recipes-kiln/kilnd/kilnd_0.1.0.bb"
bb="$out/meta-kiln/recipes-kiln/kilnd/kilnd_$version.bb"
cp "$tree/$recipe" "$bb.in"
fill "$bb" -e "s|@SITE@|$site|g" -e "s|@SHA256@|$sha|g"
# kilnd-crates.inc in the form poky's update_crates writes: one crate:// URI per
# locked crates.io package, and its checksum under the fetcher's name NAME-VERSION.
awk -v ver="$version" '
  BEGIN { n = 0 }
  function flush() {
    if (name != "" && source != "") {
      if (source !~ /^registry\+https:\/\/github\.com\/rust-lang\/crates\.io-index$/ || checksum == "") {
        printf "%s %s comes from %s\n", name, version, source > "/dev/stderr"; bad = 1
      }
      uri[n] = "crate://crates.io/" name "/" version
      sum[n] = "SRC_URI[" name "-" version ".sha256sum] = \"" checksum "\""; n++
    }
    name = version = source = checksum = ""
  }
  /^\[\[package\]\]$/ { flush(); next }
  /^name = /     { name = $3; gsub(/"/, "", name) }
  /^version = /  { version = $3; gsub(/"/, "", version) }
  /^source = /   { source = $3; gsub(/"/, "", source) }
  /^checksum = / { checksum = $3; gsub(/"/, "", checksum) }
  END {
    flush()
    if (bad) exit 1
    print "# Every crate of the Cargo.lock of kiln " ver ", written by scripts/release-source.sh"
    print "# (as `bitbake -c update_crates kilnd` would): cargo resolves the whole workspace"
    print "# lock file, so the crates kilnd does not link are listed too."
    print ""
    print "SRC_URI += \" \\"
    for (i = 0; i < n; i++) print "    " uri[i] " \\"
    print "\""
    print ""
    for (i = 0; i < n; i++) print sum[i]
  }' "$tree/Cargo.lock" >"$out/meta-kiln/recipes-kiln/kilnd/kilnd-crates.inc" ||
  die 6 "Cargo.lock has a crate that is not from crates.io with a checksum (named above): the crate:// list cannot hold it"
sums="$sums"$'\n'"$(cd "$out" && sha256sum "meta-kiln/recipes-kiln/kilnd/kilnd_$version.bb" \
  "meta-kiln/recipes-kiln/kilnd/kilnd-crates.inc")"

if [ "$vendor" = 1 ]; then
  # Buildroot: the vendored archive, then the package.
  need "$tree/$package/kilnd.mk" @VERSION@
  need "$tree/$package/kilnd.mk" @SITE@
  cp -R "$tree" "$work/vendored"
  (cd "$work/vendored" && cargo vendor --locked VENDOR >"$work/config.toml" 2>"$work/vendor.log") ||
    die 4 "\`cargo vendor --locked\` failed ($(grep -m1 -i 'error' "$work/vendor.log")): it needs static.crates.io (or every crate in the local cache)"
  # With --quiet cargo vendor prints no config either: check it names the directory.
  grep -q '^directory = "VENDOR"' "$work/config.toml" ||
    die 4 "\`cargo vendor\` printed no source replacement for VENDOR/"
  mkdir -p "$work/vendored/.cargo"
  mv "$work/config.toml" "$work/vendored/.cargo/config.toml"
  mkdir -p "$work/v"
  mv "$work/vendored" "$work/v/$name"
  tar -C "$work/v" --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 \
    --numeric-owner --mode=go-w --format=gnu -cf - "$name" | gzip -9 -n >"$out/$name-vendored.tar.gz"
  vsha=$(sha256sum "$out/$name-vendored.tar.gz" | cut -d' ' -f1)
  sums="$sums"$'\n'"$vsha  $name-vendored.tar.gz"
  rm -rf "$out/buildroot"
  cp -R "$tree/dist/buildroot" "$out/buildroot"
  mk="$out/buildroot/package/kilnd/kilnd.mk"
  mv "$mk" "$mk.in"
  fill "$mk" -e "s|@VERSION@|$version|g" -e "s|@SITE@|$site|g"
  lic=$(sha256sum "$tree/LICENSE" | cut -d' ' -f1)
  printf '%s\n' "# Written by scripts/release-source.sh for kiln $version ($commit)." \
    "# The archive as published: it already holds its crates (VENDOR/), so Buildroot" \
    "# checks it as downloaded." \
    "sha256  $vsha  $name-vendored.tar.gz" \
    "sha256  $lic  LICENSE" >"$out/buildroot/package/kilnd/kilnd.hash"
fi

printf '%s\n' "$sums" >"$out/SHA256SUMS"
echo "release-source: kiln $version ($commit) in $out:"
sed 's/^/  /' "$out/SHA256SUMS"

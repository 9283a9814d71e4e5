#!/usr/bin/env bash
# The differential corpus (docs/src/corpus.md): real programs from package registries,
# pinned in conformance/corpus/corpus.toml, each run under wasmtime (the reference) and
# compiled by `kiln compile` for x86_64, aarch64 and riscv64 and run by `kilnd run`
# (natively and under qemu-user); every output compared byte for byte.
#
#   scripts/corpus.sh            the whole corpus; writes the book's dated page
#                                docs/src/measurements/corpus-YYYY-MM-DD.md (about 15
#                                minutes on 2 cores with the host-profile kiln, most of
#                                it the 69 MB yosys module)
#   scripts/corpus.sh --quick    the programs marked `quick` (CI: scripts/test.sh)
#   options: --only NAME,NAME  --targets x86_64-linux,...  --record (print wasmtime's
#            hashes for the manifest)  --no-kiln (wasmtime only)  --no-build (use the
#            kiln already built)  --page (write the page even with other options)
#
# Packages are fetched with pip and npm into $CARGO_TARGET_DIR/corpus and kept there;
# wasmtime is its PyPI embedding in a venv there. kilnd is the shipped build of each
# target (scripts/build.sh). Exits 1 on a difference the manifest does not explain, 2
# when something it needs is missing or a package does not match its pins.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
export CARGO_TARGET_DIR
WASMTIME_PY=wasmtime==51.0.0
cache="$CARGO_TARGET_DIR/corpus"
mkdir -p "$cache"

command="scripts/corpus.sh $*"
# --quick uses the debug kiln that scripts/build.sh builds for the tests; the whole
# corpus the host-profile kiln users install (built here, as scripts/bench.sh does,
# unless --no-build: then the one already built). The page is written for a whole run.
quick='' build=yes page=--page args=()
for arg in "$@"; do
  case "$arg" in
    --no-build) build='' ;;
    --quick) quick=yes page='' ;;
    --only* | --targets* | --record | --no-kiln) page='' ;;
  esac
  [ "$arg" = --no-build ] || args+=("$arg")
done

venv="$cache/venv"
if ! "$venv/bin/python" -c "import wasmtime" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "$WASMTIME_PY"
fi

if [ -n "$quick" ]; then
  kiln="$CARGO_TARGET_DIR/debug/kiln"
else
  kiln="$CARGO_TARGET_DIR/host/kiln"
  [ -z "$build" ] || cargo build --locked --quiet -p kiln-compiler --profile host
fi
[ -x "$kiln" ] || { echo "corpus: $kiln is missing (scripts/build.sh builds the debug one)" >&2; exit 2; }
key="$cache/corpus.key"
[ -f "$key" ] || "$kiln" keygen -o "$key" >/dev/null

exec "$venv/bin/python" conformance/corpus/corpus.py --kiln "$kiln" --key "$key" \
  --cache "$cache" --target-dir "$CARGO_TARGET_DIR" --command "${command% }" \
  ${page:+"$page"} ${args[@]+"${args[@]}"}

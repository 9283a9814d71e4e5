#!/usr/bin/env bash
# Where the bytes of kilnd go: builds kilnd for TRIPLE (default aarch64) exactly as
# shipped but unstripped, in a target dir of its own (so the shipped build is not
# overwritten), and prints the size of its code and data per crate, from the symbol
# table. With fat LTO, inlined code is counted in the crate of the function it was
# inlined into, and generic code in the crate that defines it (`core`, `alloc` for
# every Vec and Option), so the table is an attribution, not an exact split.
#   scripts/bloat.sh [TRIPLE] [-- CARGO FEATURE FLAGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
triple="${1:-aarch64-unknown-linux-gnu}"
shift || true
[ "${1:-}" = "--" ] && shift
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
export CARGO_TARGET_DIR="$CARGO_TARGET_DIR-bloat"
case "$triple" in
  aarch64-*) nm=aarch64-linux-gnu-nm ;;
  riscv64*) nm=riscv64-linux-gnu-nm ;;
  x86_64-*) nm="nm" ;;
  *) echo "bloat: unknown triple \`$triple\`" >&2; exit 2 ;;
esac
CARGO_PROFILE_RELEASE_STRIP=false scripts/kilnd-build.sh "$triple" "$@"
bin="$CARGO_TARGET_DIR/$triple/release/kilnd"
stripped=$(mktemp)
trap 'rm -f "$stripped"' EXIT
"${nm%nm}strip" -o "$stripped" "$bin" 2>/dev/null || strip -o "$stripped" "$bin"
echo "kilnd for $triple $*: $(stat -c %s "$stripped") B stripped"
# Demangled symbols with sizes; the crate is the first path segment, taken from
# inside `<... as ...>` impl paths too. Symbols with no crate path (C code, libc,
# compiler-generated) are counted as `[other]`.
"$nm" --size-sort -S -C "$bin" | python3 -c '
import re, sys, collections
sizes = collections.Counter()
total = 0
for line in sys.stdin:
    parts = line.split(None, 3)
    if len(parts) < 4 or parts[2].lower() not in "tdrbv":
        continue
    size = int(parts[1], 16)
    name = parts[3].strip().lstrip("<&*")
    m = re.match(r"(?:impl )?([A-Za-z_][A-Za-z0-9_]*)::", name)
    crate = m.group(1) if m else "[other]"
    sizes[crate] += size
    total += size
print(f"| crate | bytes | share |")
print(f"|---|---|---|")
for crate, size in sizes.most_common(25):
    print(f"| {crate} | {size:,} | {100*size/total:.1f}% |")
rest = total - sum(s for _, s in sizes.most_common(25))
print(f"| (the rest) | {rest:,} | {100*rest/total:.1f}% |")
print(f"| total in symbols | {total:,} | |")
'

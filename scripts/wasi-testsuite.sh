#!/usr/bin/env bash
# The WebAssembly WASI testsuite's 46 wasm32-wasip1 Rust tests (conformance/wasi, see
# its SNAPSHOT and LICENSE), kiln next to wasmtime on the same binaries:
#
#   scripts/wasi-testsuite.sh --build   build the test binaries only (scripts/build.sh
#                                       does this; about 15 s cold) into
#                                       $CARGO_TARGET_DIR/wasi-testsuite
#   scripts/wasi-testsuite.sh           build them, run them under wasmtime (its PyPI
#                                       embedding, pinned below, in a venv in the target
#                                       dir; x86_64 only) and under kiln on x86_64,
#                                       aarch64 and riscv64 (the e2e test `wasi::`,
#                                       natively and under qemu-user), and print both
#                                       pass rates per target (docs/src/wasi.md)
#
# The kiln half needs the test kilnd of every target (scripts/build.sh). CI runs the
# kiln half only, through the e2e test; wasmtime is not needed there.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
export CARGO_TARGET_DIR
WASMTIME_PY=wasmtime==51.0.0
out="$CARGO_TARGET_DIR/wasi-testsuite"

cargo build --locked --quiet --release --target wasm32-wasip1 \
  --manifest-path conformance/wasi/Cargo.toml --target-dir "$out"
bins="$out/wasm32-wasip1/release"
# The C tests, with Debian's clang, lld and wasi-libc (scripts/setup.sh installs them).
clang=$(command -v clang-19 || command -v clang || true)
if [ -z "$clang" ]; then
  echo "wasi-testsuite.sh: no clang to build the C tests: run scripts/setup.sh" >&2
  exit 69
fi
mkdir -p "$out/c"
for src in conformance/wasi/c/*.c; do
  name=$(basename "$src" .c)
  if [ ! "$out/c/$name.wasm" -nt "$src" ]; then
    "$clang" --target=wasm32-wasi -O2 "$src" -o "$out/c/$name.wasm"
  fi
done
[ "${1:-}" = --build ] && exit 0

venv="$out/venv"
if ! "$venv/bin/python" -c "import wasmtime" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "$WASMTIME_PY"
fi
echo "wasi testsuite: wasmtime $("$venv/bin/pip" show wasmtime | sed -n 's/^Version: //p') (PyPI embedding) on x86_64:"
for set in "Rust $bins conformance/wasi/src/bin" "C $out/c conformance/wasi/c"; do
# shellcheck disable=SC2086 # three words: the set's name, its binaries, its specs
set -- $set
"$venv/bin/python" - "$2" "$3" "$1" <<'PY'
import json, os, shutil, sys, tempfile
import wasmtime

bins, specs, kind = sys.argv[1], sys.argv[2], sys.argv[3]
engine = wasmtime.Engine()
linker = wasmtime.Linker(engine)
linker.define_wasi()
passed, failed = 0, []
names = sorted(f[:-5] for f in os.listdir(bins) if f.endswith(".wasm"))
for name in names:
    spec = {}
    path = os.path.join(specs, name + ".json")
    if os.path.exists(path):
        with open(path) as f:
            spec = json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = wasmtime.WasiConfig()
        cfg.argv = [name] + spec.get("args", [])
        cfg.env = list(spec.get("env", {}).items())
        if spec.get("root"):
            root = os.path.join(tmp, "root")
            shutil.copytree(os.path.join(specs, spec["root"]), root)
            for d, _, files in os.walk(root):
                os.chmod(d, 0o755)
                for f in files:
                    os.chmod(os.path.join(d, f), 0o644)
            cfg.preopen_dir(root, "/")
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        cfg.stdout_file, cfg.stderr_file = out, err
        store = wasmtime.Store(engine)
        store.set_wasi(cfg)
        module = wasmtime.Module.from_file(engine, os.path.join(bins, name + ".wasm"))
        try:
            linker.instantiate(store, module).exports(store)["_start"](store)
            code = 0
        except wasmtime.ExitTrap as e:
            code = e.code
        except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
            code = "error: " + str(e).splitlines()[0]
        with open(out) as f:
            stdout = f.read()
        with open(err) as f:
            stderr = f.read()
    ok = code == spec.get("exit_code", 0)
    ok = ok and spec.get("stdout") in (None, stdout) and spec.get("stderr") in (None, stderr)
    if ok:
        passed += 1
    else:
        failed.append(f"{name} ({code})")
print(f"wasi testsuite ({kind}): wasmtime on x86_64-linux: {passed}/{len(names)} passed; failed: {', '.join(failed) or 'none'}")
PY
done

# kiln: the e2e test prints one line per target (and fails on a wrong expectation).
cargo test --locked --quiet -p kiln-e2e --test e2e wasi::the_wasi_testsuite -- --nocapture 2>&1 |
  grep -E '^wasi testsuite|panicked|FAILED|test result'

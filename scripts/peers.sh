#!/usr/bin/env bash
# The runtimes the benchmark compares kiln with, each from its package registry, into
# $KILN_TOOLS (default ~/.cache/kiln/tools); idempotent:
#   - wasmtime, the engine in its PyPI package (pip install --target);
#   - wasmi, an interpreter, as the floor (cargo install wasmi_cli);
#   - Node.js's WASI (V8) is used if node is on the PATH.
set -euo pipefail
tools="${KILN_TOOLS:-$HOME/.cache/kiln/tools}"
mkdir -p "$tools"
if ! PYTHONPATH="$tools/python" python3 -c 'import wasmtime' 2>/dev/null; then
  echo "peers: installing wasmtime from PyPI"
  python3 -m pip install --quiet --target "$tools/python" wasmtime
fi
if [ ! -x "$tools/bin/wasmi" ]; then
  echo "peers: installing wasmi_cli from crates.io"
  cargo install --quiet --locked --root "$tools" wasmi_cli
fi
command -v node >/dev/null || echo "peers: node not found; Node.js's column stays empty"

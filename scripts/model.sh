#!/usr/bin/env bash
# The long run of the update agent's model-based test (CI runs 32 cases with a fixed
# seed): scripts/model.sh [CASES] [SEED]. Prints cases, steps and time.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
export CARGO_TARGET_DIR
export KILN_MODEL_CASES="${1:-500}" KILN_MODEL_SEED="${2:-$(date +%s)}"
echo "model: $KILN_MODEL_CASES cases, seed $KILN_MODEL_SEED"
cargo test --locked -p kiln-runtime --lib --features conformance,test-hooks \
  random_operations_keep_the_invariants_and_converge -- --nocapture

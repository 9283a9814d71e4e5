#!/usr/bin/env bash
# The demo: a module compiled on this x86_64 host runs on emulated aarch64 and riscv64
# devices, a device refuses an artifact built for the other architecture, and an
# emulated aarch64 device keeps a healthy reactor running while misbehaving modules
# next to it are contained and restarted. Then a fleet of both follows one release
# over MQTT, and rotates its release key while one device is offline.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/kiln/target}"
export CARGO_TARGET_DIR

# Only what the demo runs: the shipped kilnd for aarch64 and riscv64, the examples.
scripts/build.sh --demo
# The release kiln users run, on the PATH (~/.cargo/bin): a fast build that unwinds,
# the `host` profile. cargo skips the build when nothing changed.
echo "install: kiln (release, host profile) into ${CARGO_HOME:-$HOME/.cargo}/bin (cold: about 9 minutes; warm: seconds)"
cargo install --locked --quiet --path compiler --profile host
kiln="${CARGO_HOME:-$HOME/.cargo}/bin/kiln"
hello="$CARGO_TARGET_DIR/examples/wasm32-wasip1/release/hello.wasm"
sensor="$CARGO_TARGET_DIR/examples/wasm32-wasip1/release/sensor_filter.wasm"
out=demo-out
rm -rf "$out" && mkdir -p "$out/data"
echo "temperature=21.5" > "$out/data/config.txt"

# Commands in bold, unless NO_COLOR asks for plain text.
if [ -n "${NO_COLOR:-}" ]; then bold="" plain=""; else bold=$'\033[1m' plain=$'\033[0m'; fi
step() { printf '\n%s$ %s%s\n' "$bold" "$*" "$plain"; "$@"; }
device() { # device PROFILE ARGS... : run kilnd the way the board would, under qemu
  local qemu
  case "$1" in
    aarch64-linux) qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu); triple=aarch64-unknown-linux-gnu ;;
    riscv64-linux) qemu=(qemu-riscv64 -L /usr/riscv64-linux-gnu); triple=riscv64gc-unknown-linux-gnu ;;
  esac
  shift
  step "${qemu[@]}" "$CARGO_TARGET_DIR/$triple/release/kilnd" "$@"
}

step "$kiln" keygen -o "$out/fleet.key"
for target in aarch64-linux riscv64-linux; do
  step "$kiln" compile "$hello" --target "$target" --sign "$out/fleet.key" -o "$out/hello-$target.kiln"
  step "$kiln" compile examples/compute.wat --target "$target" --sign "$out/fleet.key" -o "$out/compute-$target.kiln"
done
step "$kiln" inspect "$out/hello-riscv64-linux.kiln" --trust "$out/fleet.pub"

for target in aarch64-linux riscv64-linux; do
  set +e
  device "$target" run "$out/hello-$target.kiln" --trust "$out/fleet.pub" \
    --dir "$out/data:/data" --env GREETING=hello -- "$target" --read /data/config.txt --exit 3
  echo "(exit code $?)"
  set -e
  device "$target" run "$out/compute-$target.kiln" --trust "$out/fleet.pub"
done

echo
echo "A riscv64 artifact on an aarch64 device is refused before any byte is loaded:"
set +e
device aarch64-linux run "$out/compute-riscv64-linux.kiln" --trust "$out/fleet.pub"
echo "(exit code $?)"
set -e

echo
echo "An aarch64 device (kilnd serve under qemu) runs a Rust reactor next to a module"
echo "that spins forever, one that eats memory and one that recurses without end:"
step "$kiln" compile "$sensor" --target aarch64-linux --sign "$out/fleet.key" -o "$out/sensor-filter.kiln"
step "$kiln" compile examples/fixtures/spin.wat --target aarch64-linux --sign "$out/fleet.key" -o "$out/spin.kiln" --fuel 5000000
step "$kiln" compile examples/fixtures/memory-bomb.wat --target aarch64-linux --sign "$out/fleet.key" -o "$out/memory-bomb.kiln" --memory-limit 4MiB
step "$kiln" compile examples/fixtures/deep-recursion.wat --target aarch64-linux --sign "$out/fleet.key" -o "$out/deep-recursion.kiln"
cat > "$out/kilnd.toml" <<TOML
trust = ["fleet.pub"]
worker_launcher = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]   # no binfmt_misc here

[[module]]
artifact = "sensor-filter.kiln"
name = "sensor"
tick_ms = 500
timeout_ms = 10000
config = "sensor=greenhouse-1\nalpha=0.3"

[[module]]
artifact = "spin.kiln"
timeout_ms = 10000
restart = { backoff_ms = 200, max_crashes = 3 }

[[module]]
artifact = "memory-bomb.kiln"
restart = { backoff_ms = 200, max_crashes = 2 }

[[module]]
artifact = "deep-recursion.kiln"
restart = { backoff_ms = 200, max_crashes = 2 }
TOML
cat "$out/kilnd.toml"
printf '\n%s$ %s%s   (for 8 seconds)\n' "$bold" "qemu-aarch64 ... kilnd serve --config $out/kilnd.toml" "$plain"
set +e
timeout -s INT 8 qemu-aarch64 -L /usr/aarch64-linux-gnu \
  "$CARGO_TARGET_DIR/aarch64-unknown-linux-gnu/release/kilnd" serve --config "$out/kilnd.toml" \
  2>"$out/kilnd-serve.log" | tee "$out/kilnd-serve.jsonl" \
  | grep -E '"kind":"(started|stopped|failed|log)"|\\"n\\":(1|2|3|12),'
set -e
echo "(every record: $out/kilnd-serve.jsonl; kilnd's own log: $out/kilnd-serve.log)"

echo
echo "A fleet: an aarch64 and a riscv64 device (kilnd serve under qemu), both in group"
echo "demo, follow desired state from a mosquitto broker. One release reaches both: kiln"
echo "compiles the module for each target the group reports, and each device takes its own"
echo "artifact, zstd-compressed; v2 travels as a patch from the v1 each device runs. Their"
echo "telemetry streams to \`kiln watch\`, and a v3 that crashes rolls back."
port=$((20000 + RANDOM % 20000))
broker="mqtt://127.0.0.1:$port"
mkdir -p "$out/broker"
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$port" > "$out/broker/mosquitto.conf"
mosquitto -c "$out/broker/mosquitto.conf" >"$out/broker/log" 2>&1 &
pids=($!)
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
sleep 0.5
declare -A device_pid
start_device() { # start_device ID ARCH TRIPLE: kilnd serve under qemu, in the background
  "qemu-$2" -L "/usr/$2-linux-gnu" "$CARGO_TARGET_DIR/$3/release/kilnd" serve --config "$out/$1/kilnd.toml" \
    >>"$out/$1/records.jsonl" 2>>"$out/$1/kilnd.log" &
  pids+=($!)
  device_pid[$1]=$!
}
for dev in pi-01:aarch64-linux:aarch64:aarch64-unknown-linux-gnu rv-01:riscv64-linux:riscv64:riscv64gc-unknown-linux-gnu; do
  IFS=: read -r id target arch triple <<<"$dev"
  mkdir -p "$out/$id"
  cp "$out/fleet.root" "$out/$id/"
  cat > "$out/$id/kilnd.toml" <<TOML
device = "$id"
data_dir = "data"
trust = ["fleet.root"]
worker_launcher = ["qemu-$arch", "-L", "/usr/$arch-linux-gnu"]
[mqtt]
broker = "$broker"
groups = ["demo"]
[telemetry]
batch_ms = 500
stats_s = 2
TOML
  start_device "$id" "$arch" "$triple"
done
wait_for() { # wait_for TEXT: until `kiln devices` shows TEXT for both devices
  for _ in $(seq 1 120); do
    [ "$("$kiln" devices --broker "$broker" | grep -c "$1")" -ge 2 ] && return 0
    sleep 1
  done
  echo "(timed out waiting for $1)"
}
run_opts=(--health-window-ms 4000 --tick-ms 500 --timeout-ms 10000)
for _ in $(seq 1 60); do # both devices online: their status names their targets
  [ "$("$kiln" devices --broker "$broker" | awk '$2 == "yes"' | wc -l)" -ge 2 ] && break
  sleep 1
done
step "$kiln" push "$sensor" --group demo --name app --version 1 --sign "$out/fleet.key" --broker "$broker" "${run_opts[@]}"
wait_for 'app@1 .*committed'
echo "Each device signs what it reports with its own key; enrolling records the keys, and"
echo "kiln devices then shows the reports as verified:"
step "$kiln" enroll --group demo --sign "$out/fleet.key" --broker "$broker"
step "$kiln" devices --broker "$broker" --root "$out/fleet.root"
echo "v2 as a release file, built once for both targets and pushed from it:"
step "$kiln" release "$sensor" --target aarch64-linux --target riscv64-linux --name app --version 2 --sign "$out/fleet.key" -o "$out/app-v2.kilnrel"
step "$kiln" push "$out/app-v2.kilnrel" --group demo --sign "$out/fleet.key" --broker "$broker" "${run_opts[@]}"
wait_for 'app@2 .*committed'
step "$kiln" devices --broker "$broker" --root "$out/fleet.root"
echo "Live telemetry from both emulated devices: records in postcard batches, each batch"
echo "numbered per boot; watch would say GAP or duplicate if one went missing or came twice."
step "$kiln" watch --broker "$broker" --duration 5
echo "v3 divides by zero on its third tick:"
step "$kiln" push examples/fixtures/trap-tick.wat --group demo --name app --version 3 --sign "$out/fleet.key" --broker "$broker" "${run_opts[@]}"
wait_for 'app@2 .*rolled back'
step "$kiln" devices --broker "$broker" --root "$out/fleet.root"

echo
echo "Key rotation: the release key leaked. rv-01 is offline; the offline root key signs"
echo "root v2 naming a new release key; the current states are signed again with it; v4"
echo "goes out; rv-01 comes back and converges; the old key is refused from then on."
kill "${device_pid[rv-01]}"; wait "${device_pid[rv-01]}" 2>/dev/null || true
step "$kiln" keygen -o "$out/new.key" --no-root
step "$kiln" root rotate --root "$out/fleet.root" --sign "$out/fleet-root.key" --release-key "$out/new.pub"
step "$kiln" root publish "$out/fleet.root" --broker "$broker"
# What the old key signed is re-signed only when the operator adopts it, after review.
step "$kiln" refresh --all --sign "$out/new.key" --adopt --broker "$broker"
step "$kiln" push "$sensor" --group demo --name app --version 4 --sign "$out/new.key" --broker "$broker" "${run_opts[@]}"
start_device rv-01 riscv64 riscv64gc-unknown-linux-gnu
wait_for 'app@4 .*committed'
step "$kiln" devices --broker "$broker" --root "$out/fleet.root"
echo "A release signed with the old key is refused (devices refuse a state signed with it"
echo "too: e2e/tests/trust.rs publishes one straight to the broker):"
if "$kiln" push "$sensor" --group demo --name app --version 5 --sign "$out/fleet.key" \
    --broker "$broker" --root "$out/fleet.root" "${run_opts[@]}"; then
  echo "demo: the old key was accepted" >&2
  exit 1
fi

echo
echo "v5 as a rollout: the canary first, then the rest; its record stays on the broker"
echo "(kiln rollout status, from any machine):"
step "$kiln" rollout "$sensor" --group demo --name app --version 5 --sign "$out/new.key" --waves 1 \
  --broker "$broker" --root "$out/fleet.root" "${run_opts[@]}"
step "$kiln" rollout status --group demo --broker "$broker" --root "$out/fleet.root"

echo
echo "demo: artifacts and keys are in $out/"
dash_port=$((port + 1))
"$kiln" dashboard --listen "127.0.0.1:$dash_port" --broker "$broker" --root "$out/fleet.root" \
  2>"$out/dashboard.log" &
pids+=($!)
for _ in $(seq 1 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$dash_port") 2>/dev/null && break
  sleep 0.2
done
echo "demo: the fleet is live at http://127.0.0.1:$dash_port/ (kiln dashboard: both devices,"
echo "      their versions, v3's rollback, the v5 rollout's waves, telemetry as charts)"
if [ -t 0 ]; then
  read -r -p "demo: press Enter to stop the fleet " _ || true
fi

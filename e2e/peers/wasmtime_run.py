"""Runs a WASI command under wasmtime (the engine in its PyPI package), the way kiln
runs one: precompiled ahead of time for this machine, then loaded and run.

    python3 wasmtime_run.py precompile module.wasm module.cwasm
    python3 wasmtime_run.py run module.cwasm ARGS...

Only the run is timed by the bench (and the workloads time their own kernels)."""

import sys

import wasmtime


def main() -> int:
    command, path = sys.argv[1], sys.argv[2]
    engine = wasmtime.Engine()
    if command == "precompile":
        with open(sys.argv[3], "wb") as f:
            f.write(wasmtime.Module.from_file(engine, path).serialize())
        return 0
    module = wasmtime.Module.deserialize_file(engine, path)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    wasi = wasmtime.WasiConfig()
    wasi.argv = ["workloads", *sys.argv[3:]]
    wasi.inherit_stdout()
    wasi.inherit_stderr()
    store.set_wasi(wasi)
    instance = linker.instantiate(store, module)
    try:
        instance.exports(store)["_start"](store)
    except wasmtime.ExitTrap as e:
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())

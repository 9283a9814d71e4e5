// Runs a WASI command under Node.js's WASI (V8): node node_wasi.mjs module.wasm ARGS...
// V8 compiles the module when it loads; the workloads time their own kernels.
import { readFile } from "node:fs/promises";
import { argv, exit } from "node:process";
import { WASI } from "node:wasi";

const wasi = new WASI({ version: "preview1", args: ["workloads", ...argv.slice(3)], env: {} });
const module = await WebAssembly.compile(await readFile(argv[2]));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
exit(wasi.start(instance));

// Runs a wasm32-wasip1 program (a `cargo test` binary) under Node's WASI, so the
// filter's pure logic is tested compiled to wasm as well as natively.
// Used as CARGO_TARGET_WASM32_WASIP1_RUNNER; the first argument is the .wasm.
import { readFile } from 'node:fs/promises';
import { WASI } from 'node:wasi';
import process from 'node:process';

const [file, ...args] = process.argv.slice(2);
const wasi = new WASI({
  version: 'preview1',
  args: [file, ...args],
  env: {},
  preopens: {},
  returnOnExit: true,
});
const module = await WebAssembly.compile(await readFile(file));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
process.exitCode = wasi.start(instance);

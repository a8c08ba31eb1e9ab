#!/usr/bin/env bash
# `make lint`, also the first step of `make test`: cargo fmt (rustfmt.toml sets
# the width), then clippy with warnings denied, natively for the workspace and
# for wasm32-wasip1, where the proxy-wasm shell is compiled.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
cargo fmt --all --check || { echo "lint: run 'cargo fmt' (the places above differ from rustfmt.toml)" >&2; status=1; }
cargo fmt --manifest-path fuzz/Cargo.toml --check || { echo "lint: run 'cargo fmt --manifest-path fuzz/Cargo.toml'" >&2; status=1; }
cargo clippy --workspace --all-targets -- -D warnings || status=1
# The fuzz targets (their own workspace, fuzz/), natively.
cargo clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings || status=1
cargo clippy --target wasm32-wasip1 -p openclaw-filter -p bridge-protocol -- -D warnings || status=1
# make bench's itemise build (filter/src/itemise.rs): its timing code is linted too.
cargo clippy --target wasm32-wasip1 -p openclaw-filter --features itemise -- -D warnings || status=1
cargo clippy -p openclaw-filter --features itemise --all-targets -- -D warnings || status=1
exit "$status"

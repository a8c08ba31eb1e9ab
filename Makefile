# The two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: deps db build wasm test run bench fuzz lint clean

# The whole stack on port 8000 (GATEWAY_PORT), local defaults for what is not set.
run: deps
	scripts/run.sh

deps:
	@scripts/deps.sh

# The compiled build of the embedded database (crates.io, 10-20 min once, needs
# cmake): scripts/mongo.sh prefers it to the PyPI one for `make run` and `make
# bench`; tests keep the PyPI build, as CI has it.
db: deps
	@test -x target/db/bin/secantusd-rs || { command -v cmake >/dev/null || pip install -q cmake; \
		$(CARGO) install secantus-mdb --version 0.5.3-beta.196 --ignore-rust-version --locked --root target/db; }

wasm: deps
	$(CARGO) build --release --target wasm32-wasip1 -p openclaw-filter

build: deps
	$(CARGO) build --workspace --bins

# Every test: formatting and lints (scripts/lint.sh), the filter's pure logic
# compiled to wasm (run under Node's WASI) and natively, the sidecar against the MongoDB-wire server, the built .wasm in
# a real Envoy, end-to-end through the whole stack.
test: build wasm
	scripts/test.sh

# The bridge against bare Envoy and LiteLLM's proxy, side by side; writes BENCHMARKS.md.
bench: db
	@command -v wrk >/dev/null || apt-get install -y wrk || (apt-get update && apt-get install -y wrk)
	$(CARGO) build --release -p openclaw-sidecar -p bridge-tests --bins
	$(CARGO) build --release --target wasm32-wasip1 -p openclaw-filter
	$(CARGO) build --release --target wasm32-wasip1 -p openclaw-filter --features itemise --target-dir target/itemise
	@test -x target/bench-venv/bin/litellm || (python3 -m venv target/bench-venv && \
		target/bench-venv/bin/pip install -q 'litellm[proxy]') || echo "bench: LiteLLM not installed; its rows are left out"
	python3 scripts/bench.py

# Each fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS (60) on libFuzzer; `make
# test` runs a short pass of each.
fuzz: deps
	scripts/fuzz.sh

# Formatting (rustfmt.toml) and clippy, natively and for the .wasm: the
# proxy-wasm shell (filter/src/plugin.rs) only compiles for wasm32.
lint: deps
	scripts/lint.sh

clean:
	$(CARGO) clean

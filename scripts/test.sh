#!/usr/bin/env bash
# `make test`: every test, then one closing line with the totals.
#  0. formatting and lints (scripts/lint.sh): a failure fails the run, after the tests;
#  1. the filter's and protocol's unit tests compiled to wasm32-wasip1, run under Node's WASI;
#  2. the whole workspace natively, with a MongoDB-wire server (scripts/with-mongo.sh):
#     unit tests, the sidecar on MongoDB, the .wasm in real Envoy, real clients;
#  3. a short pass of each fuzz target (scripts/fuzz.sh, FUZZ_SECONDS 10 here; `make fuzz` runs longer).
set -uo pipefail
cd "$(dirname "$0")/.."
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0

scripts/lint.sh 2>&1 | tee -a "$log" || { status=1; lint_failed=1; }

# The admin console's test needs a real browser. Where none can be installed
# the test says so loudly and passes; anywhere else a missing browser fails it.
if ! scripts/deps.sh --browser; then
  export BROWSER_TESTS=unavailable
  echo "make test: !!! Chromium could not be installed: the admin console's browser test will be SKIPPED !!!" | tee -a "$log" >&2
fi

CARGO_TARGET_WASM32_WASIP1_RUNNER="node --no-warnings $(pwd)/scripts/wasi-run.mjs" \
  cargo test --target wasm32-wasip1 -p openclaw-filter -p bridge-protocol --lib 2>&1 | tee -a "$log" || status=1
scripts/with-mongo.sh cargo test --workspace --all-targets --no-fail-fast 2>&1 | tee -a "$log" || status=1
# make bench's itemise build: its step timing.
cargo test -p openclaw-filter --features itemise --lib itemise 2>&1 | tee -a "$log" || status=1

# A short pass of each fuzz target; a crash fails the run (counted as one failure).
fuzz_targets=$(ls fuzz/fuzz_targets/*.rs | wc -l)
if FUZZ_SECONDS="${FUZZ_SECONDS:-10}" scripts/fuzz.sh 2>&1 | tee -a "$log"; then
  echo "test result: ok. $fuzz_targets passed; 0 failed (fuzz targets, ${FUZZ_SECONDS:-10} s each)" | tee -a "$log"
else
  echo "test result: FAILED. 0 passed; 1 failed (a fuzz target crashed: scripts/fuzz.sh)" | tee -a "$log"
  status=1
fi

passed=$(grep -oE '^test result: [A-Za-z]+\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -oE '^test result: [A-Za-z]+\. [0-9]+ passed; [0-9]+ failed' "$log" | awk '{s += $6} END {print s + 0}')
if [ "${lint_failed:-0}" -eq 1 ]; then echo "make test: formatting or lints failed (scripts/lint.sh)" >&2; fi
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi  # a build or lint failure counts
if [ "${BROWSER_TESTS:-}" = unavailable ]; then echo "make test: the browser test was SKIPPED (no Chromium could be installed)" >&2; fi
echo "total: $passed passed, $failed failed"
exit "$status"

#!/usr/bin/env bash
# Runs each fuzz target (fuzz/fuzz_targets, libFuzzer through cargo-fuzz, on
# nightly) for FUZZ_SECONDS (default 60; `make test` passes a short time).
# Seeds are fuzz/corpus/<target> (read only); what libFuzzer finds goes to
# target/fuzz-corpus/<target>, a crash to fuzz/artifacts/<target> and fails
# the run: turn it into a unit test.
#   scripts/fuzz.sh [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-60}"
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz: installing the nightly toolchain (cargo-fuzz needs it)" >&2
  rustup toolchain install nightly --profile minimal >&2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --version 0.13.2 --locked >&2
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cd fuzz/fuzz_targets && ls ./*.rs | sed 's|^\./||; s|\.rs$||')
status=0
for t in "${targets[@]}"; do
  mkdir -p "target/fuzz-corpus/$t"
  echo "fuzz: $t for ${seconds} s" >&2
  # -rss_limit_mb: the tokenizer tables are large; -max_len: bodies of a few KB.
  if ! cargo +nightly fuzz run --fuzz-dir fuzz "$t" "target/fuzz-corpus/$t" "fuzz/corpus/$t" -- \
      -max_total_time="$seconds" -max_len=16384 -rss_limit_mb=4096 -print_final_stats=1 2>"target/fuzz-$t.log"; then
    echo "fuzz: $t FAILED; see target/fuzz-$t.log and fuzz/artifacts/$t" >&2
    tail -40 "target/fuzz-$t.log" >&2
    status=1
  else
    grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "target/fuzz-$t.log" | sed "s/^/fuzz: $t /" >&2 || true
  fi
done
exit $status

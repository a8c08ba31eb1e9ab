#!/usr/bin/env bash
# Starts and stops the MongoDB-wire-compatible server (SecantusDB) on loopback,
# on a free port, for tests and local runs. Which build: MONGO_SERVER if set,
# else the compiled one from crates.io where `make db` installed it
# (target/db/bin/secantusd-rs: it settles about 3.5 times faster, BENCHMARKS.md),
# else the PyPI one (`secantusd-py`, installed by scripts/deps.sh). Tests pin
# the PyPI build (scripts/with-mongo.sh), as CI has it.
#   scripts/mongo.sh start DIR   -> prints the connection URI; DIR holds pid, uri, log, data
#   scripts/mongo.sh stop DIR    -> stops the server started there (by pid)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ "${1:-}" = "server" ]; then
  if [ -n "${MONGO_SERVER:-}" ]; then echo "$MONGO_SERVER"
  elif [ -x "$root/target/db/bin/secantusd-rs" ]; then echo "$root/target/db/bin/secantusd-rs"
  else echo secantusd-py; fi
  exit 0
fi
cmd="${1:-}"; dir="${2:-}"
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR, or $0 server" >&2; exit 2; }
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

case "$cmd" in
start)
  if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then cat "$dir/uri"; exit 0; fi
  # MONGO_PORT: restart on a known port (fault tests); otherwise any free one.
  port="${MONGO_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
  storage="${MONGO_STORAGE:-$dir/data}"
  # setsid: its own process group, so a Ctrl-C at the terminal reaches it only through us.
  # MONGO_ARGS: extra server flags, e.g. --sync-on-commit where a test restarts it.
  # shellcheck disable=SC2086
  setsid "$("$0" server)" --host 127.0.0.1 --port "$port" --storage-path "$storage" --log-level WARNING ${MONGO_ARGS:-} \
    >"$dir/log" 2>&1 < /dev/null &
  echo $! > "$dir/pid"
  # retryWrites=false: the server's retry bookkeeping slows writes after ~10k.
  uri="mongodb://127.0.0.1:$port/?retryWrites=false"
  echo "$uri" > "$dir/uri"
  for _ in $(seq 1 300); do
    if python3 - "$uri" <<'PY' 2>/dev/null; then echo "$uri"; exit 0; fi
import sys, pymongo
pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=300).admin.command("ping")
PY
    kill -0 "$(cat "$dir/pid")" 2>/dev/null || { echo "mongo: the server exited; see $dir/log" >&2; cat "$dir/log" >&2; exit 1; }
    sleep 0.1
  done
  echo "mongo: no answer on $uri after 30 s; see $dir/log" >&2; exit 1 ;;
stop)
  if [ -f "$dir/pid" ]; then
    pid="$(cat "$dir/pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/pid"
  fi ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac

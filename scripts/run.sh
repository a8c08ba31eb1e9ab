#!/usr/bin/env bash
# `make run`: the whole gateway on this machine.
#
# Reads settings from the environment and `.env`. What is not configured gets
# a local default: no MONGODB_URI -> the MongoDB-wire server from PyPI (data in
# .run/mongo); no LLM_ENDPOINT -> the mock upstream (canned answers!); no
# ADMIN_TOKEN -> a random one, kept in .run/admin_token (mode 600).
# Ctrl-C or SIGTERM stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
# RUN_DIR: where state, logs and the local admin token live (tests point it elsewhere).
run="${RUN_DIR:-$root/.run}"
mkdir -p "$run"
chmod 700 "$run"

if [ -f .env ]; then
  # Only KEY=VALUE lines; values already in the environment win.
  while IFS='=' read -r k v; do
    [[ "$k" =~ ^[A-Z_][A-Z0-9_]*$ ]] || continue
    [ -n "${!k:-}" ] && continue
    v="${v%\"}"; v="${v#\"}"; v="${v%\'}"; v="${v#\'}"
    export "$k=$v"
  done < <(grep -E '^[A-Z_][A-Z0-9_]*=' .env)
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_busy() { python3 -c 'import socket,sys; s=socket.socket(); sys.exit(0 if s.connect_ex(("127.0.0.1",int(sys.argv[1])))==0 else 1)' "$1"; }
say() { printf '\033[1m%s\033[0m\n' "$*" >&2; }

pids=()
cleanup() {
  trap - INT TERM EXIT
  say "stopping..."
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${started_mongo:-}" ] && scripts/mongo.sh stop "$run/mongo"
  say "stopped"
}
trap 'cleanup; exit 0' INT TERM
trap cleanup EXIT

export GATEWAY_PORT="${GATEWAY_PORT:-8000}"
if port_busy "$GATEWAY_PORT"; then
  echo "run: port $GATEWAY_PORT is taken; set GATEWAY_PORT to a free port" >&2
  exit 1
fi

# BUILD_PROFILE=debug reuses `cargo build`'s binaries; SKIP_BUILD=1 skips building.
profile="${BUILD_PROFILE:-release}"
bin="target/$profile"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  say "building the sidecar, the mock upstream and the .wasm filter..."
  if [ "$profile" = release ]; then
    cargo build --release -p openclaw-sidecar -p bridge-tests --bins
  else
    cargo build -p openclaw-sidecar -p bridge-tests --bins
  fi
  cargo build --release --target wasm32-wasip1 -p openclaw-filter
fi

if [ -z "${ADMIN_TOKEN:-}" ]; then
  [ -s "$run/admin_token" ] || (umask 077; python3 -c 'import secrets; print("adm-" + secrets.token_hex(16))' > "$run/admin_token")
  ADMIN_TOKEN="$(cat "$run/admin_token")"
  say "ADMIN_TOKEN not set: using the local one in $run/admin_token"
fi
export ADMIN_TOKEN

if [ -z "${MONGODB_URI:-}" ]; then
  MONGODB_URI="$(scripts/mongo.sh start "$run/mongo")"
  started_mongo=1
  say "MONGODB_URI not set: started the MongoDB-wire server $(basename "$(scripts/mongo.sh server)") at $MONGODB_URI (data in .run/mongo/data)"
  [ "$(scripts/mongo.sh server)" != secantusd-py ] \
    || say "  (the PyPI build; \`make db\` installs the compiled one once, which settles about 3.5 times faster)"
fi
export MONGODB_URI

if [ -z "${LLM_ENDPOINT:-}" ]; then
  mock_port="$(free_port)"
  export MOCK_UPSTREAM_KEY="mock-upstream-key"
  "$bin/mock-upstream" "127.0.0.1:$mock_port" > "$run/mock.log" 2>&1 &
  pids+=($!)
  export LLM_ENDPOINT="http://127.0.0.1:$mock_port" LLM_API_KEY="$MOCK_UPSTREAM_KEY"
  say "************************************************************************"
  say "* LLM_ENDPOINT is not set: answers come from the MOCK upstream and are  *"
  say "* CANNED. Set LLM_ENDPOINT, LLM_API_KEY and LLM_MODEL for a real model. *"
  say "************************************************************************"
elif [ -z "${LLM_API_KEY:-}" ]; then
  echo "run: LLM_ENDPOINT is set but LLM_API_KEY is not" >&2
  exit 1
fi

# The internal API is on loopback; a per-run shared secret keeps other local
# processes from settling or reserving too.
export INTERNAL_TOKEN="${INTERNAL_TOKEN:-$(python3 -c 'import secrets; print(secrets.token_hex(16))')}"
export SIDECAR_ADDR="${SIDECAR_ADDR:-127.0.0.1:$(free_port)}"
export ENVOY_ADMIN_PORT="${ENVOY_ADMIN_PORT:-$(free_port)}"
export LOG_FILE="${LOG_FILE:-$root/app.log}"
"$bin/openclaw-sidecar" &
pids+=($!)

python3 envoy/render.py "$run/envoy.json"
envoy -c "$run/envoy.json" --concurrency "${ENVOY_CONCURRENCY:-2}" --disable-hot-restart \
  --log-level "${ENVOY_LOG_LEVEL:-warning}" &
pids+=($!)

for _ in $(seq 1 600); do
  if curl -fsS "http://127.0.0.1:$GATEWAY_PORT/healthz" >/dev/null 2>&1; then break; fi
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || { echo "run: a component exited; see above" >&2; exit 1; }; done
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$GATEWAY_PORT/healthz" >/dev/null

cat >&2 <<EOF

  openclaw-llm-bridge is up.
    base URL (OpenAI SDK, OpenClaw): http://127.0.0.1:$GATEWAY_PORT/v1
    admin API:                       http://127.0.0.1:$GATEWAY_PORT/admin/keys
    upstream:                        $LLM_ENDPOINT (${LLM_PROVIDER:-azure})
    logs:                            $LOG_FILE

  First key:
    curl -X POST http://127.0.0.1:$GATEWAY_PORT/admin/keys \\
      -H "Authorization: Bearer \$(cat $run/admin_token 2>/dev/null || echo \$ADMIN_TOKEN)" \\
      -H "Content-Type: application/json" \\
      -d '{"api_key": "sk-my-user-key-001", "user_name": "张三", "balance_tokens": 10000, "status": "active"}'

  Ctrl-C stops everything.
EOF
wait -n "${pids[@]}" || true
echo "run: a component exited" >&2
exit 1

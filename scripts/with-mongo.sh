#!/usr/bin/env bash
# Runs a command with MONGODB_URI pointing at a MongoDB: the one already in
# MONGODB_URI if set (real users run real MongoDB), otherwise a throwaway
# MongoDB-wire server started here and stopped afterwards.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ -n "${MONGODB_URI:-}" ]; then exec "$@"; fi
# The PyPI build, as CI has it, unless MONGO_SERVER names another; exported for
# the tests that restart the server themselves.
export MONGO_SERVER="${MONGO_SERVER:-secantusd-py}"
dir="$(mktemp -d "${TMPDIR:-/tmp}/bridge-mongo.XXXXXX")"
trap '"$here/mongo.sh" stop "$dir"; rm -rf "$dir"' EXIT
MONGO_STORAGE=":memory:" MONGODB_URI="$("$here/mongo.sh" start "$dir")" || exit 1
export MONGODB_URI
echo "with-mongo: MongoDB-wire server at $MONGODB_URI" >&2
"$@"

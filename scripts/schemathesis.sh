#!/usr/bin/env bash
# Schema-driven HTTP testing: schemathesis against the real binary's served
# /openapi.json (OpenAPI 3.1), once per role (user, agent, auditor), with valid tokens.
# Checks: no 5xx, every response's status code, content type and body match the
# document. Installs schemathesis into a venv when it is missing, starts and stops
# the server itself.
#
#   scripts/schemathesis.sh            # the short run (.ci/run): 10 examples per operation
#   ST_MAX_EXAMPLES=500 scripts/schemathesis.sh
#
# Environment: THREADLINE_BIN (the binary; built when unset), ST_VENV (the venv,
# default ~/.cache/threadline/schemathesis), ST_MAX_EXAMPLES, ST_SEED, ST_REPORT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

ST_VERSION=4.32.5
venv="${ST_VENV:-$HOME/.cache/threadline/schemathesis}"
if ! "$venv/bin/st" --version 2>/dev/null | grep -q "$ST_VERSION"; then
  echo "installing schemathesis $ST_VERSION into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "schemathesis==$ST_VERSION"
fi

bin="${THREADLINE_BIN:-}"
if [ -z "$bin" ]; then
  cargo build -q --locked -p threadline-cli --bin threadline
  bin="${CARGO_TARGET_DIR:-$PWD/target}/debug/threadline"
fi

work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# The request-rate limits are raised: schemathesis is a load of one client.
THREADLINE_RATE_LIMIT=100000 THREADLINE_RATE_BURST=100000 \
  "$bin" serve --data "$work/data" --listen 127.0.0.1:0 >"$work/server.out" 2>"$work/server.err" &
server_pid=$!
addr=""
for _ in $(seq 1 200); do
  addr="$(cat "$work/server.out" "$work/server.err" | sed -n 's|.*listening on http://\([0-9.:]*\).*|\1|p' | head -n1)"
  [ -n "$addr" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.err" >&2; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { echo "the server did not start" >&2; cat "$work/server.err" >&2; exit 1; }
echo "threadline on $addr" >&2

examples="${ST_MAX_EXAMPLES:-10}"
status=0
for role in user agent auditor; do
  token="$("$bin" token --data "$work/data" --sub "st-$role" --role "$role")"
  echo "== schemathesis as $role ($examples examples per operation)" >&2
  # /v1/ws is a WebSocket upgrade (plain HTTP gets its documented 400) and the
  # long poll on signals waits up to wait_ms: both stay in, with a timeout that fits.
  # Run from the temp dir: schemathesis keeps a cache in its working directory.
  (cd "$work" && "$venv/bin/st" run "http://$addr/openapi.json" \
    --header "Authorization: Bearer $token" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
    --phases examples,coverage,fuzzing \
    --max-examples "$examples" \
    ${ST_SEED:+--seed "$ST_SEED"} \
    --request-timeout 40 \
    --workers 1 \
    --suppress-health-check all \
    --report junit --report-dir "${ST_REPORT_DIR:-$work/report}/$role") \
    || status=1
done
if ! kill -0 "$server_pid" 2>/dev/null; then
  echo "the server died during the run" >&2
  cat "$work/server.err" >&2
  status=1
fi
if grep -q "panicked" "$work/server.err"; then
  echo "the server log shows a panic" >&2
  grep -A5 "panicked" "$work/server.err" >&2
  status=1
fi
exit "$status"

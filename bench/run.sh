#!/usr/bin/env bash
# Threadline's load harness: installs redis-server if missing, builds the
# server and the load tool in release, runs every scenario on loopback and
# prints one table (machine, figures, the Redis peer measured in the same run,
# ratio). Usage: bash bench/run.sh [--quick] [more threadline-bench flags]
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

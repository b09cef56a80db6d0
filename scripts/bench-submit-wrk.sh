#!/usr/bin/env bash
# Durable submissions per second with wrk (C, one thread) as the load generator instead of
# the in-process Rust clients of `baygrid bench submit`, so that more of the 2 cores go to the
# server. Starts `baygrid server` on a fresh SQLite (or the PostgreSQL URL given as $1, a new
# database beside it), creates a tenant, drives POST /api/v1/jobs for 15 s with 64
# connections, then checks that every 2xx answer left a job in the store.
# Needs: a release build, wrk (apt-get install wrk), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BAYGRID_BIN:-target/release/baygrid}
dir=$(mktemp -d)
source scripts/bench-lib.sh
port=$(free_port)
store=""
if [ "${1:-}" != "" ]; then
  db="baygrid_wrk_$(date +%s)"
  psql "$1" -qc "CREATE DATABASE $db" >/dev/null
  store="${1%/*}/$db"
fi
cat > "$dir/server.toml" <<CONF
listen = "127.0.0.1:$port"
data_dir = "$dir/data"
store = "$store"
sites_file = "sample"
schedule_interval = "1h"   # placement is not part of this figure
CONF
start_server "$port"
tenant_post_script wrk-lab "100000000.00 CNY" \
  '{"name":"bench","resources":{"accelerators":{"H800":1}},"command":"true","estimated_duration":"1m"}'
curl -sf "$BAYGRID_SERVER/healthz"; echo
wrk -t1 -c64 -d15s --latency -s "$dir/post.lua" "$BAYGRID_SERVER/api/v1/jobs" | tee "$dir/wrk.out"
sleep 1
stored=$(queued_jobs)
requests=$(awk '/requests in/ {print $1}' "$dir/wrk.out")
non2xx=$(awk '/Non-2xx/ {print $NF}' "$dir/wrk.out")
echo "requests answered: $requests (non-2xx: ${non2xx:-0}); jobs in the store: $stored"

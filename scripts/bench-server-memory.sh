#!/usr/bin/env bash
# Server memory with 10,000 nodes and 100,000 queued jobs. Starts `baygrid server` (release
# build) on a fresh SQLite store with the sample region scaled to 10,000 nodes (the six
# clusters' node counts raised; nothing else changed), fills the queue to 100,000 jobs with
# wrk, lets the scheduler run over the whole queue (`schedule_batch` as given, 10,000 by
# default; pass 100000 as $1 to consider every queued job each cycle), and prints the
# server's resident memory: now and at its peak (VmRSS, VmHWM from /proc).
# No agent is connected, so every job stays queued and each cycle quotes every job it reads.
# Needs: a release build, wrk, python3 with PyYAML.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BAYGRID_BIN:-target/release/baygrid}
batch=${1:-10000}
target=${JOBS:-100000}
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 - "$dir/sites.yaml" <<'PY'
import sys, yaml
sites = yaml.safe_load(open("config/sites.yaml"))
nodes = [2000, 2000, 2000, 2000, 1000, 1000]
for cluster, n in zip(sites["clusters"], nodes):
    cluster["nodes"] = n
assert sum(c["nodes"] for c in sites["clusters"]) == 10000
yaml.safe_dump(sites, open(sys.argv[1], "w"), allow_unicode=True)
PY
cat > "$dir/server.toml" <<CONF
listen = "127.0.0.1:$port"
data_dir = "$dir/data"
sites_file = "$dir/sites.yaml"
schedule_interval = "2s"
schedule_batch = $batch
CONF
BAYGRID_LOG=warn "$bin" server --config "$dir/server.toml" 2>"$dir/server.log" &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$dir"' EXIT
export BAYGRID_SERVER="http://127.0.0.1:$port" BAYGRID_DATA_DIR="$dir/data"
for _ in $(seq 1 100); do [ -s "$dir/data/operator.token" ] && curl -sf "$BAYGRID_SERVER/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
"$bin" party add mem-lab --jurisdiction CN --city guangzhou >/dev/null
"$bin" tenant add mem-lab --party mem-lab --budget "1000000000.00 CNY" >/dev/null
token=$("$bin" token issue --role tenant --subject mem-lab --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
cat > "$dir/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $token"
wrk.body = '{"name":"mem","resources":{"accelerators":{"H800":8}},"command":"train.sh","estimated_duration":"2h"}'
LUA
queued() { curl -sf "$BAYGRID_SERVER/metrics" | awk '/^baygrid_jobs\{state="queued"\}/ {print int($2)}'; }
rss() { awk '/^(VmRSS|VmHWM)/ {printf "%s %.1f MiB  ", $1, $2/1024}' /proc/$server/status; echo; }
echo "empty server: $(rss)"
while [ "$(queued)" -lt "$target" ]; do
  wrk -t1 -c64 -d5s -s "$dir/post.lua" "$BAYGRID_SERVER/api/v1/jobs" >/dev/null
  echo "queued: $(queued)  $(rss)"
done
echo "filled; letting the scheduler cycle over the queue for 20 s"
sleep 20
echo "nodes: 10000  queued jobs: $(queued)  schedule_batch: $batch"
echo "server: $(rss)"

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
source scripts/bench-lib.sh
port=$(free_port)
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
start_server "$port"
tenant_post_script mem-lab "1000000000.00 CNY" \
  '{"name":"mem","resources":{"accelerators":{"H800":8}},"command":"train.sh","estimated_duration":"2h"}'
rss() { awk '/^(VmRSS|VmHWM)/ {printf "%s %.1f MiB  ", $1, $2/1024}' /proc/$server/status; echo; }
echo "empty server: $(rss)"
while [ "$(queued_jobs)" -lt "$target" ]; do
  wrk -t1 -c64 -d5s -s "$dir/post.lua" "$BAYGRID_SERVER/api/v1/jobs" >/dev/null
  echo "queued: $(queued_jobs)  $(rss)"
done
echo "filled; letting the scheduler cycle over the queue for 20 s"
sleep 20
echo "nodes: 10000  queued jobs: $(queued_jobs)  schedule_batch: $batch"
echo "server: $(rss)"

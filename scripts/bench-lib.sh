# Shared by the server benchmarks (sourced): a `baygrid server` from the release build on a
# free port, a tenant with a token, and a wrk script that posts one job as that tenant.
# The caller sets `dir` (a scratch folder) and `bin` (the baygrid binary) first.

# A free TCP port on the loopback.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Starts the server on `$dir/server.toml` (log in `$dir/server.log`), stops it and removes
# `$dir` on exit, and waits until it answers. Sets `server` (its pid) and exports
# BAYGRID_SERVER and BAYGRID_DATA_DIR for the CLI.
start_server() {
  local port=$1
  BAYGRID_LOG=warn "$bin" server --config "$dir/server.toml" 2>"$dir/server.log" &
  server=$!
  trap 'kill $server 2>/dev/null; rm -rf "$dir"' EXIT
  export BAYGRID_SERVER="http://127.0.0.1:$port" BAYGRID_DATA_DIR="$dir/data"
  for _ in $(seq 1 100); do
    [ -s "$dir/data/operator.token" ] && curl -sf "$BAYGRID_SERVER/healthz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "the server did not answer; its log:" >&2
  cat "$dir/server.log" >&2
  return 1
}

# Makes party and tenant NAME (Guangzhou) with BUDGET, and writes `$dir/post.lua`, a wrk
# script that POSTs JOB_JSON to /api/v1/jobs as that tenant.
tenant_post_script() {
  local name=$1 budget=$2 job=$3 token
  "$bin" party add "$name" --jurisdiction CN --city guangzhou >/dev/null
  "$bin" tenant add "$name" --party "$name" --budget "$budget" >/dev/null
  token=$("$bin" token issue --role tenant --subject "$name" --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  cat > "$dir/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $token"
wrk.body = '$job'
LUA
}

# Jobs in the queue, from /metrics.
queued_jobs() {
  curl -sf "$BAYGRID_SERVER/metrics" | awk '/^baygrid_jobs\{state="queued"\}/ {print int($2)}'
}

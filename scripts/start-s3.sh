#!/usr/bin/env bash
# An S3-compatible server for the vault tests (moto's server, from PyPI), on loopback.
# Prints its endpoint on the last line. Idempotent: a running one is reused.
set -euo pipefail
port=${BAYGRID_S3_PORT:-9700}
endpoint="http://127.0.0.1:$port"
if ! python3 -c 'import moto.server' >/dev/null 2>&1; then
  python3 -m pip install -q 'moto[server]' >&2
fi
if ! curl -fsS -o /dev/null "$endpoint/moto-api/" 2>/dev/null; then
  nohup python3 -m moto.server -H 127.0.0.1 -p "$port" >/tmp/baygrid-s3.log 2>&1 &
  for _ in $(seq 1 100); do
    curl -fsS -o /dev/null "$endpoint/moto-api/" 2>/dev/null && break
    sleep 0.2
  done
fi
curl -fsS -o /dev/null "$endpoint/moto-api/" || { echo "the S3 server did not start (see /tmp/baygrid-s3.log)" >&2; exit 1; }
echo "$endpoint"

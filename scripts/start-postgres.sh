#!/usr/bin/env bash
# Starts the machine's PostgreSQL cluster (installing it when missing) and makes sure the
# `baygrid` role exists. Prints the admin URL the tests and benchmarks take as
# BAYGRID_TEST_POSTGRES_URL / BAYGRID_BENCH_POSTGRES_URL. No systemd: pg_ctlcluster.
set -euo pipefail

if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  echo "installing postgresql" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
fi

cluster=$(pg_lsclusters --no-header | awk 'NR==1 {print $1" "$2}')
if [ -z "$cluster" ]; then
  version=$(ls /usr/lib/postgresql | sort -n | tail -1)
  pg_createcluster "$version" main >&2
  cluster="$version main"
fi
set -- $cluster
version=$1 name=$2
port=$(pg_lsclusters --no-header | awk -v v="$version" -v n="$name" '$1==v && $2==n {print $3}')
status=$(pg_lsclusters --no-header | awk -v v="$version" -v n="$name" '$1==v && $2==n {print $4}')
if [ "$status" != "online" ]; then
  pg_ctlcluster "$version" "$name" start >&2
fi
for _ in $(seq 1 50); do
  if su postgres -c "psql -p $port -tAc 'SELECT 1'" >/dev/null 2>&1; then break; fi
  sleep 0.2
done
su postgres -c "psql -p $port -tAc \"SELECT 1 FROM pg_roles WHERE rolname = 'baygrid'\"" | grep -q 1 ||
  su postgres -c "psql -p $port -qc \"CREATE ROLE baygrid LOGIN SUPERUSER PASSWORD 'baygrid'\"" >&2
echo "postgres://baygrid:baygrid@127.0.0.1:$port/postgres"

#!/usr/bin/env bash
# The whole test suite: starts the services the tests need (PostgreSQL; munged, slurmctld
# and slurmd; moto's S3-compatible server for vaults), then runs every test of the
# workspace against SQLite, PostgreSQL, the real Slurm and S3, and prints one summary line.
set -euo pipefail
cd "$(dirname "$0")/.."

BAYGRID_TEST_POSTGRES_URL=$(scripts/start-postgres.sh)
export BAYGRID_TEST_POSTGRES_URL
echo "postgresql: $BAYGRID_TEST_POSTGRES_URL"
scripts/start-slurm.sh
BAYGRID_TEST_S3_ENDPOINT=$(scripts/start-s3.sh | tail -1)
export BAYGRID_TEST_S3_ENDPOINT
echo "s3: $BAYGRID_TEST_S3_ENDPOINT"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1); if ($(i) ~ /^ignored;?$/) s += $(i-1) } }
     END { printf "\ntests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
if grep -q "SKIPPING" "$log"; then
  echo "error: tests that need a service were skipped:" >&2
  grep "SKIPPING" "$log" >&2
  exit 1
fi
exit "$status"

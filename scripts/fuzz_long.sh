#!/usr/bin/env bash
# The long fuzz run the README's "Fuzzing and input guards" quotes: every target of tests/fuzz
# for CASES cases (default 100000), then a table of the figures.
#
#   scripts/fuzz_long.sh [CASES] [REPORT]      # REPORT defaults to target/fuzz-long.jsonl
#
# Each target appends one JSON line to REPORT (cases, accepted, refused, seconds, slowest case,
# peak memory of a case). Any panic, hang or oversized allocation fails the run with the case
# and a BOLERO_RANDOM_SEED to replay it. Scratch files go to /dev/shm when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
CASES=${1:-100000}
REPORT=${2:-target/fuzz-long.jsonl}
mkdir -p "$(dirname "$REPORT")"
: > "$REPORT"
[ -d /dev/shm ] && export TMPDIR=/dev/shm
export QLORA_FUZZ_CASES=$CASES QLORA_FUZZ_SECONDS=${QLORA_FUZZ_SECONDS:-36000}
export QLORA_FUZZ_REPORT=$PWD/$REPORT
start=$(date +%s)
cargo test --test fuzz fuzz_ -- --test-threads "${THREADS:-2}"
echo "fuzzed $CASES cases per target in $(( $(date +%s) - start )) s:"
python3 - "$REPORT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'target':<20}{'cases':>9}{'accepted':>10}{'refused':>9}{'seconds':>9}{'slowest ms':>12}{'peak MiB':>10}")
for r in sorted(rows, key=lambda r: r["target"]):
    print(f"{r['target']:<20}{r['cases']:>9}{r['accepted']:>10}{r['refused']:>9}{r['seconds']:>9.0f}{r['slowest_case_ms']:>12.1f}{r['peak_case_mib']:>10.1f}")
print(f"{'total':<20}{sum(r['cases'] for r in rows):>9}{sum(r['accepted'] for r in rows):>10}{sum(r['refused'] for r in rows):>9}")
PY

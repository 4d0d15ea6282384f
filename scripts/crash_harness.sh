#!/usr/bin/env bash
# The long crash-consistency run of issue 12 (its figures are in the README, "Reliability").
#
# Runs tests/crash.rs with a larger budget: `kill -9` of `qlora train` (tiny fixture, 6 steps,
# --save-steps 1) at KILLS moments — fault points inside every checkpoint, adapter, metrics and
# loss-curve write, and random delays — each followed by --resume until the run ends, every final
# adapter compared byte for byte with the uninterrupted run's and every checkpoint verified after
# every kill; then a bit flip and a truncation at every byte offset of the newest checkpoint's
# files, each of which must be refused naming the file and the newest valid checkpoint.
#
# Usage: scripts/crash_harness.sh [KILLS] (default 200); QLORA_CRASH_SEED picks the random moments.
set -euo pipefail
cd "$(dirname "$0")/.."
kills=${1:-200}
export QLORA_CRASH_KILLS=$kills QLORA_CRASH_CORRUPT=all QLORA_CRASH_SEED=${QLORA_CRASH_SEED:-2026}
cargo test --test crash -- --nocapture --test-threads 1 \
  kill_9_anywhere corrupt_checkpoints 2>&1 |
  grep -E 'crash harness:|corrupt checkpoints refused:|test result|panicked|FAILED'

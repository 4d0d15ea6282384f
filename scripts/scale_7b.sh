#!/usr/bin/env bash
# Scale test: quantize a Llama-2-7B-shaped checkpoint (random f16 weights, 13.5 GB) to NF4 on the
# CPU and report wall time, peak RSS and NF4 bytes.
#
#   scripts/scale_7b.sh                       # model under /tmp/qlora-7b, deleted afterwards
#   OUT=/dev/shm/qlora-7b scripts/scale_7b.sh  # tmpfs when the disk is short (needs ~14 GB of RAM)
#
# Environment:
#   OUT      where the random model goes (default /tmp/qlora-7b); removed at exit unless KEEP=1
#   CONFIG   config.json to mimic (default tests/fixtures/llama-2-7b-chat-hf/config.json)
#   SHARDS   shard count (default 2, as the real checkpoint)
#   QLORA    the qlora binary (default: this tree's release build)
#
# Steps: build; generate the model (timed); `qlora quantize --model M --output DIR` (blocksize
# 64, double quant, mmap pages released tensor by tensor) under /usr/bin/time -v.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/qlora-7b}
CONFIG=${CONFIG:-tests/fixtures/llama-2-7b-chat-hf/config.json}
SHARDS=${SHARDS:-2}
TARGET=${CARGO_TARGET_DIR:-target}
QLORA=${QLORA:-$TARGET/release/qlora}
LOG=${LOG:-$(mktemp -d /tmp/scale_7b.XXXXXX)}
NEED=$((13476839424 + 1000000000)) # f16 bytes of Llama-2-7B plus a margin

cleanup() {
    if [ "${KEEP:-0}" != 1 ]; then
        rm -rf "$OUT" "$OUT-nf4"
    fi
}
trap cleanup EXIT

if [ ! -x /usr/bin/time ]; then
    echo "installing GNU time" >&2
    apt-get install -y -q time >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q time >/dev/null; }
fi

echo "== build" >&2
cargo build --release --bin qlora --example make_random_llama

mkdir -p "$OUT"
avail=$(df --output=avail -B1 "$OUT" | tail -1)
fstype=$(df --output=fstype "$OUT" | tail -1)
if [ "$avail" -lt "$NEED" ]; then
    echo "only $((avail / 1000000000)) GB free on $(df --output=target "$OUT" | tail -1) for a ~14.5 GB model; set OUT elsewhere (e.g. /dev/shm/qlora-7b)" >&2
    exit 1
fi
if [ "$fstype" = tmpfs ]; then
    memavail=$(($(awk '/MemAvailable/ {print $2}' /proc/meminfo) * 1024))
    if [ "$memavail" -lt $((NEED + 6000000000)) ]; then
        echo "tmpfs: only $((memavail / 1000000000)) GB of memory available; need the model plus ~6 GB" >&2
        exit 1
    fi
fi

echo "== machine" | tee "$LOG/summary.txt"
{
    lscpu | grep 'Model name'
    nproc
    uptime
    echo "OUT=$OUT ($fstype)"
} | tee -a "$LOG/summary.txt"

echo "== generate ($CONFIG, $SHARDS shards) -> $OUT" | tee -a "$LOG/summary.txt"
/usr/bin/time -v "$TARGET/release/examples/make_random_llama" --config "$CONFIG" --out "$OUT" \
    --shards "$SHARDS" 2>"$LOG/gen.time" | tee -a "$LOG/summary.txt"
grep -E 'Elapsed|Maximum resident' "$LOG/gen.time" | tee -a "$LOG/summary.txt"
du -sb "$OUT" | tee -a "$LOG/summary.txt"

echo "== qlora quantize --model $OUT --output $OUT-nf4" | tee -a "$LOG/summary.txt"
/usr/bin/time -v "$QLORA" quantize --model "$OUT" --output "$OUT-nf4" \
    2>"$LOG/quantize.time" | tee -a "$LOG/summary.txt"
grep -E 'Elapsed|Maximum resident' "$LOG/quantize.time" | tee -a "$LOG/summary.txt"
du -sb "$OUT-nf4" | tee -a "$LOG/summary.txt"
echo "logs in $LOG" >&2

#!/usr/bin/env bash
# One LoRA training step (forward, backward, clip, AdamW) of a SmolLM2-135M-shaped model, r 16
# all-linear, 1 x 256 tokens, on the CPU: qlora (f32 base and NF4 base) next to PyTorch + PEFT
# (f32) in the same run with the same thread count. Prints both JSON lines and the time ratio.
#
#   scripts/bench_train_step.sh [THREADS] [STEPS]
#   PYTHON=/path/to/venv/bin/python scripts/bench_train_step.sh
# PyTorch + PEFT are skipped with a message when the Python interpreter cannot import them.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-$(nproc)}
STEPS=${2:-5}
PYTHON=${PYTHON:-python3}

cargo build --release --example train_step >/dev/null 2>&1 || cargo build --release --example train_step
BIN=target/release/examples/train_step
ours=$("$BIN" --threads "$THREADS" --steps "$STEPS" --quant none)
ours_nf4=$("$BIN" --threads "$THREADS" --steps "$STEPS" --quant nf4)
echo "$ours"
echo "$ours_nf4"
if "$PYTHON" -c "import torch, transformers, peft" 2>/dev/null; then
  ref=$("$PYTHON" scripts/bench_train_step.py --threads "$THREADS" --steps "$STEPS" 2>/dev/null | tail -1)
  echo "$ref"
  "$PYTHON" - "$ours" "$ours_nf4" "$ref" <<'PY'
import json, sys
o, q, r = (json.loads(s) for s in sys.argv[1:4])
print(f"\n| impl | base | median step (s) | peak RSS (MiB) |\n|---|---|---|---|")
for x, base in ((r, "f32"), (o, "f32"), (q, "NF4")):
    print(f"| {x['impl']} | {base} | {x['median_s']:.3f} | {x['peak_rss_mib']} |")
print(f"\nqlora/pytorch time ratio: f32 {o['median_s']/r['median_s']:.2f}, NF4 {q['median_s']/r['median_s']:.2f} "
      f"({o['threads']} threads, {o['seq']} tokens, r {o['rank']})")
PY
else
  echo "PyTorch + PEFT not importable by $PYTHON: reference skipped (set PYTHON=... to a venv with torch, transformers, peft)"
fi

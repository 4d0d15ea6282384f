#!/usr/bin/env bash
# Runs on the GPU machine (device tool) what scripts/gpu_bundle.sh built: the CUDA tests
# against the CPU spec, then the CUDA benches, then eval/generate end to end on the fixture
# model, CPU vs CUDA. Logs go to $OUT (or ./gpu-logs). Usage: bash scripts/gpu_run.sh [tests|bench|e2e|all]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-logs}"; mkdir -p "$out"
what="${1:-all}"
echo "commit $(cat .gpu/commit)" | tee "$out/info.txt"
# The test and bench binaries read fixtures under the repository path they were built in.
built_in=$(cat .gpu/manifest_dir)
if [[ ! -e $built_in/tests/fixtures ]]; then
  mkdir -p "$(dirname "$built_in")" && ln -sfn "$PWD" "$built_in"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee -a "$out/info.txt"
if [[ $what == tests || $what == all ]]; then
  ./.gpu/cuda_ops --nocapture --test-threads=1 2>&1 | tee "$out/tests.log"
fi
if [[ $what == e2e || $what == all ]]; then
  # eval and greedy generate on the fixture model, CPU vs CUDA: identical text, loss within
  # bf16 tolerance (the CUDA prefill multiplies in bf16).
  m=tests/fixtures/tiny/gqa
  {
    for dev in cpu cuda; do
      ./.gpu/qlora eval --model $m --dataset tests/fixtures/tiny/eval.jsonl --device $dev --json > "$out/eval-$dev.json"
      ./.gpu/qlora generate --model $m --prompt "Hello" --max-new-tokens 24 --temperature 0 --device $dev > "$out/gen-$dev.txt"
      echo "== $dev: $(cat "$out/eval-$dev.json")"
    done
    python3 - "$out" <<'PY'
import json, sys
o = sys.argv[1]
c, g = (json.load(open(f"{o}/eval-{d}.json")) for d in ("cpu", "cuda"))
rel = abs(c["loss"] - g["loss"]) / c["loss"]
same = open(f"{o}/gen-cpu.txt", "rb").read() == open(f"{o}/gen-cuda.txt", "rb").read()
print(f"eval loss cpu {c['loss']:.6f} cuda {g['loss']:.6f} rel diff {rel:.2e} ({'ok' if rel < 5e-3 else 'FAIL'})")
print(f"greedy generate identical: {same} ({'ok' if same else 'FAIL'})")
print(f"peak device memory {g.get('peak_device_mib')} MiB")
PY
  } 2>&1 | tee "$out/e2e.log"
fi
if [[ $what == bench || $what == all ]]; then
  ./.gpu/bench_cuda --bench --noplot 2>&1 | tee "$out/bench.log"
fi

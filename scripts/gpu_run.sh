#!/usr/bin/env bash
# Runs on the GPU machine (device tool) what scripts/gpu_bundle.sh built: `qlora check`, the CUDA
# tests (then the kernel checks once under compute-sanitizer memcheck and racecheck), a 30-step
# training run on GPU and CPU with the same seed and data (per-step losses compared, checkpoints
# resumed across devices), eval/generate CPU vs CUDA, and the benches. Each section has a time
# limit; `check tests sanitize train e2e` fits one device call of about 8 minutes, `bench` is a
# second one (about 4 minutes: ~110 kernel benches, the GEMMs up to M = 8192). `trainbench` (7B QLoRA training steps, qlora next to transformers + PEFT +
# bitsandbytes, about 3-5 minutes) is a call of its own and runs only when named (not in
# `all`); it needs `bash scripts/gpu_bundle.sh train`. `decode` (7B NF4 decode tokens/s and
# time to first token, qlora next to transformers + bitsandbytes generate, about 3-5 minutes)
# likewise, with `bash scripts/gpu_bundle.sh bench train`. Logs go to $OUT (or ./gpu-logs);
# summary.txt holds one verdict per section.
#
#   bash scripts/gpu_run.sh [all|check|tests|sanitize|train|e2e|bench|trainbench|decode]...
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-logs}"; mkdir -p "$out"
sections=("${@:-all}")
want() { [[ " ${sections[*]} " == *" all "* || " ${sections[*]} " == *" $1 "* ]]; }
named() { [[ " ${sections[*]} " == *" $1 "* ]]; }
verdict() { echo "$1: $2" | tee -a "$out/summary.txt"; }
q=./.gpu/qlora
# gpu_bundle.sh ships the binaries xz-compressed (the carry limit): unpack them once.
for z in .gpu/*.xz; do
  [[ -e $z ]] || continue
  { xz -d -f "$z" 2>/dev/null ||
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[1][:-3], "wb"))' "$z"; } &&
    rm -f "$z" && chmod +x "${z%.xz}"
done

echo "commit $(cat .gpu/commit)" | tee "$out/info.txt"
# The test and bench binaries read fixtures under the repository path they were built in.
built_in=$(cat .gpu/manifest_dir)
if [[ ! -e $built_in/tests/fixtures ]]; then
  mkdir -p "$(dirname "$built_in")" && ln -sfn "$PWD" "$built_in"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee -a "$out/info.txt"
# cuBLAS: the machine has no ~/.cache/qlora/cublas-13.0; torch's environment ships nvidia-cublas.
if [[ -z ${QLORA_CUDA_LIB_DIR:-} ]]; then
  for sp in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
    lib=$(ls "$sp"/nvidia/cu13/lib/libcublas.so.13 "$sp"/nvidia/cublas/lib/libcublas.so.* 2>/dev/null | head -n 1)
    if [[ -n $lib ]]; then export QLORA_CUDA_LIB_DIR=$(dirname "$lib"); break; fi
  done
fi
echo "QLORA_CUDA_LIB_DIR=${QLORA_CUDA_LIB_DIR:-<unset>}" | tee -a "$out/info.txt"

if want check; then
  timeout 90 $q check 2>&1 | tee "$out/check.log"
  verdict check "$([[ ${PIPESTATUS[0]} == 0 ]] && echo ok || echo FAIL)"
fi

if want tests; then
  timeout 180 ./.gpu/cuda_ops --nocapture --test-threads=1 2>&1 | tee "$out/tests.log"
  verdict tests "$([[ ${PIPESTATUS[0]} == 0 ]] && echo ok || echo FAIL) ($(grep -c '^test .* ok$' "$out/tests.log") passed)"
  # The memory plan (qlora train --dry-run) against the device meter, byte for byte.
  timeout 120 ./.gpu/plan plan_matches_the_cuda_meter --nocapture --test-threads=1 2>&1 | tee "$out/plan.log"
  verdict plan "$([[ ${PIPESTATUS[0]} == 0 ]] && ! grep -q '^skipping' "$out/plan.log" && echo ok || echo FAIL)"
fi

if want sanitize; then
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -n 1)
  if [[ -z $cs ]]; then
    verdict sanitize "SKIPPED (no compute-sanitizer)"
  else
    # memcheck over the kernel-level checks and the zero-row calls; racecheck (slower) over the
    # kernels that share memory between threads (tiles, reductions).
    timeout 150 "$cs" --tool memcheck --error-exitcode 99 ./.gpu/cuda_ops --test-threads=1 check_ zero_row 2>&1 | tail -n 40 > "$out/memcheck.log"
    m=${PIPESTATUS[0]}
    timeout 100 "$cs" --tool racecheck --error-exitcode 99 ./.gpu/cuda_ops --test-threads=1 check_flash check_nf4 check_training_ops check_adamw check_sample check_decode_attention 2>&1 | tail -n 40 > "$out/racecheck.log"
    r=${PIPESTATUS[0]}
    verdict sanitize "memcheck exit $m, racecheck exit $r ($([[ $m == 0 && $r == 0 ]] && echo ok || echo FAIL))"
  fi
fi

if want train; then
  # 30 steps on GPU and CPU with the same seed and data; then each device's checkpoint-10
  # resumed on the other device. Every step's loss must agree within 2 %.
  w=$(mktemp -d)
  models=(tests/fixtures/tiny/gqa)
  if python3 scripts/make_tiny_d64.py "$w/tiny-d64" > "$out/make_d64.log" 2>&1; then models+=("$w/tiny-d64"); fi
  {
    for m in "${models[@]}"; do
      tag=$(basename "$m")
      common=(--model "$m" --dataset tests/fixtures/guanaco-llama2-1k --max-rows 240 --max-seq-len 128
              --max-steps 30 --save-steps 10 --logging-steps 1 --seed 7 --lora-dropout 0.1
              --target-modules all-linear --learning-rate 1e-3 --warmup-steps 0)
      for dev in cuda cpu; do
        $q train "${common[@]}" --device $dev --output "$w/$tag-$dev" 2>&1 | tail -n 3
      done
      for pair in cuda:cpu cpu:cuda; do
        from=${pair%%:*}; to=${pair##*:}; d="$w/$tag-$from-then-$to"
        cp -r "$w/$tag-$from" "$d"
        rm -rf "$d/checkpoint-20" "$d/checkpoint-30" "$d/adapter_config.json" "$d/adapter_model.safetensors"
        $q train "${common[@]}" --device "$to" --output "$d" --resume 2>&1 | tail -n 2
      done
      python3 - "$w" "$tag" <<'PY'
import json, sys
w, tag = sys.argv[1], sys.argv[2]
def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"{w}/{tag}-{run}/metrics.jsonl"))}
ref = {d: losses(d) for d in ("cuda", "cpu")}
ok = len(ref["cuda"]) == 30 and len(ref["cpu"]) == 30
worst = max(abs(ref["cuda"][s] - ref["cpu"][s]) / ref["cpu"][s] for s in ref["cpu"])
print(f"{tag}: 30 steps, loss step 1 cpu {ref['cpu'][1]:.4f} cuda {ref['cuda'][1]:.4f}, "
      f"step 30 cpu {ref['cpu'][30]:.4f} cuda {ref['cuda'][30]:.4f}; worst per-step rel diff {worst:.2e}")
ok &= worst <= 0.02
for run in ("cuda-then-cpu", "cpu-then-cuda"):
    r = losses(run)
    wr = max(abs(r[s] - ref["cpu"][s]) / ref["cpu"][s] for s in range(11, 31))
    print(f"{tag}: {run} resumed at 10, steps 11-30 vs cpu: worst rel diff {wr:.2e}")
    ok &= len(r) == 30 and wr <= 0.02
print(f"{tag}: {'ok' if ok else 'FAIL'}")
PY
    done
  } 2>&1 | tee "$out/train30.log"
  verdict train "$(grep -E ': (ok|FAIL)$' "$out/train30.log" | tr '\n' ' ')"
  rm -rf "$w"
fi

if want e2e; then
  # eval and greedy generate on the fixture model, CPU vs CUDA: identical text, loss within
  # bf16 tolerance (the CUDA prefill multiplies in bf16).
  m=tests/fixtures/tiny/gqa
  {
    for dev in cpu cuda; do
      $q eval --model $m --dataset tests/fixtures/tiny/eval.jsonl --device $dev --json > "$out/eval-$dev.json"
      $q generate --model $m --prompt "Hello" --max-new-tokens 24 --temperature 0 --device $dev > "$out/gen-$dev.txt"
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
  verdict e2e "$(grep -c FAIL "$out/e2e.log") failures"
fi

if want bench; then
  timeout 300 ./.gpu/bench_cuda --bench --noplot --warm-up-time 0.5 --measurement-time 1.5 2>&1 | tee "$out/bench.log"
  verdict bench "exit ${PIPESTATUS[0]}"
fi
if named load; then
  # Load time of a Llama-2-7B-shaped f16 checkpoint onto the GPU with NF4 quantization there
  # (target ≤ 15 s): a random checkpoint written to /dev/shm (13.5 GB, page cache: a warm load),
  # then examples/load_time (load, linears and quantize seconds, peak device memory).
  m=/dev/shm/qlora-7b
  timeout 240 ./.gpu/make_random_llama --config tests/fixtures/llama-2-7b-chat-hf/config.json --out $m 2>&1 | tail -n 2
  timeout 120 ./.gpu/load_time --model $m --device cuda 2>&1 | tee "$out/load.log"
  verdict load "$(tail -n 1 "$out/load.log")"
  rm -rf $m
fi
if named trainbench; then
  # Llama-2-7B-shaped QLoRA training steps at 4 x 512 tokens: qlora (benches/train.rs: r8-qv and
  # r16-all, selective and full recompute) then transformers + PEFT + bitsandbytes
  # (scripts/bench_train_ref.py: the same adapters, gradient checkpointing on and off), one after
  # the other on the same GPU; then the side-by-side table and the estimated wall time of one
  # guanaco-llama2-1k epoch. bitsandbytes comes from the slim wheel gpu_bundle.sh put in .gpu/.
  # TRAINBENCH_REF_ARGS adds arguments to the reference (e.g. `--device cpu --tiny` for a dry run).
  site=$(mktemp -d)
  whl=$(ls .gpu/bitsandbytes-*.whl .whl/bitsandbytes-*.whl 2>/dev/null | head -n 1)
  if [[ -n $whl ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$whl" 2>&1 | tail -n 3
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if [[ -x ./.gpu/bench_train ]]; then
    timeout 240 ./.gpu/bench_train 2>&1 | tee "$out/trainbench-qlora.log"
    ours=${PIPESTATUS[0]}
  else
    echo "no .gpu/bench_train: run scripts/gpu_bundle.sh train" | tee "$out/trainbench-qlora.log"
    ours=missing
  fi
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 timeout 240 python3 scripts/bench_train_ref.py ${TRAINBENCH_REF_ARGS:-} 2>&1 | tee "$out/trainbench-ref.log"
  ref=${PIPESTATUS[0]}
  python3 - "$out/trainbench-qlora.log" "$out/trainbench-ref.log" <<'PY' | tee "$out/trainbench.md"
import json, sys
# guanaco-llama2-1k (tests/fixtures/guanaco-llama2-1k, 1000 rows) under the tutorial settings
# (max_seq_len 512, batch 4, 250 steps), counted with the Llama-2 tokenizer fixture as qlora's
# data pipeline tokenizes plain text (BOS once, EOS appended): 461,907 tokens in all, 299 rows
# truncated; 345,498 tokens after truncation (what qlora computes: packed, no padding).
# transformers pads each batch to its longest row: with group_by_length (HF's
# LengthGroupedSampler, megabatches of 50 x 4 sorted by length) that is 349,079 tokens
# (mean over 20 shuffles, 348,856-349,300).
EPOCH_TOKENS, EPOCH_TOKENS_PADDED = 345_498, 349_079
def rows(path):
    out = {}
    for line in open(path, errors="replace"):
        if line.startswith('{"impl"'):
            r = json.loads(line)
            out[r["config"]] = r
    return out
ours, ref = rows(sys.argv[1]), rows(sys.argv[2])
dev = next((r["device"] for r in list(ours.values()) + list(ref.values())), "?")
def tps(r):
    return r.get("tokens_per_s") if r else None
def fmt(v, f="{:.0f}"):
    return "-" if v is None else f.format(v)
print(f"\n## 7B QLoRA training, 4 x 512 tokens, on {dev}\n")
print("| adapter | qlora recompute | qlora tokens/s | qlora MFU | qlora peak MiB "
      "| reference GC | ref tokens/s | ref MFU | ref peak MiB | ratio |")
print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|")
for lora in ("r8-qv", "r16-all"):
    for mine, theirs in (("selective", "none"), ("full", "full")):
        o, r = ours.get(f"{lora}/{mine}"), ref.get(f"{lora}/{theirs}")
        if not o and not r:
            continue
        ratio = tps(o) / tps(r) if tps(o) and tps(r) else None
        print(f"| {lora} | {mine} | {fmt(tps(o))} | {fmt((o or {}).get('mfu'), '{:.1%}')} "
              f"| {fmt((o or {}).get('peak_device_mib'))} | {'on' if theirs == 'full' else 'off'} "
              f"| {fmt(tps(r))} | {fmt((r or {}).get('mfu'), '{:.1%}')} "
              f"| {fmt((r or {}).get('peak_device_mib'))} | {fmt(ratio, '{:.2f}x')} |")
for name, rs in (("qlora", ours), ("reference", ref)):
    for c, r in rs.items():
        if "error" in r:
            print(f"\n{name} {c} FAILED: {r['error']}")
print()
gc = tps(ref.get("r16-all/full"))
best = max((r for c, r in ours.items() if c.startswith("r16-all/") and tps(r)), key=tps, default=None)
if gc and best:
    ratio = tps(best) / gc
    print(f"target (r16-all, >= 2x the reference with gradient checkpointing): qlora {best['config']} "
          f"{tps(best):.0f} / {gc:.0f} tokens/s = {ratio:.2f}x ({'met' if ratio >= 2 else 'MISSED'})")
for mode, limit in (("full", 7e9), ("selective", 11e9)):
    r = ours.get(f"r16-all/{mode}")
    if r and r.get("peak_device_mib") is not None:
        b = r["peak_device_mib"] * 2**20
        print(f"target (r16-all {mode} peak <= {limit / 1e9:.0f} GB): {b / 1e9:.2f} GB "
              f"({'met' if b <= limit else 'MISSED'})")
def epoch(tokens, r):
    if not tps(r):
        return "-"
    s = tokens / tps(r)
    return f"{int(s // 60)} min {s % 60:02.0f} s ({r['config']}, {tps(r):.0f} tokens/s)"
print(f"guanaco-llama2-1k epoch, tutorial settings (r 8 q/v, 4 x <=512, 250 steps), estimated: "
      f"qlora {epoch(EPOCH_TOKENS, ours.get('r8-qv/selective'))}; "
      f"reference {epoch(EPOCH_TOKENS_PADDED, ref.get('r8-qv/full'))} "
      f"(tokens/s measured at 4 x 512; the epoch's rows average 345 tokens)")
PY
  r16=$(grep -o 'qlora r16-all/[a-z]* [0-9]* / [0-9]* tokens/s = [0-9.]*x' "$out/trainbench.md" | sed 's/.* = //')
  verdict trainbench "qlora exit $ours, reference exit $ref, r16-all qlora/reference ${r16:-n/a}"
  rm -rf "$site"
fi
if named decode; then
  # Llama-2-7B-shaped NF4 decode, batch 1: qlora (benches/cuda.rs decode group, QLORA_BENCH=decode:
  # tokens/s at 128 / 2,048 / 4,096 context without and with an r 64 adapter (adapter_r64: its
  # bf16 copies, as generate reads it; adapter_r64_f32: the unfrozen f32 one), and without CUDA
  # graphs (base_no_graph: every kernel launched from the host), fraction of the
  # bandwidth limit, time to first token of 512 tokens) then transformers + bitsandbytes 4-bit
  # generate (scripts/bench_decode_ref.py, same shapes), one after the other on the same GPU;
  # then the side-by-side table. Needs `bash scripts/gpu_bundle.sh bench train` (the bench binary
  # and the slim bitsandbytes wheel). DECODE_REF_ARGS adds arguments to the reference.
  site=$(mktemp -d)
  whl=$(ls .gpu/bitsandbytes-*.whl .whl/bitsandbytes-*.whl 2>/dev/null | head -n 1)
  if [[ -n $whl ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$whl" 2>&1 | tail -n 3
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  QLORA_BENCH=decode timeout 260 ./.gpu/bench_cuda --bench --noplot --warm-up-time 1 \
    --measurement-time 2 2>&1 | tee "$out/decode-qlora.log"
  ours=${PIPESTATUS[0]}
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 timeout 300 python3 scripts/bench_decode_ref.py ${DECODE_REF_ARGS:-} 2>&1 | tee "$out/decode-ref.log"
  ref=${PIPESTATUS[0]}
  python3 - "$out/decode-qlora.log" "$out/decode-ref.log" <<'PY' | tee "$out/decode.md"
import json, sys
def rows(path):
    out = {}
    for line in open(path, errors="replace"):
        if line.startswith('{"impl"'):
            r = json.loads(line)
            out[r["case"]] = r
    return out
ours, ref = rows(sys.argv[1]), rows(sys.argv[2])
dev = next((r["device"] for r in list(ours.values()) + list(ref.values())), "?")
f = lambda v, s="{:.1f}": "-" if v is None else s.format(v)
print(f"\n## 7B NF4 decode, batch 1, on {dev}\n")
print("| case | qlora tokens/s | qlora % of bandwidth limit | transformers+bnb tokens/s | ratio |")
print("|---|---:|---:|---:|---:|")
for tag in ("base", "base_no_graph", "adapter_r64", "adapter_r64_f32"):
    for ctx in (128, 2048, 4096):
        o, r = ours.get(f"{tag}/{ctx}", {}), ref.get(f"{tag}/{ctx}", {})
        a, b = o.get("tokens_per_s"), r.get("tokens_per_s")
        bw = o.get("bandwidth_frac")
        print(f"| {tag} @ {ctx} | {f(a)} | {f(None if bw is None else 100 * bw)} | {f(b)} "
              f"| {f(a / b if a and b else None, '{:.1f}x')} |")
t_o, t_r = ours.get("ttft/512", {}).get("ms"), ref.get("ttft/512", {}).get("ms")
print(f"\ntime to first token, 512-token prompt: qlora {f(t_o)} ms, transformers+bnb {f(t_r)} ms")
for c, r in ref.items():
    if "error" in r:
        print(f"reference {c} FAILED: {r['error']}")
b128, b4k = ours.get("base/128", {}).get("tokens_per_s"), ours.get("base/4096", {}).get("tokens_per_s")
r128 = ref.get("base/128", {}).get("tokens_per_s")
print(f"targets (H100): >= 600 tok/s at 128: {f(b128)}; >= 400 at 4096: {f(b4k)}; "
      f">= 10x the reference: {f(b128 / r128 if b128 and r128 else None, '{:.1f}x')}; "
      f"TTFT <= 30 ms: {f(t_o)}")
n128 = ours.get("base_no_graph/128", {}).get("tokens_per_s")
if n128 and b128:
    print(f"CUDA graph per step at 128 context: {b128 / n128:.2f}x the tokens/s of host-launched kernels")
a128 = ours.get("adapter_r64/128", {}).get("tokens_per_s")
if a128 and b128:
    print(f"adapter cost at 128 context: {100 * (b128 / a128 - 1):.1f}% of the base decode time (target < 10%)")
f128 = ours.get("adapter_r64_f32/128", {}).get("tokens_per_s")
if f128 and b128:
    print(f"(the same adapter read in f32, unfrozen: {100 * (b128 / f128 - 1):.1f}%)")
PY
  verdict decode "qlora exit $ours, reference exit $ref, $(grep -o 'targets (H100).*' "$out/decode.md")"
  rm -rf "$site"
fi

cat "$out/summary.txt"

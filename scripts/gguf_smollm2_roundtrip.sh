#!/usr/bin/env bash
# The real-model round trip of `qlora export` (issue #13): finetune the real SmolLM2-135M-Instruct
# briefly (CPU), export the merged model to an f32 GGUF, and require llama.cpp's greedy text to
# equal `qlora generate --adapter`'s for a few prompts (raw text and ChatML). Also exports the
# adapter alone (`--lora-only`) and requires llama.cpp to give the same text with it applied to
# the exported base, and the base alone to write something else for at least one prompt (the
# finetune matters). Not part of CI: it needs the model (../shared/scripts/make_smollm2.sh, ~25 s,
# offline) and llama-cpp-python (pinned in scripts/fixtures_gguf.py; e.g. /work/venv-gguf).
#
#   bash scripts/gguf_smollm2_roundtrip.sh [MODEL_DIR] [PYTHON]
#
# Prints one line per prompt and mode (`same` or `DIFFERENT` with both texts) and exits non-zero
# if any differs. About 2 minutes on 2 cores (the 12 training steps dominate).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-$HOME/.cache/qlora-test/smollm2-135m}
py=${2:-/work/venv-gguf/bin/python}
[[ -f $model/config.json ]] || bash ../shared/scripts/make_smollm2.sh
cargo build -q --release --features cuda --bin qlora
q=target/release/qlora
work=$(mktemp -d "${TMPDIR:-/tmp}/gguf_smollm2.XXXXXX")
trap 'rm -rf "$work"' EXIT

# A finetune that visibly moves the model: r 16 on every linear, lr 1e-3, 12 steps of 4 × 128.
$q train --model "$model" --dataset tests/fixtures/guanaco-llama2-1k --output "$work/adapter" \
  --max-rows 96 --max-seq-len 128 --max-steps 12 --learning-rate 1e-3 --lora-r 16 \
  --target-modules all-linear --logging-steps 4 2>&1 | tail -n 2
$q export --adapter "$work/adapter" --model "$model" --output "$work/merged.gguf" --dtype f32 | tail -n 1
$q export --model "$model" --output "$work/base.gguf" --dtype f32 | tail -n 1
$q export --adapter "$work/adapter" --model "$model" --lora-only --output "$work/lora.gguf" | tail -n 1

prompts=("The capital of France is"
  "### Human: Give me three tips for staying healthy. ### Assistant:"
  $'<|im_start|>user\nWhat is QLoRA?<|im_end|>\n<|im_start|>assistant\n')
n=40
fail=0
moved=0
for p in "${prompts[@]}"; do
  # qlora: f32 base (as exported), the adapter applied unmerged, greedy.
  ours=$($q generate --model "$model" --adapter "$work/adapter" --quant none --device cpu \
    --prompt "$p" --max-new-tokens $n --temperature 0 2>/dev/null)
  for mode in merged lora base; do
    theirs=$("$py" - "$work" "$mode" "$p" "$n" <<'EOF'
import sys
from llama_cpp import Llama
work, mode, prompt, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
kw = {"merged": dict(model_path=f"{work}/merged.gguf"),
      "lora": dict(model_path=f"{work}/base.gguf", lora_path=f"{work}/lora.gguf"),
      "base": dict(model_path=f"{work}/base.gguf")}[mode]
llm = Llama(n_ctx=512, n_threads=2, verbose=False, **kw)
ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
out = []
for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
    if tok == llm.token_eos() or len(out) == n:
        break
    out.append(tok)
sys.stdout.write(llm.detokenize(out).decode("utf-8", errors="replace"))
EOF
)
    if [[ $mode == base ]]; then
      # The adapter must matter: count prompts where the base alone writes something else.
      [[ $ours != "$theirs" ]] && moved=$((moved + 1))
      continue
    fi
    if [[ $ours == "$theirs" ]]; then
      echo "same ($mode): $(printf %q "$p") → $(printf %q "${ours:0:80}")…"
    else
      echo "DIFFERENT ($mode): $(printf %q "$p")"
      echo "  qlora:     $(printf %q "$ours")"
      echo "  llama.cpp: $(printf %q "$theirs")"
      fail=1
    fi
  done
done
echo "the finetune changed the greedy text of $moved of ${#prompts[@]} prompts (llama.cpp, base alone vs merged)"
[[ $moved -gt 0 ]] || fail=1
exit $fail

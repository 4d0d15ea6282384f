"""Writes a random Llama with head_dim 64 (the tensor-core attention path) and the tiny fixtures'
tokenizer, for the GPU-vs-CPU training comparison of scripts/gpu_run.sh (run on the GPU machine,
which has torch and transformers; nothing here is a test fixture or a runtime dependency).

    python3 scripts/make_tiny_d64.py OUT_DIR
"""
import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

out = Path(sys.argv[1])
src = Path(__file__).resolve().parent.parent / "tests/fixtures/tiny/gqa"
cfg = LlamaConfig(
    vocab_size=384, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(out, safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(src / f, out / f)
print(f"wrote {out}: head_dim {cfg.head_dim}, {sum(p.numel() for p in model.parameters())} parameters")

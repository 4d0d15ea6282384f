#!/usr/bin/env python3
"""Reference side of the `decode` group of `cargo bench --features cuda --bench cuda`
(benches/cuda.rs): batch-1 generation of transformers + bitsandbytes 4-bit on the same model
shapes, printing the same JSON lines (`{"impl": "transformers+bnb", "case": ...}`).

Model: LlamaForCausalLM from tests/fixtures/llama-2-7b-chat-hf/config.json (Llama-2-7B's exact
shapes) with random weights, built as scripts/bench_train_ref.py builds it (bf16 on the GPU, every
decoder projection replaced by a bitsandbytes NF4 `Linear4bit`: blocksize 64, double
quantization, bf16 compute dtype, as `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bfloat16)`
loads a checkpoint), SDPA attention, KV cache on (`use_cache=True`, transformers' DynamicCache).

Cases (as the Rust bench): decode tokens/s at 128, 2,048 and 4,096 context, without and with a
PEFT adapter (r 64, alpha 16, q/k/v/o/gate/up/down_proj, unmerged: what `--adapter` does), and
the time to first token of a 512-token prompt. Decode is timed through `model.generate` (greedy,
`min_new_tokens = max_new_tokens`, no early stop): the time of N + 1 new tokens minus the time of
1 new token (prefill + first token), over N, median of --repeats; TTFT is the median time of
`generate(prompt of 512, max_new_tokens=1)`. Each measurement ends with
`torch.cuda.synchronize()` (generate returns host-visible ids anyway).

Runs without a GPU only as a logic check: `--device cpu --tiny` (a 2-layer model).
On the GPU machine bitsandbytes is carried as a slim wheel (scripts/gpu_run.sh installs it).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_ref as tr  # noqa: E402  (build_model, check_quantized, CONFIG_7B, TINY)

CTXS = [128, 2048, 4096]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gen_secs(model, ids, new, device, repeats):
    """Median seconds of `generate(ids, new tokens)`, greedy, exactly `new` tokens."""
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, use_cache=True,
                                 pad_token_id=0)
        sync(device)
        times.append(time.perf_counter() - t0)
        assert out.shape[1] == ids.shape[1] + new, out.shape
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model (logic check)")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode tokens timed per case")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-adapter", action="store_true")
    args = ap.parse_args()
    cfg = json.loads(tr.CONFIG_7B.read_text())
    ctxs = CTXS
    if args.tiny:
        cfg.update(tr.TINY)
        ctxs = [16, 64]
    import bitsandbytes as bnb
    import peft
    import transformers

    device = args.device
    dev_name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    t0 = time.perf_counter()
    model = tr.build_model(cfg, device, args.tiny)
    tr.check_quantized(model, cfg["num_hidden_layers"])
    model.config.use_cache = True
    model.generation_config.pad_token_id = 0
    model.eval()
    sync(device)
    print(f"reference on {dev_name}: {'tiny' if args.tiny else '7B-shape'} NF4 model built in "
          f"{time.perf_counter() - t0:.1f} s (torch {torch.__version__}, transformers "
          f"{transformers.__version__}, peft {peft.__version__}, bitsandbytes {bnb.__version__})",
          file=sys.stderr)
    gen = torch.Generator().manual_seed(0)
    vocab = cfg["vocab_size"]

    def row(**kw):
        print(json.dumps({"impl": "transformers+bnb", "device": dev_name, **kw}), flush=True)

    prompt = torch.randint(0, vocab, (1, 512 if not args.tiny else 32), generator=gen).to(device)
    row(case=f"ttft/{prompt.shape[1]}", ms=1e3 * gen_secs(model, prompt, 1, device, args.repeats))

    variants = [("base", model)]
    if not args.no_adapter:
        lcfg = peft.LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                               bias="none", task_type="CAUSAL_LM")
        variants.append(("adapter_r64", None))
    for tag, m in variants:
        if m is None:
            m = peft.get_peft_model(model, lcfg)
            m.eval()
        for ctx in ctxs:
            ids = torch.randint(0, vocab, (1, ctx), generator=gen).to(device)
            try:
                one = gen_secs(m, ids, 1, device, args.repeats)
                many = gen_secs(m, ids, args.new_tokens + 1, device, args.repeats)
                per = (many - one) / args.new_tokens
                row(case=f"{tag}/{ctx}", tokens_per_s=1.0 / per, ms_per_token=1e3 * per,
                    new_tokens=args.new_tokens)
            except Exception as e:  # noqa: BLE001  (report and go on: one table row)
                row(case=f"{tag}/{ctx}", error=f"{type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""PyTorch + PEFT side of scripts/bench_train_step.sh: one LoRA training step (forward, backward,
clip_grad_norm_, AdamW) of a SmolLM2-135M-shaped LlamaForCausalLM with random weights, float32 on
the CPU, r 16 all-linear, 1 x 256 tokens. Prints one JSON object like examples/train_step.rs.

Pinned: torch 2.15.0, transformers 5.23.0, peft 0.21.2 (reference only; qlora never imports it).
"""
import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(**json.loads((ROOT / "benches" / "smollm2-135m.json").read_text()))
    model = LlamaForCausalLM(cfg).float()
    peft_cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, peft_cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    ids = torch.tensor([[(i * 7919 + 13) % cfg.vocab_size for i in range(a.seq)]])
    times, loss = [], float("nan")
    for s in range(a.steps + 1):
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        if s > 0:
            times.append(time.perf_counter() - t0)
    print(json.dumps({
        "impl": "pytorch+peft", "quant": "none", "threads": torch.get_num_threads(),
        "seq": a.seq, "rank": a.rank, "steps": a.steps,
        "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
        "loss": round(loss, 4),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "versions": {"torch": torch.__version__.split("+")[0],
                     "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__},
    }))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Reference side of `cargo bench --features cuda --bench train` (benches/train.rs): the same
LoRA training steps on transformers + PEFT + bitsandbytes, the stack of the guanaco-llama2-1k
QLoRA tutorial, printing the same JSON lines.

Model: LlamaForCausalLM built from tests/fixtures/llama-2-7b-chat-hf/config.json (Llama-2-7B's
exact shapes) with random weights, no download: constructed in bf16 on the GPU, then every
decoder projection replaced by a `bnb.nn.Linear4bit` (NF4, blocksize 64, double quantization =
`compress_statistics`, bf16 compute dtype) quantized on the GPU, as `BitsAndBytesConfig(
load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=torch.bfloat16)` loads a checkpoint. SDPA attention. Then what TRL's
`SFTTrainer` does with such a model: `peft.prepare_model_for_kbit_training` (freezes the base,
upcasts embeddings, norms and lm_head to fp32, enables gradient checkpointing, non-reentrant)
and `get_peft_model`. The forward runs under `torch.autocast(bfloat16)`, as the HF Trainer
does with `bf16=True` (`--no-autocast`: the tutorial's literal fp32 activations).

Configs (names as the Rust bench's; `full` = gradient checkpointing, `none` = without):
r8-qv (r 8, alpha 16, q_proj + v_proj: the tutorial) and r16-all (r 16, alpha 32,
target_modules="all-linear"), both with lora_dropout 0.1. A step: one micro-batch of 4 × 512
tokens (labels = input ids), backward, clip_grad_norm_ 0.3, bitsandbytes `PagedAdamW32bit`
(lr 2e-4, weight decay 0.001), zero_grad, then `torch.cuda.synchronize()`. Warm-up steps are
untimed (the first is validated: finite loss, finite non-zero gradient norm), then up to
--steps timed steps (fewer, at least 2, when they would outlast --budget-s).

Memory: `peak_device_mib` = `torch.cuda.max_memory_allocated()` since the config started plus
the optimizer states bitsandbytes keeps in paged (CUDA managed) memory, which PyTorch's
allocator does not see (bnb pages states of tensors of ≥ 1e5 elements); also reported
separately, with the allocator's reserved peak and the driver's `total − free`.

MFU: the formula of benches/train.rs's header (4·N_frozen + 6·N_lora per token plus causal
attention `6·L·q_dim·T²` per sequence, over the card's dense bf16 peak).

Runs without a GPU only as a logic check: `--device cpu --tiny` (a 2-layer model, 4 × 32
tokens; bitsandbytes' CPU path; torch's AdamW when the paged optimizer needs CUDA).

On the GPU machine bitsandbytes is carried as a slim wheel (scripts/gpu_run.sh installs it).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG_7B = ROOT / "tests" / "fixtures" / "llama-2-7b-chat-hf" / "config.json"
TINY = {  # --tiny: a Llama small enough for a CPU logic check
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 512,
}
LORAS = [  # name, r, alpha, target_modules (as benches/train.rs)
    ("r8-qv", 8, 16, ["q_proj", "v_proj"]),
    ("r16-all", 16, 32, "all-linear"),
]
RECOMPUTE = [("full", True), ("none", False)]  # name, gradient checkpointing
LR, WEIGHT_DECAY, MAX_GRAD_NORM, LORA_DROPOUT = 2e-4, 0.001, 0.3, 0.1
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def peak_flops(name):
    """Dense bf16 tensor-core peak of the card, FLOP/s (benches/train.rs's table)."""
    if os.environ.get("QLORA_PEAK_TFLOPS"):
        return float(os.environ["QLORA_PEAK_TFLOPS"]) * 1e12
    n = name.upper()
    if "H100" in n and "PCIE" in n:
        return 756e12
    if "H100" in n and "NVL" in n:
        return 835e12
    if "H100" in n or "H200" in n or "H800" in n:
        return 989.4e12
    if "A100" in n or "A800" in n:
        return 312e12
    return None


def step_flops(cfg, n_lora, lens):
    """(model FLOPs, of which attention) of one step: benches/train.rs's formula."""
    c, f, l, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hd = c // cfg["num_attention_heads"]
    qd, kvd = cfg["num_attention_heads"] * hd, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd
    n_frozen = l * (2 * c * qd + 2 * c * kvd + 3 * c * f) + v * c
    tokens = sum(lens)
    attn = sum(6.0 * l * qd * t * t for t in lens)
    return 4.0 * n_frozen * tokens + 6.0 * n_lora * tokens + attn, attn


def quantize_linears(model, compute_dtype, device):
    """Replaces every decoder projection by an NF4 `Linear4bit` (double quant, blocksize 64),
    quantized on `device`, freeing the 16-bit weight as it goes."""
    import bitsandbytes as bnb
    for layer in model.model.layers:
        for path in LINEARS:
            parent_name, name = path.split(".")
            parent = getattr(layer, parent_name)
            old = getattr(parent, name)
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=False,
                                    compute_dtype=compute_dtype, compress_statistics=True,
                                    quant_type="nf4", device="meta")
            new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, blocksize=64,
                                           compress_statistics=True, quant_type="nf4")
            new = new.to(device)  # quantizes (Params4bit.to → quantize_4bit)
            setattr(parent, name, new)
            del old
    # What transformers' bnb quantizer marks on a 4-bit model (peft and the Trainer read it).
    model.is_loaded_in_4bit = True
    return model


def check_quantized(model, n_layers):
    """Every decoder projection is a 4-bit NF4 weight with double-quantized blocks of 64."""
    import bitsandbytes as bnb
    lin = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    bad = [m for m in lin if not (m.weight.bnb_quantized and m.weight.quant_state.quant_type == "nf4"
                                  and m.weight.quant_state.nested and m.weight.quant_state.blocksize == 64)]
    if len(lin) != len(LINEARS) * n_layers or bad:
        raise RuntimeError(f"{len(lin)} Linear4bit modules ({len(bad)} not NF4/double-quant/64), "
                           f"expected {len(LINEARS) * n_layers}")
    return len(lin)


def build_model(cfg, device, tiny):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**cfg)
    config.use_cache = False
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return quantize_linears(model, torch.bfloat16, device)


def set_checkpointing(model, on):
    """Gradient checkpointing on (non-reentrant, as prepare_model_for_kbit_training set it up)
    or off, across transformers 5.x's method names."""
    if on:
        f = getattr(model, "gradient_checkpointing_enable", None) or model.activation_checkpointing_enable
        f(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        f = getattr(model, "gradient_checkpointing_disable", None) or model.activation_checkpointing_disable
        f()


def make_optimizer(params, device):
    """bitsandbytes' PagedAdamW32bit; torch's AdamW for the CPU logic check if bnb refuses."""
    import bitsandbytes as bnb
    try:
        return bnb.optim.PagedAdamW32bit(params, lr=LR, weight_decay=WEIGHT_DECAY), "bnb.PagedAdamW32bit"
    except Exception as e:  # noqa: BLE001 - only reachable without CUDA
        if device != "cpu":
            raise
        print(f"  PagedAdamW32bit unavailable on the CPU ({e}); torch AdamW instead", file=sys.stderr)
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY), "torch.AdamW (cpu check)"


def paged_bytes(opt):
    """Bytes of optimizer state bitsandbytes keeps in paged (managed) memory."""
    total = 0
    for st in getattr(opt, "state", {}).values():
        for t in st.values() if isinstance(st, dict) else []:
            if torch.is_tensor(t) and getattr(t, "is_paged", False):
                total += t.numel() * t.element_size()
    return total


def run_config(model, cfg, name, gc, args, ids, autocast):
    is_cuda = args.device.startswith("cuda")
    set_checkpointing(model, gc)
    model.train()
    if bool(getattr(model, "is_gradient_checkpointing", gc)) != gc:
        raise RuntimeError(f"gradient checkpointing did not turn {'on' if gc else 'off'}")
    params = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in params)
    opt, opt_name = make_optimizer(params, args.device)
    if is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def step():
        t0 = time.perf_counter()
        with autocast:
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss, norm = out.loss.item(), float(norm)
        if is_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise RuntimeError(f"loss {loss}, gradient norm {norm} (not finite)")
        return dt, loss, norm

    dt, loss_first, norm_first = step()
    if norm_first <= 0:
        raise RuntimeError(f"step 1: gradient norm {norm_first}: no gradient reached the adapters")
    print(f"  step 1 (warm-up, validated): {dt:.3f} s, loss {loss_first:.4f}, gradient norm {norm_first:.4e}",
          file=sys.stderr)
    loss_last = loss_first
    for _ in range(1, args.warmup):
        dt, loss_last, _ = step()
    n = max(2, min(max(args.steps, 2), int(args.budget_s / dt)))
    times = []
    for _ in range(n):
        t, loss_last, _ = step()
        times.append(t)
    lens = [ids.shape[1]] * ids.shape[0]
    flops, attn = step_flops(cfg, n_lora, lens)
    med = statistics.median(times)
    peak = peak_flops(torch.cuda.get_device_name()) if is_cuda else None
    paged = paged_bytes(opt)
    mib = 1 << 20
    rec = {
        "warmup": args.warmup, "steps": n,
        "step_s": round(med, 4), "step_s_min": round(min(times), 4),
        "tokens_per_s": round(sum(lens) / med, 1),
        "mfu": round(flops / (med * peak), 4) if peak else None,
        "model_tflop_per_step": round(flops / 1e12, 3), "attn_tflop_per_step": round(attn / 1e12, 3),
        "peak_tflops": peak / 1e12 if peak else None,
        "loss_first": round(loss_first, 4), "loss_last": round(loss_last, 4), "grad_norm_first": norm_first,
        "trainable_params": n_lora, "optimizer": opt_name,
    }
    if is_cuda:
        free, total = torch.cuda.mem_get_info()
        rec.update({
            "peak_device_mib": round((torch.cuda.max_memory_allocated() + paged) / mib),
            "torch_peak_allocated_mib": round(torch.cuda.max_memory_allocated() / mib),
            "torch_peak_reserved_mib": round(torch.cuda.max_memory_reserved() / mib),
            "paged_state_mib": round(paged / mib, 1),
            "driver_used_mib": round((total - free) / mib),
        })
    print(f"  {n} timed steps: median {med:.3f} s, {sum(lens) / med:.0f} tokens/s"
          + (f", MFU {100 * rec['mfu']:.1f} %" if rec["mfu"] else "")
          + (f", peak {rec['peak_device_mib']} MiB" if is_cuda else ""), file=sys.stderr)
    del opt
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model at 4 x 32 tokens (logic check)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (512; 32 with --tiny)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=25.0)
    ap.add_argument("--no-autocast", action="store_true", help="fp32 activations (the tutorial's literal setting)")
    ap.add_argument("configs", nargs="*", help="run only configs whose name contains one of these")
    args = ap.parse_args()
    seq = args.seq or (32 if args.tiny else 512)
    cfg = json.loads(CONFIG_7B.read_text())
    if args.tiny:
        cfg.update(TINY)
    import bitsandbytes as bnb
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    device = args.device
    dev_name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    t0 = time.perf_counter()
    model = build_model(cfg, device, args.tiny)
    n_nf4 = check_quantized(model, cfg["num_hidden_layers"])
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    print(f"reference on {dev_name}: {'tiny' if args.tiny else '7B-shape'} NF4 model built in {build_s:.1f} s "
          f"(torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"bitsandbytes {bnb.__version__})", file=sys.stderr)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, seq), generator=gen).to(device)
    autocast = (torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                               enabled=not args.no_autocast))
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "bitsandbytes": bnb.__version__}
    failed = 0
    for lname, r, alpha, targets in LORAS:
        todo = [(f"{lname}/{rn}", gc) for rn, gc in RECOMPUTE]
        todo = [t for t in todo if not args.configs or any(f in t[0] for f in args.configs)]
        if not todo:
            continue
        lcfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=LORA_DROPOUT, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM")
        pm = get_peft_model(model, lcfg)
        for name, gc in todo:
            print(f"{name}: r {r}, alpha {alpha}, {targets}, {args.batch} x {seq} tokens, "
                  f"gradient checkpointing {'on' if gc else 'off'}", file=sys.stderr)
            base = {
                "impl": "transformers+peft+bnb", "config": name, "lora_r": r, "lora_alpha": alpha,
                "targets": targets if isinstance(targets, list) else [targets],
                "recompute": name.split("/")[1], "batch": args.batch, "seq_len": seq,
                "tokens_per_step": args.batch * seq, "device": dev_name, "build_s": round(build_s, 1),
                "autocast_bf16": not args.no_autocast,
                "attn_implementation": getattr(model.config, "_attn_implementation", None),
                "nf4_linears": n_nf4, "lm_head_dtype": str(model.lm_head.weight.dtype).replace("torch.", ""),
                "versions": versions,
            }
            try:
                base.update(run_config(pm, cfg, name, gc, args, ids, autocast))
            except Exception as e:  # noqa: BLE001 - reported in the JSON line, run goes on
                failed += 1
                print(f"  FAILED: {type(e).__name__}: {e}", file=sys.stderr)
                base["error"] = f"{type(e).__name__}: {e}"
            print(json.dumps(base), flush=True)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        model = pm.unload()  # the base model back, without the adapter
        if hasattr(model, "peft_config"):
            del model.peft_config
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

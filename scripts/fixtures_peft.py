#!/usr/bin/env python3
"""Golden PEFT / optimizer / schedule fixtures for `tests/adapter.rs` and `tests/optim.rs`.

Pinned versions (asserted at start; install into a venv outside the repo):
    torch==2.15.0  transformers==5.23.0  peft==0.21.2  safetensors==0.8.0  numpy==2.4.6
    /work/venv-fixtures/bin/pip install peft==0.21.2     # on top of requirements-fixtures.txt
    /work/venv-fixtures/bin/python scripts/fixtures_peft.py [--out tests/fixtures/peft]

Everything runs on CPU in float32, single-threaded, from fixed seeds (two runs give identical
tensors). Output under --out:

    gqa-lora/                    PEFT `save_pretrained` of a LoRA on tests/fixtures/tiny/gqa
                                 (r 4, alpha 8, q_proj,v_proj,down_proj, dropout 0; A as PEFT
                                 initializes it, B overwritten with seeded N(0, 0.05²) so the
                                 adapter changes the output): adapter_config.json,
                                 adapter_model.safetensors (f32)
    gqa-lora/golden.safetensors  logits.{i}  f32 [T, V]  PeftModel logits, 3 prompts of
                                             tiny/gqa/golden.json (eval mode)
                                 loss.0      f32 []      mean next-token cross-entropy, prompt 0
                                 grad.<key>  f32         d loss.0 / d <key> for every key of
                                             adapter_model.safetensors
                                 merged.{i}  f32 [T, V]  logits after `merge_and_unload()`
    gqa-all-linear-rslora/       PEFT `save_pretrained` with target_modules="all-linear",
                                 use_rslora, r 2, alpha 16; lora weights saved as bf16
    adamw.json                   torch.optim.AdamW (foreach=False: `_single_tensor_adam`, the CPU
                                 default) for 5 steps on 2 seeded tensors with seeded gradients,
                                 plus one `clip_grad_norm_` case
    schedules.json               lr per optimizer step from transformers'
                                 get_{constant,linear,cosine}_schedule_with_warmup as the HF
                                 Trainer steps them, and TrainingArguments.get_warmup_steps cases

    --check-qlora DIR            instead: load the adapter in DIR (written by qlora) with PEFT onto
                                 tests/fixtures/tiny/gqa and write DIR/peft_check.safetensors with
                                 logits.{i} for the 3 golden prompts (or --check-out PATH).
    --check-merged DIR           instead: load the model folder DIR (written by `qlora merge`) with
                                 transformers and write DIR/transformers_check.safetensors with
                                 logits.{i} for the 3 golden prompts (or --check-out PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny" / "gqa"
# The base model path recorded in adapter_config.json (relative to the repo root).
TINY_REL = "tests/fixtures/tiny/gqa"

PINS = {
    "torch": "2.15.0",
    "transformers": "5.23.0",
    "peft": "0.21.2",
    "safetensors": "0.8.0",
    "numpy": "2.4.6",
}


def check_versions() -> dict:
    import numpy
    import peft
    import safetensors
    import torch
    import transformers

    got = {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
    }
    for k, v in PINS.items():
        if got[k] != v:
            sys.exit(f"{k}: pinned {v}, installed {got[k]}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    return got


def load_base():
    import torch
    from transformers import LlamaForCausalLM

    # Load through the relative path so PEFT records it as base_model_name_or_path.
    os.chdir(ROOT)
    model = LlamaForCausalLM.from_pretrained(TINY_REL, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def prompts() -> list[list[int]]:
    return json.loads((TINY / "golden.json").read_text())["prompts"]


def logits_of(model) -> dict:
    import torch

    out = {}
    with torch.no_grad():
        for i, ids in enumerate(prompts()):
            x = torch.tensor([ids], dtype=torch.long)
            out[f"logits.{i}"] = model(input_ids=x).logits[0].float().contiguous()
    return out


def peft_key(param_name: str) -> str:
    """PeftModel parameter name -> key in adapter_model.safetensors (adapter name removed)."""
    return param_name.replace(".default.", ".")


def gen_gqa_lora(out: Path, versions: dict) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    torch.manual_seed(1234)
    model = load_base()
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "down_proj"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.05)
    pm.eval()
    d = out / "gqa-lora"
    if d.exists():
        shutil.rmtree(d)
    pm.save_pretrained(str(d))
    (d / "README.md").unlink()  # PEFT's generated model card; not needed
    saved = load_file(str(d / "adapter_model.safetensors"))

    golden = logits_of(pm)

    # Gradient of the mean next-token loss on prompt 0 w.r.t. every LoRA parameter.
    pm.zero_grad()
    ids = torch.tensor([prompts()[0]], dtype=torch.long)
    loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    golden["loss.0"] = loss.detach().float().reshape(())
    for name, p in pm.named_parameters():
        if p.requires_grad:
            key = peft_key(name)
            assert key in saved, (key, sorted(saved))
            golden[f"grad.{key}"] = p.grad.detach().float().contiguous()
    assert len([k for k in golden if k.startswith("grad.")]) == len(saved)

    merged = pm.merge_and_unload()
    for k, v in logits_of(merged).items():
        golden[k.replace("logits.", "merged.")] = v
    save_file(golden, str(d / "golden.safetensors"), metadata={"versions": json.dumps(versions)})


def gen_all_linear(out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(4321)
    model = load_base()
    cfg = LoraConfig(
        r=2,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules="all-linear",
        use_rslora=True,
        bias="none",
        task_type="CAUSAL_LM",
    )
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                p.data = p.data.to(torch.bfloat16)
    d = out / "gqa-all-linear-rslora"
    if d.exists():
        shutil.rmtree(d)
    pm.save_pretrained(str(d))
    (d / "README.md").unlink()


def gen_adamw(out: Path, versions: dict) -> None:
    import torch

    hyper = {"lr": 2e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.001}
    g = torch.Generator().manual_seed(2024)
    shapes = [(7,), (3, 11)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    p0 = [p.detach().clone().flatten().tolist() for p in params]
    opt = torch.optim.AdamW(
        params,
        lr=hyper["lr"],
        betas=(hyper["beta1"], hyper["beta2"]),
        eps=hyper["eps"],
        weight_decay=hyper["weight_decay"],
        foreach=False,
    )
    grads, after = [], []
    for step in range(5):
        # Gradients of varying scale, some exactly zero, so eps and bias correction matter.
        gs = [torch.randn(s, generator=g) * (10.0 ** (step - 2)) for s in shapes]
        gs[0][step % 7] = 0.0
        for p, gr in zip(params, gs):
            p.grad = gr.clone()
        opt.step()
        grads.append([gr.flatten().tolist() for gr in gs])
        after.append([p.detach().flatten().tolist() for p in params])
    states = [opt.state[p] for p in params]

    # clip_grad_norm_ on two tensors whose total norm exceeds max_norm, and one that does not.
    cg = [torch.randn((5,), generator=g) * 3.0, torch.randn((2, 4), generator=g)]
    before = [t.flatten().tolist() for t in cg]
    ps = [torch.nn.Parameter(torch.zeros_like(t)) for t in cg]
    for p, t in zip(ps, cg):
        p.grad = t.clone()
    total = torch.nn.utils.clip_grad_norm_(ps, max_norm=1.0)
    clip = {
        "max_norm": 1.0,
        "grads": before,
        "total_norm": float(total),
        "clipped": [p.grad.flatten().tolist() for p in ps],
    }
    doc = {
        "note": "torch.optim.AdamW(foreach=False) reference; params/grads flattened row-major, f32 values as f64",
        "hyper": hyper,
        "shapes": [list(s) for s in shapes],
        "params0": p0,
        "grads": grads,
        "params": after,
        "exp_avg": [s["exp_avg"].flatten().tolist() for s in states],
        "exp_avg_sq": [s["exp_avg_sq"].flatten().tolist() for s in states],
        "step": [float(s["step"]) for s in states],
        "clip": clip,
        "versions": versions,
    }
    (out / "adamw.json").write_text(json.dumps(doc, indent=1) + "\n")


def gen_schedules(out: Path, versions: dict) -> None:
    import torch
    from transformers import TrainingArguments
    from transformers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    base_lr = 2e-4
    cases = []
    for kind in ["constant", "linear", "cosine"]:
        for warmup, total in [(0, 10), (3, 10), (10, 10), (5, 23), (1, 1)]:
            p = torch.nn.Parameter(torch.zeros(1))
            opt = torch.optim.SGD([p], lr=base_lr)
            if kind == "constant":
                sched = get_constant_schedule_with_warmup(opt, warmup)
            elif kind == "linear":
                sched = get_linear_schedule_with_warmup(opt, warmup, total)
            else:
                sched = get_cosine_schedule_with_warmup(opt, warmup, total)
            lrs = []
            # As the HF Trainer: optimizer step k uses the lr set after k scheduler steps.
            for _ in range(total + 2):
                lrs.append(opt.param_groups[0]["lr"])
                opt.step()
                sched.step()
            cases.append({"kind": kind, "warmup_steps": warmup, "total_steps": total, "lrs": lrs})
    warm = []
    for ratio, total in [(0.03, 100), (0.03, 1000), (0.1, 7), (0.0, 50), (0.5, 3), (0.03, 1875)]:
        w = TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=ratio), total)
        warm.append({"ratio": ratio, "total_steps": total, "warmup_steps": w})
    doc = {"base_lr": base_lr, "schedules": cases, "warmup_from_ratio": warm, "versions": versions}
    (out / "schedules.json").write_text(json.dumps(doc, indent=1) + "\n")


def check_qlora(adapter_dir: Path, out_path: Path | None) -> None:
    """Loads an adapter written by qlora with PEFT and records PEFT's logits for it."""
    from peft import PeftModel
    from safetensors.torch import save_file

    adapter_dir = adapter_dir.resolve()
    model = load_base()
    pm = PeftModel.from_pretrained(model, str(adapter_dir))
    pm.eval()
    out = out_path or adapter_dir / "peft_check.safetensors"
    save_file(logits_of(pm), str(out))
    print(f"wrote {out}")


def check_merged(model_dir: Path, out_path: Path | None) -> None:
    """Loads a model folder written by `qlora merge` with transformers and records its logits."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model_dir = model_dir.resolve()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    out = out_path or model_dir / "transformers_check.safetensors"
    save_file(logits_of(model), str(out))
    print(f"wrote {out}")


def main() -> None:
    # PEFT writes an expanded `all-linear` target list from a Python set: pin the string hash
    # seed so the order (and so the file) is the same on every run.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "peft")
    ap.add_argument("--check-qlora", type=Path, metavar="DIR", help="load DIR with PEFT, record logits")
    ap.add_argument("--check-merged", type=Path, metavar="DIR",
                    help="load the model folder DIR (from `qlora merge`) with transformers, record logits")
    ap.add_argument("--check-out", type=Path, help="output file for --check-qlora / --check-merged")
    args = ap.parse_args()
    versions = check_versions()
    if args.check_qlora:
        check_qlora(args.check_qlora, args.check_out)
        return
    if args.check_merged:
        check_merged(args.check_merged, args.check_out)
        return
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    gen_gqa_lora(out, versions)
    gen_all_linear(out)
    gen_adamw(out, versions)
    gen_schedules(out, versions)


if __name__ == "__main__":
    main()

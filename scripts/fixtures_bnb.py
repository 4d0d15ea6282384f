#!/usr/bin/env python3
"""bitsandbytes 4-bit (NF4) checkpoint fixtures for `tests/bnb.rs`, and the interop check of our
writer (`qlora::quant::bnb::quantize_checkpoint`).

Pinned versions (asserted at start; install into a venv outside the repo):
    torch==2.15.0 bitsandbytes==0.50.2 transformers==5.23.0 accelerate==1.15.0
    safetensors==0.8.0 numpy==2.4.6 tokenizers==0.23.3
    python3 -m venv /work/venv-nf4
    /work/venv-nf4/bin/pip install torch==2.15.0 bitsandbytes==0.50.2 transformers==5.23.0 \
        accelerate==1.15.0 safetensors==0.8.0 numpy==2.4.6 tokenizers==0.23.3

Usage:
    python scripts/fixtures_bnb.py                      # writes tests/fixtures/bnb/{gqa-bnb4,tied-bnb4-nodq}
    python scripts/fixtures_bnb.py --qlora-out tests/fixtures/bnb/gqa-qlora-nf4
                                                        # checks a folder our Rust writer made,
                                                        # writes tests/fixtures/bnb/interop.json

Everything runs on CPU with one thread. bnb's AVX512-BF16 repacking of 4-bit weights on the first
CPU forward is switched off (it asserts out_features % 32 == 0, false for the 172-row gate/up
projections here); the generic CPU `matmul_4bit` runs instead. For each (source, output, double quant):
  - the f32 tiny model tests/fixtures/tiny/<source> is loaded by transformers with
    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=<dq>, bnb_4bit_compute_dtype=torch.float32) and written with
    save_pretrained (model.safetensors, config.json, generation_config.json); the tokenizer files
    are copied from the source;
  - the saved folder is loaded back (from_pretrained of the pre-quantized checkpoint, eager
    attention) and its logits for the 3 prompts of tests/fixtures/tiny/<source>/golden.json are
    written to golden.safetensors as `logits.{i}` (f32 [T, V]), computed with every Linear4bit
    replaced by an f32 Linear holding the *reference* dequantization (NF4[code] * absmax of the
    block of the flat index: bnb's default-backend formula and what its CUDA kernel computes);
  - golden.json records max |bnb's own CPU 4-bit forward - logits.{i}|. For gqa-bnb4 (double
    quant) it is exactly 0: logits.{i} are transformers' own 4-bit logits. For tied-bnb4-nodq it
    is large: on an AVX-512 host bnb 0.50.2's CPU dequantize of an f32 absmax indexes absmax per
    row, wrong whenever blocks cross row boundaries (in_features 48, blocksize 64), so there the
    reference is the only trustworthy value.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

PINS = {
    "torch": "2.15.0",
    "bitsandbytes": "0.50.2",
    "transformers": "5.23.0",
    "accelerate": "1.15.0",
    "safetensors": "0.8.0",
    "numpy": "2.4.6",
    "tokenizers": "0.23.3",
}

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny"
OUT = ROOT / "tests" / "fixtures" / "bnb"
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]

# (source model under tests/fixtures/tiny, output folder under tests/fixtures/bnb, double quant)
MODELS = [("gqa", "gqa-bnb4", True), ("tied", "tied-bnb4-nodq", False)]


def check_versions() -> dict:
    import accelerate
    import bitsandbytes
    import numpy
    import safetensors
    import tokenizers
    import torch
    import transformers

    got = {
        "torch": torch.__version__.split("+")[0],
        "bitsandbytes": bitsandbytes.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
        "tokenizers": tokenizers.__version__,
    }
    for k, v in PINS.items():
        assert got[k] == v, f"{k}: pinned {v}, installed {got[k]}"
    return got


os.environ.setdefault("OMP_NUM_THREADS", "1")
VERSIONS = check_versions()

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

torch.set_num_threads(1)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def bnb_config(dq: bool) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=dq,
        bnb_4bit_compute_dtype=torch.float32,
    )


def load_4bit(path: Path, quantization_config=None):
    kw = {"attn_implementation": "eager"}
    if quantization_config is not None:
        kw["quantization_config"] = quantization_config
    model = AutoModelForCausalLM.from_pretrained(str(path), **kw)
    model.eval()
    # bnb 0.50.2 on a CPU with AVX512-BF16 repacks each 4-bit weight on the first forward into a
    # layout that needs out_features % 32 == 0 (it asserts; gate/up_proj here have 172 rows).
    # Turn that path off: the forward then runs bnb's generic CPU matmul_4bit.
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def reference_dequant(weight) -> torch.Tensor:
    """NF4[code] * absmax[flat_index // blocksize], f32, from a bnb Params4bit."""
    qs = weight.quant_state
    absmax = qs.absmax
    if qs.nested:
        s2 = qs.state2
        q = absmax.to(torch.int64)
        nb = s2.blocksize
        dq = s2.code[q] * s2.absmax.repeat_interleave(nb)[: q.numel()]
        absmax = dq + qs.offset
    packed = weight.data.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).to(torch.int64)
    n = 1
    for d in qs.shape:
        n *= d
    codes = codes[:n]
    scale = absmax.float().repeat_interleave(qs.blocksize)[:n]
    return (qs.code.float()[codes] * scale).reshape(qs.shape)


def reference_model(model4):
    """A copy of the 4-bit model's forward with every Linear4bit an f32 Linear of its reference
    dequantization."""
    import bitsandbytes as bnb

    for name, mod in list(model4.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = reference_dequant(child.weight)
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=False)
                lin.weight.data = w
                setattr(mod, cname, lin)
    return model4


@torch.no_grad()
def logits_for(model, prompts) -> list[torch.Tensor]:
    return [model(torch.tensor([ids])).logits[0].float().contiguous() for ids in prompts]


def make_model(src: str, out_name: str, dq: bool) -> None:
    src_dir = TINY / src
    out = OUT / out_name
    if out.exists():
        shutil.rmtree(out)
    model = load_4bit(src_dir, bnb_config(dq))
    model.save_pretrained(str(out))
    for f in TOKENIZER_FILES:
        if (src_dir / f).exists():
            shutil.copy(src_dir / f, out / f)
    golden_src = json.loads((src_dir / "golden.json").read_text())
    prompts = golden_src["prompts"]

    m4 = load_4bit(out)
    bnb_cpu = logits_for(m4, prompts)
    ref = logits_for(reference_model(m4), prompts)
    tensors = {f"logits.{i}": r for i, r in enumerate(ref)}
    diffs = [float((a - b).abs().max()) for a, b in zip(bnb_cpu, ref)]
    save_file(tensors, str(out / "golden.safetensors"), metadata={"format": "pt"})
    write_json(out / "golden.json", {
        "note": "Logits of the pre-quantized 4-bit checkpoint in this folder as loaded by "
                "transformers (from_pretrained, CPU, compute dtype float32, eager attention, "
                "eval, no_grad, 1 thread). golden.safetensors: logits.{i} f32 [T, V] for "
                "prompts[i], computed with every Linear4bit replaced by an f32 Linear of the "
                "reference dequantization NF4[code] * absmax[flat_index // blocksize] (bnb's "
                "default-backend formula, what its CUDA kernel computes). "
                "max_abs_diff_bnb_cpu_vs_logits[i] = max |bnb's own CPU 4-bit forward - "
                "logits.{i}|: 0 means logits.{i} are transformers' 4-bit logits exactly; a large "
                "value means bnb 0.50.2's CPU dequantize (AVX-512, non-double-quant absmax) is "
                "wrong for this model: it indexes absmax per row, and blocks cross rows when "
                "in_features is not a multiple of the blocksize.",
        "source": f"tests/fixtures/tiny/{src}",
        "double_quant": dq,
        "blocksize": 64,
        "compute_dtype": "float32",
        "prompts": prompts,
        "prompt_texts": golden_src.get("prompt_texts"),
        "max_abs_diff_bnb_cpu_vs_logits": diffs,
        "versions": VERSIONS,
    })
    print(f"{out_name}: max |bnb cpu - reference| per prompt: {diffs}")


def safetensors_entries(path: Path) -> dict:
    out = {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            out[k] = (str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes()
                      if t.numel() else b"")
    return out


def interop(qlora_dir: Path) -> None:
    ours_dir = qlora_dir.resolve()
    theirs_dir = OUT / "gqa-bnb4"
    golden = json.loads((theirs_dir / "golden.json").read_text())
    result = {
        "note": "Checks a folder written by qlora's quantize_checkpoint (tests/fixtures/tiny/gqa, "
                "blocksize 64, double quant) against transformers' own 4-bit save of the same "
                "model (tests/fixtures/bnb/gqa-bnb4). loaded: AutoModelForCausalLM.from_pretrained "
                "on CPU succeeded. max_abs_logit_diff: vs transformers' own 4-bit model on the 3 "
                "golden prompts. state_dict_identical: same keys, dtypes, shapes and bytes. "
                "file_identical: model.safetensors byte for byte.",
        "qlora_dir": os.path.relpath(ours_dir, ROOT),
        "reference_dir": os.path.relpath(theirs_dir, ROOT),
        "versions": VERSIONS,
    }
    try:
        m_ours = load_4bit(ours_dir)
        result["loaded"] = True
        import bitsandbytes as bnb

        result["linear4bit_modules"] = sum(
            isinstance(m, bnb.nn.Linear4bit) for m in m_ours.modules())
    except Exception as e:  # noqa: BLE001
        result["loaded"] = False
        result["load_error"] = f"{type(e).__name__}: {e}"
        m_ours = None
    if m_ours is not None:
        m_theirs = load_4bit(theirs_dir)
        a = logits_for(m_ours, golden["prompts"])
        b = logits_for(m_theirs, golden["prompts"])
        result["max_abs_logit_diff"] = max(float((x - y).abs().max()) for x, y in zip(a, b))
    e_ours = safetensors_entries(ours_dir / "model.safetensors")
    e_theirs = safetensors_entries(theirs_dir / "model.safetensors")
    diffs = []
    for k in sorted(set(e_ours) | set(e_theirs)):
        if k not in e_ours or k not in e_theirs:
            diffs.append(f"{k}: only in {'ours' if k in e_ours else 'transformers'}")
        elif e_ours[k] != e_theirs[k]:
            diffs.append(f"{k}: differs (dtype/shape ours {e_ours[k][:2]}, transformers {e_theirs[k][:2]})")
    result["state_dict_identical"] = not diffs
    result["state_dict_differences"] = diffs
    result["file_identical"] = ((ours_dir / "model.safetensors").read_bytes()
                                == (theirs_dir / "model.safetensors").read_bytes())
    qc_ours = json.loads((ours_dir / "config.json").read_text()).get("quantization_config")
    qc_theirs = json.loads((theirs_dir / "config.json").read_text()).get("quantization_config")
    result["quantization_config_equal"] = qc_ours == qc_theirs
    write_json(OUT / "interop.json", result)
    print(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qlora-out", type=Path, help="folder written by quantize_checkpoint to check")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.qlora_out:
        interop(args.qlora_out)
    else:
        for src, name, dq in MODELS:
            make_model(src, name, dq)


if __name__ == "__main__":
    main()

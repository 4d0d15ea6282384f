#!/usr/bin/env python3
"""GGUF export fixtures: `qlora export` read back by llama.cpp's own `gguf` package.

Exports the tiny fixture models with the qlora binary, reads every file with `gguf.GGUFReader`
and checks, independently of qlora's code:
  - f32 exports: each tensor as gguf decodes it equals the Hugging Face weight with llama.cpp's
    converter steps applied here in numpy (q/k rows permuted by `LlamaModel.permute`, names
    mapped), exactly; the Llama-3 RoPE factors equal the converter's formula;
  - the merged export: tensors equal permute(W + s·B·A) computed here from the PEFT adapter;
  - q8_0: every Q8_0 tensor's bytes equal `gguf.quants.quantize(f32 values, Q8_0)` (llama.cpp's
    reference quantizer), F16 fallbacks equal numpy's float16, and the dequantized values are
    within half a quantization step of the f32 export.
Then writes tests/fixtures/gguf/tiny.json: per file the metadata, tensor names, gguf shapes,
types and sha256 of the data bytes, and the figures above; tests/gguf.rs compares a fresh
export against it.

Pinned: gguf==0.17.1 (llama.cpp gguf-py), numpy (any 1.26+/2.x). Usage:
    python -m venv /work/venv-gguf && /work/venv-gguf/bin/pip install gguf==0.17.1 numpy
    cargo build --features cuda && /work/venv-gguf/bin/python scripts/fixtures_gguf.py
"""

import argparse
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

ROOT = Path(__file__).resolve().parent.parent
GGUF_VERSION = "0.17.1"

# name, model, adapter, dtype
EXPORTS = [
    ("gqa_f32", "tests/fixtures/tiny/gqa", None, "f32"),
    ("gqa_q8_0", "tests/fixtures/tiny/gqa", None, "q8_0"),
    ("gqa_lora_f32", "tests/fixtures/tiny/gqa", "tests/fixtures/peft/gqa-lora", "f32"),
    ("llama3_f32", "tests/fixtures/tiny/llama3", None, "f32"),
]


def read_safetensors(path):
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (name, info["dtype"])
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=np.float32).reshape(info["shape"])
    return out


def permute(w, n_head, n_head_kv):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def expected_tensors(model_dir, adapter_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    w = read_safetensors(model_dir / "model.safetensors")
    if adapter_dir is not None:
        acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert not acfg.get("use_rslora"), "rsLoRA not handled here"
        s = acfg["lora_alpha"] / acfg["r"]
        ad = read_safetensors(adapter_dir / "adapter_model.safetensors")
        for name in list(w):
            stem = name[: -len(".weight")]
            a = ad.get(f"base_model.model.{stem}.lora_A.weight")
            b = ad.get(f"base_model.model.{stem}.lora_B.weight")
            if a is not None:
                w[name] = (w[name] + s * (b @ a)).astype(np.float32)
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = {"token_embd.weight": w["model.embed_tokens.weight"], "output_norm.weight": w["model.norm.weight"]}
    if "lm_head.weight" in w:
        out["output.weight"] = w["lm_head.weight"]
    for l in range(cfg["num_hidden_layers"]):
        for hf, gg in HF_TO_GGUF.items():
            t = w[f"model.layers.{l}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                t = permute(t, n_head, n_head)
            elif hf == "self_attn.k_proj":
                t = permute(t, n_head, n_kv)
            out[f"blk.{l}.{gg}.weight"] = t
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rp.get("rope_type") == "llama3":
        # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, in float32 like torch.
        base, dim = rp["rope_theta"], cfg["head_dim"]
        freqs = 1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
        old = rp["original_max_position_embeddings"]
        lo, hi, factor = rp["low_freq_factor"], rp["high_freq_factor"], rp["factor"]
        f = []
        for freq in freqs:
            wl = 2 * np.pi / freq
            if wl < old / hi:
                f.append(1.0)
            elif wl > old / lo:
                f.append(factor)
            else:
                sm = (old / wl - lo) / (hi - lo)
                f.append(1 / ((1 - sm) / factor + sm))
        out["rope_freqs.weight"] = np.array(f, dtype=np.float32)
    return out


def field_value(field):
    t = field.types[0]
    if t == gguf.GGUFValueType.ARRAY:
        items = [field.contents(i) for i in range(len(field.data))]
        sub = field.types[1]
        # Strings joined by NUL as UTF-8; numbers as little-endian bytes of their type.
        if sub == gguf.GGUFValueType.STRING:
            raw = "\x00".join(items).encode()
        else:
            np_type = {gguf.GGUFValueType.FLOAT32: "<f4", gguf.GGUFValueType.INT32: "<i4", gguf.GGUFValueType.UINT32: "<u4"}[sub]
            raw = np.array(items, dtype=np_type).tobytes()
        return {"array_of": sub.name, "len": len(items), "head": items[:4], "sha256": hashlib.sha256(raw).hexdigest()}
    v = field.contents()
    if t in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64):
        return {"type": t.name, "value": float(v)}
    return {"type": t.name, "value": v}


def read(path):
    r = gguf.GGUFReader(path)
    meta = {}
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = field_value(field)
    tensors = []
    for t in r.tensors:
        tensors.append(
            {
                "name": t.name,
                "ne": [int(x) for x in t.shape],
                "type": t.tensor_type.name,
                "nbytes": int(t.n_bytes),
                "offset": int(t.data_offset),
                "sha256": hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest(),
            }
        )
    return r, meta, tensors


def decoded(r):
    """name → f32 values in PyTorch order, as gguf dequantizes them."""
    out = {}
    for t in r.tensors:
        v = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(v, dtype=np.float32).reshape(list(reversed([int(x) for x in t.shape])))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qlora", default=str(ROOT / "target/debug/qlora"))
    ap.add_argument("--out", default=str(ROOT / "tests/fixtures/gguf/tiny.json"))
    args = ap.parse_args()
    from importlib.metadata import version

    assert version("gguf") == GGUF_VERSION, f"pin gguf=={GGUF_VERSION}, found {version('gguf')}"
    result = {"gguf_version": GGUF_VERSION, "numpy_version": np.__version__, "files": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, model, adapter, dtype in EXPORTS:
            p = Path(tmp) / f"{name}.gguf"
            cmd = [args.qlora, "export", "--model", str(ROOT / model), "-o", str(p), "--dtype", dtype]
            if adapter:
                cmd += ["--adapter", str(ROOT / adapter)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            paths[name] = p
        for name, model, adapter, dtype in EXPORTS:
            r, meta, tensors = read(paths[name])
            entry = {"model": model, "adapter": adapter, "dtype": dtype, "metadata": meta, "tensors": tensors}
            dec = decoded(r)
            want = expected_tensors(ROOT / model, ROOT / adapter if adapter else None)
            assert sorted(dec) == sorted(want), (sorted(dec), sorted(want))
            if dtype == "f32":
                err = max(float(np.abs(dec[k] - want[k]).max()) for k in want)
                entry["max_abs_diff_vs_hf"] = err
                bound = 1e-6 if adapter else 0.0  # merge: f32 sums in another order
                assert err <= bound, (name, err)
            else:
                ref = decoded(gguf.GGUFReader(paths["gqa_f32"]))
                worst_step = 0.0
                for t in r.tensors:
                    x = ref[t.name]
                    if t.tensor_type == QT.Q8_0:
                        q = gguf.quants.quantize(x, QT.Q8_0)
                        assert q.tobytes() == np.ascontiguousarray(t.data).tobytes(), t.name
                        d = np.abs(x.reshape(-1, 32)).max(axis=1) / 127
                        e = np.abs(dec[t.name] - x).reshape(-1, 32).max(axis=1)
                        worst_step = max(worst_step, float((e / np.where(d > 0, d, 1)).max()))
                    elif t.tensor_type == QT.F16:
                        assert np.array_equal(dec[t.name], x.astype(np.float16).astype(np.float32)), t.name
                    else:
                        assert t.tensor_type == QT.F32 and len(x.shape) == 1, t.name
                        assert np.array_equal(dec[t.name], x), t.name
                entry["q8_0_bytes_equal_gguf_quantize"] = True
                # |x − q·d16| in units of the f32 step d: ≤ 0.5 + 127·|d − d16|/d ≤ 0.5 + 127·2^-11.
                entry["q8_0_max_err_in_steps"] = worst_step
                assert worst_step <= 0.5 + 127 * 2**-11, worst_step
            result["files"][name] = entry
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

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
    within half a quantization step (plus the f16 rounding of the scale) of the f32 export;
  - the LoRA-only file passes llama.cpp's adapter shape checks, and base + (alpha/r)·B·A from it
    equals the merged export (so names, B's q/k permutation and alpha are consistent);
  - the export of a bitsandbytes 4-bit checkpoint: logits as below against transformers' own
    logits of that 4-bit model (tests/fixtures/bnb/gqa-bnb4/golden.safetensors);
  - logits: a float64 numpy forward pass that reads only the GGUF file and follows llama.cpp's
    `llama` graph (RoPE on adjacent pairs, rope_freqs, GQA, SwiGLU, tied output) reproduces the
    committed transformers logits (tests/fixtures/tiny/*/golden.safetensors) and PEFT's merged
    logits (tests/fixtures/peft/gqa-lora/golden.safetensors) within 1e-4 for the f32 files.
Then writes tests/fixtures/gguf/tiny.json: per file the metadata, tensor names, gguf shapes,
types and sha256 of the data bytes, and the figures above; tests/gguf.rs compares a fresh
export against it.

Pinned: gguf==0.17.1 (llama.cpp gguf-py, asserted), numpy (recorded; 2.4.6 here), and for
--llama-cpp-dir tokenizers (recorded; 0.23.3 here). The two llama.cpp references come from the
llama-cpp-python 0.3.36 sdist (its vendor/llama.cpp: conversion/base.py for the pre-tokenizer
hash text, models/ggml-vocab-llama-spm.gguf for Llama 2's vocabulary); without the flags the
recorded references are kept. Usage:
    python -m venv /work/venv-gguf && /work/venv-gguf/bin/pip install gguf==0.17.1 numpy tokenizers
    cargo build --features cuda && /work/venv-gguf/bin/python scripts/fixtures_gguf.py \
        [--llama-cpp-dir SDIST/vendor/llama.cpp] \
        [--llama-spm-vocab SDIST/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf]

--llama-cpp: llama.cpp itself as the oracle, through llama-cpp-python 0.3.36 (asserted; it builds
llama.cpp from source, CPU only):
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
        /work/venv-gguf/bin/pip install llama-cpp-python==0.3.36
    /work/venv-gguf/bin/python scripts/fixtures_gguf.py --llama-cpp
llama.cpp (CPU, f32 KV cache, no flash attention) loads the f32 and q8_0 exports of the tiny
models and the merged-adapter exports, and records per prompt of each model's golden.json the
logits at the last position (f32 exports) and 8 greedy tokens; it applies the --lora-only files to
the f32 base export (`lora_path`) and records the same; and it tokenizes the 1000 guanaco rows
with a vocab-only load of an export carrying Llama 2's tokenizer. Writes
tests/fixtures/gguf/llama_cpp.json; tests/gguf.rs compares qlora's CPU-backend logits, greedy
ids and tokenizer against it.
"""

import argparse
import hashlib
import json
import os
import re
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

# name, model, adapter, dtype, lora_only
EXPORTS = [
    ("gqa_f32", "tests/fixtures/tiny/gqa", None, "f32", False),
    ("gqa_q8_0", "tests/fixtures/tiny/gqa", None, "q8_0", False),
    ("gqa_lora_f32", "tests/fixtures/tiny/gqa", "tests/fixtures/peft/gqa-lora", "f32", False),
    ("llama3_f32", "tests/fixtures/tiny/llama3", None, "f32", False),
    ("gqa_lora_only_f32", "tests/fixtures/tiny/gqa", "tests/fixtures/peft/gqa-lora", "f32", True),
    # bitsandbytes 4-bit checkpoint (transformers' own save), dequantized by the exporter.
    ("gqa_bnb4_f32", "tests/fixtures/bnb/gqa-bnb4", None, "f32", False),
    # rsLoRA (s = alpha/sqrt(r)) on all linears, k_proj included (B permuted with the KV heads).
    ("gqa_rslora_f32", "tests/fixtures/tiny/gqa", "tests/fixtures/peft/gqa-all-linear-rslora", "f32", False),
    ("gqa_rslora_lora_only_f32", "tests/fixtures/tiny/gqa", "tests/fixtures/peft/gqa-all-linear-rslora", "f32", True),
]
# LoRA-only file → the merged export of the same adapter.
MERGED_OF = {"gqa_lora_only_f32": "gqa_lora_f32", "gqa_rslora_lora_only_f32": "gqa_rslora_f32"}


def check_lora_file(r, base, merged):
    """llama.cpp's checks on a LoRA GGUF (llama-adapter.cpp: a.ne[0] = in, b.ne[1] = out,
    a.ne[1] = b.ne[0]) and base + (alpha/r)·B·A = the merged export; returns the max difference."""
    alpha = float(meta_value(r, "adapter.lora.alpha"))
    assert meta_value(r, "general.type") == "adapter" and meta_value(r, "adapter.type") == "lora"
    lo = decoded(r)
    shapes = {t.name: [int(x) for x in t.shape] for t in r.tensors}
    err = 0.0
    for name in base:
        if f"{name}.lora_a" not in lo:
            assert np.array_equal(base[name], merged[name]), name
            continue
        a, b = lo[f"{name}.lora_a"], lo[f"{name}.lora_b"]
        ne, na, nb = list(reversed(base[name].shape)), shapes[f"{name}.lora_a"], shapes[f"{name}.lora_b"]
        assert na[0] == ne[0] and nb[1] == ne[1] and na[1] == nb[0], (name, ne, na, nb)
        want = base[name] + np.float32(alpha / na[1]) * (b @ a)
        err = max(err, float(np.abs(want - merged[name]).max()))
    return err


def read_safetensors(path):
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = raw[8 + n + a : 8 + n + b]
        if info["dtype"] == "F32":
            v = np.frombuffer(buf, dtype=np.float32)
        elif info["dtype"] == "BF16":
            v = (np.frombuffer(buf, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] == "F16":
            v = np.frombuffer(buf, dtype=np.float16).astype(np.float32)
        else:
            raise ValueError((name, info["dtype"]))
        out[name] = v.reshape(info["shape"])
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
        s = acfg["lora_alpha"] / (acfg["r"] ** 0.5 if acfg.get("use_rslora") else acfg["r"])
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


def meta_value(r, key):
    f = r.fields.get(key)
    return None if f is None else f.contents()


def llama_cpp_forward(r, ids):
    """Logits [T, V] of a `llama` GGUF computed with llama.cpp's semantics (src/models/llama.cpp,
    ggml_rope_ext in NORM mode), in float64 numpy, reading only the file: RMSNorm, RoPE on
    adjacent pairs (2i, 2i+1) with theta = pos · base^(-2i/n_rot) / rope_freqs[i], causal GQA
    attention scaled by 1/sqrt(head_dim), SwiGLU, output (or token_embd when absent)."""
    w = {k: v.astype(np.float64) for k, v in decoded(r).items()}
    m = lambda k: meta_value(r, f"llama.{k}")
    n_head, n_kv, base = m("attention.head_count"), m("attention.head_count_kv"), m("rope.freq_base")
    n_rot, eps, hd = m("rope.dimension_count"), m("attention.layer_norm_rms_epsilon"), m("attention.key_length")
    ff = w.get("rope_freqs.weight", np.ones(n_rot // 2))
    T = len(ids)
    theta = np.arange(T)[:, None] * base ** (-np.arange(0, n_rot, 2) / n_rot)[None, :] / ff[None, :]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]

    def rope(x):  # [T, H, hd]
        x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out = x.copy()
        out[..., 0:n_rot:2] = x0 * cos - x1 * sin
        out[..., 1:n_rot:2] = x0 * sin + x1 * cos
        return out

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    x = w["token_embd.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(m("block_count")):
        b = lambda n: w[f"blk.{l}.{n}.weight"]
        h = norm(x, b("attn_norm"))
        q = rope((h @ b("attn_q").T).reshape(T, n_head, hd))
        k = rope((h @ b("attn_k").T).reshape(T, n_kv, hd))
        v = (h @ b("attn_v").T).reshape(T, n_kv, hd)
        rep = n_head // n_kv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, n_head * hd)
        x = x + o @ b("attn_output").T
        h = norm(x, b("ffn_norm"))
        g = h @ b("ffn_gate").T
        x = x + ((g / (1 + np.exp(-g))) * (h @ b("ffn_up").T)) @ b("ffn_down").T
    x = norm(x, w["output_norm.weight"])
    return x @ w.get("output.weight", w["token_embd.weight"]).T


def golden_logits(model_dir, adapter_dir):
    """Reference logits per prompt: transformers (base) or PEFT merge_and_unload (adapter)."""
    prompts = json.loads((model_dir / "golden.json").read_text())["prompts"]
    if adapter_dir is None:
        g = read_safetensors(model_dir / "golden.safetensors")
        return prompts, [g[f"logits.{i}"] for i in range(len(prompts))]
    g = read_safetensors_any(adapter_dir / "golden.safetensors")
    return prompts, [g[f"merged.{i}"] for i in range(len(prompts))]


def read_safetensors_any(path):
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name != "__metadata__" and info["dtype"] == "F32":
            a, b = info["data_offsets"]
            out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=np.float32).reshape(info["shape"])
    return out


def llama_spm_reference(path):
    """What llama.cpp's own converter wrote for Llama 2's SentencePiece vocabulary
    (models/ggml-vocab-llama-spm.gguf, made from tokenizer.model), as hashes plus the score rule
    it follows, for tests/gguf.rs to compare qlora's tokenizer.json-based export against."""
    r = gguf.GGUFReader(path)
    arr = lambda k: [r.fields[k].contents(i) for i in range(len(r.fields[k].data))]
    tokens, types, scores = arr("tokenizer.ggml.tokens"), arr("tokenizer.ggml.token_type"), arr("tokenizer.ggml.scores")
    low = [i for i, x in enumerate(scores) if x == -1e9]
    # The rule: 0 for <unk>, <s>, </s> and the 256 byte tokens; -1e9 for `low`; else -(id - 259).
    rule = [0.0 if i < 259 else (-1e9 if i in set(low) else -(i - 259.0)) for i in range(len(scores))]
    assert rule == scores, "score rule does not describe the reference"
    return {
        "source": "llama-cpp-python 0.3.36 sdist, vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf",
        "file_sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        "tokens_sha256": hashlib.sha256("\x00".join(tokens).encode()).hexdigest(),
        "token_type_sha256": hashlib.sha256(np.array(types, dtype="<i4").tobytes()).hexdigest(),
        "score_rule": "0 for ids < 259; -1e9 for minus_1e9_ids; else -(id - 259)",
        "minus_1e9_ids": low,
        "scalars": {k: meta_value(r, k) for k in [
            "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
            "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"]},
    }


def chkhsh_reference(llama_cpp_dir, tokenizer_dir):
    """llama.cpp's pre-tokenizer hash (conversion/base.py get_vocab_base_pre) of a tokenizer.json,
    computed with the `tokenizers` package and the converter's own chktxt."""
    import ast, re
    from importlib.metadata import version
    from tokenizers import Tokenizer

    src = (Path(llama_cpp_dir) / "conversion/base.py").read_text(encoding="utf-8")
    chktxt = ast.literal_eval(re.search(r"^\s*chktxt = (.*)$", src, re.M).group(1))
    ids = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")).encode(chktxt).ids
    return {
        "tokenizer": str(Path(tokenizer_dir).relative_to(ROOT)),
        "tokenizers_version": version("tokenizers"),
        "chktxt_sha256": hashlib.sha256(chktxt.encode()).hexdigest(),
        "chkhsh": hashlib.sha256(str(ids).encode()).hexdigest(),
    }


# ---------------------------------------------------------------------------------------------
# --llama-cpp: llama.cpp itself (through llama-cpp-python, which builds it from source) as the
# oracle. Writes tests/fixtures/gguf/llama_cpp.json; tests/gguf.rs compares qlora against it.

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# name, model, adapter, dtype (merged exports llama.cpp runs)
LLAMA_CPP_MODELS = [
    ("gqa_f32", "tests/fixtures/tiny/gqa", None, "f32"),
    ("gqa_q8_0", "tests/fixtures/tiny/gqa", None, "q8_0"),
    ("llama3_f32", "tests/fixtures/tiny/llama3", None, "f32"),
    ("gqa_lora_f32", "tests/fixtures/tiny/gqa", "tests/fixtures/peft/gqa-lora", "f32"),
    ("gqa_rslora_f32", "tests/fixtures/tiny/gqa", "tests/fixtures/peft/gqa-all-linear-rslora", "f32"),
]
# LoRA-only export applied by llama.cpp (`lora_path`) on the f32 base export → merged export.
LLAMA_CPP_LORAS = [
    ("gqa_lora_only_f32", "tests/fixtures/peft/gqa-lora", "gqa_f32", "gqa_lora_f32"),
    ("gqa_rslora_lora_only_f32", "tests/fixtures/peft/gqa-all-linear-rslora", "gqa_f32", "gqa_rslora_f32"),
]
GREEDY_NEW = 8
GGML_TYPE_F32 = 0


def qlora_export(qlora, out, model, adapter=None, dtype="f32", lora_only=False):
    cmd = [qlora, "export", "--model", str(model), "-o", str(out), "--dtype", dtype]
    if adapter:
        cmd += ["--adapter", str(adapter)]
    if lora_only:
        cmd += ["--lora-only"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def llama_cpp_load(path, **kw):
    """A llama.cpp context on the CPU: f32 KV cache and no flash attention, so that the only
    differences from an f32 reference are llama.cpp's own f32 summation orders."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_batch=64, n_threads=2,
                           verbose=False, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                           flash_attn=False, **kw)


def llama_cpp_logits(llm, ids):
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_cpp_greedy(llm, ids, n):
    """n argmax tokens after `ids` (EOS does not stop), fed back one at a time."""
    llm.reset()
    llm.eval(list(ids))
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out


def logit_record(logits, prompts):
    """Rows of llama.cpp's logits kept in the fixture: per prompt the last position (which
    attends to the whole prompt), rounded to 1e-5, far below the 1e-3 the test allows. Every
    position is compared here (vs_transformers_max_abs_diff, vs_merged_export_max_abs_diff)."""
    return [{"prompt": p, "pos": len(ids) - 1, "logits": [round(float(x), 5) for x in l[-1]]}
            for p, (ids, l) in enumerate(zip(prompts, logits))]


def write_safetensors(path, tensors):
    header, off, blobs = {}, 0, []
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def llama2_vocab_model(tmp):
    """A model folder with Llama 2's real tokenizer files (tests/fixtures/llama-2-7b-chat-hf) and
    the tiny GQA model's architecture widened to Llama 2's 32000-token vocabulary (random
    embedding / output rows: the weights are never run, only the vocabulary is read)."""
    src, tiny = ROOT / "tests/fixtures/llama-2-7b-chat-hf", ROOT / "tests/fixtures/tiny/gqa"
    d = Path(tmp) / "llama2-vocab"
    d.mkdir()
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]:
        if (src / f).exists():
            (d / f).write_bytes((src / f).read_bytes())
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["vocab_size"] = 32000
    (d / "config.json").write_text(json.dumps(cfg))
    w = read_safetensors(tiny / "model.safetensors")
    rng = np.random.default_rng(0)
    for k in ["model.embed_tokens.weight", "lm_head.weight"]:
        w[k] = rng.standard_normal((32000, cfg["hidden_size"])).astype(np.float32) * 0.02
    write_safetensors(d / "model.safetensors", w)
    return d


def guanaco_tokenization(llm):
    """llama.cpp's ids (special tokens parsed, no BOS added: the rows start with a literal `<s>`)
    for the 1000 guanaco rows, against Python `tokenizers`' ids of the same rows
    (tests/fixtures/tiny/guanaco_llama2_ids.json, which qlora's tokenizer equals:
    tests/tokenizer.rs). `all_rows_sha256` hashes the per-row sha256 (u32-LE ids) lines."""
    want = json.loads((ROOT / "tests/fixtures/tiny/guanaco_llama2_ids.json").read_text())["rows"]
    lines = (ROOT / "tests/fixtures/guanaco-llama2-1k/train.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(want) == 1000
    equal, differ, per_row, total = 0, [], [], 0
    for i, (line, w) in enumerate(zip(lines, want)):
        ids = llm.tokenize(json.loads(line)["text"].encode("utf-8"), add_bos=False, special=True)
        h = hashlib.sha256(np.array(ids, dtype="<u4").tobytes()).hexdigest()
        per_row.append(h)
        total += len(ids)
        if h == w["sha256"] and len(ids) == w["len"]:
            equal += 1
        else:
            k = next((j for j, (a, b) in enumerate(zip(ids, w["head"])) if a != b), None)
            differ.append({"row": i, "len": len(ids), "want_len": w["len"], "sha256": h,
                           "first_diff_in_head": k})
    return {
        "rows": len(lines),
        "rows_equal_to_python_tokenizers": equal,
        "total_ids": total,
        "all_rows_sha256": hashlib.sha256("".join(h + "\n" for h in per_row).encode()).hexdigest(),
        "differing_rows": differ[:20],
    }


def llama_cpp_oracle(args):
    from importlib.metadata import version

    import llama_cpp

    got = version("llama_cpp_python")
    assert got == LLAMA_CPP_PYTHON_VERSION, f"pin llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}, found {got}"
    result = {"llama_cpp_python_version": got, "numpy_version": np.__version__,
              "settings": "CPU, n_threads=2, f32 KV cache, flash_attn off, logits_all",
              "greedy_new_tokens": GREEDY_NEW, "models": {}, "loras": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths, logits = {}, {}
        for name, model, adapter, dtype in LLAMA_CPP_MODELS:
            paths[name] = Path(tmp) / f"{name}.gguf"
            qlora_export(args.qlora, paths[name], ROOT / model, adapter and ROOT / adapter, dtype)
        for name, model, adapter, dtype in LLAMA_CPP_MODELS:
            prompts = json.loads((ROOT / model / "golden.json").read_text())["prompts"]
            llm = llama_cpp_load(paths[name])
            logits[name] = [llama_cpp_logits(llm, p) for p in prompts]
            entry = {"model": model, "adapter": adapter, "dtype": dtype,
                     "greedy": [llama_cpp_greedy(llm, p, GREEDY_NEW) for p in prompts]}
            del llm
            gold_path = ROOT / (adapter or model) / "golden.safetensors"
            if gold_path.exists():
                _, gold = golden_logits(ROOT / model, ROOT / adapter if adapter else None)
                entry["vs_transformers_max_abs_diff"] = max(
                    float(np.abs(l - g).max()) for l, g in zip(logits[name], gold))
            if dtype == "f32":
                entry["logits"] = logit_record(logits[name], prompts)
            else:
                f32 = logits[name.replace(dtype, "f32")]
                entry["vs_f32_export_max_abs_diff"] = max(
                    float(np.abs(a - b).max()) for a, b in zip(logits[name], f32))
            if dtype == "f32" and "vs_transformers_max_abs_diff" in entry:
                assert entry["vs_transformers_max_abs_diff"] <= 1e-3, (name, entry)
            result["models"][name] = entry
            print(name, {k: v for k, v in entry.items() if k != "logits"}, file=sys.stderr)
        for name, adapter, base, merged in LLAMA_CPP_LORAS:
            p = Path(tmp) / f"{name}.gguf"
            qlora_export(args.qlora, p, ROOT / "tests/fixtures/tiny/gqa", ROOT / adapter, "f32", lora_only=True)
            prompts = json.loads((ROOT / "tests/fixtures/tiny/gqa/golden.json").read_text())["prompts"]
            llm = llama_cpp_load(paths[base], lora_path=str(p))
            got = [llama_cpp_logits(llm, q) for q in prompts]
            entry = {"adapter": adapter, "base": base, "merged": merged,
                     "vs_merged_export_max_abs_diff": max(
                         float(np.abs(a - b).max()) for a, b in zip(got, logits[merged])),
                     "greedy": [llama_cpp_greedy(llm, q, GREEDY_NEW) for q in prompts],
                     "logits": logit_record(got, prompts)}
            del llm
            assert entry["vs_merged_export_max_abs_diff"] <= 1e-3, (name, entry)
            result["loras"][name] = entry
            print(name, {k: v for k, v in entry.items() if k != "logits"}, file=sys.stderr)
        d = llama2_vocab_model(tmp)
        p = Path(tmp) / "llama2_vocab.gguf"
        qlora_export(args.qlora, p, d, dtype="q8_0")
        llm = llama_cpp.Llama(model_path=str(p), vocab_only=True, verbose=False)
        result["llama2_guanaco_tokenization"] = tok = guanaco_tokenization(llm)
        print("guanaco", {k: v for k, v in tok.items() if k != "differing_rows"}, file=sys.stderr)
    out = ROOT / "tests/fixtures/gguf/llama_cpp.json"
    # Number arrays (logits, greedy ids) on one line each.
    text = re.sub(r"\[[-0-9.e,\s]*\]", lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "),
                  json.dumps(result, indent=1))
    out.write_text(text + "\n")
    print(f"wrote {out}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp-dir", help="a llama.cpp source tree (e.g. vendor/llama.cpp of the "
                    "llama-cpp-python sdist) for the pre-tokenizer hash reference")
    ap.add_argument("--llama-spm-vocab", help="llama.cpp's models/ggml-vocab-llama-spm.gguf "
                    "(e.g. from the llama-cpp-python sdist); default: keep the recorded reference")
    ap.add_argument("--qlora", default=str(ROOT / "target/debug/qlora"))
    ap.add_argument("--out", default=str(ROOT / "tests/fixtures/gguf/tiny.json"))
    ap.add_argument("--llama-cpp", action="store_true", help="run the exports in llama.cpp "
                    f"(llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}) and write "
                    "tests/fixtures/gguf/llama_cpp.json instead")
    args = ap.parse_args()
    if args.llama_cpp:
        llama_cpp_oracle(args)
        return
    from importlib.metadata import version

    assert version("gguf") == GGUF_VERSION, f"pin gguf=={GGUF_VERSION}, found {version('gguf')}"
    result = {"gguf_version": GGUF_VERSION, "numpy_version": np.__version__, "files": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, model, adapter, dtype, lora_only in EXPORTS:
            p = Path(tmp) / f"{name}.gguf"
            cmd = [args.qlora, "export", "--model", str(ROOT / model), "-o", str(p), "--dtype", dtype]
            if adapter:
                cmd += ["--adapter", str(ROOT / adapter)]
            if lora_only:
                cmd += ["--lora-only"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            paths[name] = p
        for name, model, adapter, dtype, lora_only in EXPORTS:
            r, meta, tensors = read(paths[name])
            entry = {"model": model, "adapter": adapter, "dtype": dtype, "lora_only": lora_only,
                     "metadata": meta, "tensors": tensors}
            if lora_only:
                base = decoded(gguf.GGUFReader(paths["gqa_f32"]))
                merged = decoded(gguf.GGUFReader(paths[MERGED_OF[name]]))
                err = check_lora_file(r, base, merged)
                # merged: f32 W + s·(B·A) summed in another order than numpy's
                entry["lora_plus_base_vs_merged_max_abs_diff"] = err
                assert err <= 1e-6, err
                result["files"][name] = entry
                continue
            dec = decoded(r)
            four_bit = "quantization_config" in json.loads((ROOT / model / "config.json").read_text())
            if four_bit:
                # No f32 weights to compare with: the logits against transformers' 4-bit model
                # (below) check the dequantization.
                pass
            else:
                want = expected_tensors(ROOT / model, ROOT / adapter if adapter else None)
                assert sorted(dec) == sorted(want), (sorted(dec), sorted(want))
            if dtype == "f32" and not four_bit:
                err = max(float(np.abs(dec[k] - want[k]).max()) for k in want)
                entry["max_abs_diff_vs_hf"] = err
                bound = 1e-6 if adapter else 0.0  # merge: f32 sums in another order
                assert err <= bound, (name, err)
            elif dtype == "q8_0":
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
            if adapter and not (ROOT / adapter / "golden.safetensors").exists():
                result["files"][name] = entry
                continue
            prompts, gold = golden_logits(ROOT / model, ROOT / adapter if adapter else None)
            ours = [llama_cpp_forward(r, p) for p in prompts]
            diff = max(float(np.abs(o - g).max()) for o, g in zip(ours, gold))
            scale = max(float(np.abs(g).max()) for g in gold)
            agree = float(np.mean(np.concatenate([o.argmax(-1) == g.argmax(-1) for o, g in zip(ours, gold)])))
            entry["llama_cpp_semantics_logits_max_abs_diff"] = diff
            entry["llama_cpp_semantics_argmax_agreement"] = agree
            entry["reference_logits_max_abs"] = scale
            # f32: float32 (reference) vs float64 (here) math only. q8_0: quantization error;
            # this tiny random model amplifies weight rounding (bf16 weights alone give 0.14 of
            # max |logit| 6.9, f16 0.015), so only a loose bound relative to the logit scale.
            assert diff < (1e-4 if dtype == "f32" else 0.1 * scale), (name, diff, scale)
            result["files"][name] = entry
    if args.llama_cpp_dir:
        result["chkhsh_reference"] = chkhsh_reference(args.llama_cpp_dir, ROOT / "tests/fixtures/tiny/tokenizer")
    elif Path(args.out).exists():
        old = json.loads(Path(args.out).read_text()).get("chkhsh_reference")
        if old:
            result["chkhsh_reference"] = old
    if args.llama_spm_vocab:
        result["llama2_spm_reference"] = llama_spm_reference(args.llama_spm_vocab)
    elif Path(args.out).exists():
        old = json.loads(Path(args.out).read_text()).get("llama2_spm_reference")
        if old:
            result["llama2_spm_reference"] = old
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

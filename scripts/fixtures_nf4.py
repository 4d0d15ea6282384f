#!/usr/bin/env python3
"""Golden NF4 fixtures from bitsandbytes (CPU) for `tests/nf4.rs`.

Pinned versions (asserted at start; install into a venv outside the repo):
    torch==2.15.0  bitsandbytes==0.50.2  numpy==2.4.6  safetensors==0.8.0
    python3 -m venv /work/venv-nf4
    /work/venv-nf4/bin/pip install torch==2.15.0 bitsandbytes==0.50.2 numpy==2.4.6 safetensors==0.8.0
    /work/venv-nf4/bin/python scripts/fixtures_nf4.py [--out tests/fixtures/nf4]

Everything runs on CPU, single-threaded (torch.set_num_threads(1)), from fixed seeds, so two runs
give identical files. Output:
    nf4_golden.safetensors   case{i}.input (f32, or bf16 for the bf16 case), case{i}.packed (u8,
                             shape as bnb returns it: [ceil(n/2), 1]), case{i}.absmax (f32, or u8 with
                             double quant), case{i}.offset (f32 [1]), case{i}.nested_absmax (f32),
                             case{i}.nested_code (f32 [256]), case{i}.dequant (f32, see below),
                             nf4_code (state.code), dynamic_code (create_dynamic_map(signed=True)),
                             blockwise8.* (a standalone 8-bit blockwise quantization with the
                             dynamic code: the path bnb uses for the nested absmax), matmul.x /
                             matmul.out (x @ dequant(W).T for one case).
    nf4_golden.json          per case: shape, blocksize, double_quant, input dtype, versions.

`case{i}.dequant` is the reference dequantization (bnb's default backend formula, also what the
CUDA kernel computes: code[q] * absmax[block of the flat index]). On an AVX-512 host the public
CPU `dequantize_4bit` of bnb 0.50.2 indexes absmax per row (absmax[row * (cols / blocksize) +
col / blocksize]) and so returns wrong values whenever blocks cross row boundaries (cols not a
multiple of blocksize). The json records, per case, whether the public CPU result equals the
reference (`cpu_dequant_matches_reference`); when it does not, the public result is stored as
case{i}.dequant_bnb_cpu for the record.
"""

from __future__ import annotations

import argparse
import json
import os

PINS = {"torch": "2.15.0", "bitsandbytes": "0.50.2", "numpy": "2.4.6", "safetensors": "0.8.0"}


def check_versions() -> dict:
    import bitsandbytes
    import numpy
    import safetensors
    import torch

    got = {
        "torch": torch.__version__.split("+")[0],
        "bitsandbytes": bitsandbytes.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
    }
    for k, v in PINS.items():
        assert got[k] == v, f"{k}: pinned {v}, installed {got[k]}"
    return got


# (name, shape, blocksize, double_quant, dtype, kind)
CASES = [
    ("square", (64, 64), 64, False, "f32", "normal"),
    ("odd_partial", (7, 13), 64, False, "f32", "normal"),
    ("rows_cross_blocks_dq", (33, 100), 128, True, "f32", "normal"),
    ("many_blocks_dq", (128, 256), 64, True, "f32", "normal"),
    ("single_block_4096_dq", (16, 256), 4096, True, "f32", "normal"),
    ("all_zero_dq", (32, 64), 64, True, "f32", "zeros"),
    ("outliers", (48, 64), 256, False, "f32", "outliers"),
    ("zero_rows_dq", (41, 63), 64, True, "f32", "zero_rows"),
    ("zero_tail_block", (3, 70), 64, False, "f32", "zero_tail"),
    ("bf16_dq", (48, 64), 64, True, "bf16", "normal"),
    ("matmul", (48, 64), 128, False, "f32", "normal"),
    ("wide_256_dq", (64, 256), 256, True, "f32", "normal"),
    ("nested_partial_dq", (300, 64), 64, True, "f32", "normal"),
    ("bs32", (5, 37), 32, False, "f32", "normal"),
]


def make_input(torch, shape, kind, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float32) * 0.02
    if kind == "zeros":
        w.zero_()
    elif kind == "outliers":
        flat = w.view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[:5]
        flat[idx] = torch.tensor([1e4, -1e4, 5e3, -2.5e3, 1e4])
    elif kind == "zero_rows":
        w[5:10] = 0.0
    elif kind == "zero_tail":
        w.view(-1)[-20:] = 0.0
    return w


def build(out_dir: str) -> None:
    # Plain eager torch: bnb wraps its reference dequantization in torch.compile; disable it so the
    # numbers come from the eager kernels on any host, with or without a C compiler.
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    versions = check_versions()
    torch.set_num_threads(1)
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    tensors: dict[str, np.ndarray] = {}
    meta = {"versions": versions, "device": "cpu", "torch_threads": 1,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cases": []}

    def put(key, t):
        if t.dtype == torch.bfloat16:
            # safetensors.numpy has no bf16: store the raw bits as u16 and say so in the json
            tensors[key] = t.contiguous().view(torch.int16).numpy().view(np.uint16).copy()
        else:
            tensors[key] = t.contiguous().numpy().copy()

    for i, (name, shape, bs, dq, dtype, kind) in enumerate(CASES):
        w = make_input(torch, shape, kind, seed=1000 + i)
        if dtype == "bf16":
            w = w.to(torch.bfloat16)
        q, st = F.quantize_4bit(w, blocksize=bs, compress_statistics=dq, quant_type="nf4")
        # reference dequantization: decoded absmax, then code[q] * absmax[flat block]
        if dq:
            absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
        else:
            absmax = st.absmax
        ref = _dequantize_4bit_compute(q.reshape(-1), absmax.float(), st.code, bs, shape, torch.float32)
        pub = F.dequantize_4bit(q, st)  # in the input dtype
        matches = bool(torch.equal(pub, ref.to(pub.dtype)))
        p = f"case{i}"
        put(f"{p}.input", w)
        put(f"{p}.packed", q)
        put(f"{p}.dequant", ref)
        if not matches:
            put(f"{p}.dequant_bnb_cpu", pub)
        entry = {"index": i, "name": name, "shape": list(shape), "blocksize": bs, "double_quant": dq,
                 "input_dtype": "bfloat16 (stored as u16 bits)" if dtype == "bf16" else "float32",
                 "quant_dtype_of_state": str(st.dtype), "packed_shape": list(q.shape),
                 "cpu_dequant_matches_reference": matches}
        if dq:
            put(f"{p}.absmax", st.absmax)
            put(f"{p}.offset", st.offset.reshape(1).float())
            put(f"{p}.nested_absmax", st.state2.absmax)
            put(f"{p}.nested_code", st.state2.code)
            entry["nested_blocksize"] = st.state2.blocksize
        else:
            put(f"{p}.absmax", st.absmax)
        if name == "matmul":
            g = torch.Generator().manual_seed(77)
            x = torch.randn((5, shape[1]), generator=g, dtype=torch.float32)
            put("matmul.x", x)
            put("matmul.out", x @ ref.T)
            entry["matmul"] = "matmul.out = matmul.x @ dequant.T (torch f32 CPU)"
        meta["cases"].append(entry)
        tensors.setdefault("nf4_code", st.code.float().numpy().copy())

    # The nested absmax path on its own: 8-bit blockwise quantization with the signed dynamic code.
    g = torch.Generator().manual_seed(4242)
    a = torch.randn(20000, generator=g, dtype=torch.float32)
    a[100:356] = 0.0  # one all-zero block of 256
    q8, st8 = F.quantize_blockwise(a, blocksize=256)
    put("blockwise8.input", a)
    put("blockwise8.q", q8)
    put("blockwise8.absmax", st8.absmax)
    put("blockwise8.dequant", F.dequantize_blockwise(q8, st8))
    put("dynamic_code", F.create_dynamic_map(signed=True))
    meta["blockwise8"] = {"n": 20000, "blocksize": 256, "code": "create_dynamic_map(signed=True)"}

    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "nf4_golden.safetensors"))
    with open(os.path.join(out_dir, "nf4_golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "nf4"))
    args = ap.parse_args()
    build(args.out)


if __name__ == "__main__":
    main()

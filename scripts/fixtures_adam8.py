#!/usr/bin/env python3
"""Fixtures for `--optim paged_adamw_8bit` (`tests/optim8.rs`, spec `src/train/optim8.rs`).

Pinned versions (asserted at start; install into a venv outside the repo, CPU only is enough):
    python3 -m venv /work/venv-adam8
    /work/venv-adam8/bin/pip install torch==2.15.0 bitsandbytes==0.50.2 numpy==2.4.6 safetensors==0.8.0

Usage:
    python scripts/fixtures_adam8.py             # writes tests/fixtures/optim8/{adam8.safetensors,adam8.json}
    python scripts/fixtures_adam8.py --cuda OUT.json
                                                 # on a GPU with bnb's CUDA library: runs bnb's own
                                                 # kernel on the same inputs and writes how far it
                                                 # lands from the port (nothing in the repo changes)

Two oracles, because the optimizer users run (`bnb.optim.PagedAdamW8bit` on CUDA) cannot run here:

1. `port_*` below: a line-by-line numpy port of bitsandbytes' CUDA kernel
   `kOptimizerStatic8bit2StateBlockwise<float, ADAM, 256, 1>` (csrc/kernels.cu; the launcher
   `optimizerStatic8bitBlockwise` in csrc/ops.cu, BLOCKSIZE_2STATE 256, NUM_2STATE 1: one thread
   per value, one block per 256 values) and of `kOptimizer32bit2State<float, ADAM>` for tensors
   under `min_8bit_size` (4096; bitsandbytes/optim/optimizer.py `Optimizer2State.init_state`),
   with the state init of `Optimizer2State.init_state` (zero codes, zero absmax) and the maps of
   `Optimizer8bit.fill_qmap` (state1: `create_dynamic_map(signed=True)`, state2:
   `create_dynamic_map(signed=False)`; taken from bitsandbytes itself below). Every f32 operation
   is one numpy float32 operation (IEEE round-to-nearest-even, never fused), in the kernel's
   order; bnb's fast-math intrinsics (`__powf`, `__fdividef`, `sqrtf` under --use_fast_math,
   FMA contraction, flush-to-zero) are replaced by correctly rounded operations (see
   `port_scalars`). `tests/optim8.rs` requires our Rust spec to reproduce it bit for bit.

2. bitsandbytes 0.50.2 itself, on CPU: `bnb.optim.AdamW8bit` runs `_optimizer_update_8bit_blockwise_cpu`
   (bitsandbytes/backends/cpu/ops.py), a torch re-implementation that is *not* the CUDA rule:
   weight decay before the update, torch's eps placement, a 65536-entry table quantizer without
   the sign fix. Its results after steps 1 and 5 are stored too (`bnb_cpu.{0,4}.*`) with the
   measured distance to the port (adam8.json `bnb_cpu_vs_port_step1`, `bnb_cpu_vs_port`);
   `tests/optim8.rs` checks our spec lands within bounds of bitsandbytes' own output.

Runs on CPU, one thread, deterministic: running it twice gives identical files.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

PINS = {"torch": "2.15.0", "bitsandbytes": "0.50.2", "numpy": "2.4.6", "safetensors": "0.8.0"}

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "optim8"

# Tensors: an exact number of blocks, a partial last block of 136, a last block of one value,
# and one under min_8bit_size (f32 states, bnb's 32-bit kernel).
SIZES = [4096, 5000, 4097, 1000]
STEPS = 5
LRS = [1e-3, 9e-4, 8e-4, 7e-4, 6e-4]  # a decaying schedule: the scalars change every step
HYPER = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
MIN_8BIT_SIZE = 4096
BLOCK = 256


def check_versions(strict=True):
    """The pins, enforced when writing fixtures; with --cuda (a device machine's own torch) only
    reported: the port is plain IEEE numpy arithmetic, independent of the versions."""
    import importlib.metadata as md

    bad = {k: (v, md.version(k)) for k, v in PINS.items() if md.version(k).split("+")[0] != v}
    if bad and strict:
        raise SystemExit(f"version mismatch (want, have): {bad}")
    if bad:
        print(f"note: versions differ from the pins (want, have): {bad}")


def inputs(np):
    """Parameters and per-step gradients (f32), from a fixed seed. Tensor 2's first gradient is
    zero (a LoRA A matrix's first step: B starts at zero), its block 3 stays zero at step 2."""
    rng = np.random.default_rng(20240611)
    params = [rng.standard_normal(n).astype(np.float32) * np.float32(0.05) for n in SIZES]
    grads = []
    for k in range(STEPS):
        gs = []
        for t, n in enumerate(SIZES):
            # Heavy-tailed magnitudes across blocks so codes spread over the dynamic map.
            scale = np.repeat(10.0 ** rng.uniform(-4, -1, size=-(-n // BLOCK)), BLOCK)[:n]
            g = (rng.standard_normal(n) * scale).astype(np.float32)
            if t == 2 and k == 0:
                g[:] = 0
            if t == 2 and k == 1:
                g[3 * BLOCK : 4 * BLOCK] = 0
            gs.append(g)
        grads.append(gs)
    return params, grads


# ---- the port of bnb's CUDA rule ---------------------------------------------------------------


def port_scalars(np, lr, step):
    """The kernel's scalars (kernels.cu, kOptimizerStatic8bit2StateBlockwise head):
        correction1 = 1.0f - __powf(beta1, step);
        correction2 = sqrtf(1.0f - __powf(beta2, step));
        step_size = __fdividef(-lr * correction2, correction1);
    and `correction2 * eps` in the update. The f32 arguments are what bnb's Python passes
    (`ct.c_float`). pow and sqrt in f64 (C's pow, as Rust's powf), rounded once to f32; then
    f32 products/quotient (IEEE). The decay `1.0f - (lr * weight_decay)` and `1.0f - beta`:
    f32 operations."""
    f = np.float32
    b1, b2, eps, wd, lr32 = f(HYPER["beta1"]), f(HYPER["beta2"]), f(HYPER["eps"]), f(HYPER["weight_decay"]), f(lr)
    c1 = f(1.0 - float(b1) ** float(step))
    c2 = f(math.sqrt(1.0 - float(b2) ** float(step)))
    return {
        "beta1": b1,
        "w1": f(1.0) - b1,
        "beta2": b2,
        "w2": f(1.0) - b2,
        "step_size": (-lr32 * c2) / c1,
        "eps_hat": c2 * eps,
        "decay": f(1.0) - lr32 * wd,
        "use_decay": wd > 0,
    }


def port_quantize_2d(np, code, signed, x):
    """quantize_2D<SIGNED> (kernels.cu): binary search from pivot 127 with steps 64..1 (the
    `quadrants` are code[63], code[127], code[191], i.e. the same values), then the midpoint
    comparison. Vectorized over x; NaN compares false everywhere as on the device."""
    n = x.shape[0]
    pivot = np.full(n, 127, dtype=np.int64)
    upper_pivot = np.full(n, 255, dtype=np.int64)
    lower_pivot = np.zeros(n, dtype=np.int64)
    lower = np.full(n, -1.0 if signed else 0.0, dtype=np.float32)
    upper = np.full(n, 1.0, dtype=np.float32)
    val = code[pivot]
    i = 64
    while i > 0:
        up = x > val
        lower_pivot = np.where(up, pivot, lower_pivot)
        lower = np.where(up, val, lower)
        upper_pivot = np.where(up, upper_pivot, pivot)
        upper = np.where(up, upper, val)
        pivot = np.where(up, pivot + i, pivot - i)
        val = code[pivot]
        i >>= 1
    half = np.float32(0.5)
    up = x > val
    mid_up = (upper + val) * half
    mid_lo = (lower + val) * half
    out = np.where(up, np.where(x > mid_up, upper_pivot, pivot), np.where(x < mid_lo, lower_pivot, pivot))
    return out


def port_step_q8(np, s, code1, code2, p, g, c1s, c2s, absmax1, absmax2):
    """One launch of kOptimizerStatic8bit2StateBlockwise<float, ADAM> on one tensor, block by
    block. Returns new (p, c1s, c2s, absmax1, absmax2)."""
    n = p.shape[0]
    nblocks = -(-n // BLOCK)
    pad = nblocks * BLOCK - n
    # BlockLoad with valid_items: out-of-range g = (T)0, state1 = 128, state2 = 0.
    g_full = np.concatenate([g, np.zeros(pad, np.float32)])
    c1_full = np.concatenate([c1s, np.full(pad, 128, np.uint8)])
    c2_full = np.concatenate([c2s, np.zeros(pad, np.uint8)])
    a1 = np.repeat(absmax1, BLOCK)
    a2 = np.repeat(absmax2, BLOCK)
    finite = np.isfinite(g_full)
    gv = np.where(finite, g_full, np.float32(0))
    # gnorm_scale = 1 (bnb's Python passes 1.0; clipping happens before, in the trainer).
    # s2 = smem_quantiles2[c2] * absmax2[i / BLOCK_SIZE];  s2 = (s2 * beta2) + (((1.0f - beta2) * g * g))
    s2 = code2[c2_full] * a2
    s2 = (s2 * s["beta2"]) + ((s["w2"] * gv) * gv)
    # s1 = smem_quantiles1[c1] * absmax1[i / BLOCK_SIZE];  s1 = (s1 * beta1) + (((1.0f - beta1) * g))
    s1 = code1[c1_full] * a1
    s1 = (s1 * s["beta1"]) + (s["w1"] * gv)
    # else branch: s1 = s2 = 0
    s1 = np.where(finite, s1, np.float32(0))
    s2 = np.where(finite, s2, np.float32(0))
    # new_local_abs_max = BlockReduce(max over fabsf), from -FLT_MAX (as bit patterns of |x|).
    am1 = np.abs(s1).reshape(nblocks, BLOCK).view(np.uint32).max(axis=1).view(np.float32)
    am2 = np.abs(s2).reshape(nblocks, BLOCK).view(np.uint32).max(axis=1).view(np.float32)
    # p = p + (step_size * (s1 / (sqrtf(s2) + (correction2 * eps))));  if wd > 0: p = p * (1 - lr*wd)
    s1v, s2v, fin = s1[:n], s2[:n], finite[:n]
    newp = p + (s["step_size"] * (s1v / (np.sqrt(s2v) + s["eps_hat"])))
    if s["use_decay"]:
        newp = newp * s["decay"]
    newp = np.where(fin, newp, p)
    # c1 = quantize_2D<1>(..., __fdividef(s1, absmax1)); c2 = quantize_2D<0>(..., s2 / absmax2)
    with np.errstate(invalid="ignore", divide="ignore"):
        x1 = s1v / np.repeat(am1, BLOCK)[:n]
        x2 = s2v / np.repeat(am2, BLOCK)[:n]
    q1 = port_quantize_2d(np, code1, True, x1)
    q2 = port_quantize_2d(np, code2, False, x2)
    # if (signbit(smem_quantiles1[c1]) != signbit(s1)) { if (s1 > 0) c1 += 1; else c1 -= 1; }
    flip = np.signbit(code1[q1]) != np.signbit(s1v)
    q1 = np.where(flip, np.where(s1v > 0, q1 + 1, q1 - 1), q1)
    return newp, (q1 & 0xFF).astype(np.uint8), q2.astype(np.uint8), am1, am2


def port_step_f32(np, s, p, g, m, v):
    """kOptimizer32bit2State<float, ADAM> (kernels.cu), update_scale 1, skip_zeros off:
    s1 = s1 * beta1 + ((1.0f - beta1) * g);  s2 = s2 * beta2 + ((1.0f - beta2) * (g * g));
    p = p + (update_scale * step_size * (s1 / (sqrtf(s2) + (eps * correction2))));  decay."""
    m = m * s["beta1"] + (s["w1"] * g)
    v = v * s["beta2"] + (s["w2"] * (g * g))
    p = p + (s["step_size"] * (m / (np.sqrt(v) + s["eps_hat"])))
    if s["use_decay"]:
        p = p * s["decay"]
    return p, m, v


def run_port(np, code1, code2, params, grads):
    """STEPS steps of the port over every tensor; returns per-step snapshots."""
    st = []
    for n in SIZES:
        if n >= MIN_8BIT_SIZE:
            nb = -(-n // BLOCK)
            st.append(("q8", np.zeros(n, np.uint8), np.zeros(n, np.uint8), np.zeros(nb, np.float32), np.zeros(nb, np.float32)))
        else:
            st.append(("f32", np.zeros(n, np.float32), np.zeros(n, np.float32)))
    ps = [p.copy() for p in params]
    snaps = []
    for k in range(STEPS):
        s = port_scalars(np, LRS[k], k + 1)
        snap = []
        for t in range(len(SIZES)):
            if st[t][0] == "q8":
                _, c1, c2, a1, a2 = st[t]
                ps[t], c1, c2, a1, a2 = port_step_q8(np, s, code1, code2, ps[t], grads[k][t], c1, c2, a1, a2)
                st[t] = ("q8", c1, c2, a1, a2)
                snap.append({"p": ps[t].copy(), "m_codes": c1, "v_codes": c2, "m_absmax": a1, "v_absmax": a2})
            else:
                _, m, v = st[t]
                ps[t], m, v = port_step_f32(np, s, ps[t], grads[k][t], m, v)
                st[t] = ("f32", m, v)
                snap.append({"p": ps[t].copy(), "m": m.copy(), "v": v.copy()})
        snaps.append(snap)
    return snaps


# ---- bitsandbytes itself -------------------------------------------------------------------------


def run_bnb(torch, bnb, params, grads, device="cpu", paged=False):
    """bnb's AdamW8bit (PagedAdamW8bit on CUDA when `paged`) on the same inputs: its states after
    every step (state1/state2 codes, absmax1/absmax2; f32 state1/state2 below min_8bit_size)."""
    ps = [torch.nn.Parameter(torch.from_numpy(p.copy()).to(device)) for p in params]
    cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    opt = cls(ps, lr=LRS[0], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"], weight_decay=HYPER["weight_decay"])
    snaps = []
    for k in range(STEPS):
        for g_ in opt.param_groups:
            g_["lr"] = LRS[k]
        for p, g in zip(ps, grads[k]):
            p.grad = torch.from_numpy(g.copy()).to(device)
        opt.step()
        snap = []
        for p in ps:
            s = opt.state[p]
            cpu = lambda x: x.detach().to("cpu").numpy().copy()
            if s["state1"].dtype == torch.uint8:
                snap.append({"p": cpu(p), "m_codes": cpu(s["state1"]), "v_codes": cpu(s["state2"]),
                             "m_absmax": cpu(s["absmax1"]), "v_absmax": cpu(s["absmax2"])})
            else:
                snap.append({"p": cpu(p), "m": cpu(s["state1"]), "v": cpu(s["state2"])})
        snaps.append(snap)
    return snaps


def distance(np, a, b, steps):
    """How far snapshot list `a` lands from `b` (per tensor, over `steps`): max |Δp| in units
    of the step's lr, code agreement, max code distance, max relative absmax difference, and
    for f32 states the max relative m/v difference."""
    out = []
    for t in range(len(SIZES)):
        d = {"max_dp_over_lr": 0.0}
        for k in steps:
            x, y = a[k][t], b[k][t]
            d["max_dp_over_lr"] = max(d["max_dp_over_lr"], float(np.max(np.abs(x["p"].astype(np.float64) - y["p"]))) / LRS[k])
            if "m_codes" in x:
                for c in ("m_codes", "v_codes"):
                    diff = np.abs(x[c].astype(np.int64) - y[c].astype(np.int64))
                    diff = np.minimum(diff, 256 - diff)  # 0 and 255 are neighbours through the wrap
                    d[f"{c}_equal_frac_min"] = min(d.get(f"{c}_equal_frac_min", 1.0), float(np.mean(diff == 0)))
                    d[f"{c}_max_diff"] = max(d.get(f"{c}_max_diff", 0), int(diff.max()))
                for c in ("m_absmax", "v_absmax"):
                    den = np.maximum(np.abs(y[c].astype(np.float64)), 1e-30)
                    r = float(np.max(np.abs(x[c].astype(np.float64) - y[c]) / den))
                    d[f"{c}_max_rel"] = max(d.get(f"{c}_max_rel", 0.0), r)
            else:
                for c in ("m", "v"):
                    den = max(float(np.max(np.abs(y[c]))), 1e-30)
                    r = float(np.max(np.abs(x[c].astype(np.float64) - y[c]))) / den
                    d[f"{c}_max_rel"] = max(d.get(f"{c}_max_rel", 0.0), r)
        out.append(d)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuda", metavar="OUT_JSON", help="compare bnb's CUDA kernel with the port")
    args = ap.parse_args()
    check_versions(strict=not args.cuda)
    import numpy as np
    import torch
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from safetensors.numpy import save_file

    torch.set_num_threads(1)
    code1 = F.create_dynamic_map(signed=True).numpy().astype(np.float32)
    code2 = F.create_dynamic_map(signed=False).numpy().astype(np.float32)
    params, grads = inputs(np)
    port = run_port(np, code1, code2, params, grads)

    if args.cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--cuda: no CUDA device")
        dev = run_bnb(torch, bnb, params, grads, device="cuda", paged=True)
        report = {
            "device": torch.cuda.get_device_name(0),
            "versions": {k: __import__(k).__version__ for k in PINS},
            "bnb_cuda_vs_port_step1": distance(np, dev, port, [0]),
            "bnb_cuda_vs_port": distance(np, dev, port, range(STEPS)),
        }
        Path(args.cuda).write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report, indent=1))
        return

    bnb_cpu = run_bnb(torch, bnb, params, grads)
    tensors = {"map.signed": code1, "map.unsigned": code2}
    for t, p in enumerate(params):
        tensors[f"p0.{t}"] = p
    for k in range(STEPS):
        for t in range(len(SIZES)):
            tensors[f"grad.{k}.{t}"] = grads[k][t]
            for name, val in port[k][t].items():
                tensors[f"port.{k}.{t}.{name}"] = val
    for k in (0, STEPS - 1):
        for t in range(len(SIZES)):
            for name, val in bnb_cpu[k][t].items():
                tensors[f"bnb_cpu.{k}.{t}.{name}"] = val
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(OUT / "adam8.safetensors"))
    meta = {
        "sizes": SIZES,
        "steps": STEPS,
        "lrs": LRS,
        "hyper": HYPER,
        "min_8bit_size": MIN_8BIT_SIZE,
        "block": BLOCK,
        "versions": {k: __import__(k).__version__ for k in PINS},
        # Step 1 starts from zero states on both sides: only the rule differs (decay order, eps
        # placement, quantizer). Over 5 steps the quantizers' differences feed back.
        "bnb_cpu_vs_port_step1": distance(np, bnb_cpu, port, [0]),
        "bnb_cpu_vs_port": distance(np, bnb_cpu, port, range(STEPS)),
    }
    (OUT / "adam8.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({k: meta[k] for k in ("bnb_cpu_vs_port_step1", "bnb_cpu_vs_port")}, indent=1))


if __name__ == "__main__":
    main()

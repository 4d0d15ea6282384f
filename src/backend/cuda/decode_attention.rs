//! Launchers of `kernels/decode_attention.cu`: the bf16 KV cache write and flash-decoding
//! attention (split kernel + combine), spec in [`crate::backend::cpu::decode_attention`].
//!
//! [`attention`] is what [`crate::backend::Backend::attention`] runs on CUDA: the split kernel
//! for head_dim 64 and 128 with at most 16 query heads per KV head (every Llama shape), for
//! decode and prefill alike (a CTA takes up to 16 query rows of one KV group, so a prefill
//! reads each K/V tile once per 16 / G positions); `kernels/attention.cu` (one warp per query,
//! reading the same bf16 cache) for any other shape, e.g. the tiny test models' head_dim 16.
//! The split length comes from [`split_plan`] (about `TARGET_CTAS` CTAs); with one split the
//! kernel normalises in place and no combine is launched.
//!
//! A decode step replayed from a CUDA graph (`step.rs`) passes its position as a device word
//! (`pos_dev`): the grid is then sized for the whole cache ([`max_splits`]), the kernels plan the
//! split for the position they read, and the combine is always launched (it returns at once
//! when the plan is one split). The result is the same split, hence the same bits, as a launch
//! planned on the host at that position.

use super::ops::{grid, launch_err, need, DevU32};
use super::runtime::{CudaDevice, DevBuf};
use crate::backend::cpu::decode_attention::{max_splits, split_plan, MAX_ROWS};
use crate::backend::AttnShape;
use crate::error::Result;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// Split partials, reused across calls: `part_o` `[rows, n_splits, D]`, `part_ml` `[rows, n_splits, 2]`.
#[derive(Default)]
pub struct DecodeScratch {
    part_o: Option<DevBuf<f32>>,
    part_ml: Option<DevBuf<f32>>,
}

/// `cache[off..off + len] = bf16(src[..len])`, round to nearest even. A non-null `pos_dev`
/// (a decode step's position word) replaces `off` by `*pos_dev · len` on the device.
pub fn kv_write(
    dev: &CudaDevice,
    cache: &mut CudaSlice<u16>,
    off: usize,
    src: &CudaSlice<f32>,
    len: usize,
    pos_dev: DevU32<'_>,
) -> Result<()> {
    need("kv_write cache", cache.len(), off + len)?;
    need("kv_write src", src.len(), len)?;
    if len == 0 {
        return Ok(());
    }
    let f = dev.function("decode_attention", "kv_write_bf16")?;
    let (off64, n64) = (off as i64, len as i64);
    let mut b = dev.stream.launch_builder(&f);
    b.arg(cache).arg(src).arg(&off64).arg(&n64);
    pos_dev.push(&mut b);
    b.arg(&n64);
    // SAFETY: matches kv_write_bf16(uint16_t*, const float*, int64_t, int64_t, const uint32_t*,
    // int64_t); sizes checked; a device position is below the cache's positions (the step
    // checks it on the host before every launch).
    unsafe { b.launch(grid(len)) }.map_err(launch_err("kv_write_bf16"))?;
    Ok(())
}

/// Whether the split kernel takes `s` (else `kernels/attention.cu` does).
pub fn supported(s: &AttnShape) -> bool {
    matches!(s.head_dim, 64 | 128) && s.kv_heads > 0 && s.heads / s.kv_heads <= MAX_ROWS
}

/// `(split_len, n_splits, query blocks)` of a launch for `s`; with a device position, the grid's
/// `n_splits` is the most any position of the cache needs.
pub fn plan(s: &AttnShape, device_pos: bool) -> (usize, usize, usize) {
    let tq = MAX_ROWS / (s.heads / s.kv_heads);
    let q_blocks = s.q_len.div_ceil(tq);
    let ctas = s.batch * s.kv_heads * q_blocks;
    let (split_len, n_splits) = split_plan(s.pos0 + s.q_len, ctas);
    if device_pos {
        return (split_len, max_splits(s.cache_cap, ctas), q_blocks);
    }
    (split_len, n_splits, q_blocks)
}

/// Causal GQA attention over bf16 caches (see [`AttnShape`]), by whichever kernel takes `s`;
/// a non-null `pos_dev` is a decode step's position word (see the module doc).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    dev: &CudaDevice,
    scratch: &mut DecodeScratch,
    out: &mut CudaSlice<f32>,
    q: &CudaSlice<f32>,
    k: &CudaSlice<u16>,
    v: &CudaSlice<u16>,
    s: AttnShape,
    pos_dev: DevU32<'_>,
) -> Result<()> {
    let qn = super::ops::check_attention(&s, out, q, k, v)?;
    if qn == 0 {
        return Ok(());
    }
    if !supported(&s) {
        return super::ops::attention(dev, out, q, k, v, s, pos_dev);
    }
    let device_pos = !matches!(pos_dev, DevU32::Addr(0));
    let (split_len, n_splits, q_blocks) = plan(&s, device_pos);
    let rows = s.batch * s.q_len * s.heads;
    let part_o = dev.grown(&mut scratch.part_o, rows * n_splits * s.head_dim)?;
    let part_ml = dev.grown(&mut scratch.part_ml, rows * n_splits * 2)?;
    let name = if s.head_dim == 64 {
        "decode_attention_split_d64"
    } else {
        "decode_attention_split_d128"
    };
    let f = dev.function("decode_attention", name)?;
    let a = [
        s.q_len as i32,
        s.pos0 as i32,
        s.cache_cap as i32,
        s.heads as i32,
        s.kv_heads as i32,
        split_len as i32,
        n_splits as i32,
    ];
    let cfg = LaunchConfig {
        grid_dim: (
            n_splits as u32,
            s.kv_heads as u32,
            (s.batch * q_blocks) as u32,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream.launch_builder(&f);
    b.arg(&mut *out)
        .arg(&mut **part_o)
        .arg(&mut **part_ml)
        .arg(q)
        .arg(k)
        .arg(v);
    for x in &a {
        b.arg(x);
    }
    pos_dev.push(&mut b);
    // SAFETY: matches decode_attention_split_d{64,128}(float*×3, const float*, const uint16_t*×2,
    // int×7, const uint32_t*); q, out, k, v sizes checked above, the partials hold
    // rows·n_splits·(D, 2) floats; a device plan never has more splits than the grid.
    unsafe { b.launch(cfg) }.map_err(launch_err(name))?;
    if n_splits == 1 {
        return Ok(());
    }
    let f = dev.function("decode_attention", "decode_attention_combine")?;
    let (rows32, splits32, d32) = (rows as i32, n_splits as i32, s.head_dim as i32);
    let (q_len32, ctas32) = (s.q_len as i32, (s.batch * s.kv_heads * q_blocks) as i32);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (s.head_dim as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream.launch_builder(&f);
    b.arg(out)
        .arg(&**part_o)
        .arg(&**part_ml)
        .arg(&rows32)
        .arg(&splits32)
        .arg(&d32);
    pos_dev.push(&mut b);
    b.arg(&q_len32).arg(&ctas32);
    // SAFETY: matches decode_attention_combine(float*, const float*×2, int×3, const uint32_t*,
    // int×2); the partials were written above for rows × n_splits (the device plan's splits).
    unsafe { b.launch(cfg) }.map_err(launch_err("decode_attention_combine"))?;
    Ok(())
}

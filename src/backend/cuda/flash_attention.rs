//! Launchers of `kernels/flash_attention.cu`: causal GQA attention forward (saving the per-row
//! log-sum-exp) and backward for training, FlashAttention-2 style. CPU specification:
//! [`crate::backend::cpu::flash_attention`] (derivation there); checked against it by
//! `crate::check::attention`.
//!
//! Head dims 64 and 128 run the tensor-core kernels (`flash_attention_{fwd,bwd}_bf16_d{64,128}`:
//! bf16 operands in shared memory, f32 softmax statistics and accumulators); any other
//! `head_dim ≤ 256` runs the plain f32 kernels (`flash_attention_fwd_f32`,
//! `flash_attention_bwd_{dq,dkdv}_f32`). The backward first computes `Δ = rowsum(dout ⊙ out)`
//! into a scratch buffer and zeroes `dq` (`flash_attention_delta_f32`); the tensor-core backward
//! then accumulates `dq` with atomics. Shapes are those of training: `pos0 = 0`,
//! `cache_cap = q_len`; anything else is refused.

use super::runtime::CudaDevice;
use crate::backend::AttnShape;
use crate::error::{Error, Result};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// Threads per CTA of the tensor-core kernels and of the f32 kernels (4 warps).
const THREADS: u32 = 128;
/// Queries per forward CTA and keys per backward CTA of the tensor-core kernels.
const TILE: usize = 64;
/// Largest head_dim the f32 kernels take (8 values per lane).
const MAX_HEAD_DIM: usize = 256;

fn launch_err(kernel: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Backend(format!("{kernel}: {e}"))
}

fn need(what: &str, have: usize, want: usize) -> Result<()> {
    if have < want {
        return Err(Error::Backend(format!(
            "cuda flash attention {what}: buffer holds {have} values, op needs {want}"
        )));
    }
    Ok(())
}

/// Whether `head_dim` has a tensor-core kernel.
fn tensor_core(head_dim: usize) -> bool {
    matches!(head_dim, 64 | 128)
}

/// Refuses shapes the kernels do not implement; returns `(query values, kv values, rows)`
/// with `rows = B·T·H` (the length of `lse`).
fn check_shape(s: AttnShape) -> Result<(usize, usize, usize)> {
    let bad = |why: &str| {
        Err(Error::Backend(format!(
            "cuda flash attention: unsupported shape {s:?} ({why})"
        )))
    };
    if s.pos0 != 0 || s.cache_cap != s.q_len {
        return bad("training attention needs pos0 = 0 and cache_cap = q_len");
    }
    if s.kv_heads == 0 || s.heads % s.kv_heads != 0 {
        return bad("heads must be a multiple of kv_heads");
    }
    if s.head_dim == 0 || s.head_dim > MAX_HEAD_DIM {
        return bad("head_dim must be 1..=256");
    }
    if s.batch > 65_535 || s.heads > 65_535 || s.q_len > i32::MAX as usize {
        return bad("batch and heads ≤ 65535 (grid dimensions)");
    }
    let rows = s.batch * s.q_len * s.heads;
    Ok((
        rows * s.head_dim,
        s.batch * s.q_len * s.kv_heads * s.head_dim,
        rows,
    ))
}

/// Dynamic shared memory of `flash_attention_bwd_bf16_d{head_dim}`: K, V (64 rows) and Q, dout
/// (`bq` rows: 64 queries per tile for D = 64, 32 for D = 128, the register budget) at D + 8
/// bf16 per row, dS (`bq × 72` bf16), lse and Δ (`bq` f32 each).
fn bwd_smem_bytes(head_dim: usize) -> usize {
    let bq = if head_dim == 64 { 64 } else { 32 };
    (2 * TILE + 2 * bq) * (head_dim + 8) * 2 + bq * (TILE + 8) * 2 + 2 * bq * 4
}

/// One warp per row, 4 warps per block.
fn warp_rows(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(4) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Forward: writes `out` `[B, T, H, D]` and `lse` `[B, T, H]` (see `TrainBackend::attention_train`).
pub fn forward(
    dev: &CudaDevice,
    out: &mut CudaSlice<f32>,
    lse: &mut CudaSlice<f32>,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    s: AttnShape,
) -> Result<()> {
    let (qn, kvn, rows) = check_shape(s)?;
    need("out", out.len(), qn)?;
    need("lse", lse.len(), rows)?;
    need("q", q.len(), qn)?;
    need("k", k.len(), kvn)?;
    need("v", v.len(), kvn)?;
    if qn == 0 {
        return Ok(());
    }
    let (b, t, h, kv, d) = (
        s.batch as i32,
        s.q_len as i32,
        s.heads as i32,
        s.kv_heads as i32,
        s.head_dim as i32,
    );
    if tensor_core(s.head_dim) {
        let name = format!("flash_attention_fwd_bf16_d{d}");
        let f = dev.function("flash_attention", &name)?;
        let cfg = LaunchConfig {
            grid_dim: (s.q_len.div_ceil(TILE) as u32, h as u32, b as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = dev.stream.launch_builder(&f);
        l.arg(out)
            .arg(lse)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(&t)
            .arg(&h)
            .arg(&kv);
        // SAFETY: matches FA_FWD_ARGS (float*×2, const float*×3, int×3); sizes checked; head_dim
        // is the kernel's D, so rows are whole float4s of 256-byte aligned allocations.
        unsafe { l.launch(cfg) }.map_err(launch_err(&name))?;
    } else {
        let f = dev.function("flash_attention", "flash_attention_fwd_f32")?;
        let mut l = dev.stream.launch_builder(&f);
        l.arg(out).arg(lse).arg(q).arg(k).arg(v);
        l.arg(&b).arg(&t).arg(&h).arg(&kv).arg(&d);
        // SAFETY: matches flash_attention_fwd_f32(float*×2, const float*×3, int×5); sizes checked.
        unsafe { l.launch(warp_rows(rows)) }.map_err(launch_err("flash_attention_fwd_f32"))?;
    }
    Ok(())
}

/// Backward: writes `dq`, `dk`, `dv` from `dout`, the inputs and the forward's `out`, `lse`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dev: &CudaDevice,
    dq: &mut CudaSlice<f32>,
    dk: &mut CudaSlice<f32>,
    dv: &mut CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    out: &CudaSlice<f32>,
    lse: &CudaSlice<f32>,
    s: AttnShape,
) -> Result<()> {
    let (qn, kvn, rows) = check_shape(s)?;
    for (what, len) in [("dq", dq.len()), ("dout", dout.len()), ("q", q.len())] {
        need(what, len, qn)?;
    }
    need("out", out.len(), qn)?;
    for (what, len) in [
        ("dk", dk.len()),
        ("dv", dv.len()),
        ("k", k.len()),
        ("v", v.len()),
    ] {
        need(what, len, kvn)?;
    }
    need("lse", lse.len(), rows)?;
    if qn == 0 {
        return Ok(());
    }
    let (b, t, h, kv, d) = (
        s.batch as i32,
        s.q_len as i32,
        s.heads as i32,
        s.kv_heads as i32,
        s.head_dim as i32,
    );

    // Δ = rowsum(dout ⊙ out) and dq = 0.
    let mut delta = dev.zeros::<f32>(rows)?;
    let f = dev.function("flash_attention", "flash_attention_delta_f32")?;
    let rows64 = rows as i64;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = dev.stream.launch_builder(&f);
    l.arg(&mut *delta)
        .arg(&mut *dq)
        .arg(dout)
        .arg(out)
        .arg(&rows64)
        .arg(&d);
    // SAFETY: matches flash_attention_delta_f32(float*×2, const float*×2, int64_t, int); delta
    // holds `rows` values, dq, dout, out `rows · d` (checked).
    unsafe { l.launch(cfg) }.map_err(launch_err("flash_attention_delta_f32"))?;

    if tensor_core(s.head_dim) {
        let smem = bwd_smem_bytes(s.head_dim);
        let name = format!("flash_attention_bwd_bf16_d{d}");
        let f = dev.function("flash_attention", &name)?;
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(launch_err(&name))?;
        let cfg = LaunchConfig {
            grid_dim: (s.q_len.div_ceil(TILE) as u32, kv as u32, b as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut l = dev.stream.launch_builder(&f);
        l.arg(dq)
            .arg(dk)
            .arg(dv)
            .arg(dout)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(lse);
        l.arg(&*delta).arg(&t).arg(&h).arg(&kv);
        // SAFETY: matches FA_BWD_ARGS (float*×3, const float*×6, int×3); sizes checked; the
        // dynamic shared memory is the kernel's carve-up for this D (see its header).
        unsafe { l.launch(cfg) }.map_err(launch_err(&name))?;
    } else {
        let f = dev.function("flash_attention", "flash_attention_bwd_dq_f32")?;
        let mut l = dev.stream.launch_builder(&f);
        l.arg(dq)
            .arg(dout)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(lse)
            .arg(&*delta);
        l.arg(&b).arg(&t).arg(&h).arg(&kv).arg(&d);
        // SAFETY: matches flash_attention_bwd_dq_f32(float*, const float*×6, int×5); sizes checked.
        unsafe { l.launch(warp_rows(rows)) }.map_err(launch_err("flash_attention_bwd_dq_f32"))?;

        let f = dev.function("flash_attention", "flash_attention_bwd_dkdv_f32")?;
        let mut l = dev.stream.launch_builder(&f);
        l.arg(dk)
            .arg(dv)
            .arg(dout)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(lse)
            .arg(&*delta);
        l.arg(&b).arg(&t).arg(&h).arg(&kv).arg(&d);
        // SAFETY: matches flash_attention_bwd_dkdv_f32(float*×2, const float*×6, int×5); one warp
        // per key row (B·T·KV); sizes checked.
        let kv_rows = s.batch * s.q_len * s.kv_heads;
        unsafe { l.launch(warp_rows(kv_rows)) }
            .map_err(launch_err("flash_attention_bwd_dkdv_f32"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(t: usize, pos0: usize, cap: usize, h: usize, kv: usize, d: usize) -> AttnShape {
        AttnShape {
            batch: 1,
            q_len: t,
            pos0,
            cache_cap: cap,
            heads: h,
            kv_heads: kv,
            head_dim: d,
        }
    }

    /// Training shapes pass; prefixes, foreign caches, odd groups and wide heads are refused.
    #[test]
    fn shapes_outside_training_are_refused() {
        assert_eq!(
            check_shape(shape(17, 0, 17, 6, 2, 128)).unwrap(),
            (17 * 6 * 128, 17 * 2 * 128, 17 * 6)
        );
        assert!(check_shape(shape(0, 0, 0, 4, 1, 64)).is_ok());
        assert!(check_shape(shape(17, 0, 17, 4, 1, 256)).is_ok());
        for bad in [
            shape(17, 3, 20, 4, 1, 64),  // prefix
            shape(17, 0, 32, 4, 1, 64),  // cache larger than the sequence
            shape(17, 0, 17, 4, 3, 64),  // heads not a multiple of kv_heads
            shape(17, 0, 17, 4, 0, 64),  // no kv heads
            shape(17, 0, 17, 4, 1, 0),   // empty heads
            shape(17, 0, 17, 4, 1, 320), // wider than the f32 kernels take
        ] {
            assert!(check_shape(bad).is_err(), "{bad:?}");
        }
    }

    /// The backward's shared memory matches the kernel's carve-up (its header) and fits the
    /// smallest opt-in limit of the supported GPUs (99 KiB on sm_86/89).
    #[test]
    fn backward_shared_memory() {
        assert_eq!(bwd_smem_bytes(64), 46_592);
        assert_eq!(bwd_smem_bytes(128), 57_088);
        assert!(bwd_smem_bytes(128) <= 99 * 1024);
    }
}

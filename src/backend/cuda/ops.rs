//! Launchers of the elementwise (SwiGLU backward and the bf16 activation stash included), RoPE,
//! embedding, attention and cross-entropy kernels (`kernels/elementwise.cu`, `kernels/rope.cu`, `kernels/attention.cu`), and the cuBLAS
//! products (`y = x·Wᵀ` for dense f32 weights, row-major, through column-major sgemm).

use super::runtime::CudaDevice;
use crate::backend::AttnShape;
use crate::error::{Error, Result};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};

/// A kernel's `const uint32_t*` argument (token ids, positions): a device buffer, or a raw
/// device address — a decode step's state words at their fixed address (`step.rs`), or 0 for a
/// null pointer where the kernel then takes its host argument instead.
#[derive(Clone, Copy, Debug)]
pub enum DevU32<'a> {
    Buf(&'a CudaSlice<u32>),
    Addr(u64),
}

impl<'a> DevU32<'a> {
    /// The null pointer: the kernel uses its host value.
    pub const NULL: DevU32<'static> = DevU32::Addr(0);

    /// Pushes the pointer onto a launch.
    pub(super) fn push<'l>(&'l self, l: &mut LaunchArgs<'l>)
    where
        'a: 'l,
    {
        match self {
            DevU32::Buf(s) => l.arg(*s),
            DevU32::Addr(p) => l.arg(p),
        };
    }
}

pub(super) fn launch_err(kernel: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Backend(format!("{kernel}: {e}"))
}

/// A 1-D grid-stride launch over `n` items.
pub(super) fn grid(n: usize) -> LaunchConfig {
    let blocks = (n as u64).div_ceil(256).clamp(1, 65_535 * 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(super) fn need(what: &str, have: usize, want: usize) -> Result<()> {
    if have < want {
        return Err(Error::Backend(format!(
            "cuda {what}: buffer holds {have} values, op needs {want}"
        )));
    }
    Ok(())
}

/// `x += y` over `n` values.
pub fn add_assign(
    dev: &CudaDevice,
    x: &mut CudaSlice<f32>,
    y: &CudaSlice<f32>,
    n: usize,
) -> Result<()> {
    need("add x", x.len(), n)?;
    need("add y", y.len(), n)?;
    let f = dev.function("elementwise", "add_assign_f32")?;
    let n64 = n as i64;
    let mut b = dev.stream.launch_builder(&f);
    b.arg(x).arg(y).arg(&n64);
    // SAFETY: matches add_assign_f32(float*, const float*, int64_t); sizes checked.
    unsafe { b.launch(grid(n)) }.map_err(launch_err("add_assign_f32"))?;
    Ok(())
}

/// `out[i] = half(x[i])` for `i < n`, rounded to nearest even: f16 bits when `f16`
/// (`dense_half.cu`'s `f32_to_f16`), else bf16 bits (`elementwise.cu`'s `f32_to_bf16`).
pub fn to_half(
    dev: &CudaDevice,
    out: &mut CudaSlice<u16>,
    x: &CudaSlice<f32>,
    n: usize,
    f16: bool,
) -> Result<()> {
    let (module, name) = if f16 {
        ("dense_half", "f32_to_f16")
    } else {
        ("elementwise", "f32_to_bf16")
    };
    need(&format!("{name} out"), out.len(), n)?;
    need(&format!("{name} x"), x.len(), n)?;
    let f = dev.function(module, name)?;
    let n64 = n as i64;
    let mut b = dev.stream.launch_builder(&f);
    b.arg(out).arg(x).arg(&n64);
    // SAFETY: matches f32_to_{bf16,f16}(16-bit*, const float*, int64_t); sizes checked.
    unsafe { b.launch(grid(n)) }.map_err(launch_err(name))?;
    Ok(())
}

/// `out = silu(gate) · up` over `n` values.
pub fn swiglu(
    dev: &CudaDevice,
    out: &mut CudaSlice<f32>,
    gate: &CudaSlice<f32>,
    up: &CudaSlice<f32>,
    n: usize,
) -> Result<()> {
    for (w, l) in [("out", out.len()), ("gate", gate.len()), ("up", up.len())] {
        need(&format!("swiglu {w}"), l, n)?;
    }
    let f = dev.function("elementwise", "swiglu_f32")?;
    let n64 = n as i64;
    let mut b = dev.stream.launch_builder(&f);
    b.arg(out).arg(gate).arg(up).arg(&n64);
    // SAFETY: matches swiglu_f32(float*, const float*, const float*, int64_t); sizes checked.
    unsafe { b.launch(grid(n)) }.map_err(launch_err("swiglu_f32"))?;
    Ok(())
}

/// Row gather `out[r, :] = table[ids[r], :]` (ids already checked against the vocabulary).
pub fn embedding(
    dev: &CudaDevice,
    out: &mut CudaSlice<f32>,
    table: &CudaSlice<f32>,
    ids: DevU32<'_>,
    rows: usize,
    dim: usize,
) -> Result<()> {
    need("embedding out", out.len(), rows * dim)?;
    if rows == 0 || dim == 0 {
        return Ok(()); // no rows, as on the CPU
    }
    let f = dev.function("elementwise", "embedding_f32")?;
    let (d64, r64) = (dim as i64, rows as i64);
    let mut b = dev.stream.launch_builder(&f);
    b.arg(out).arg(table);
    ids.push(&mut b);
    b.arg(&d64).arg(&r64);
    // SAFETY: matches embedding_f32(float*, const float*, const uint32_t*, int64_t, int64_t);
    // `ids` holds `rows` ids below the table's rows (checked by the caller).
    unsafe { b.launch(grid(rows * dim)) }.map_err(launch_err("embedding_f32"))?;
    Ok(())
}

/// [`embedding`] from a 16-bit table (`f16`: IEEE half, else bf16) `[vocab, dim]`, widened to
/// f32 exactly.
pub fn embedding_half(
    dev: &CudaDevice,
    out: &mut CudaSlice<f32>,
    table: &CudaSlice<u16>,
    f16: bool,
    ids: DevU32<'_>,
    rows: usize,
    dim: usize,
) -> Result<()> {
    need("embedding out", out.len(), rows * dim)?;
    if rows == 0 || dim == 0 {
        return Ok(());
    }
    let f = dev.function("elementwise", "embedding_half")?;
    let (d64, r64, is_f16) = (dim as i64, rows as i64, i32::from(f16));
    let mut b = dev.stream.launch_builder(&f);
    b.arg(out).arg(table);
    ids.push(&mut b);
    b.arg(&d64).arg(&r64).arg(&is_f16);
    // SAFETY: matches embedding_half(float*, const uint16_t*, const uint32_t*, int64_t, int64_t,
    // int); out holds rows·dim floats (checked above), `ids` holds `rows` ids < vocab (checked
    // by the caller).
    unsafe { b.launch(grid(rows * dim)) }.map_err(launch_err("embedding_half"))?;
    Ok(())
}

/// RoPE in place on `x` `[rows, heads, d]` at the device positions `pos[..rows]`; `sign = -1`
/// applies the transpose.
#[allow(clippy::too_many_arguments)]
pub fn rope(
    dev: &CudaDevice,
    x: &mut CudaSlice<f32>,
    pos: DevU32<'_>,
    rows: usize,
    inv_freq: &CudaSlice<f32>,
    heads: usize,
    d: usize,
    sign: f32,
) -> Result<()> {
    need("rope x", x.len(), rows * heads * d)?;
    if let DevU32::Buf(p) = pos {
        need("rope positions", p.len(), rows)?;
    }
    need("rope inv_freq", inv_freq.len(), d / 2)?;
    if rows == 0 {
        return Ok(());
    }
    let f = dev.function("rope", "rope_f32")?;
    let (h32, d32, r64) = (heads as i32, d as i32, rows as i64);
    let mut b = dev.stream.launch_builder(&f);
    b.arg(x);
    pos.push(&mut b);
    b.arg(inv_freq).arg(&h32).arg(&d32).arg(&sign).arg(&r64);
    // SAFETY: matches rope_f32(float*, const uint32_t*, const float*, int, int, float, int64_t);
    // `pos` holds `rows` positions (a buffer checked above, or a step's position word).
    unsafe { b.launch(grid(rows * heads * (d / 2))) }.map_err(launch_err("rope_f32"))?;
    Ok(())
}

/// The checks both attention launchers make: a consistent shape (positions within the cache,
/// whole GQA groups) and buffers holding `q`, `out` `[B, T, H, D]` and the caches `[B, S, KV,
/// D]`; returns the number of query values.
pub(super) fn check_attention(
    s: &AttnShape,
    out: &CudaSlice<f32>,
    q: &CudaSlice<f32>,
    k: &CudaSlice<u16>,
    v: &CudaSlice<u16>,
) -> Result<usize> {
    if s.pos0 + s.q_len > s.cache_cap || s.kv_heads == 0 || s.heads % s.kv_heads != 0 {
        return Err(Error::Backend(format!(
            "cuda attention: inconsistent shape {s:?}"
        )));
    }
    let qn = s.batch * s.q_len * s.heads * s.head_dim;
    let kvn = s.batch * s.cache_cap * s.kv_heads * s.head_dim;
    need("attention q", q.len(), qn)?;
    need("attention out", out.len(), qn)?;
    need("attention k", k.len(), kvn)?;
    need("attention v", v.len(), kvn)?;
    Ok(qn)
}

/// Causal GQA attention over bf16 caches (see [`AttnShape`]), one warp per query; `head_dim ≤
/// 256`. The general path of [`super::decode_attention::attention`] (shapes its split kernel
/// does not take). A non-null `pos_dev` replaces `s.pos0` on the device (a decode step).
pub fn attention(
    dev: &CudaDevice,
    out: &mut CudaSlice<f32>,
    q: &CudaSlice<f32>,
    k: &CudaSlice<u16>,
    v: &CudaSlice<u16>,
    s: AttnShape,
    pos_dev: DevU32<'_>,
) -> Result<()> {
    if s.head_dim > 256 {
        return Err(Error::Backend(format!(
            "cuda attention: unsupported shape {s:?} (head_dim ≤ 256)"
        )));
    }
    check_attention(&s, out, q, k, v)?;
    let f = dev.function("attention", "attention_bf16kv")?;
    let warps = s.batch * s.q_len * s.heads;
    let a = [
        s.batch as i32,
        s.q_len as i32,
        s.pos0 as i32,
        s.cache_cap as i32,
        s.heads as i32,
        s.kv_heads as i32,
        s.head_dim as i32,
    ];
    let cfg = LaunchConfig {
        grid_dim: ((warps as u32).div_ceil(4).max(1), 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream.launch_builder(&f);
    b.arg(out).arg(q).arg(k).arg(v);
    for x in &a {
        b.arg(x);
    }
    pos_dev.push(&mut b);
    // SAFETY: matches attention_bf16kv(float*, const float*, const uint16_t*×2, int×7, const
    // uint32_t*); sizes checked; a device position (a decode step's) stays below the capacity.
    unsafe { b.launch(cfg) }.map_err(launch_err("attention_bf16kv"))?;
    Ok(())
}

/// Per-row cross-entropy (targets checked against the vocabulary by the caller).
pub fn cross_entropy(
    dev: &CudaDevice,
    losses: &mut CudaSlice<f32>,
    logits: &CudaSlice<f32>,
    targets: &[i32],
    vocab: usize,
) -> Result<()> {
    let rows = targets.len();
    need("cross_entropy logits", logits.len(), rows * vocab)?;
    need("cross_entropy losses", losses.len(), rows)?;
    if rows == 0 {
        return Ok(());
    }
    let td = dev.upload(targets)?;
    let f = dev.function("elementwise", "cross_entropy_f32")?;
    let v64 = vocab as i64;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream.launch_builder(&f);
    b.arg(losses).arg(logits).arg(&*td).arg(&v64);
    // SAFETY: matches cross_entropy_f32(float*, const float*, const int32_t*, int64_t).
    unsafe { b.launch(cfg) }.map_err(launch_err("cross_entropy_f32"))?;
    Ok(())
}

/// `y[m, n] = beta·y + alpha · x[m, k] · W[n, k]ᵀ`, all row-major (cuBLAS sees the column-major
/// transposes: `yᵀ = W · xᵀ`, so `transa = T` on W with `lda = k`, `transb = N` on x).
#[allow(clippy::too_many_arguments)]
pub fn gemm_wt(
    blas: &CudaBlas,
    y: &mut CudaSlice<f32>,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    need("gemm y", y.len(), m * n)?;
    need("gemm x", x.len(), m * k)?;
    need("gemm w", w.len(), n * k)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    use cudarc::cublas::sys::cublasOperation_t as Op;
    let cfg = GemmConfig {
        transa: Op::CUBLAS_OP_T,
        transb: Op::CUBLAS_OP_N,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha,
        lda: k as i32,
        ldb: k as i32,
        beta,
        ldc: n as i32,
    };
    // SAFETY: the sizes were checked above against m, n, k and the leading dimensions.
    unsafe { blas.gemm(cfg, w, x, y) }.map_err(|e| Error::Backend(format!("cuBLAS sgemm: {e}")))
}

/// SwiGLU backward over `n` values (CPU spec `cpu/backward/swiglu.rs`): writes
/// `dgate = dh·up·σ(g)·(1 + g·(1 − σ(g)))` and `dup = dh·g·σ(g)` (`swiglu_backward_f32`).
pub fn swiglu_backward(
    dev: &CudaDevice,
    dgate: &mut CudaSlice<f32>,
    dup: &mut CudaSlice<f32>,
    dh: &CudaSlice<f32>,
    gate: &CudaSlice<f32>,
    up: &CudaSlice<f32>,
    n: usize,
) -> Result<()> {
    for (w, l) in [
        ("dgate", dgate.len()),
        ("dup", dup.len()),
        ("dh", dh.len()),
        ("gate", gate.len()),
        ("up", up.len()),
    ] {
        need(&format!("swiglu backward {w}"), l, n)?;
    }
    if n == 0 {
        return Ok(());
    }
    let f = dev.function("elementwise", "swiglu_backward_f32")?;
    let n64 = n as i64;
    let mut b = dev.stream.launch_builder(&f);
    b.arg(dgate).arg(dup).arg(dh).arg(gate).arg(up).arg(&n64);
    // SAFETY: matches swiglu_backward_f32(float*, float*, const float*×3, int64_t); every buffer
    // holds n values (checked); the two outputs are distinct &mut, so nothing aliases.
    unsafe { b.launch(grid(n)) }.map_err(launch_err("swiglu_backward_f32"))?;
    Ok(())
}

/// `out[i] = f32(x[i])` for bf16 bits `x`, `i < n`: the exact widening (bits shifted up by 16)
/// that undoes [`to_half`]`(.., false)` up to its rounding (`bf16_to_f32` in `elementwise.cu`).
pub fn bf16_to_f32(
    dev: &CudaDevice,
    out: &mut CudaSlice<f32>,
    x: &CudaSlice<u16>,
    n: usize,
) -> Result<()> {
    need("bf16_to_f32 out", out.len(), n)?;
    need("bf16_to_f32 x", x.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = dev.function("elementwise", "bf16_to_f32")?;
    let n64 = n as i64;
    let mut b = dev.stream.launch_builder(&f);
    b.arg(out).arg(x).arg(&n64);
    // SAFETY: matches bf16_to_f32(float*, const uint16_t*, int64_t); both buffers hold n values.
    unsafe { b.launch(grid(n)) }.map_err(launch_err("bf16_to_f32"))?;
    Ok(())
}

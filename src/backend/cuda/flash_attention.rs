//! Launchers of `kernels/flash_attention.cu`: causal GQA attention forward (saving the per-row
//! log-sum-exp) and backward for training, FlashAttention-2 style, over a packed batch
//! ([`Packed`]: the sequences concatenated along the token axis, each attending causally within
//! itself from position 0, FlashAttention's varlen layout). CPU specification:
//! [`crate::backend::cpu::flash_attention`] per sequence (derivation there); checked against it
//! by `crate::check::attention`.
//!
//! One launch set serves the whole batch. The kernels find each sequence's rows through
//! `cu_seqlens` (the B + 1 cumulative offsets) and, on the tensor-core path, a tile table built
//! here: one entry `(sequence, 64-row tile)` per CTA and head, ordered longest work first. Both
//! are uploaded together and kept in a [`FlashScratch`] while consecutive calls pack the same
//! lengths (every layer of a step does), with the backward's Δ buffer.
//!
//! Head dims 64 and 128 run the tensor-core kernels (`flash_attention_{fwd,bwd}_bf16_d{64,128}`:
//! bf16 operands in shared memory, f32 softmax statistics and accumulators); any other
//! `head_dim ≤ 256` runs the plain f32 kernels (`flash_attention_fwd_f32`,
//! `flash_attention_bwd_{dq,dkdv}_f32`, which find a row's sequence by binary search in
//! `cu_seqlens`). The backward first computes `Δ = rowsum(dout ⊙ out)` into the scratch and
//! zeroes `dq` (`flash_attention_delta_f32`); the tensor-core backward then accumulates `dq` with
//! atomics.

use super::ops::launch_err;
use super::runtime::{CudaDevice, DevBuf};
use crate::backend::Packed;
use crate::error::{Error, Result};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};

/// Threads per CTA of the tensor-core kernels and of the f32 kernels (4 warps).
const THREADS: u32 = 128;
/// Queries per forward CTA and keys per backward CTA of the tensor-core kernels: the rows of one
/// tile table entry.
const TILE: usize = 64;
/// Largest head_dim the f32 kernels take (8 values per lane).
const MAX_HEAD_DIM: usize = 256;
/// Largest 1-D grid (CUDA's x dimension).
const MAX_GRID: usize = i32::MAX as usize;

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

/// Refuses batches the kernels do not implement; returns `(query values, kv values, rows·H)`
/// (`rows·H` is the length of `lse`).
fn check_packed(p: Packed) -> Result<(usize, usize, usize)> {
    let bad = |why: &str| {
        Err(Error::Backend(format!(
            "cuda flash attention: unsupported batch (lens {:?}, heads {}, kv_heads {}, \
             head_dim {}): {why}",
            p.lens, p.heads, p.kv_heads, p.head_dim
        )))
    };
    if p.kv_heads == 0 || p.heads % p.kv_heads != 0 {
        return bad("heads must be a multiple of kv_heads");
    }
    if p.head_dim == 0 || p.head_dim > MAX_HEAD_DIM {
        return bad("head_dim must be 1..=256");
    }
    let rows = p.rows();
    // int32 row offsets; grids of one CTA per (tile, head) and one warp per (row, head).
    let tiles: usize = p.lens.iter().map(|l| l.div_ceil(TILE)).sum();
    if rows > i32::MAX as usize
        || p.lens.len() > i32::MAX as usize
        || tiles * p.heads > MAX_GRID
        || (rows * p.heads).div_ceil(4) > MAX_GRID
    {
        return bad("more rows than 32-bit offsets and grids address");
    }
    Ok((
        rows * p.heads * p.head_dim,
        rows * p.kv_heads * p.head_dim,
        rows * p.heads,
    ))
}

/// The host side of a batch's sequence tables, one int32 buffer
/// `[forward tiles | backward tiles | cu_seqlens]` (see the kernel's header):
/// - forward tiles: pairs `(sequence, query tile)`, ordered by decreasing tile index (a query
///   tile `i` walks `i + 1` key tiles), so the longest CTAs of all sequences start first;
/// - backward tiles: the same pairs `(sequence, key tile)`, ordered by decreasing
///   `len − 64·tile` (the queries that see the tile's keys);
/// - `cu_seqlens`: `B + 1` offsets, `cu_seqlens[s]` the first row of sequence `s`.
///
/// Returns the buffer and the number of tiles (entries per table). Ties keep sequence order.
fn seq_tables(lens: &[usize]) -> (Vec<i32>, usize) {
    let mut tiles: Vec<(usize, usize)> = lens
        .iter()
        .enumerate()
        .flat_map(|(s, &len)| (0..len.div_ceil(TILE)).map(move |i| (s, i)))
        .collect();
    let n = tiles.len();
    let mut buf = Vec::with_capacity(4 * n + lens.len() + 1);
    tiles.sort_by_key(|&(_, i)| std::cmp::Reverse(i));
    buf.extend(tiles.iter().flat_map(|&(s, i)| [s as i32, i as i32]));
    tiles.sort_by_key(|&(s, i)| std::cmp::Reverse(lens[s] - i * TILE));
    buf.extend(tiles.iter().flat_map(|&(s, i)| [s as i32, i as i32]));
    buf.push(0);
    let mut end = 0;
    for &len in lens {
        end += len;
        buf.push(end as i32);
    }
    (buf, n)
}

/// A batch's sequence tables on the device ([`seq_tables`]).
struct SeqTables {
    lens: Vec<usize>,
    tiles: usize,
    buf: DevBuf<i32>,
}

impl SeqTables {
    fn forward_tiles(&self) -> CudaView<'_, i32> {
        self.buf.slice(..2 * self.tiles)
    }
    fn backward_tiles(&self) -> CudaView<'_, i32> {
        self.buf.slice(2 * self.tiles..4 * self.tiles)
    }
    fn cu_seqlens(&self) -> CudaView<'_, i32> {
        self.buf.slice(4 * self.tiles..)
    }
}

/// Device state the launchers reuse from call to call: the sequence tables of the last packed
/// lengths (uploaded again only when the lengths change; every layer of a training step packs
/// the same ones) and the backward's Δ buffer (`rows·H` f32, grown on demand).
#[derive(Default)]
pub struct FlashScratch {
    tables: Option<SeqTables>,
    delta: Option<DevBuf<f32>>,
}

/// The tables of `lens` in `slot`, uploaded unless the cached ones are for the same lengths.
fn tables<'a>(
    slot: &'a mut Option<SeqTables>,
    dev: &CudaDevice,
    lens: &[usize],
) -> Result<&'a SeqTables> {
    if slot.as_ref().is_none_or(|t| t.lens != lens) {
        *slot = None;
        let (host, tiles) = seq_tables(lens);
        *slot = Some(SeqTables {
            lens: lens.to_vec(),
            tiles,
            buf: dev.upload(&host)?,
        });
    }
    Ok(slot.as_ref().expect("uploaded above"))
}

/// Dynamic shared memory of `flash_attention_bwd_bf16_d{head_dim}`: K, V (64 rows) and Q, dout
/// (`bq` rows: 64 queries per tile for D = 64, 32 for D = 128, the register budget) at D + 8
/// bf16 per row, dS (`bq × 72` bf16), lse and Δ (`bq` f32 each).
fn bwd_smem_bytes(head_dim: usize) -> usize {
    let bq = if head_dim == 64 { 64 } else { 32 };
    (2 * TILE + 2 * bq) * (head_dim + 8) * 2 + bq * (TILE + 8) * 2 + 2 * bq * 4
}

/// `n` CTAs of 128 threads in a 1-D grid.
fn ctas(n: usize, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes,
    }
}

/// One warp per row, 4 warps per block.
fn warp_rows(rows: usize) -> LaunchConfig {
    ctas(rows.div_ceil(4), 0)
}

/// Forward over a packed batch: writes `out` `[rows, H, D]` and `lse` `[rows, H]` from `q`
/// `[rows, H, D]`, `k`, `v` `[rows, KV, D]` (see `TrainBackend::attention_train`). A single
/// sequence is `p.lens = [T]`.
#[allow(clippy::too_many_arguments)]
pub fn forward_packed(
    dev: &CudaDevice,
    scratch: &mut FlashScratch,
    out: &mut CudaSlice<f32>,
    lse: &mut CudaSlice<f32>,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    p: Packed,
) -> Result<()> {
    let (qn, kvn, rows_h) = check_packed(p)?;
    need("out", out.len(), qn)?;
    need("lse", lse.len(), rows_h)?;
    need("q", q.len(), qn)?;
    need("k", k.len(), kvn)?;
    need("v", v.len(), kvn)?;
    if qn == 0 {
        return Ok(());
    }
    let (nseq, h, kv, d) = (
        p.lens.len() as i32,
        p.heads as i32,
        p.kv_heads as i32,
        p.head_dim as i32,
    );
    let t = tables(&mut scratch.tables, dev, p.lens)?;
    let cu = t.cu_seqlens();
    if tensor_core(p.head_dim) {
        let name = format!("flash_attention_fwd_bf16_d{d}");
        let f = dev.function("flash_attention", &name)?;
        let tiles = t.forward_tiles();
        let mut l = dev.stream.launch_builder(&f);
        l.arg(out).arg(lse).arg(q).arg(k).arg(v);
        l.arg(&cu).arg(&tiles).arg(&h).arg(&kv);
        // SAFETY: matches FA_FWD_ARGS (float*×2, const float*×3, const int*×2, int×2); sizes
        // checked against Σ lens, and the tables (built by seq_tables from the same lens) keep
        // every row a CTA touches inside its own sequence; head_dim is the kernel's D, so rows
        // are whole float4s of 256-byte aligned allocations. One CTA per (tile, head).
        unsafe { l.launch(ctas(t.tiles * p.heads, 0)) }.map_err(launch_err(&name))?;
    } else {
        let f = dev.function("flash_attention", "flash_attention_fwd_f32")?;
        let mut l = dev.stream.launch_builder(&f);
        l.arg(out).arg(lse).arg(q).arg(k).arg(v);
        l.arg(&cu).arg(&nseq).arg(&h).arg(&kv).arg(&d);
        // SAFETY: matches flash_attention_fwd_f32(float*×2, const float*×3, const int*, int×4);
        // one warp per (row, head) of the Σ lens rows; sizes checked.
        unsafe { l.launch(warp_rows(rows_h)) }.map_err(launch_err("flash_attention_fwd_f32"))?;
    }
    Ok(())
}

/// Backward over a packed batch: writes `dq`, `dk`, `dv` from `dout`, the inputs and the
/// forward's `out`, `lse` (layouts as [`forward_packed`]).
#[allow(clippy::too_many_arguments)]
pub fn backward_packed(
    dev: &CudaDevice,
    scratch: &mut FlashScratch,
    dq: &mut CudaSlice<f32>,
    dk: &mut CudaSlice<f32>,
    dv: &mut CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    out: &CudaSlice<f32>,
    lse: &CudaSlice<f32>,
    p: Packed,
) -> Result<()> {
    let (qn, kvn, rows_h) = check_packed(p)?;
    for (what, len) in [
        ("dq", dq.len()),
        ("dout", dout.len()),
        ("q", q.len()),
        ("out", out.len()),
    ] {
        need(what, len, qn)?;
    }
    for (what, len) in [
        ("dk", dk.len()),
        ("dv", dv.len()),
        ("k", k.len()),
        ("v", v.len()),
    ] {
        need(what, len, kvn)?;
    }
    need("lse", lse.len(), rows_h)?;
    if qn == 0 {
        return Ok(());
    }
    let (nseq, h, kv, d) = (
        p.lens.len() as i32,
        p.heads as i32,
        p.kv_heads as i32,
        p.head_dim as i32,
    );

    let t = tables(&mut scratch.tables, dev, p.lens)?;
    let cu = t.cu_seqlens();

    // Δ = rowsum(dout ⊙ out) and dq = 0.
    let delta = dev.grown(&mut scratch.delta, rows_h)?;
    let f = dev.function("flash_attention", "flash_attention_delta_f32")?;
    let rows64 = rows_h as i64;
    let cfg = LaunchConfig {
        grid_dim: (rows_h.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = dev.stream.launch_builder(&f);
    l.arg(&mut **delta).arg(&mut *dq).arg(dout).arg(out);
    l.arg(&rows64).arg(&d);
    // SAFETY: matches flash_attention_delta_f32(float*×2, const float*×2, int64_t, int); delta
    // holds ≥ rows·H values, dq, dout, out rows·H·d (checked).
    unsafe { l.launch(cfg) }.map_err(launch_err("flash_attention_delta_f32"))?;
    let delta: &CudaSlice<f32> = delta;

    if tensor_core(p.head_dim) {
        let smem = bwd_smem_bytes(p.head_dim);
        let name = format!("flash_attention_bwd_bf16_d{d}");
        let f = dev.function("flash_attention", &name)?;
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(launch_err(&name))?;
        let tiles = t.backward_tiles();
        let mut l = dev.stream.launch_builder(&f);
        l.arg(dq).arg(dk).arg(dv).arg(dout).arg(q).arg(k).arg(v);
        l.arg(lse).arg(delta).arg(&cu).arg(&tiles).arg(&h).arg(&kv);
        // SAFETY: matches FA_BWD_ARGS (float*×3, const float*×6, const int*×2, int×2); sizes
        // checked against Σ lens, and the tables keep every row a CTA touches inside its own
        // sequence; the dynamic shared memory is the kernel's carve-up for this D (see its
        // header). One CTA per (key tile, kv head).
        unsafe { l.launch(ctas(t.tiles * p.kv_heads, smem as u32)) }.map_err(launch_err(&name))?;
    } else {
        let f = dev.function("flash_attention", "flash_attention_bwd_dq_f32")?;
        let mut l = dev.stream.launch_builder(&f);
        l.arg(dq).arg(dout).arg(q).arg(k).arg(v).arg(lse).arg(delta);
        l.arg(&cu).arg(&nseq).arg(&h).arg(&kv).arg(&d);
        // SAFETY: matches flash_attention_bwd_dq_f32(float*, const float*×6, const int*, int×4);
        // one warp per (row, head); sizes checked.
        unsafe { l.launch(warp_rows(rows_h)) }.map_err(launch_err("flash_attention_bwd_dq_f32"))?;

        let f = dev.function("flash_attention", "flash_attention_bwd_dkdv_f32")?;
        let mut l = dev.stream.launch_builder(&f);
        l.arg(dk).arg(dv).arg(dout).arg(q).arg(k).arg(v).arg(lse);
        l.arg(delta).arg(&cu).arg(&nseq).arg(&h).arg(&kv).arg(&d);
        // SAFETY: matches flash_attention_bwd_dkdv_f32(float*×2, const float*×6, const int*,
        // int×4); one warp per (row, kv head); sizes checked.
        unsafe { l.launch(warp_rows(p.rows() * p.kv_heads)) }
            .map_err(launch_err("flash_attention_bwd_dkdv_f32"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(lens: &[usize], h: usize, kv: usize, d: usize) -> Packed<'_> {
        Packed {
            lens,
            heads: h,
            kv_heads: kv,
            head_dim: d,
        }
    }

    /// Training batches pass; odd groups and wide heads are refused.
    #[test]
    fn batches_outside_the_kernels_are_refused() {
        assert_eq!(
            check_packed(packed(&[17], 6, 2, 128)).unwrap(),
            (17 * 6 * 128, 17 * 2 * 128, 17 * 6)
        );
        assert_eq!(
            check_packed(packed(&[5, 0, 12], 4, 1, 24)).unwrap(),
            (17 * 4 * 24, 17 * 24, 17 * 4)
        );
        assert!(check_packed(packed(&[], 4, 1, 64)).is_ok());
        assert!(check_packed(packed(&[0], 4, 1, 64)).is_ok());
        assert!(check_packed(packed(&[17], 4, 1, 256)).is_ok());
        for (lens, h, kv, d) in [
            (&[17usize][..], 4, 3, 64),      // heads not a multiple of kv_heads
            (&[17], 4, 0, 64),               // no kv heads
            (&[17], 4, 1, 0),                // empty heads
            (&[17], 4, 1, 320),              // wider than the f32 kernels take
            (&[1 << 30, 1 << 30], 4, 1, 64), // rows past int32
        ] {
            assert!(check_packed(packed(lens, h, kv, d)).is_err(), "{lens:?}");
        }
    }

    /// The tables name every 64-row tile of every sequence exactly once, in the order of their
    /// work, and `cu_seqlens` holds the offsets; the rows a tile covers stay in its sequence.
    #[test]
    fn seq_tables_cover_every_tile_once() {
        let lens = [1usize, 17, 64, 0, 130, 300, 5];
        let (buf, n) = seq_tables(&lens);
        let want_n: usize = lens.iter().map(|l| l.div_ceil(64)).sum();
        assert_eq!(n, want_n);
        assert_eq!(buf.len(), 4 * n + lens.len() + 1);
        let cu = &buf[4 * n..];
        assert_eq!(cu, [0, 1, 18, 82, 82, 212, 512, 517]);
        let pairs = |t: &[i32]| -> Vec<(usize, usize)> {
            t.chunks(2)
                .map(|e| (e[0] as usize, e[1] as usize))
                .collect()
        };
        let (fwd, bwd) = (pairs(&buf[..2 * n]), pairs(&buf[2 * n..4 * n]));
        for table in [&fwd, &bwd] {
            let mut seen = table.clone();
            seen.sort();
            seen.dedup();
            assert_eq!(seen.len(), n, "an entry repeats");
            for &(s, i) in table.iter() {
                // The tile's first row is inside the sequence (the kernels mask the rest).
                assert!(i * 64 < lens[s], "tile {i} of sequence {s}");
            }
        }
        // Forward: decreasing key tiles to walk; backward: decreasing queries to visit.
        assert!(fwd.windows(2).all(|w| w[0].1 >= w[1].1));
        let work = |&(s, i): &(usize, usize)| lens[s] - 64 * i;
        assert!(bwd.windows(2).all(|w| work(&w[0]) >= work(&w[1])));
        assert_eq!(fwd[0], (5, 4));
        assert_eq!(bwd[0], (5, 0));
        // A single sequence: tiles from the last (forward) and from the first (backward).
        let (buf, n) = seq_tables(&[130]);
        assert_eq!(
            (n, buf),
            (3, vec![0, 2, 0, 1, 0, 0, 0, 0, 0, 1, 0, 2, 0, 130])
        );
        let (buf, n) = seq_tables(&[]);
        assert_eq!((n, buf), (0, vec![0]));
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

//! Launchers of `kernels/adamw8.cu`: bitsandbytes' 8-bit blockwise AdamW (`paged_adamw_8bit`) on
//! the device, over every LoRA tensor at once, with global gradient-norm clipping, bit for bit as
//! its CPU spec ([`crate::train::optim8`]: [`optim8::update_q8`] / [`optim8::update_f32`] after
//! [`crate::train::clip_grad_norm`], composed as `CpuBackend::adamw_step`).
//!
//! # Math
//! See the header of `kernels/adamw8.cu` and the spec's module docs. The host computes the scalars
//! with the spec's own code ([`Consts8`], [`Scalars8`] per tensor from its step count); the
//! device performs the spec's f32 operations in its order with IEEE rounding, so given the same
//! clip coefficient p, codes and absmax are bit-identical. The norm and the clip coefficient are
//! computed by the 32-bit optimizer's kernels (`adamw_sumsq_f32`, `adamw_norm_f32` of
//! `kernels/adamw.cu`) on this optimizer's table, whose entries have their layout.
//!
//! # State memory
//! One allocation, managed (pageable) exactly as the 32-bit optimizer's (`adamw.rs`: preferred
//! location the device, prefetched before each step, never more than the free memory, plain
//! device memory with a warning without concurrent managed access) or plain device memory:
//! ```text
//! [ f32 m | f32 v ]  tensors under 4096 values, each at a multiple of 64 f32   (2·F f32)
//! [ absmax₁ | absmax₂ ]  one f32 per block of 256 of each 8-bit tensor           (2·A f32)
//! [ m codes | v codes ]  one byte per value, each tensor at a multiple of 256 B  (2·P bytes)
//! ```
//! `F = Σ round_up(n, 64)` over the f32 tensors, `A = round_up(Σ ⌈n/256⌉, 64)` and `P = Σ
//! round_up(n, 256)` over the 8-bit ones ([`Layout8`]). Bytes: `8F + 8A + 2P`, i.e. 2.03125 per
//! parameter of the 8-bit tensors plus alignment ([`DeviceAdamW8::nbytes`]).
//!
//! # One step ([`DeviceAdamW8::step`])
//! 1. The table (`AdamTensor` {p, g, m, v, n, chunk0} per tensor, 6 × u64) and the absmax pointers
//!    (`Adam8Absmax`, 2 × u64) are uploaded when the parameter or gradient pointers change; the
//!    per-tensor `{step_size, eps_hat}` every step. The f64 sums are zeroed; managed states are
//!    prefetched.
//! 2. `adamw_sumsq_f32`, 3. `adamw_norm_f32` (`kernels/adamw.cu`): the norm and coefficient.
//! 4. `adamw8_update_f32` (grid Σ ⌈n/2048⌉, 256 threads): clip + 8-bit AdamW, or nothing when the
//!    norm is not finite.
//! 5. The norm back to the host (4 bytes); the step counts advance when it is finite.

use super::adamw::{check_step_buffers, launch_norm, param_grad_ptrs, read_norm, CHUNK};
use super::managed::{managed_supported, Managed, StateMem};
use super::runtime::{CudaDevice, DevBuf};
use crate::error::{Error, Result};
use crate::train::optim8::{
    self, blocks, signed_map, unsigned_map, uses_q8, Consts8, Quant8, Scalars8, BLOCK,
};
use crate::train::{AdamParamState, AdamW};
use cudarc::driver::{result, CudaSlice, LaunchConfig, PushKernelArg};

/// Threads per block (`ADAMW8_THREADS`); one warp per quantization block.
const THREADS: u32 = 256;
/// f32 tensors' states start at a multiple of this many f32 (256 bytes).
const ALIGN_F32: usize = 64;
/// u64 words per table entry (`AdamTensor`) and per absmax entry (`Adam8Absmax`).
const ENTRY: usize = 6;
const ABSMAX_ENTRY: usize = 2;
const _: () = assert!(
    CHUNK == (THREADS as usize / 32) * BLOCK,
    "adamw8.cu covers adamw.cu's chunks"
);

fn drv(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Backend(format!("device 8-bit AdamW: {what}: {e}"))
}

/// Where one tensor's states lie (byte offsets from the allocation's base).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Place {
    /// f32 moments: m at `m`, v at `v`.
    F32 { m: usize, v: usize },
    /// 8-bit moments: codes at `mc`, `vc`; absmax at `a1`, `a2`.
    Q8 {
        mc: usize,
        vc: usize,
        a1: usize,
        a2: usize,
    },
}

/// The allocation's regions and every tensor's place in them (host arithmetic only).
#[derive(Debug, Clone, PartialEq)]
struct Layout8 {
    places: Vec<Place>,
    /// Bytes of the allocation.
    bytes: usize,
    /// Index of each tensor's first chunk of `CHUNK` values (prefix sum of `⌈n/CHUNK⌉`).
    chunk0: Vec<usize>,
    chunks: usize,
}

impl Layout8 {
    fn new(sizes: &[usize]) -> Layout8 {
        let (mut f, mut a, mut p) = (0usize, 0usize, 0usize);
        let mut rel = Vec::with_capacity(sizes.len());
        for &n in sizes {
            if uses_q8(n) {
                rel.push((true, p, a));
                p += n.next_multiple_of(BLOCK);
                a += blocks(n);
            } else {
                rel.push((false, f, 0));
                f += n.next_multiple_of(ALIGN_F32);
            }
        }
        let a = a.next_multiple_of(ALIGN_F32);
        let (absmax0, codes0) = (8 * f, 8 * f + 8 * a);
        let places = rel
            .iter()
            .map(|&(q8, o, ao)| {
                if q8 {
                    Place::Q8 {
                        mc: codes0 + o,
                        vc: codes0 + p + o,
                        a1: absmax0 + 4 * ao,
                        a2: absmax0 + 4 * (a + ao),
                    }
                } else {
                    Place::F32 {
                        m: 4 * o,
                        v: 4 * (f + o),
                    }
                }
            })
            .collect();
        let mut chunk0 = Vec::with_capacity(sizes.len());
        let mut chunks = 0;
        for &n in sizes {
            chunk0.push(chunks);
            chunks += n.div_ceil(CHUNK);
        }
        Layout8 {
            places,
            bytes: codes0 + 2 * p,
            chunk0,
            chunks,
        }
    }

    /// The device tables for states at `base`: `AdamTensor` entries `{p, g, m, v, n, chunk0}`
    /// with `ptrs = [p0, g0, p1, g1, ..]`, and `Adam8Absmax` entries `{a1, a2}` (0 for f32).
    fn tables(&self, sizes: &[usize], ptrs: &[u64], base: u64) -> (Vec<u64>, Vec<u64>) {
        let mut tab = Vec::with_capacity(ENTRY * sizes.len());
        let mut amx = Vec::with_capacity(ABSMAX_ENTRY * sizes.len());
        for (t, (&n, place)) in sizes.iter().zip(&self.places).enumerate() {
            let (m, v, a) = match *place {
                Place::F32 { m, v } => (m, v, None),
                Place::Q8 { mc, vc, a1, a2 } => (mc, vc, Some((a1, a2))),
            };
            tab.extend_from_slice(&[
                ptrs[2 * t],
                ptrs[2 * t + 1],
                base + m as u64,
                base + v as u64,
                n as u64,
                self.chunk0[t] as u64,
            ]);
            match a {
                Some((a1, a2)) => amx.extend_from_slice(&[base + a1 as u64, base + a2 as u64]),
                None => amx.extend_from_slice(&[0, 0]),
            }
        }
        (tab, amx)
    }

    /// The whole allocation's bytes holding `states` (which must be in their 8-bit-optimizer
    /// form and of the layout's sizes).
    fn pack(&self, states: &[AdamParamState]) -> Vec<u8> {
        let mut host = vec![0u8; self.bytes];
        let put_f32 = |host: &mut [u8], at: usize, x: &[f32]| {
            for (i, v) in x.iter().enumerate() {
                host[at + 4 * i..at + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
            }
        };
        for (s, place) in states.iter().zip(&self.places) {
            match (*place, &s.q8) {
                (Place::F32 { m, v }, None) => {
                    put_f32(&mut host, m, &s.m);
                    put_f32(&mut host, v, &s.v);
                }
                (Place::Q8 { mc, vc, a1, a2 }, Some(q)) => {
                    host[mc..mc + q.len()].copy_from_slice(&q.m_codes);
                    host[vc..vc + q.len()].copy_from_slice(&q.v_codes);
                    put_f32(&mut host, a1, &q.m_absmax);
                    put_f32(&mut host, a2, &q.v_absmax);
                }
                _ => unreachable!("checked by DeviceAdamW8::check_states"),
            }
        }
        host
    }

    /// The states held in `host` (the allocation's bytes), with their step counts.
    fn unpack(&self, host: &[u8], sizes: &[usize], steps: &[u64]) -> Vec<AdamParamState> {
        let get_f32 = |at: usize, n: usize| -> Vec<f32> {
            host[at..at + 4 * n]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        sizes
            .iter()
            .zip(&self.places)
            .zip(steps)
            .map(|((&n, place), &step)| match *place {
                Place::F32 { m, v } => AdamParamState {
                    step,
                    m: get_f32(m, n),
                    v: get_f32(v, n),
                    q8: None,
                },
                Place::Q8 { mc, vc, a1, a2 } => AdamParamState {
                    step,
                    m: Vec::new(),
                    v: Vec::new(),
                    q8: Some(Quant8 {
                        m_codes: host[mc..mc + n].to_vec(),
                        m_absmax: get_f32(a1, blocks(n)),
                        v_codes: host[vc..vc + n].to_vec(),
                        v_absmax: get_f32(a2, blocks(n)),
                    }),
                },
            })
            .collect()
    }
}

/// 8-bit AdamW states of a list of tensors on the device.
pub struct DeviceAdamW8 {
    sizes: Vec<usize>,
    paged: bool,
    layout: Layout8,
    steps: Vec<u64>,
    mem: StateMem,
    /// The uploaded tables and the `[p0, g0, p1, g1, ..]` pointers they were built with.
    table: Option<(DevBuf<u64>, DevBuf<u64>)>,
    table_ptrs: Vec<u64>,
    /// The signed then the unsigned map (512 f32).
    maps: DevBuf<f32>,
    /// `{step_size, eps_hat}` per tensor (uploaded each step).
    scalars: DevBuf<f32>,
    sumsq: DevBuf<f64>,
    /// `{total norm, clip coefficient}`.
    out: DevBuf<f32>,
}

impl DeviceAdamW8 {
    /// Fresh states (zero codes, absmax and moments, step 0) for tensors of `sizes`; managed
    /// (pageable) memory when `paged` (plain device memory, with a warning, where the device
    /// cannot page it).
    pub fn new(dev: &CudaDevice, sizes: &[usize], paged: bool) -> Result<Self> {
        let layout = Layout8::new(sizes);
        if sizes.len() > i32::MAX as usize || layout.chunks > i32::MAX as usize {
            return Err(Error::Backend(format!(
                "device 8-bit AdamW: {} tensors in {} chunks exceed one launch",
                sizes.len(),
                layout.chunks
            )));
        }
        let bytes = layout.bytes.next_multiple_of(4).max(256);
        let paged = paged
            && {
                let ok = managed_supported(dev)?;
                if !ok {
                    tracing::warn!(
                    "{} (cuda:{}) has no concurrent managed memory access (e.g. Windows/WSL): the paged 8-bit AdamW states go to plain device memory ({:.1} MiB) and cannot be paged to host RAM",
                    dev.name,
                    dev.ordinal,
                    bytes as f64 / (1u64 << 20) as f64
                );
                }
                ok
            };
        let mem = if paged {
            StateMem::Managed(Managed::alloc(dev, bytes)?)
        } else {
            StateMem::Device(dev.zeros::<f32>(bytes / 4)?)
        };
        let maps: Vec<f32> = signed_map().iter().chain(unsigned_map()).copied().collect();
        let t = sizes.len().max(1);
        Ok(DeviceAdamW8 {
            sizes: sizes.to_vec(),
            paged,
            layout,
            steps: vec![0; sizes.len()],
            mem,
            table: None,
            table_ptrs: Vec::new(),
            maps: dev.upload(&maps)?,
            scalars: dev.zeros::<f32>(2 * t)?,
            sumsq: dev.zeros::<f64>(t)?,
            out: dev.zeros::<f32>(2)?,
        })
    }

    /// Whether `states` are of this optimizer's sizes and form (8-bit from 4096 values).
    fn check_states(&self, states: &[AdamParamState]) -> Result<()> {
        let ok = states.len() == self.sizes.len()
            && states.iter().zip(&self.sizes).all(|(s, &n)| match &s.q8 {
                Some(q) => uses_q8(n) && q.len() == n && q.is_consistent(),
                None => !uses_q8(n) && s.m.len() == n && s.v.len() == n,
            });
        if ok {
            return Ok(());
        }
        let got: Vec<(usize, bool)> = states.iter().map(|s| (s.len(), s.q8.is_some())).collect();
        Err(Error::InvalidArg(format!(
            "device 8-bit AdamW: states of (length, 8-bit) {got:?} do not match the tensor sizes {:?} (8-bit from {} values; convert with optim8::for_kind)",
            self.sizes,
            optim8::MIN_8BIT_SIZE
        )))
    }

    /// Replaces the states with host ones (same sizes and form, in order).
    pub fn upload_state(&mut self, dev: &CudaDevice, states: &[AdamParamState]) -> Result<()> {
        self.check_states(states)?;
        let host = self.layout.pack(states);
        if !host.is_empty() {
            dev.stream
                .context()
                .bind_to_thread()
                .map_err(drv("binding the context"))?;
            let base = self.mem.base(&dev.stream);
            // SAFETY: the allocation holds at least `layout.bytes` = host.len() bytes; `host`
            // lives until the stream is synchronized below.
            unsafe { result::memcpy_htod_async(base, &host, dev.stream.cu_stream()) }
                .map_err(drv("uploading the states"))?;
            dev.synchronize()?;
        }
        self.steps = states.iter().map(|s| s.step).collect();
        Ok(())
    }

    /// The states as host states, in order (8-bit ones as codes and absmax).
    pub fn download_state(&self, dev: &CudaDevice) -> Result<Vec<AdamParamState>> {
        let mut host = vec![0u8; self.layout.bytes];
        if !host.is_empty() {
            dev.stream
                .context()
                .bind_to_thread()
                .map_err(drv("binding the context"))?;
            let base = self.mem.base(&dev.stream);
            // SAFETY: the allocation holds at least `layout.bytes` bytes; the copy is complete
            // when the stream is synchronized below, before `host` is read.
            unsafe { result::memcpy_dtoh_async(&mut host, base, dev.stream.cu_stream()) }
                .map_err(drv("downloading the states"))?;
            dev.synchronize()?;
        }
        Ok(self.layout.unpack(&host, &self.sizes, &self.steps))
    }

    /// Global norm, clip, update (see `TrainBackend::adamw_step`); returns the norm.
    pub fn step(
        &mut self,
        dev: &CudaDevice,
        params: &mut [&mut CudaSlice<f32>],
        grads: &[&CudaSlice<f32>],
        hyper: &AdamW,
        lr: f64,
        max_norm: f32,
    ) -> Result<f32> {
        let nt = self.sizes.len();
        check_step_buffers("cuda adamw_step (8-bit)", &self.sizes, params, grads)?;
        if self.layout.chunks == 0 {
            // Only empty tensors (or none): the norm is 0 and every update a no-op, as on the host.
            self.steps.iter_mut().for_each(|s| *s += 1);
            return Ok(0.0);
        }
        let stream = &dev.stream;
        let ptrs = param_grad_ptrs(stream, params, grads);
        if self.table.is_none() || ptrs != self.table_ptrs {
            let base = self.mem.base(stream);
            let (tab, amx) = self.layout.tables(&self.sizes, &ptrs, base);
            self.table = None;
            self.table = Some((dev.upload(&tab)?, dev.upload(&amx)?));
            self.table_ptrs = ptrs;
        }
        let scal: Vec<f32> = self
            .steps
            .iter()
            .flat_map(|&k| {
                let s = Scalars8::new(hyper, lr, k + 1);
                [s.step_size, s.eps_hat]
            })
            .collect();
        stream
            .memcpy_htod(&scal, &mut *self.scalars)
            .map_err(drv("uploading the step scalars"))?;
        if let StateMem::Managed(m) = &self.mem {
            m.prefetch()?;
        }
        let (table, amx) = self.table.as_ref().expect("uploaded above");
        let (t32, chunks) = (nt as i32, self.layout.chunks);
        // SAFETY: the table holds nt 48-byte entries in adamw.cu's layout whose chunks (of CHUNK
        // values) cover exactly `chunks` blocks; every g pointer holds n_t values (checked above)
        // and stays borrowed until `read_norm` synchronizes; sumsq holds nt doubles, out 2 floats.
        unsafe {
            launch_norm(
                dev,
                table,
                nt,
                chunks,
                &mut self.sumsq,
                &mut self.out,
                max_norm,
            )?
        };
        let grid = LaunchConfig {
            grid_dim: (chunks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };

        let c = Consts8::new(hyper, lr);
        let use_decay = i32::from(c.use_decay);
        let f = dev.function("adamw8", "adamw8_update_f32")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&**table)
            .arg(&**amx)
            .arg(&*self.scalars)
            .arg(&t32)
            .arg(&*self.out)
            .arg(&*self.maps)
            .arg(&c.beta1)
            .arg(&c.w1)
            .arg(&c.beta2)
            .arg(&c.w2)
            .arg(&c.decay)
            .arg(&use_decay);
        // SAFETY: matches adamw8_update_f32(const AdamTensor*, const Adam8Absmax*, const float2*,
        // int, const float*, const float*, float×5, int); the table's p, g (n_t values each,
        // checked above, borrowed until the synchronization below) and the m, v, absmax regions
        // (carved from the state allocation by `Layout8`, disjoint, each tensor's codes and
        // absmax covering ⌈n_t/256⌉ whole blocks) are valid; scalars holds 2·nt floats, out 2,
        // maps 512. Each quantization block is owned by one warp (no two blocks share bytes).
        unsafe { b.launch(grid) }.map_err(drv("adamw8_update_f32"))?;

        let norm = read_norm(dev, &self.out)?;
        if norm.is_finite() {
            self.steps.iter_mut().for_each(|s| *s += 1);
        }
        Ok(norm)
    }

    /// Device bytes of the states (with alignment).
    pub fn nbytes(&self) -> usize {
        self.layout.bytes
    }

    /// Whether the states live in managed (pageable) memory.
    pub fn paged(&self) -> bool {
        self.paged
    }
}

#[cfg(test)]
mod tests {
    //! The host half of the device optimizer (layout, tables, packing) and the kernel's work
    //! decomposition; the arithmetic is the spec's, checked on the device by `check::adam8`.
    use super::*;
    use crate::check::test_values;
    use crate::train::OptimKind;

    /// `find_tensor` of the kernel: the last t with chunk0 ≤ b.
    fn find_tensor(l: &Layout8, b: usize) -> usize {
        let (mut lo, mut hi) = (0, l.chunk0.len());
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if l.chunk0[mid] <= b {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }

    #[test]
    fn warps_own_every_quantization_block_once() {
        let sizes = [1, 0, 4095, 4096, 4097, 0, 10_000, 2048, 65_537];
        let l = Layout8::new(&sizes);
        let mut owned: Vec<Vec<u32>> = sizes.iter().map(|&n| vec![0; n.div_ceil(BLOCK)]).collect();
        for b in 0..l.chunks {
            let t = find_tensor(&l, b);
            for w in 0..(THREADS as usize / 32) {
                let start = (b - l.chunk0[t]) * CHUNK + w * BLOCK;
                if start >= sizes[t] {
                    continue;
                }
                assert_eq!(start % BLOCK, 0);
                owned[t][start / BLOCK] += 1;
            }
        }
        assert!(owned.iter().flatten().all(|&c| c == 1));
    }

    #[test]
    fn regions_are_disjoint_and_aligned() {
        let sizes = [1usize, 4096, 0, 4097, 100, 65_537];
        let l = Layout8::new(&sizes);
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for (&n, place) in sizes.iter().zip(&l.places) {
            match *place {
                Place::F32 { m, v } => {
                    assert!(!uses_q8(n));
                    assert_eq!((m % 256, v % 256), (0, 0));
                    spans.extend([(m, m + 4 * n), (v, v + 4 * n)]);
                }
                Place::Q8 { mc, vc, a1, a2 } => {
                    assert!(uses_q8(n));
                    assert_eq!((mc % 256, vc % 256, a1 % 4, a2 % 4), (0, 0, 0, 0));
                    let nb = blocks(n);
                    spans.extend([
                        (mc, mc + n),
                        (vc, vc + n),
                        (a1, a1 + 4 * nb),
                        (a2, a2 + 4 * nb),
                    ]);
                }
            }
        }
        spans.retain(|s| s.0 < s.1);
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "{w:?} overlap");
        }
        assert!(spans.last().unwrap().1 <= l.bytes);
        // 8-bit tensors cost 2 + 8/256 bytes per value plus alignment.
        let q8: usize = [4096usize, 4097, 65_537]
            .iter()
            .map(|&n| optim8::state_nbytes(n))
            .sum();
        assert!(l.bytes >= q8 + 8 * (1 + 100));
        assert!(l.bytes <= q8 + 8 * (64 + 128) + 2 * 3 * 256 + 8 * 64);
    }

    #[test]
    fn tables_and_pack_round_trip() {
        let sizes = [100usize, 5000, 4096];
        let l = Layout8::new(&sizes);
        let (tab, amx) = l.tables(&sizes, &[1, 2, 3, 4, 5, 6], 1 << 20);
        assert_eq!(tab.len(), 3 * ENTRY);
        assert_eq!(&tab[..2], &[1, 2]);
        assert_eq!(tab[4], 100);
        assert_eq!(tab[ENTRY + 5], 1); // 5000's first chunk (100 values: one chunk before it)
        assert_eq!(tab[2 * ENTRY + 5], 1 + 3);
        assert_eq!(&amx[..2], &[0, 0]); // f32 tensor
        assert!(amx[2] > 0 && amx[3] > amx[2]);
        let mut states: Vec<AdamParamState> = sizes
            .iter()
            .map(|&n| {
                let mut s = AdamParamState::new(n);
                s.m = test_values(n as u64, n, 0.1);
                s.v = test_values(n as u64 + 1, n, 0.1)
                    .iter()
                    .map(|x| x * x)
                    .collect();
                s.step = n as u64;
                optim8::for_kind(s, OptimKind::PagedAdamW8bit)
            })
            .collect();
        states[2].q8.as_mut().unwrap().m_codes[4095] = 255;
        let host = l.pack(&states);
        assert_eq!(host.len(), l.bytes);
        let steps: Vec<u64> = states.iter().map(|s| s.step).collect();
        assert_eq!(l.unpack(&host, &sizes, &steps), states);
    }
}

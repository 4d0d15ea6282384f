//! Launchers of `kernels/adamw.cu`: AdamW with 32-bit states on the device, over every LoRA
//! tensor at once, with global gradient-norm clipping, bit for bit as the host optimizer
//! ([`AdamW::update`] after [`crate::train::clip_grad_norm`], composed as `CpuBackend::adamw_step`).
//!
//! # Math
//! See the header of `kernels/adamw.cu`. The host computes every scalar in f64 exactly as
//! [`AdamW::update`] does and rounds it to f32 where it does ([`Consts`] for the values shared by
//! all tensors, [`step_scalars`] per tensor from its own step count); the device performs the same
//! f32 operations in the same order with IEEE rounding (no flush-to-zero, no contraction), so
//! given the same clip coefficient p, m and v are bit-identical to the host's. The norm is summed
//! in f64 in another order than on the host and may differ in its last bit.
//!
//! # State memory
//! The moments of all tensors live in one allocation of `2·P` f32, `[m region | v region]`, where
//! tensor `t`'s m starts at `offsets[t]` and its v at `P + offsets[t]`; each tensor starts at a
//! multiple of 64 values (256 bytes) and `P = Σ round_up(n_t, 64)` ([`Layout`]).
//! - Paged (`paged_adamw_32bit`, bitsandbytes' paged optimizer): CUDA managed memory
//!   (`cuMemAllocManaged`, attached globally), advised `SET_PREFERRED_LOCATION` = this device and
//!   prefetched to it (`cuMemPrefetchAsync` on the stream) before each step, so the step runs on
//!   device-resident pages but, when the rest of training runs short of memory, the driver
//!   evicts them to host RAM instead of failing an allocation. Never more is requested than the
//!   device has free at that moment (over-subscribing managed memory can hang a GPU): the
//!   constructor fails naming the amounts. A device without concurrent managed access
//!   (`CONCURRENT_MANAGED_ACCESS` = 0, e.g. some Windows/WSL setups, where the host may not touch
//!   managed memory while any kernel runs and prefetching is not allowed) gets plain device
//!   memory with a warning. Freed on drop (after the stream is idle). The allocation itself is
//!   `managed.rs`'s (shared with the 8-bit optimizer).
//! - Not paged (`adamw`): one metered [`DevBuf`].
//!
//! Step counts are host integers (one per tensor), incremented only when an update happened.
//!
//! # One step ([`DeviceAdamW::step`])
//! 1. The table of `{p, g, m, v, n, chunk0}` per tensor (`AdamTensor`, 6 × u64) is uploaded when
//!    the parameter or gradient pointers differ from the last step's (training reuses the same
//!    buffers, so in practice once); the per-tensor `{neg_step, bc2_sqrt}` (8 bytes per tensor)
//!    every step. The f64 per-tensor sums are zeroed; the managed states are prefetched.
//! 2. `adamw_sumsq_f32` (grid = Σ ceil(n_t / 2048) blocks): per-tensor Σg² in f64.
//! 3. `adamw_norm_f32` (one block): per-tensor norms, global norm, clip coefficient, to device
//!    memory.
//! 4. `adamw_update_f32` (same grid as 2): clip + AdamW, or nothing when the norm is not finite.
//! 5. One 4-byte copy of the norm back to the host (which waits for the stream); the step counts
//!    advance when it is finite.

use super::managed::{managed_supported, Managed, StateMem};
use super::runtime::{CudaDevice, DevBuf};
use crate::error::{Error, Result};
use crate::sys::mib;
use crate::train::{AdamParamState, AdamW};
use cudarc::driver::{
    result, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use std::sync::Arc;

/// Elements per block of the multi-tensor launches (`ADAMW_CHUNK` in `kernels/adamw.cu`).
pub(super) const CHUNK: usize = 2048;
/// Threads per block (`ADAMW_THREADS`).
const THREADS: u32 = 256;
/// Each tensor's states start at a multiple of this many f32 (256 bytes).
const ALIGN: usize = 64;
/// u64 words per table entry (`AdamTensor`: p, g, m, v, n, chunk0).
const ENTRY: usize = 6;

fn drv(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Backend(format!("device AdamW: {what}: {e}"))
}

/// The buffer checks of a device optimizer step (`label` names the optimizer in errors): one
/// parameter and one gradient per state, each holding at least its tensor's `sizes[t]` values.
pub(super) fn check_step_buffers(
    label: &str,
    sizes: &[usize],
    params: &[&mut CudaSlice<f32>],
    grads: &[&CudaSlice<f32>],
) -> Result<()> {
    let nt = sizes.len();
    if params.len() != nt || grads.len() != nt {
        return Err(Error::InvalidArg(format!(
            "adamw_step: {} parameters, {} gradients, {nt} states",
            params.len(),
            grads.len()
        )));
    }
    for (t, &n) in sizes.iter().enumerate() {
        for (what, have) in [("param", params[t].len()), ("grad", grads[t].len())] {
            if have < n {
                return Err(Error::Backend(format!(
                    "{label} {what} {t}: buffer holds {have} values, op needs {n}"
                )));
            }
        }
    }
    Ok(())
}

/// The device pointers `[p0, g0, p1, g1, ..]` a step's table is built from.
pub(super) fn param_grad_ptrs(
    stream: &Arc<CudaStream>,
    params: &mut [&mut CudaSlice<f32>],
    grads: &[&CudaSlice<f32>],
) -> Vec<u64> {
    let mut ptrs = Vec::with_capacity(2 * params.len());
    for (p, g) in params.iter_mut().zip(grads) {
        ptrs.push((**p).device_ptr_mut(stream).0);
        ptrs.push(g.device_ptr(stream).0);
    }
    ptrs
}

/// The global gradient norm and clip coefficient of a step into `out` (`{norm, coef}`): zeroes
/// `sumsq`, then `adamw_sumsq_f32` over `chunks` blocks and `adamw_norm_f32` (clipping when
/// `max_norm > 0`).
///
/// # Safety
/// `table` holds `nt` `AdamTensor` entries (kernels/adamw.cu's 48-byte layout) whose chunks cover
/// exactly `chunks` blocks, each g pointer valid for its n_t values until the stream is
/// synchronized; `sumsq` holds at least `nt` doubles and `out` 2 floats.
pub(super) unsafe fn launch_norm(
    dev: &CudaDevice,
    table: &CudaSlice<u64>,
    nt: usize,
    chunks: usize,
    sumsq: &mut CudaSlice<f64>,
    out: &mut CudaSlice<f32>,
    max_norm: f32,
) -> Result<()> {
    let stream = &dev.stream;
    stream
        .memset_zeros(sumsq)
        .map_err(drv("zeroing the norm sums"))?;
    let t32 = nt as i32;
    let grid = LaunchConfig {
        grid_dim: (chunks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = dev.function("adamw", "adamw_sumsq_f32")?;
    let mut b = stream.launch_builder(&f);
    b.arg(table).arg(&t32).arg(&mut *sumsq);
    // SAFETY: matches adamw_sumsq_f32(const AdamTensor*, int, double*); the table, its g
    // pointers and sumsq are as this function's contract requires.
    unsafe { b.launch(grid) }.map_err(drv("adamw_sumsq_f32"))?;
    let clip = i32::from(max_norm > 0.0);
    let max_norm = if clip == 1 { max_norm } else { 0.0 };
    let f = dev.function("adamw", "adamw_norm_f32")?;
    let mut b = stream.launch_builder(&f);
    b.arg(sumsq).arg(&t32).arg(&clip).arg(&max_norm).arg(out);
    let one = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches adamw_norm_f32(double*, int, int, float, float*); sumsq holds nt
    // doubles, out 2 floats.
    unsafe { b.launch(one) }.map_err(drv("adamw_norm_f32"))?;
    Ok(())
}

/// Waits for the step and reads back its gradient norm (`out[0]`).
pub(super) fn read_norm(dev: &CudaDevice, out: &CudaSlice<f32>) -> Result<f32> {
    let mut norm = [0f32];
    dev.stream
        .memcpy_dtoh(&out.slice(..1), &mut norm[..])
        .map_err(drv("reading the norm"))?;
    dev.synchronize()?;
    Ok(norm[0])
}

/// Where each tensor's states and chunks lie (host arithmetic only).
#[derive(Debug, Clone, PartialEq)]
struct Layout {
    /// Offset (in f32) of tensor t's m from the base; its v is at `padded + offsets[t]`.
    offsets: Vec<usize>,
    /// `Σ round_up(n_t, ALIGN)`: the length of the m region and of the v region.
    padded: usize,
    /// Index of each tensor's first chunk (prefix sum of `ceil(n_t / CHUNK)`).
    chunk0: Vec<usize>,
    /// Chunks in all: the blocks of a multi-tensor launch.
    chunks: usize,
}

impl Layout {
    fn new(sizes: &[usize]) -> Layout {
        let (mut offsets, mut chunk0) = (Vec::with_capacity(sizes.len()), Vec::new());
        let (mut padded, mut chunks) = (0, 0);
        for &n in sizes {
            offsets.push(padded);
            chunk0.push(chunks);
            padded += n.next_multiple_of(ALIGN);
            chunks += n.div_ceil(CHUNK);
        }
        Layout {
            offsets,
            padded,
            chunk0,
            chunks,
        }
    }

    /// The device table: per tensor `{p, g, m, v, n, chunk0}` with `ptrs = [p0, g0, p1, g1, ..]`
    /// and the states at `base` (byte address of the allocation).
    fn table(&self, sizes: &[usize], ptrs: &[u64], base: u64) -> Vec<u64> {
        let mut tab = Vec::with_capacity(ENTRY * sizes.len());
        for (t, &n) in sizes.iter().enumerate() {
            let m = base + 4 * self.offsets[t] as u64;
            let v = base + 4 * (self.padded + self.offsets[t]) as u64;
            tab.extend_from_slice(&[
                ptrs[2 * t],
                ptrs[2 * t + 1],
                m,
                v,
                n as u64,
                self.chunk0[t] as u64,
            ]);
        }
        tab
    }
}

/// The f32 constants of [`AdamW::update`] shared by every tensor, rounded as it rounds them.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Consts {
    /// `(f32)(1 − lr·wd)`, applied when `use_decay` (`weight_decay ≠ 0`).
    decay: f32,
    use_decay: bool,
    /// `|w1| < 0.5`: which of ATen's two lerp formulas applies.
    lerp_lo: bool,
    /// `(f32)(1 − β1)` and `w1 − 1` (in f32, as the host's lerp computes it).
    w1: f32,
    w1m1: f32,
    beta2: f32,
    /// `(f32)(1 − β2)`.
    w2: f32,
    eps: f32,
}

impl Consts {
    fn new(hyper: &AdamW, lr: f64) -> Consts {
        let w1 = (1.0 - hyper.beta1) as f32;
        Consts {
            decay: (1.0 - lr * hyper.weight_decay) as f32,
            use_decay: hyper.weight_decay != 0.0,
            lerp_lo: w1.abs() < 0.5,
            w1,
            w1m1: w1 - 1.0,
            beta2: hyper.beta2 as f32,
            w2: (1.0 - hyper.beta2) as f32,
            eps: hyper.eps as f32,
        }
    }
}

/// `{neg_step, bc2_sqrt}` of a tensor's update number `k` (its step count after the update), in
/// f64 and rounded to f32 exactly as [`AdamW::update`].
fn step_scalars(hyper: &AdamW, lr: f64, k: u64) -> [f32; 2] {
    let t = k as f64;
    let bias_correction1 = 1.0 - hyper.beta1.powf(t);
    let bias_correction2 = 1.0 - hyper.beta2.powf(t);
    let step_size = lr / bias_correction1;
    let bc2_sqrt = bias_correction2.powf(0.5) as f32;
    [(-step_size) as f32, bc2_sqrt]
}

/// AdamW states of a list of tensors on the device.
pub struct DeviceAdamW {
    sizes: Vec<usize>,
    paged: bool,
    layout: Layout,
    /// Step count of each tensor.
    steps: Vec<u64>,
    mem: StateMem,
    /// The uploaded table and the `[p0, g0, p1, g1, ..]` pointers it was built with.
    table: Option<DevBuf<u64>>,
    table_ptrs: Vec<u64>,
    /// `{neg_step, bc2_sqrt}` per tensor (uploaded each step).
    scalars: DevBuf<f32>,
    /// Per-tensor f64 sums of squares.
    sumsq: DevBuf<f64>,
    /// `{total norm, clip coefficient}`.
    out: DevBuf<f32>,
}

impl DeviceAdamW {
    /// Zero moments, step 0, for tensors of `sizes`; managed (pageable) memory when `paged`
    /// (plain device memory, with a warning, where the device cannot page them).
    pub fn new(dev: &CudaDevice, sizes: &[usize], paged: bool) -> Result<Self> {
        let layout = Layout::new(sizes);
        if sizes.len() > i32::MAX as usize || layout.chunks > i32::MAX as usize {
            return Err(Error::Backend(format!(
                "device AdamW: {} tensors in {} chunks exceed one launch",
                sizes.len(),
                layout.chunks
            )));
        }
        let len = (2 * layout.padded).max(ALIGN);
        let paged = paged
            && {
                let ok = managed_supported(dev)?;
                if !ok {
                    tracing::warn!(
                    "{} (cuda:{}) has no concurrent managed memory access (e.g. Windows/WSL): the paged AdamW states go to plain device memory ({:.1} MiB) and cannot be paged to host RAM",
                    dev.name,
                    dev.ordinal,
                    mib(4 * len)
                );
                }
                ok
            };
        let mem = if paged {
            StateMem::Managed(Managed::alloc(dev, 4 * len)?)
        } else {
            StateMem::Device(dev.zeros::<f32>(len)?)
        };
        let t = sizes.len().max(1);
        Ok(DeviceAdamW {
            sizes: sizes.to_vec(),
            paged,
            layout,
            steps: vec![0; sizes.len()],
            mem,
            table: None,
            table_ptrs: Vec::new(),
            scalars: dev.zeros::<f32>(2 * t)?,
            sumsq: dev.zeros::<f64>(t)?,
            out: dev.zeros::<f32>(2)?,
        })
    }

    fn check_states(&self, states: &[AdamParamState]) -> Result<()> {
        let ok = states.len() == self.sizes.len()
            && states
                .iter()
                .zip(&self.sizes)
                .all(|(s, &n)| s.m.len() == n && s.v.len() == n);
        if ok {
            return Ok(());
        }
        let lens: Vec<(usize, usize)> = states.iter().map(|s| (s.m.len(), s.v.len())).collect();
        Err(Error::InvalidArg(format!(
            "device AdamW: states of (m, v) lengths {lens:?} do not match the tensor sizes {:?}",
            self.sizes
        )))
    }

    /// Replaces the states with host ones (same sizes, in order).
    pub fn upload_state(&mut self, dev: &CudaDevice, states: &[AdamParamState]) -> Result<()> {
        self.check_states(states)?;
        let p = self.layout.padded;
        let mut host = vec![0f32; 2 * p];
        for (s, &o) in states.iter().zip(&self.layout.offsets) {
            host[o..o + s.m.len()].copy_from_slice(&s.m);
            host[p + o..p + o + s.v.len()].copy_from_slice(&s.v);
        }
        if !host.is_empty() {
            dev.stream
                .context()
                .bind_to_thread()
                .map_err(drv("binding the context"))?;
            let base = self.mem.base(&dev.stream);
            // SAFETY: the allocation holds at least 2·padded f32 (`len` in `new`); `host` lives
            // until the stream is synchronized below.
            unsafe { result::memcpy_htod_async(base, &host, dev.stream.cu_stream()) }
                .map_err(drv("uploading the states"))?;
            dev.synchronize()?;
        }
        self.steps = states.iter().map(|s| s.step).collect();
        Ok(())
    }

    /// The states as host vectors, in order.
    pub fn download_state(&self, dev: &CudaDevice) -> Result<Vec<AdamParamState>> {
        let p = self.layout.padded;
        let mut host = vec![0f32; 2 * p];
        if !host.is_empty() {
            dev.stream
                .context()
                .bind_to_thread()
                .map_err(drv("binding the context"))?;
            let base = self.mem.base(&dev.stream);
            // SAFETY: the allocation holds at least 2·padded f32; the copy is complete when the
            // stream is synchronized below, before `host` is read.
            unsafe { result::memcpy_dtoh_async(&mut host, base, dev.stream.cu_stream()) }
                .map_err(drv("downloading the states"))?;
            dev.synchronize()?;
        }
        Ok(self
            .sizes
            .iter()
            .zip(&self.layout.offsets)
            .zip(&self.steps)
            .map(|((&n, &o), &step)| AdamParamState {
                step,
                m: host[o..o + n].to_vec(),
                v: host[p + o..p + o + n].to_vec(),
                q8: None,
            })
            .collect())
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
        check_step_buffers("cuda adamw_step", &self.sizes, params, grads)?;
        if self.layout.chunks == 0 {
            // Only empty tensors (or none): the norm is 0 and every update a no-op, as on the host.
            self.steps.iter_mut().for_each(|s| *s += 1);
            return Ok(0.0);
        }
        let stream = &dev.stream;
        let ptrs = param_grad_ptrs(stream, params, grads);
        if self.table.is_none() || ptrs != self.table_ptrs {
            let base = self.mem.base(stream);
            let tab = self.layout.table(&self.sizes, &ptrs, base);
            self.table = None;
            self.table = Some(dev.upload(&tab)?);
            self.table_ptrs = ptrs;
        }
        let scal: Vec<f32> = self
            .steps
            .iter()
            .flat_map(|&k| step_scalars(hyper, lr, k + 1))
            .collect();
        stream
            .memcpy_htod(&scal, &mut *self.scalars)
            .map_err(drv("uploading the step scalars"))?;
        if let StateMem::Managed(m) = &self.mem {
            m.prefetch()?;
        }
        let table = self.table.as_ref().expect("uploaded above");
        let (t32, chunks) = (nt as i32, self.layout.chunks);
        // SAFETY: the table holds nt entries whose chunks cover exactly `chunks` blocks, every g
        // pointer holds n_t values (checked above) and stays borrowed until `read_norm`
        // synchronizes; sumsq holds nt doubles, out 2 floats.
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

        let c = Consts::new(hyper, lr);
        let (use_decay, lerp_lo) = (i32::from(c.use_decay), i32::from(c.lerp_lo));
        let f = dev.function("adamw", "adamw_update_f32")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&**table)
            .arg(&*self.scalars)
            .arg(&t32)
            .arg(&*self.out)
            .arg(&c.decay)
            .arg(&use_decay)
            .arg(&lerp_lo)
            .arg(&c.w1)
            .arg(&c.w1m1)
            .arg(&c.beta2)
            .arg(&c.w2)
            .arg(&c.eps);
        // SAFETY: matches adamw_update_f32(const AdamTensor*, const float2*, int, const float*,
        // float, int, int, float×5); the table's p, g (n_t values each, checked above, borrowed
        // until the synchronization below) and m, v (carved from the state allocation by
        // `Layout`, disjoint) are valid; scalars holds 2·nt floats, out 2.
        unsafe { b.launch(grid) }.map_err(drv("adamw_update_f32"))?;

        let norm = read_norm(dev, &self.out)?;
        if norm.is_finite() {
            self.steps.iter_mut().for_each(|s| *s += 1);
        }
        Ok(norm)
    }

    /// Device bytes of the states (m and v of every tensor, each padded to 256 bytes).
    pub fn nbytes(&self) -> usize {
        8 * self.layout.padded
    }

    /// Whether the states live in managed (pageable) memory.
    pub fn paged(&self) -> bool {
        self.paged
    }
}

#[cfg(test)]
mod tests {
    //! The host half of the device optimizer (layout, table, scalars) and an op-by-op Rust
    //! model of the three kernels, checked bit for bit against the host optimizer. The kernels
    //! mirror these models line by line; the device itself is checked by `check::adamw`.
    use super::*;
    use crate::check::test_values;
    use crate::train::{clip_grad_norm, grad_norm};

    /// `find_tensor` of the kernels: the last t with chunk0 ≤ b.
    fn find_tensor(l: &Layout, b: usize) -> usize {
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

    /// adamw_sumsq_f32 + adamw_norm_f32 (host order for the f64 sums: the device's may differ).
    fn model_norm(grads: &[&[f32]], max_norm: f32) -> (f32, f32) {
        let mut acc = 0f64;
        for g in grads {
            let s: f64 = g.iter().map(|&x| (x as f64) * (x as f64)).sum();
            let n = s.sqrt() as f32 as f64;
            acc += n * n;
        }
        let total = acc.sqrt() as f32;
        let mut coef = 1.0f32;
        if max_norm > 0.0 {
            let c = max_norm / (total + 1e-6);
            if c.to_bits() < 1f32.to_bits() {
                coef = c;
            }
        }
        (total, coef)
    }

    /// adamw_update_f32 on one tensor.
    #[allow(clippy::too_many_arguments)]
    fn model_update(
        c: &Consts,
        s: [f32; 2],
        coef: f32,
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
    ) {
        for i in 0..p.len() {
            let gi = g[i] * coef;
            let mut pi = p[i];
            if c.use_decay {
                pi *= c.decay;
            }
            let d = gi - m[i];
            let mi = if c.lerp_lo {
                c.w1.mul_add(d, m[i])
            } else {
                c.w1m1.mul_add(d, gi)
            };
            let vi = v[i] * c.beta2 + (c.w2 * gi) * gi;
            let denom = vi.sqrt() / s[1] + c.eps;
            pi += (s[0] * mi) / denom;
            p[i] = pi;
            m[i] = mi;
            v[i] = vi;
        }
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn layout_aligns_states_and_chunks_cover_every_element_once() {
        let sizes = [1, 0, 7, 2048, 2049, 0, 65_537, 64];
        let l = Layout::new(&sizes);
        assert_eq!(l.chunks, 1 + 1 + 1 + 2 + 33 + 1);
        let mut covered: Vec<Vec<u32>> = sizes.iter().map(|&n| vec![0; n]).collect();
        for b in 0..l.chunks {
            let t = find_tensor(&l, b);
            let start = (b - l.chunk0[t]) * CHUNK;
            let end = (start + CHUNK).min(sizes[t]);
            assert!(start < end, "block {b} got an empty range of tensor {t}");
            for c in &mut covered[t][start..end] {
                *c += 1;
            }
        }
        assert!(covered.iter().flatten().all(|&c| c == 1));
        for (t, &n) in sizes.iter().enumerate() {
            assert_eq!(l.offsets[t] % ALIGN, 0);
            let next = l.offsets.get(t + 1).copied().unwrap_or(l.padded);
            assert!(l.offsets[t] + n <= next, "tensor {t} overlaps the next");
        }
        // 1, 0, 7, 2048, 2049, 0, 65 537, 64 rounded up to multiples of 64.
        assert_eq!(l.padded, 64 + 64 + 2048 + 2112 + 65_600 + 64);
    }

    #[test]
    fn table_entries() {
        let sizes = [3, 5000];
        let l = Layout::new(&sizes);
        let tab = l.table(&sizes, &[10, 20, 30, 40], 1 << 20);
        let base = 1u64 << 20;
        let p = l.padded as u64;
        assert_eq!(
            tab,
            vec![
                10,
                20,
                base,
                base + 4 * p,
                3,
                0,
                30,
                40,
                base + 4 * 64,
                base + 4 * (p + 64),
                5000,
                1
            ]
        );
    }

    /// The kernel model equals `clip_grad_norm` + `AdamW::update` bit for bit, over several
    /// hyper-parameter sets (both lerp branches, with and without weight decay), learning
    /// rates, per-tensor step counts (a resumed state) and subnormal moments.
    #[test]
    fn kernel_model_is_the_host_optimizer_bit_for_bit() {
        let sizes = [1usize, 7, 300, 4099];
        let hypers = [
            AdamW {
                lr: 2e-4,
                weight_decay: 0.001,
                ..AdamW::default()
            },
            AdamW {
                lr: 1e-3,
                beta1: 0.3,
                beta2: 0.95,
                eps: 1e-6,
                weight_decay: 0.0,
            },
            AdamW::default(),
        ];
        for (h, hyper) in hypers.iter().enumerate() {
            for max_norm in [0.0f32, 0.3, 1e6] {
                let mut hp: Vec<Vec<f32>> = Vec::new();
                let mut hs: Vec<AdamParamState> = Vec::new();
                for (t, &n) in sizes.iter().enumerate() {
                    hp.push(test_values(100 + t as u64, n, 1.0));
                    let mut st = AdamParamState::new(n);
                    st.step = [3, 0, 10, 1000][t];
                    if st.step > 0 {
                        st.m = test_values(200 + t as u64, n, 1e-3);
                        st.v = test_values(300 + t as u64, n, 1e-3)
                            .iter()
                            .map(|x| x * x)
                            .collect();
                    }
                    hs.push(st);
                }
                let (mut dp, mut ds) = (hp.clone(), hs.clone());
                for step in 0..3u64 {
                    let lr = hyper.lr * (1.0 - 0.1 * step as f64);
                    let mut grads: Vec<Vec<f32>> = sizes
                        .iter()
                        .enumerate()
                        .map(|(t, &n)| {
                            // Tensor 1's gradients are tiny: w2·g² is subnormal.
                            let amp = if t == 1 { 1e-20 } else { 0.01 };
                            test_values(1000 * step + t as u64, n, amp)
                        })
                        .collect();
                    // Model.
                    let gref: Vec<&[f32]> = grads.iter().map(|g| &g[..]).collect();
                    let (total, coef) = model_norm(&gref, max_norm);
                    let c = Consts::new(hyper, lr);
                    for t in 0..sizes.len() {
                        let s = step_scalars(hyper, lr, ds[t].step + 1);
                        let st = &mut ds[t];
                        model_update(&c, s, coef, &mut dp[t], &grads[t], &mut st.m, &mut st.v);
                        st.step += 1;
                    }
                    // Host optimizer, as CpuBackend::adamw_step composes it.
                    let norm = if max_norm > 0.0 {
                        let mut sl: Vec<&mut [f32]> =
                            grads.iter_mut().map(|g| &mut g[..]).collect();
                        clip_grad_norm(&mut sl, max_norm)
                    } else {
                        grad_norm(grads.iter().map(|g| &g[..]))
                    };
                    assert_eq!(norm.to_bits(), total.to_bits());
                    for t in 0..sizes.len() {
                        hyper.update(lr, &mut hp[t], &grads[t], &mut hs[t]);
                    }
                    for t in 0..sizes.len() {
                        let what = format!("hyper {h} max_norm {max_norm} step {step} tensor {t}");
                        assert_eq!(bits(&dp[t]), bits(&hp[t]), "p: {what}");
                        assert_eq!(bits(&ds[t].m), bits(&hs[t].m), "m: {what}");
                        assert_eq!(bits(&ds[t].v), bits(&hs[t].v), "v: {what}");
                        assert_eq!(ds[t].step, hs[t].step);
                    }
                }
                // The tiny tensor's v really is subnormal (the flush-to-zero trap is exercised).
                assert!(hs[1].v.iter().any(|v| v.is_subnormal()));
            }
        }
    }

    #[test]
    fn clip_coefficient_rule() {
        // No clipping: coefficient 1 whatever the norm; clipping only below 1.
        assert_eq!(model_norm(&[&[3.0, 4.0]], 0.0), (5.0, 1.0));
        assert_eq!(model_norm(&[&[3.0, 4.0]], 10.0), (5.0, 1.0));
        let (total, coef) = model_norm(&[&[3.0], &[4.0]], 1.0);
        assert_eq!(total, 5.0);
        assert_eq!(coef, 1.0 / (5.0 + 1e-6));
        // A non-finite norm is reported as such (the update kernel then does nothing).
        assert!(model_norm(&[&[f32::NAN, 1.0]], 1.0).0.is_nan());
        assert_eq!(model_norm(&[&[f32::INFINITY]], 1.0).0, f32::INFINITY);
    }

    #[test]
    fn consts_follow_the_host_rounding() {
        let h = AdamW {
            lr: 2e-4,
            weight_decay: 0.001,
            ..AdamW::default()
        };
        let c = Consts::new(&h, 3e-4);
        assert_eq!(c.decay, (1.0 - 3e-4 * 0.001) as f32);
        assert!(c.use_decay && c.lerp_lo);
        assert_eq!(c.w1, (1.0 - 0.9f64) as f32);
        assert_eq!(c.w2, (1.0 - 0.999f64) as f32);
        let s = step_scalars(&h, 3e-4, 1);
        assert_eq!(s[0], (-3e-4 / (1.0 - 0.9f64)) as f32);
        assert_eq!(s[1], (1.0 - 0.999f64).sqrt() as f32);
        let hi = Consts::new(&AdamW { beta1: 0.3, ..h }, 1e-3);
        assert!(!hi.lerp_lo);
        assert_eq!(hi.w1m1, hi.w1 - 1.0);
    }
}

//! Launcher of `kernels/sample.cu` (CPU spec: `src/backend/cpu/sample.rs`): the next token from
//! one row of logits on the device, greedy (`argmax_f32`) or sampled (`sample_f32`: temperature,
//! top-k, top-p and the draw with the host's uniform). One block of 1024 threads; the only
//! transfer is the 4-byte id coming back, which is also the only wait for the stream.

use super::runtime::{CudaDevice, DevBuf};
use crate::error::{Error, Result};
use crate::generate::Sampling;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// `SAMPLE_THREADS` in `kernels/sample.cu` (its `__launch_bounds__`).
const THREADS: u32 = 1024;

/// The top-k the kernel receives: 0 (off) for `k = 0` and for `k ≥ vocab`, as the spec keeps
/// every token then.
fn kernel_top_k(top_k: usize, vocab: usize) -> i64 {
    if top_k >= vocab {
        0
    } else {
        top_k as i64
    }
}

/// The token chosen from `logits[..vocab]` under `s` with the uniform `u ∈ [0, 1)` (ignored when
/// greedy); `out` is a one-element scratch buffer the kernel writes the id into.
pub fn sample(
    dev: &CudaDevice,
    logits: &CudaSlice<f32>,
    vocab: usize,
    s: &Sampling,
    u: f32,
    out: &mut DevBuf<u32>,
) -> Result<u32> {
    if vocab == 0 || logits.len() < vocab {
        return Err(Error::Backend(format!(
            "sample: logits hold {} values, vocab is {vocab}",
            logits.len()
        )));
    }
    // Key64 keeps the index in 32 bits; the index 2³² − 1 is never a token.
    if vocab > u32::MAX as usize {
        return Err(Error::Backend(format!(
            "sample: vocab {vocab} exceeds 2^32 - 1"
        )));
    }
    s.validate()?;
    if !(0.0..1.0).contains(&u) {
        return Err(Error::Backend(format!("sample: uniform {u} not in [0, 1)")));
    }
    if out.is_empty() {
        return Err(Error::Backend("sample: empty output buffer".into()));
    }
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let v64 = vocab as i64;
    if s.temperature == 0.0 {
        let f = dev.function("sample", "argmax_f32")?;
        let mut b = dev.stream.launch_builder(&f);
        b.arg(logits).arg(&v64).arg(&mut **out);
        // SAFETY: matches argmax_f32(const float*, int64_t, uint32_t*); logits holds ≥ vocab
        // values and out ≥ 1 (checked above); one block of the kernel's launch bound.
        unsafe { b.launch(cfg) }.map_err(|e| Error::Backend(format!("argmax_f32: {e}")))?;
    } else {
        let f = dev.function("sample", "sample_f32")?;
        let k = kernel_top_k(s.top_k, vocab);
        let mut b = dev.stream.launch_builder(&f);
        b.arg(logits)
            .arg(&v64)
            .arg(&s.temperature)
            .arg(&k)
            .arg(&s.top_p)
            .arg(&u)
            .arg(&mut **out);
        // SAFETY: matches sample_f32(const float*, int64_t, float, int64_t, float, float,
        // uint32_t*); logits holds ≥ vocab values, vocab < 2³², out ≥ 1 (checked above);
        // temperature > 0 finite, 0 ≤ k < vocab, p in (0, 1], u in [0, 1); one block of the
        // kernel's launch bound.
        unsafe { b.launch(cfg) }.map_err(|e| Error::Backend(format!("sample_f32: {e}")))?;
    }
    let id = dev.download(&**out)?;
    let id = id[0];
    if id as usize >= vocab {
        return Err(Error::Backend(format!(
            "sample: the kernel returned id {id} for vocab {vocab}"
        )));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_off_at_or_above_the_vocabulary() {
        assert_eq!(kernel_top_k(0, 10), 0);
        assert_eq!(kernel_top_k(1, 10), 1);
        assert_eq!(kernel_top_k(9, 10), 9);
        assert_eq!(kernel_top_k(10, 10), 0);
        assert_eq!(kernel_top_k(usize::MAX, 10), 0);
    }
}

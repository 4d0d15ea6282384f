//! Check of inference attention over the bf16 KV cache (`kernels/decode_attention.cu`, the
//! general `kernels/attention.cu`; launcher `backend/cuda/decode_attention.rs`) against the CPU
//! spec ([`crate::backend::cpu::attention`]) on the same bf16-rounded K/V, through the backend's
//! own `kv_write` + `attention`, as `Llama::forward` calls them.
//!
//! Cases: decode (T = 1) at cache lengths 1, 7, 300 and 2049 (one key; under a tile; several
//! tiles with a partial one; 33 splits ending in a one-key split), head_dim 64 and 128, GQA
//! ratios 1, 3 (SmolLM2), 4 and 8, a batch of 2; causal chunks (T = 5 after 295 cached keys,
//! rows whose visible keys end before the last split) and a 300-token prefill with G = 3
//! (blocks of 5 positions per CTA, the last one partial); head_dim 16 through the general
//! kernel. The cache is longer than the keys in use and its unused tail holds NaN, so a kernel
//! reading past `pos0 + T` fails the row.
//!
//! Bounds. Both sides read identical bf16 K/V and compute in f32; the kernel differs in the
//! order of its sums (tiles, splits, the combine), in scaling q by 1/√D before the dot product
//! instead of the score after it (one rounding), and in fast-math `expf` (a few ulp of its
//! argument, the scores being O(1)): **max rel err ≤ 1e-4** (a few hundred f32 ulp; a wrong
//! mask, split or combine is O(1)). The cache write is round-to-nearest-even, checked **bit
//! for bit** against `half::bf16::from_f32` (bound 0 mismatching values), NaN tail included.

use super::{max_rel_err, rows_or_failure, test_values, CheckRow};
use crate::backend::cpu::{attention, bf16_round};
use crate::backend::cuda::backend::CudaBackend;
use crate::backend::{AttnShape, Backend};
use crate::error::Result;

/// `(batch, q_len, pos0, heads, kv_heads, head_dim)`.
type Case = (usize, usize, usize, usize, usize, usize);

#[rustfmt::skip]
const CASES: [Case; 14] = [
    // decode
    (1, 1, 0, 4, 1, 64),
    (1, 1, 6, 9, 3, 64),
    (1, 1, 299, 32, 32, 128),
    (1, 1, 2048, 8, 1, 128),
    (1, 1, 2048, 9, 3, 64),
    (2, 1, 299, 16, 2, 128),
    (1, 1, 6, 8, 8, 128),
    (1, 1, 2048, 32, 8, 128),
    // chunks and prefill
    (1, 5, 295, 4, 1, 64),
    (1, 5, 295, 8, 2, 128),
    (1, 300, 0, 9, 3, 64),
    (1, 7, 0, 4, 4, 128),
    // general kernel
    (1, 1, 299, 4, 2, 16),
    (1, 7, 293, 6, 3, 16),
];

/// Extra cache positions past the keys in use, filled with NaN.
const TAIL: usize = 3;

const BOUND: f64 = 1e-4;

fn name(&(batch, t, pos0, heads, kv, d): &Case) -> String {
    format!("attention bf16 kv B={batch} T={t} pos0={pos0} H={heads}/KV={kv} D={d}")
}

fn device_case(be: &CudaBackend, c: &Case, seed: u64) -> Result<Vec<CheckRow>> {
    let &(batch, q_len, pos0, heads, kv_heads, head_dim) = c;
    let cap = pos0 + q_len + TAIL;
    let s = AttnShape {
        batch,
        q_len,
        pos0,
        cache_cap: cap,
        heads,
        kv_heads,
        head_dim,
    };
    let row = kv_heads * head_dim;
    let with_tail = |mut x: Vec<f32>| {
        for b in 0..batch {
            x[(b * cap + pos0 + q_len) * row..(b + 1) * cap * row].fill(f32::NAN);
        }
        x
    };
    let q = test_values(seed, batch * q_len * heads * head_dim, 2.0);
    let k = with_tail(test_values(seed + 1, batch * cap * row, 2.0));
    let v = with_tail(test_values(seed + 2, batch * cap * row, 1.0));
    let (kb, vb): (Vec<f32>, Vec<f32>) = (
        k.iter().map(|&x| bf16_round(x)).collect(),
        v.iter().map(|&x| bf16_round(x)).collect(),
    );
    let mut want = vec![0.0; q.len()];
    attention(&mut want, &q, &kb, &vb, s);

    let (mut kc, mut vc) = (be.kv_new(k.len())?, be.kv_new(v.len())?);
    be.kv_write(&mut kc, 0, &be.upload(&k)?, k.len())?;
    be.kv_write(&mut vc, 0, &be.upload(&v)?, v.len())?;
    let mut out = be.zeros(q.len())?;
    be.attention(&mut out, &be.upload(&q)?, &kc, &vc, s)?;
    let got = be.download(&out)?;

    let bits = |x: &[f32]| -> Vec<u16> {
        x.iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect()
    };
    let (kd, vd) = (be.dev.download(&kc)?, be.dev.download(&vc)?);
    let bad = kd.iter().zip(bits(&k)).filter(|(a, b)| **a != *b).count()
        + vd.iter().zip(bits(&v)).filter(|(a, b)| **a != *b).count();
    Ok(vec![
        CheckRow::new(name(c), max_rel_err(&got, &want), BOUND),
        CheckRow::new(
            format!("kv_write bf16 [{}] (mismatching values)", k.len()),
            bad as f64,
            0.0,
        ),
    ])
}

/// Every case, two rows each (attention, cache write).
pub fn run(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let mut rows = Vec::new();
    for (i, c) in CASES.iter().enumerate() {
        rows.extend(rows_or_failure(&name(c), || {
            device_case(be, c, 0xDEC0 + 16 * i as u64)
        }));
    }
    Ok(rows)
}

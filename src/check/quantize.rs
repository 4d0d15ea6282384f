//! Check of NF4 quantization on the device (`kernels/nf4_quantize.cu` through
//! [`Backend::quantize_linear`], the path `--quant nf4` loads a model by on CUDA) against the CPU
//! spec [`quantize_nf4`] on the same stored values, widened exactly.
//!
//! Inputs: f16, bf16 and f32 tensors of odd shapes (blocks crossing rows, odd element counts with
//! the padding nibble, a partial last block, a tensor smaller than one block), blocksizes 32, 64,
//! 256 and 4096, double quantization on and off; among the random values (±0.05) the full blocks
//! 1 to 4 hold, where the tensor has them: all zeros; ± the dtype's largest finite value (f32:
//! its reciprocal is subnormal); only subnormals of the dtype; 1.0 next to every NF4 midpoint and
//! its f32 neighbours (f32 only: ties must take the lower level); block 5 (f32) holds [`traps`]:
//! values that a division and a reciprocal-then-product scale to different codes. The partial last
//! block is random, all zeros (stored absmax 1e-38), all subnormal (divided by the subnormal clamp
//! 1e-38), or traps (f32).
//!
//! Measure: the number of differing items — packed bytes, absmax bit patterns (f32 scales), or
//! with double quantization the 8-bit codes, the offset, nested absmax and code bits — plus one
//! for a different scale format. Bound 0: the kernel's arithmetic is the spec's step for step
//! (module doc of the kernel), and the nested step is the spec's own host code, so any
//! difference is a bug. Three more rows feed non-finite elements (NaN, +Inf, -Inf; the error
//! must name the first one's flat index, as the host loader does) and one an empty tensor
//! (`Ok(None)`: the host path reports it); each counts 1 when the outcome differs.

use super::{test_values, CheckRow};
use crate::backend::cuda::backend::{CudaBackend, CudaLinear};
use crate::backend::{Backend, RawTensor};
use crate::error::{Error, Result};
use crate::quant::{quantize_nf4, Absmax, Nf4Tensor, NF4_TABLE};
use crate::weights::DType;
use half::{bf16, f16};

/// What fills the partial last block of a case (when there is one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    Random,
    Zero,
    Subnormal,
    /// [`traps`]: values whose quotient `x / c` and product `x · (1 / c)` fall on different sides
    /// of a midpoint (f32 only), so the two scalings a block may use are told apart.
    Traps,
}

/// One tensor quantized on both sides.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub blocksize: usize,
    pub double_quant: bool,
    pub tail: Tail,
}

const fn case(
    dtype: DType,
    (rows, cols): (usize, usize),
    blocksize: usize,
    double_quant: bool,
    tail: Tail,
) -> Case {
    Case {
        dtype,
        rows,
        cols,
        blocksize,
        double_quant,
        tail,
    }
}

/// The cases, with `n = rows · cols`: every dtype with blocksizes 64 and 256 and both scale
/// formats, partial last blocks of every tail kind, odd `n`, exact multiples of the blocksize.
pub const CASES: [Case; 13] = [
    case(DType::F16, (7, 129), 64, false, Tail::Subnormal), // n 903: 14 blocks + 7
    case(DType::F16, (7, 129), 64, true, Tail::Zero),
    case(DType::F16, (1, 70), 64, false, Tail::Zero), // 1 block + 6 zeros
    case(DType::F16, (17, 33), 32, true, Tail::Subnormal), // n 561: 17 blocks + 17
    case(DType::F16, (9, 1111), 256, true, Tail::Random), // n 9999: 39 blocks + 15
    case(DType::BF16, (5, 300), 256, false, Tail::Subnormal), // 5 blocks + 220
    case(DType::BF16, (33, 1000), 64, true, Tail::Random), // 515 blocks + 40
    case(DType::BF16, (3, 4099), 4096, false, Tail::Random), // n 12297: 3 blocks + 9
    case(DType::BF16, (9, 1111), 256, false, Tail::Zero),
    case(DType::F32, (3, 37), 64, false, Tail::Traps), // n 111: 1 block + 47
    case(DType::F32, (11, 997), 256, true, Tail::Subnormal), // n 10967: 42 blocks + 215
    case(DType::F32, (13, 321), 64, false, Tail::Zero), // 65 blocks + 13
    case(DType::F32, (64, 64), 64, true, Tail::Random), // 64 whole blocks
];

/// Bytes per stored element.
fn width(dtype: DType) -> usize {
    dtype.size_in_bytes().unwrap_or(4)
}

/// The dtype's largest finite value.
fn largest(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => f16::MAX.to_f32(),
        DType::BF16 => bf16::MAX.to_f32(),
        _ => f32::MAX,
    }
}

/// A subnormal of the dtype (as f32, exactly representable in it), varying with `k`, sign
/// alternating.
fn subnormal(dtype: DType, k: usize) -> f32 {
    let neg = k % 2 == 1;
    let v = match dtype {
        DType::F16 => f16::from_bits(((k * 37) % 1023 + 1) as u16).to_f32(),
        DType::BF16 => bf16::from_bits(((k * 37) % 127 + 1) as u16).to_f32(),
        _ => f32::from_bits(((k * 7919) % 0x7f_ffff + 1) as u32),
    };
    if neg {
        -v
    } else {
        v
    }
}

/// NF4 code of a scaled value: the number of f32 midpoints strictly below it (the spec's rule).
fn code(s: f32) -> usize {
    NF4_TABLE
        .windows(2)
        .filter(|w| (w[0] + w[1]) / 2.0 < s)
        .count()
}

/// A block scale `c` and values `|x| ≤ c` for which `x / c` and `x · (1 / c)` (each rounded
/// to f32) encode to different NF4 codes, at least one near each of 10 or more midpoints: a
/// partial block (division) or a full block (reciprocal, then product) holding them comes out
/// wrong if it scales the other way. `c` is the first f32 from 0.04 upward that offers 10.
pub fn traps() -> (f32, Vec<f32>) {
    let mut c = 0.04f32;
    loop {
        let r = 1.0 / c;
        let mut found = Vec::new();
        for w in NF4_TABLE.windows(2) {
            let x0 = (w[0] + w[1]) / 2.0 * c;
            let hit = (-64i32..=64)
                .map(|k| f32::from_bits(x0.to_bits().wrapping_add_signed(k)))
                .find(|&x| x.abs() <= c && code(x / c) != code(x * r));
            found.extend(hit);
        }
        if found.len() >= 10 {
            return (c, found);
        }
        c = f32::from_bits(c.to_bits() + 1);
    }
}

/// Writes [`traps`] into `block` (its first element is the scale, the rest after the traps zero).
fn fill_traps(block: &mut [f32]) {
    let (c, t) = traps();
    block.fill(0.0);
    block[0] = c;
    block[1..1 + t.len()].copy_from_slice(&t);
}

/// Stores `v` as `dtype` (round to nearest even for the 16-bit types), little-endian.
fn store(dtype: DType, v: f32, out: &mut Vec<u8>) {
    match dtype {
        DType::F16 => out.extend(f16::from_f32(v).to_le_bytes()),
        DType::BF16 => out.extend(bf16::from_f32(v).to_le_bytes()),
        _ => out.extend(v.to_le_bytes()),
    }
}

/// The stored bytes of a case (values per the module doc).
pub fn case_bytes(c: &Case) -> Vec<u8> {
    let n = c.rows * c.cols;
    let bs = c.blocksize;
    let seed = (c.rows * 131 + c.cols * 7 + bs) as u64;
    let mut v = test_values(seed, n, 0.05);
    let full = n / bs;
    let block = |b: usize| b * bs..(b + 1) * bs;
    if full > 1 {
        v[block(1)].fill(0.0);
    }
    if full > 2 {
        let big = largest(c.dtype);
        v[2 * bs] = big;
        v[2 * bs + 5] = -big;
    }
    if full > 3 {
        for (k, x) in v[block(3)].iter_mut().enumerate() {
            *x = subnormal(c.dtype, k);
        }
    }
    if full > 4 && c.dtype == DType::F32 && bs >= 46 {
        // 1.0 sets the scale to exactly 1: each midpoint, and its neighbours, unscaled.
        let b = &mut v[block(4)];
        b[0] = 1.0;
        for (j, w) in NF4_TABLE.windows(2).enumerate() {
            let m = (w[0] + w[1]) / 2.0;
            b[1 + 3 * j] = m;
            b[2 + 3 * j] = f32::from_bits(m.to_bits() + 1);
            b[3 + 3 * j] = f32::from_bits(m.to_bits() - 1);
        }
    }
    if full > 5 && c.dtype == DType::F32 && bs >= 46 {
        fill_traps(&mut v[block(5)]);
    }
    if n % bs != 0 {
        for (k, x) in v[full * bs..].iter_mut().enumerate() {
            match c.tail {
                Tail::Random => {}
                Tail::Zero => *x = 0.0,
                Tail::Subnormal => *x = subnormal(c.dtype, k + 3),
                Tail::Traps => {}
            }
        }
        if c.tail == Tail::Traps {
            fill_traps(&mut v[full * bs..]);
        }
    }
    let mut bytes = Vec::with_capacity(n * width(c.dtype));
    for &x in &v {
        store(c.dtype, x, &mut bytes);
    }
    bytes
}

/// The values the bytes hold, widened to f32 exactly: the spec's input.
pub fn widened(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    let raw = RawTensor { dtype, bytes };
    (0..bytes.len() / width(dtype))
        .map(|i| raw.get_f32(i).expect("a float dtype"))
        .collect()
}

/// The number of differing items of two quantized tensors (see the module doc).
pub fn mismatches(got: &Nf4Tensor, want: &Nf4Tensor) -> usize {
    fn bytes(a: &[u8], b: &[u8]) -> usize {
        a.len().abs_diff(b.len()) + a.iter().zip(b).filter(|(x, y)| x != y).count()
    }
    fn bits(a: &[f32], b: &[f32]) -> usize {
        a.len().abs_diff(b.len())
            + a.iter()
                .zip(b)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count()
    }
    let mut d = bytes(&got.packed, &want.packed)
        + usize::from(got.shape != want.shape || got.blocksize != want.blocksize);
    d += match (&got.absmax, &want.absmax) {
        (Absmax::F32(a), Absmax::F32(b)) => bits(a, b),
        (
            Absmax::Double {
                q: qa,
                offset: oa,
                nested_absmax: na,
                nested_code: ca,
                nested_blocksize: ba,
            },
            Absmax::Double {
                q: qb,
                offset: ob,
                nested_absmax: nb,
                nested_code: cb,
                nested_blocksize: bb,
            },
        ) => {
            bytes(qa, qb)
                + bits(&[*oa], &[*ob])
                + bits(na, nb)
                + bits(ca, cb)
                + usize::from(ba != bb)
        }
        _ => 1,
    };
    d
}

/// The device's result for stored bytes, downloaded (`None`: the backend declined).
fn device_quantize(
    be: &CudaBackend,
    dtype: DType,
    bytes: &[u8],
    (rows, cols): (usize, usize),
    blocksize: usize,
    double_quant: bool,
) -> Result<Option<Nf4Tensor>> {
    let raw = RawTensor { dtype, bytes };
    match be.quantize_linear(raw, rows, cols, blocksize, double_quant)? {
        Some(CudaLinear::Nf4(t)) => t.download(&be.dev).map(Some),
        Some(_) => Err(Error::Backend(
            "quantize_linear returned a weight that is not NF4".into(),
        )),
        None => Ok(None),
    }
}

/// Runs the checks; each row compares the device against the CPU spec.
pub fn run(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let mut rows = Vec::new();
    for c in &CASES {
        let op = format!(
            "nf4 quantize {} [{}, {}] bs {}{} tail {:?}",
            c.dtype,
            c.rows,
            c.cols,
            c.blocksize,
            if c.double_quant { " dq" } else { "" },
            c.tail
        );
        let bytes = case_bytes(c);
        let shape = (c.rows, c.cols);
        let want = quantize_nf4(
            &widened(c.dtype, &bytes),
            &[c.rows, c.cols],
            c.blocksize,
            c.double_quant,
        )?;
        rows.push(
            match device_quantize(be, c.dtype, &bytes, shape, c.blocksize, c.double_quant) {
                Ok(Some(got)) => CheckRow::new(op, mismatches(&got, &want) as f64, 0.0),
                Ok(None) => CheckRow::failed(op, "the device declined to quantize"),
                Err(e) => CheckRow::failed(op, e),
            },
        );
    }
    // Non-finite elements: the error names the first one's flat index.
    let (r, k) = (5, 77);
    for (dtype, bad) in [
        (DType::F16, vec![(123, f32::NAN), (300, f32::INFINITY)]),
        (DType::BF16, vec![(0, f32::NEG_INFINITY)]),
        (DType::F32, vec![(r * k - 1, f32::NAN)]),
    ] {
        let mut v = test_values(9, r * k, 0.05);
        for &(i, x) in &bad {
            v[i] = x;
        }
        let mut bytes = Vec::new();
        for &x in &v {
            store(dtype, x, &mut bytes);
        }
        let first = bad[0].0;
        let op = format!("nf4 quantize {dtype} [{r}, {k}]: non-finite at {first}");
        let ok = match device_quantize(be, dtype, &bytes, (r, k), 64, true) {
            Err(Error::InvalidArg(msg)) => msg.ends_with(&format!("at flat index {first}")),
            _ => false,
        };
        rows.push(CheckRow::new(op, f64::from(u8::from(!ok)), 0.0));
    }
    let empty = device_quantize(be, DType::F16, &[], (0, 64), 64, true);
    rows.push(CheckRow::new(
        "nf4 quantize empty [0, 64]: left to the host",
        f64::from(u8::from(!matches!(empty, Ok(None)))),
        0.0,
    ));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cases hold what the module doc promises (so the check covers it).
    #[test]
    fn cases_cover_the_edge_inputs() {
        let mut seen = [false; 10];
        for c in &CASES {
            let n = c.rows * c.cols;
            let bs = c.blocksize;
            let v = widened(c.dtype, &case_bytes(c));
            assert_eq!(v.len(), n);
            let full = n / bs;
            let t = quantize_nf4(&v, &[c.rows, c.cols], bs, false).unwrap();
            let Absmax::F32(am) = &t.absmax else {
                unreachable!()
            };
            seen[0] |= n % 2 == 1;
            seen[1] |= n % bs != 0 && n > bs;
            seen[2] |= n % bs == 0;
            if full > 1 {
                assert_eq!(am[1], 0.0, "{c:?}: block 1 all zero");
                seen[3] = true;
            }
            if full > 2 {
                assert_eq!(am[2], largest(c.dtype), "{c:?}: outlier block");
                seen[4] |= c.dtype == DType::F32 && (1.0 / am[2]).is_subnormal();
            }
            if full > 3 {
                assert!(
                    v[3 * bs..4 * bs]
                        .iter()
                        .all(|x| x.is_subnormal() || c.dtype == DType::F16),
                    "{c:?}"
                );
                seen[5] = true;
            }
            if n % bs != 0 && c.tail == Tail::Zero {
                assert_eq!(*am.last().unwrap(), 1e-38, "{c:?}: clamped zero tail");
                seen[6] = true;
            }
            if n % bs != 0 && c.tail == Tail::Subnormal && c.dtype != DType::F16 {
                seen[7] |= *am.last().unwrap() == 1e-38;
            }
            seen[8] |= n % bs != 0 && c.tail == Tail::Traps;
            seen[9] |= full > 5 && c.dtype == DType::F32;
        }
        assert!(seen.iter().all(|&s| s), "{seen:?}");
        // f16 subnormals widen to f32 normals, below every f16 normal
        assert!(subnormal(DType::F16, 0) < f16::MIN_POSITIVE.to_f32());
        // the traps tell the two scalings apart, and fit the smallest blocks that hold them
        let (c, t) = traps();
        assert!(t.len() >= 10 && t.len() < 46, "{}", t.len());
        let r = 1.0 / c;
        assert!(t.iter().all(|&x| code(x / c) != code(x * r)));
    }

    #[test]
    fn mismatches_counts_every_difference() {
        let v = test_values(1, 300, 1.0);
        let a = quantize_nf4(&v, &[3, 100], 64, true).unwrap();
        assert_eq!(mismatches(&a, &a), 0);
        let mut b = a.clone();
        b.packed[7] ^= 1;
        assert_eq!(mismatches(&b, &a), 1);
        let f = quantize_nf4(&v, &[3, 100], 64, false).unwrap();
        assert_eq!(mismatches(&f, &a), 1);
        let mut g = f.clone();
        if let Absmax::F32(x) = &mut g.absmax {
            x[2] = f32::from_bits(x[2].to_bits() + 1);
        }
        assert_eq!(mismatches(&g, &f), 1);
    }
}

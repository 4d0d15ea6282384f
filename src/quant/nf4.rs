//! NF4 (4-bit NormalFloat) blockwise quantization in bitsandbytes' layout.
//!
//! Semantics (bitsandbytes 0.50.2, `quantize_4bit(..., quant_type="nf4")`, default backend, which
//! is what runs for CPU tensors):
//! - the tensor is flattened row-major and cut into blocks of `blocksize` consecutive elements
//!   (blocks cross row boundaries); the last block may be partial;
//! - `absmax[b] = max |x|` over the block (f32);
//! - full blocks are scaled by `x * (1 / max(absmax, 1e-38))`, the partial last block by
//!   `x / max(absmax, 1e-38)` (a division: bnb writes the two differently, and the roundings
//!   differ); the scaled value is clamped to [-1, 1];
//! - the code is the number of NF4 midpoints strictly below the scaled value (`torch.bucketize`
//!   with `right=False` over the f32 midpoints `(T[i] + T[i+1]) / 2`), so a value exactly on a
//!   midpoint takes the lower level;
//! - an all-zero full block keeps `absmax = 0` and encodes every element as level 7 (0.0); an
//!   all-zero *partial last* block stores the clamped `absmax = 1e-38` (bnb clamps there before
//!   storing);
//! - two codes per byte, element `2i` in the high nibble; an odd element count pads the last low
//!   nibble with the code of 0.0 (7).
//!
//! Dequantization is `T[code] * absmax[block]` in f32, with the double-quantized absmax decoded
//! first as `nested_code[q] * nested_absmax[q_index / 256] + offset`.

use crate::error::{Error, Result};

use super::double_quant;

/// bitsandbytes' 16 NF4 levels (the exact f32 values of `get_4bit_type("nf4")`).
#[allow(clippy::excessive_precision)]
pub const NF4_TABLE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// The code bitsandbytes stores for 0.0 (and for the padding nibble of an odd element count).
pub const NF4_ZERO_CODE: u8 = 7;

/// Block size of the nested (double) quantization of the absmax, as bitsandbytes uses.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The 15 decision thresholds: f32 midpoints of consecutive levels, as bnb computes them.
fn midpoints() -> [f32; 15] {
    let mut m = [0f32; 15];
    for (i, v) in m.iter_mut().enumerate() {
        *v = (NF4_TABLE[i] + NF4_TABLE[i + 1]) / 2.0;
    }
    m
}

/// NF4 code of a scaled value in [-1, 1]: the number of midpoints strictly below it.
#[inline]
fn encode(s: f32, mid: &[f32; 15]) -> u8 {
    mid.iter().map(|&m| u8::from(m < s)).sum()
}

/// Per-block absmax of a quantized tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    F32(Vec<f32>),
    /// Double quantization: `absmax - offset` quantized blockwise (blocks of `nested_blocksize`)
    /// to u8 codes of bnb's signed dynamic 8-bit map, with one f32 absmax per nested block.
    Double {
        q: Vec<u8>,
        offset: f32,
        nested_absmax: Vec<f32>,
        nested_code: Vec<f32>,
        nested_blocksize: usize,
    },
}

impl Absmax {
    /// Number of (outer) blocks described.
    pub fn len(&self) -> usize {
        match self {
            Absmax::F32(v) => v.len(),
            Absmax::Double { q, .. } => q.len(),
        }
    }

    /// Whether no block is described.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The decoded f32 absmax per block (bnb's order of f32 operations for the double case).
    pub fn decode(&self) -> Vec<f32> {
        match self {
            Absmax::F32(v) => v.clone(),
            Absmax::Double {
                q,
                offset,
                nested_absmax,
                nested_code,
                nested_blocksize,
            } => {
                let mut out = double_quant::dequantize_blockwise_8bit(
                    q,
                    nested_absmax,
                    nested_code,
                    *nested_blocksize,
                );
                for v in &mut out {
                    *v += *offset;
                }
                out
            }
        }
    }
}

/// A quantized NF4 tensor in bitsandbytes' layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// Original shape, e.g. `[out, in]` for a linear weight.
    pub shape: Vec<usize>,
    /// Elements per block (a power of two in 32..=4096).
    pub blocksize: usize,
    /// `ceil(numel / 2)` bytes: element `2i` in the high nibble, `2i + 1` in the low nibble.
    pub packed: Vec<u8>,
    /// Per-block scale.
    pub absmax: Absmax,
}

impl Nf4Tensor {
    /// Number of elements of the original tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of blocks, `ceil(numel / blocksize)`.
    pub fn nblocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }

    /// Bytes held by the quantized representation (packed codes + statistics).
    pub fn nbytes(&self) -> usize {
        let stats = match &self.absmax {
            Absmax::F32(v) => 4 * v.len(),
            Absmax::Double {
                q,
                nested_absmax,
                nested_code,
                ..
            } => q.len() + 4 + 4 * nested_absmax.len() + 4 * nested_code.len(),
        };
        self.packed.len() + stats
    }

    /// Decoded absmax per block, exactly as bitsandbytes decodes it before dequantizing.
    pub fn block_absmax(&self) -> Vec<f32> {
        self.absmax.decode()
    }

    /// Checks that the parts agree with each other (sizes, blocksize); for tensors built from a
    /// file rather than by [`quantize_nf4`].
    pub fn validate(&self) -> Result<()> {
        check_blocksize(self.blocksize)?;
        let n = self.numel();
        if self.packed.len() != n.div_ceil(2) {
            return Err(Error::InvalidArg(format!(
                "NF4 tensor of shape {:?} needs {} packed bytes, has {}",
                self.shape,
                n.div_ceil(2),
                self.packed.len()
            )));
        }
        if self.absmax.len() != self.nblocks() {
            return Err(Error::InvalidArg(format!(
                "NF4 tensor of shape {:?} with blocksize {} needs {} absmax values, has {}",
                self.shape,
                self.blocksize,
                self.nblocks(),
                self.absmax.len()
            )));
        }
        if let Absmax::Double {
            q,
            nested_absmax,
            nested_code,
            nested_blocksize,
            ..
        } = &self.absmax
        {
            if *nested_blocksize == 0 || nested_absmax.len() != q.len().div_ceil(*nested_blocksize)
            {
                return Err(Error::InvalidArg(format!(
                    "double-quantized absmax: {} codes in blocks of {nested_blocksize} need {} nested absmax values, have {}",
                    q.len(),
                    q.len().div_ceil((*nested_blocksize).max(1)),
                    nested_absmax.len()
                )));
            }
            if nested_code.len() != 256 {
                return Err(Error::InvalidArg(format!(
                    "double-quantized absmax: nested code has {} entries, expected 256",
                    nested_code.len()
                )));
            }
        }
        Ok(())
    }
}

/// bitsandbytes accepts these block sizes for 4-bit quantization.
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if !(32..=4096).contains(&blocksize) || !blocksize.is_power_of_two() {
        return Err(Error::InvalidArg(format!(
            "NF4 blocksize must be a power of two in 32..=4096 (bitsandbytes' set), got {blocksize}"
        )));
    }
    Ok(())
}

/// Quantizes `w` (row-major, of `shape`) to NF4 exactly as bitsandbytes'
/// `quantize_4bit(w, blocksize, compress_statistics=double_quant, quant_type="nf4")` on CPU.
///
/// bf16 / f16 inputs: convert to f32 first (bnb does the same, exactly). Errors on a NaN or
/// infinite element (named by its index), an empty tensor, a shape that does not match `w`, or a
/// block size bnb does not accept.
pub fn quantize_nf4(
    w: &[f32],
    shape: &[usize],
    blocksize: usize,
    double_quant: bool,
) -> Result<Nf4Tensor> {
    check_blocksize(blocksize)?;
    let n: usize = shape.iter().product();
    if n != w.len() {
        return Err(Error::InvalidArg(format!(
            "quantize_nf4: shape {shape:?} has {n} elements but {} values were given",
            w.len()
        )));
    }
    if n == 0 {
        return Err(Error::InvalidArg(format!(
            "quantize_nf4: empty tensor of shape {shape:?}"
        )));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        let what = if w[i].is_nan() { "NaN" } else { "infinite" };
        let cols = *shape.last().unwrap_or(&1);
        return Err(Error::InvalidArg(format!(
            "quantize_nf4: element {i} (row {}, column {}) of a tensor of shape {shape:?} is {what} ({}); NF4 needs finite weights",
            i / cols.max(1),
            i % cols.max(1),
            w[i]
        )));
    }

    let mid = midpoints();
    let nblocks = n.div_ceil(blocksize);
    let full = n / blocksize;
    let mut absmax = Vec::with_capacity(nblocks);
    let mut codes = vec![NF4_ZERO_CODE; n + (n & 1)];
    for (b, (chunk, out)) in w
        .chunks(blocksize)
        .zip(codes.chunks_mut(blocksize))
        .enumerate()
    {
        let am = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let clamped = am.max(1e-38);
        if b < full {
            absmax.push(am);
            let r = 1.0 / clamped;
            for (o, &x) in out.iter_mut().zip(chunk) {
                *o = encode((x * r).clamp(-1.0, 1.0), &mid);
            }
        } else {
            absmax.push(clamped);
            for (o, &x) in out.iter_mut().zip(chunk) {
                *o = encode((x / clamped).clamp(-1.0, 1.0), &mid);
            }
        }
    }
    let packed = codes.chunks_exact(2).map(|p| (p[0] << 4) | p[1]).collect();
    let absmax = if double_quant {
        double_quant::compress_absmax(&absmax)
    } else {
        Absmax::F32(absmax)
    };
    Ok(Nf4Tensor {
        shape: shape.to_vec(),
        blocksize,
        packed,
        absmax,
    })
}

/// Dequantizes to f32, exactly bitsandbytes' reference `dequantize_4bit` values
/// (`NF4_TABLE[code] * absmax[block]`).
pub fn dequantize_nf4(t: &Nf4Tensor) -> Vec<f32> {
    let n = t.numel();
    let absmax = t.block_absmax();
    let mut out = vec![0f32; n];
    for (b, block) in out.chunks_mut(t.blocksize).enumerate() {
        dequantize_block(&t.packed, b * t.blocksize, absmax[b], block);
    }
    out
}

/// Dequantizes the elements `start..start + out.len()` (all in one block of scale `scale`).
#[inline]
pub fn dequantize_block(packed: &[u8], start: usize, scale: f32, out: &mut [f32]) {
    let lut = scaled_table(scale);
    dequantize_run(packed, start, &lut, out);
}

/// `NF4_TABLE[i] * scale` for every level: one product per level, the same f32 products bnb forms.
#[inline]
pub fn scaled_table(scale: f32) -> [f32; 16] {
    let mut lut = [0f32; 16];
    for (l, t) in lut.iter_mut().zip(NF4_TABLE) {
        *l = t * scale;
    }
    lut
}

/// Decodes elements `start..start + out.len()` through a per-block scaled table.
#[inline]
pub fn dequantize_run(packed: &[u8], start: usize, lut: &[f32; 16], out: &mut [f32]) {
    let mut i = 0;
    let len = out.len();
    if start & 1 == 1 && len > 0 {
        out[0] = lut[(packed[start >> 1] & 0x0f) as usize];
        i = 1;
    }
    let bytes = &packed[(start + i) >> 1..];
    let pairs = (len - i) / 2;
    for (o, &byte) in out[i..i + 2 * pairs].chunks_exact_mut(2).zip(bytes) {
        o[0] = lut[(byte >> 4) as usize];
        o[1] = lut[(byte & 0x0f) as usize];
    }
    if i + 2 * pairs < len {
        out[len - 1] = lut[(bytes[pairs] >> 4) as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_symmetric_ends() {
        assert!(NF4_TABLE.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(NF4_TABLE[0], -1.0);
        assert_eq!(NF4_TABLE[7], 0.0);
        assert_eq!(NF4_TABLE[15], 1.0);
        assert_eq!(encode(0.0, &midpoints()), NF4_ZERO_CODE);
    }

    #[test]
    fn each_level_encodes_to_itself_and_midpoints_go_down() {
        let mid = midpoints();
        for (i, &t) in NF4_TABLE.iter().enumerate() {
            assert_eq!(encode(t, &mid) as usize, i);
        }
        for (i, &m) in mid.iter().enumerate() {
            assert_eq!(
                encode(m, &mid) as usize,
                i,
                "tie at midpoint {i} takes the lower level"
            );
            assert_eq!(
                encode(f32::from_bits(m.to_bits() + 1), &mid) as usize,
                if m > 0.0 { i + 1 } else { i }
            );
        }
    }

    #[test]
    fn pack_order_high_nibble_first_and_odd_padding() {
        // 3 elements: levels 15, 0, 7 -> bytes [0xF0, 0x77] (the pad nibble is the zero code).
        let t = quantize_nf4(&[2.0, -2.0, 0.0], &[3], 64, false).unwrap();
        assert_eq!(t.packed, vec![0xF0, 0x77]);
        assert_eq!(t.absmax, Absmax::F32(vec![2.0]));
        assert_eq!(dequantize_nf4(&t), vec![2.0, -2.0, 0.0]);
    }

    #[test]
    fn partial_last_block_and_zero_blocks() {
        let mut w = vec![0f32; 64 + 10];
        w[64] = 0.5;
        w[70] = -0.25;
        let t = quantize_nf4(&w, &[2, 37], 64, false).unwrap();
        let Absmax::F32(a) = &t.absmax else { panic!() };
        assert_eq!(a, &vec![0.0, 0.5]);
        assert!(t.packed[..32].iter().all(|&b| b == 0x77));
        let d = dequantize_nf4(&t);
        assert_eq!(d[64], 0.5);
        assert_eq!(d[70], NF4_TABLE[2] * 0.5);
        // an all-zero partial last block stores the clamped absmax
        let t = quantize_nf4(&[0.0; 5], &[5], 64, false).unwrap();
        assert_eq!(t.absmax, Absmax::F32(vec![1e-38]));
        assert_eq!(dequantize_nf4(&t), vec![0.0; 5]);
    }

    #[test]
    fn rejects_nan_inf_bad_shape_and_blocksize() {
        let e = quantize_nf4(&[1.0, f32::NAN], &[1, 2], 64, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("element 1") && e.contains("NaN"), "{e}");
        let e = quantize_nf4(&[f32::NEG_INFINITY], &[1], 64, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("infinite"), "{e}");
        assert!(quantize_nf4(&[1.0; 4], &[2, 3], 64, false).is_err());
        assert!(quantize_nf4(&[], &[0], 64, false).is_err());
        for bs in [0, 16, 48, 100, 8192] {
            let e = quantize_nf4(&[1.0; 4], &[4], bs, false)
                .unwrap_err()
                .to_string();
            assert!(e.contains("blocksize"), "{e}");
        }
        for bs in [32, 64, 128, 256, 512, 1024, 2048, 4096] {
            quantize_nf4(&[1.0; 4], &[4], bs, true)
                .unwrap()
                .validate()
                .unwrap();
        }
    }

    #[test]
    fn dequantize_run_any_alignment() {
        let w: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let t = quantize_nf4(&w, &[37], 64, false).unwrap();
        let full = dequantize_nf4(&t);
        let lut = scaled_table(t.block_absmax()[0]);
        for start in 0..37 {
            for len in 0..=(37 - start) {
                let mut out = vec![0f32; len];
                dequantize_run(&t.packed, start, &lut, &mut out);
                assert_eq!(out, full[start..start + len]);
            }
        }
    }
}

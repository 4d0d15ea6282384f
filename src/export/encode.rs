//! Tensor storage types of an exported GGUF and their encoders (f32 in, little-endian bytes out).
//!
//! - F32, F16 (IEEE half, round to nearest even), BF16 (round to nearest even, NaN kept quiet:
//!   `ggml_compute_fp32_to_bf16`).
//! - Q8_0 (`quantize_row_q8_0_ref` in ggml-quants.c, `Q8_0.quantize_blocks` in gguf-py): blocks
//!   of 32 consecutive values along a row, each stored as `d: f16` then `q: [i8; 32]` (34 bytes):
//!   ```text
//!   d = amax(|x|) / 127        (f32; stored rounded to f16)
//!   q = roundf(x · (1/d))      (half away from zero; 1/d taken as 0 when d = 0)
//!   ```
//!   The quantized values use the f32 `d`, as the reference does, not the stored f16.
//!   A row length that is not a multiple of 32 cannot be Q8_0 (llama.cpp's converter then falls
//!   back to F16; so does the exporter).

use crate::error::{Error, Result};

pub const QK8_0: usize = 32;
/// Bytes of one Q8_0 block.
pub const Q8_0_BLOCK_BYTES: usize = 2 + QK8_0;

/// ggml tensor types the exporter writes (ids from ggml's `enum ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q8_0,
    BF16,
}

impl GgmlType {
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Bytes of `n` elements (a whole number of blocks for Q8_0).
    pub fn nbytes(self, n: usize) -> usize {
        match self {
            GgmlType::F32 => 4 * n,
            GgmlType::F16 | GgmlType::BF16 => 2 * n,
            GgmlType::Q8_0 => n / QK8_0 * Q8_0_BLOCK_BYTES,
        }
    }

    /// Whether a tensor of this shape (PyTorch order) can be stored in this type.
    pub fn fits(self, shape: &[usize]) -> bool {
        match self {
            GgmlType::Q8_0 => shape.last().is_some_and(|&c| c % QK8_0 == 0),
            _ => true,
        }
    }

    pub(crate) fn check_shape(self, name: &str, shape: &[usize]) -> Result<()> {
        if self.fits(shape) {
            Ok(())
        } else {
            Err(Error::InvalidArg(format!(
                "gguf: tensor {name} {shape:?}: rows of Q8_0 must be a multiple of {QK8_0} long"
            )))
        }
    }

    /// Encodes `x` (row-major, rows a multiple of 32 long for Q8_0).
    pub fn encode(self, x: &[f32]) -> Vec<u8> {
        match self {
            GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            GgmlType::F16 => x
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
            GgmlType::BF16 => x.iter().flat_map(|&v| bf16_bits(v).to_le_bytes()).collect(),
            GgmlType::Q8_0 => quantize_q8_0(x),
        }
    }
}

/// `ggml_compute_fp32_to_bf16`: NaN forced quiet, otherwise round to nearest even.
pub fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u as u64 + (0x7fff + ((u >> 16) & 1) as u64)) >> 16) as u16
}

/// Q8_0 blocks of `x` (`x.len()` a multiple of 32).
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    assert_eq!(x.len() % QK8_0, 0, "q8_0: length not a multiple of 32");
    let mut out = Vec::with_capacity(x.len() / QK8_0 * Q8_0_BLOCK_BYTES);
    for block in x.chunks_exact(QK8_0) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(half::f16::from_f32(d).to_le_bytes());
        // f32::round is roundf: half away from zero.
        out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    out
}

/// Inverse of [`quantize_q8_0`]: `q · d` with the stored f16 `d`.
pub fn dequantize_q8_0(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(Q8_0_BLOCK_BYTES)
        .flat_map(|b| {
            let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            b[2..].iter().map(move |&q| q as i8 as f32 * d)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_block_by_hand() {
        let mut x = vec![0f32; 32];
        x[0] = 1.27;
        x[1] = -0.635; // exactly half a step from 63/64: rounds away from zero
        x[2] = 0.004;
        x[31] = -1.27;
        let b = quantize_q8_0(&x);
        assert_eq!(b.len(), 34);
        let d = half::f16::from_le_bytes([b[0], b[1]]);
        assert_eq!(d, half::f16::from_f32(1.27 / 127.0));
        let q: Vec<i8> = b[2..].iter().map(|&v| v as i8).collect();
        assert_eq!(q[0], 127);
        assert_eq!(q[31], -127);
        assert_eq!(q[2], 0);
        assert_eq!(q[1], (-0.635f32 * (1.0 / (1.27f32 / 127.0))).round() as i8);
        let back = dequantize_q8_0(&b);
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= 0.5 * 1.27 / 127.0 + 1e-3, "{a} {b}");
        }
    }

    #[test]
    fn q8_0_zero_block_and_rounding_mode() {
        assert_eq!(quantize_q8_0(&[0.0; 32]), vec![0u8; 34]);
        assert_eq!(2.5f32.round(), 3.0);
        assert_eq!((-2.5f32).round(), -3.0);
    }

    #[test]
    fn bf16_rounds_to_nearest_even_and_keeps_nan_quiet() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125: ties to even (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(f32::from_bits(0x7f80_0001)), 0x7fc0);
        for v in [0.1f32, -3.7, 65504.0, 1e-30] {
            assert_eq!(bf16_bits(v), half::bf16::from_f32(v).to_bits());
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(GgmlType::Q8_0.nbytes(64), 68);
        assert_eq!(GgmlType::BF16.nbytes(3), 6);
        assert!(GgmlType::Q8_0.fits(&[5, 64]));
        assert!(!GgmlType::Q8_0.fits(&[64, 172]));
    }
}

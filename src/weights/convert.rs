//! Widening stored floats (little-endian F32 / F16 / BF16 bytes) to `f32`.
//!
//! The bytes come straight from a memory map at whatever offset the header gives, so they may be
//! unaligned for the element type. Aligned data (the usual case: writers pad the header to 8
//! bytes) is reinterpreted in place with `bytemuck` and converted with `half`'s vectorised slice
//! conversion; unaligned data is decoded from little-endian bytes through a small aligned
//! staging buffer. Large tensors are converted in parallel chunks.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

/// The float encodings [`widen`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Float {
    F32,
    F16,
    BF16,
}

impl Float {
    fn size(self) -> usize {
        match self {
            Float::F32 => 4,
            Float::F16 | Float::BF16 => 2,
        }
    }
}

/// Elements per parallel work item.
const CHUNK: usize = 1 << 16;
/// Tensors with fewer elements are converted on the calling thread.
const PARALLEL_MIN: usize = 1 << 18;
/// Elements per staging buffer on the unaligned path.
const STAGE: usize = 1024;

/// Converts `src` (a whole number of `kind` elements) to f32.
pub(crate) fn widen(kind: Float, src: &[u8]) -> Vec<f32> {
    let size = kind.size();
    debug_assert_eq!(src.len() % size, 0);
    let n = src.len() / size;
    let mut out = vec![0f32; n];
    if n >= PARALLEL_MIN {
        out.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK * size))
            .for_each(|(dst, src)| widen_block(kind, src, dst));
    } else {
        widen_block(kind, src, &mut out);
    }
    out
}

fn widen_block(kind: Float, src: &[u8], dst: &mut [f32]) {
    match kind {
        Float::F32 => f32_block(src, dst),
        Float::F16 => half_block(src, dst, f16::from_bits, |h: &[f16], d| {
            h.convert_to_f32_slice(d)
        }),
        Float::BF16 => half_block(src, dst, bf16::from_bits, |h: &[bf16], d| {
            h.convert_to_f32_slice(d)
        }),
    }
}

fn f32_block(src: &[u8], dst: &mut [f32]) {
    if cfg!(target_endian = "little") {
        if let Ok(words) = bytemuck::try_cast_slice::<u8, f32>(src) {
            dst.copy_from_slice(words);
            return;
        }
    }
    for (d, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// Converts 16-bit floats: in place when aligned, else through an aligned staging buffer.
fn half_block<H: bytemuck::Pod>(
    src: &[u8],
    dst: &mut [f32],
    from_bits: fn(u16) -> H,
    convert: fn(&[H], &mut [f32]),
) {
    if cfg!(target_endian = "little") {
        if let Ok(halves) = bytemuck::try_cast_slice::<u8, H>(src) {
            convert(halves, dst);
            return;
        }
    }
    let mut stage = [from_bits(0); STAGE];
    for (d, s) in dst.chunks_mut(STAGE).zip(src.chunks(2 * STAGE)) {
        for (h, b) in stage.iter_mut().zip(s.chunks_exact(2)) {
            *h = from_bits(u16::from_le_bytes([b[0], b[1]]));
        }
        convert(&stage[..d.len()], d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `bytes` placed at an odd address, so every element is misaligned.
    fn misaligned(bytes: &[u8]) -> (Vec<u8>, usize) {
        let mut buf = vec![0u8; bytes.len() + 8];
        let start = (1..8)
            .find(|&o| (buf.as_ptr() as usize + o) % 2 == 1)
            .unwrap();
        buf[start..start + bytes.len()].copy_from_slice(bytes);
        (buf, start)
    }

    fn check(kind: Float, bytes: &[u8], want: &[f32]) {
        let got = widen(kind, bytes);
        assert_eq!(got.len(), want.len());
        let (buf, start) = misaligned(bytes);
        let got_unaligned = widen(kind, &buf[start..start + bytes.len()]);
        for ((g, u), w) in got.iter().zip(&got_unaligned).zip(want) {
            if w.is_nan() {
                // NaN payloads may differ between hardware and software conversion.
                assert!(g.is_nan() && u.is_nan());
            } else {
                assert_eq!(g.to_bits(), w.to_bits());
                assert_eq!(u.to_bits(), w.to_bits());
            }
        }
    }

    #[test]
    fn f16_bf16_f32_every_path() {
        // Sizes below the staging buffer, across it, and across the parallel threshold.
        for n in [0, 1, 7, STAGE + 3, PARALLEL_MIN + CHUNK / 2 + 1] {
            let bits: Vec<u16> = (0..n)
                .map(|i| (i as u32).wrapping_mul(40503) as u16)
                .collect();
            let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
            let want: Vec<f32> = bits.iter().map(|&b| f16::from_bits(b).to_f32()).collect();
            check(Float::F16, &bytes, &want);
            let want: Vec<f32> = bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
            check(Float::BF16, &bytes, &want);
            let words: Vec<u32> = (0..n)
                .map(|i| (i as u32).wrapping_mul(2654435761))
                .collect();
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            let want: Vec<f32> = words.iter().map(|&w| f32::from_bits(w)).collect();
            check(Float::F32, &bytes, &want);
        }
    }
}

//! NF4 quantization, bit-exact with bitsandbytes (`quantize_4bit` / `dequantize_4bit`, `quant_type
//! = "nf4"`), and the fused CPU matmul over NF4 weights.
//!
//! - [`nf4`]: the 16-level NF4 code, [`Nf4Tensor`] in bitsandbytes' packed layout, quantize /
//!   dequantize.
//! - [`double_quant`]: bitsandbytes' "compress_statistics": the per-block absmax stored as 8-bit
//!   codes of the signed dynamic map (blocks of 256) plus an f32 offset.
//! - [`matmul`]: `x · Wᵀ` and `dy · W` with `W` dequantized tile by tile, never materialised.
//!
//! The reference is bitsandbytes 0.50.2 on CPU (its default-backend `quantize_4bit`, its C++ CPU
//! `quantize_blockwise` for the nested absmax) with torch 2.15.0; `scripts/fixtures_nf4.py` writes
//! the golden fixtures that `tests/nf4.rs` compares against, byte for byte.

pub mod bnb;
pub mod double_quant;
pub mod matmul;
pub mod nf4;

pub use double_quant::{dequantize_blockwise_8bit, dynamic_code_signed, quantize_blockwise_8bit};
pub use matmul::{nf4_matmul, nf4_matmul_wt};
pub use nf4::{dequantize_nf4, quantize_nf4, Absmax, Nf4Tensor, NF4_TABLE};

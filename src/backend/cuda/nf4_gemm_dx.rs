//! Launchers of `kernels/nf4_gemm_dx.cu`: the backward product `dx = dy · W` of a frozen
//! projection, NF4 decoded in the tile loader, bf16 tensor cores, f32 accumulation; and its
//! baselines, "dequantize to a bf16 scratch weight, then cuBLAS bf16 GEMM" and cuBLAS on a 16-bit
//! dense weight. All compute `dx[m, k] (+)= Σ_n half(dy[m, n]) · half(W[n, k])` with f32 sums, W
//! `[n = rows, k = cols]` read in its stored layout; the CPU spec is
//! [`crate::backend::cpu::nf4_gemm_dx`].

use super::blas::{gemm_half, RowMajor};
use super::dense_half::DeviceHalf;
use super::nf4::DeviceNf4;
use super::nf4_gemm::Bf16Scratch;
use super::ops::to_half;
use super::runtime::CudaDevice;
use crate::error::{Error, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// Largest `m` the small-tile configuration (64×64 tiles) handles; above it 128×128 tiles.
const SMALL_TILE_MAX_M: usize = 64;

/// The tile configurations of `kernels/nf4_gemm_dx.cu` (the launcher picks by `m`; the check runs
/// both on every shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DxTiles {
    /// `nf4_gemm_dx_bf16_64x64`: 4 warps, for `m ≤ 64`.
    Small,
    /// `nf4_gemm_dx_bf16_128x128`: 8 warps, for larger `m`.
    Large,
}

impl DxTiles {
    /// (kernel, tile rows, tile columns, threads per CTA).
    fn config(self) -> (&'static str, usize, usize, u32) {
        match self {
            DxTiles::Small => ("nf4_gemm_dx_bf16_64x64", 64, 64, 128),
            DxTiles::Large => ("nf4_gemm_dx_bf16_128x128", 128, 128, 256),
        }
    }
}

impl std::fmt::Display for DxTiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (_, bm, bn, _) = self.config();
        write!(f, "{bm}x{bn}")
    }
}

/// `dy` holds `[m, rows]` and `dx` `[m, cols]` of a `[rows, cols]` weight.
fn check_sizes(rows: usize, cols: usize, dx: usize, dy: usize, m: usize, what: &str) -> Result<()> {
    if dy < m * rows || dx < m * cols {
        return Err(Error::Backend(format!(
            "{what}: buffers hold dx {dx}, dy {dy} values; [{m}, {rows}] · [{rows}, {cols}] needs {}, {}",
            m * cols,
            m * rows
        )));
    }
    Ok(())
}

impl DeviceNf4 {
    /// Whether the fused dx kernel takes this weight: `cols % 16 == 0` and `blocksize >= 16` (every
    /// 16-element run of a row lies in one quantization block, as for the forward GEMM), and with
    /// double quantization a power-of-two nested block (bitsandbytes uses 256), which the kernel
    /// divides by with a shift. All Llama shapes qualify.
    pub fn gemm_dx_supported(&self) -> bool {
        self.cols % 16 == 0
            && self.blocksize >= 16
            && (self.dq_flag() == 0 || (self.nested_blocksize as u32).is_power_of_two())
    }

    /// `dx[m, cols] (+)= dy[m, rows] · dequant(W)` (bf16 operands, f32 accumulation);
    /// `accumulate` adds to `dx` instead of overwriting it (gradient accumulation).
    pub fn gemm_dx(
        &self,
        dev: &CudaDevice,
        dx: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        m: usize,
        accumulate: bool,
    ) -> Result<()> {
        let tiles = if m <= SMALL_TILE_MAX_M {
            DxTiles::Small
        } else {
            DxTiles::Large
        };
        self.gemm_dx_tiles(dev, dx, dy, m, accumulate, tiles)
    }

    /// [`DeviceNf4::gemm_dx`] with the tile configuration chosen by the caller (both compute the
    /// same; the choice only affects speed).
    pub fn gemm_dx_tiles(
        &self,
        dev: &CudaDevice,
        dx: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        m: usize,
        accumulate: bool,
        tiles: DxTiles,
    ) -> Result<()> {
        if !self.gemm_dx_supported() {
            return Err(Error::Backend(format!(
                "nf4 gemm dx needs cols % 16 == 0, blocksize >= 16 and a power-of-two nested \
                 block, got [{}, {}] blocksize {} nested block {}",
                self.rows, self.cols, self.blocksize, self.nested_blocksize
            )));
        }
        check_sizes(self.rows, self.cols, dx.len(), dy.len(), m, "nf4 gemm dx")?;
        if m == 0 || self.cols == 0 {
            return Ok(());
        }
        let (name, bm, bn, threads) = tiles.config();
        let grid_y = m.div_ceil(bm);
        if grid_y > 65_535
            || [m, self.rows, self.cols]
                .iter()
                .any(|&d| d > i32::MAX as usize - 256)
        {
            return Err(Error::Backend(format!(
                "nf4 gemm dx: [{m}, {}] · [{}, {}] is more than one launch takes",
                self.rows, self.rows, self.cols
            )));
        }
        let f = dev.function("nf4_gemm_dx", name)?;
        let dq = self.dq_flag();
        let (m32, n32, k32, acc) = (
            m as i32,
            self.rows as i32,
            self.cols as i32,
            accumulate as i32,
        );
        let cfg = LaunchConfig {
            grid_dim: (self.cols.div_ceil(bn) as u32, grid_y as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = dev.stream.launch_builder(&f);
        b.arg(dx).arg(dy);
        self.push_args(&mut b, &dq);
        b.arg(&m32).arg(&n32).arg(&k32).arg(&acc);
        // SAFETY: arguments match NF4_GEMM_DX_ARGS in kernels/nf4_gemm_dx.cu; sizes checked above
        // (the kernel reads dy[< m·rows] and writes dx[< m·cols] only); cols % 16 == 0 and whole
        // allocations (256-byte aligned) give the 8-byte W and dx accesses their alignment, and the
        // kernel reads dy as float4 only when rows % 4 == 0; nested block a power of two (checked).
        unsafe { b.launch(cfg) }.map_err(|e| Error::Backend(format!("{name}: {e}")))?;
        Ok(())
    }
}

impl Bf16Scratch {
    /// Baseline: dequantize W to bf16, round dy to bf16, cuBLAS bf16 GEMM `dx (+)= dy · W`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_dx(
        &mut self,
        dev: &CudaDevice,
        blas: &CudaBlas,
        w: &DeviceNf4,
        dx: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        m: usize,
        accumulate: bool,
    ) -> Result<()> {
        check_sizes(
            w.rows,
            w.cols,
            dx.len(),
            dy.len(),
            m,
            "nf4 dequant + cuBLAS dx",
        )?;
        if m == 0 || w.cols == 0 {
            return Ok(());
        }
        let ws = dev.grown(&mut self.w, w.rows * w.cols)?;
        w.dequantize_bf16(dev, ws)?;
        let ys = dev.grown(&mut self.x, m * w.rows)?;
        to_half(dev, ys, dy, m * w.rows, false)?;
        let (ws, ys) = (
            self.w.as_ref().expect("grown above"),
            self.x.as_ref().expect("grown above"),
        );
        let beta = if accumulate { 1.0 } else { 0.0 };
        let p = RowMajor::xw(m, w.rows, w.cols).scaled(1.0, beta);
        gemm_half(blas, &dev.stream, dx, ys, ws, p, false)
    }
}

impl DeviceHalf {
    /// `dx[m, cols] (+)= dy[m, rows] · W` for a 16-bit dense weight (cuBLAS, f32 accumulation):
    /// dy is rounded to the weight's format (bf16, or f16 when `self.f16`) in `scratch`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_dx(
        &self,
        dev: &CudaDevice,
        blas: &CudaBlas,
        scratch: &mut Bf16Scratch,
        dx: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        m: usize,
        accumulate: bool,
    ) -> Result<()> {
        check_sizes(
            self.rows,
            self.cols,
            dx.len(),
            dy.len(),
            m,
            "16-bit dense dx",
        )?;
        if m == 0 || self.cols == 0 {
            return Ok(());
        }
        let n = m * self.rows;
        let ys = scratch.x_scratch(dev, n)?;
        to_half(dev, ys, dy, n, self.f16)?;
        let beta = if accumulate { 1.0 } else { 0.0 };
        let p = RowMajor::xw(m, self.rows, self.cols).scaled(1.0, beta);
        gemm_half(blas, &dev.stream, dx, ys, &self.w, p, self.f16)
    }
}

//! Device memory for optimizer states: CUDA managed memory for the paged optimizers
//! (bitsandbytes' `paged_adamw_32bit` / `paged_adamw_8bit`), or a plain metered buffer.
//!
//! Managed memory is allocated with `cuMemAllocManaged` (attached globally), advised
//! `SET_PREFERRED_LOCATION` = the device and prefetched to it before each step, so optimizer
//! steps run on device-resident pages while the driver may evict them to host RAM when the rest
//! of training runs short. Never more is requested than the device has free (over-subscribing
//! managed memory can hang a GPU). Used by `adamw.rs` and `adamw8.rs`.

use super::runtime::{CudaDevice, DevBuf};
use crate::error::{Error, Result};
use crate::sys::mib;
use cudarc::driver::{result, sys, CudaStream, DevicePtr};
use std::sync::Arc;

fn drv(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Backend(format!("device AdamW: {what}: {e}"))
}

/// A CUDA managed allocation, freed on drop.
pub(super) struct Managed {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    stream: Arc<CudaStream>,
    /// `CUdevice` of the stream's context (prefetch target).
    device: sys::CUdevice,
    /// Counts the allocation in the device's peak-memory meter while it lives.
    _metered: super::runtime::MeteredBytes,
}

impl Managed {
    /// `bytes` of managed memory, preferring `dev`, zeroed (on the stream).
    pub(super) fn alloc(dev: &CudaDevice, bytes: usize) -> Result<Managed> {
        // Blocks the memory pool keeps for reuse count as used in mem_info: give them back first.
        dev.release_cached()?;
        let (free, total) = dev.mem_info()?;
        if bytes > free {
            return Err(Error::Backend(format!(
                "paged AdamW: the optimizer states need {:.1} MiB of managed memory, but {} (cuda:{}) has only {:.1} MiB free of {:.1} MiB; over-subscribing managed memory can hang the GPU, so none was requested",
                mib(bytes),
                dev.name,
                dev.ordinal,
                mib(free),
                mib(total)
            )));
        }
        let ctx = dev.stream.context();
        ctx.bind_to_thread().map_err(drv("binding the context"))?;
        // SAFETY: a plain allocation of `bytes` (> 0); the pointer is owned by the returned
        // `Managed` and freed once in its Drop.
        let ptr =
            unsafe { result::malloc_managed(bytes, sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL) }
                .map_err(|e| {
                    Error::Backend(format!(
                        "paged AdamW: allocating {:.1} MiB of managed memory on {}: {e}",
                        mib(bytes),
                        dev.name
                    ))
                })?;
        let m = Managed {
            ptr,
            bytes,
            stream: dev.stream.clone(),
            device: ctx.cu_device(),
            _metered: dev.meter_external(bytes),
        };
        // SAFETY: the range is exactly the allocation made above.
        unsafe {
            result::mem_advise(
                m.ptr,
                m.bytes,
                sys::CUmem_advise::CU_MEM_ADVISE_SET_PREFERRED_LOCATION,
                m.location(),
            )
        }
        .map_err(drv("advising the managed states to the device"))?;
        m.prefetch()?;
        // SAFETY: zero bytes are valid f32 zeros; the range is the allocation; stream-ordered
        // before every later use of it.
        unsafe { result::memset_d8_async(m.ptr, 0, m.bytes, m.stream.cu_stream()) }
            .map_err(drv("zeroing the managed states"))?;
        Ok(m)
    }

    fn location(&self) -> sys::CUmemLocation {
        sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: self.device,
        }
    }

    /// Queues the migration of every page to the device on the stream.
    pub(super) fn prefetch(&self) -> Result<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(drv("binding the context"))?;
        // SAFETY: the range is exactly the managed allocation; the device has concurrent
        // managed access (checked before allocating).
        unsafe {
            result::mem_prefetch_async(
                self.ptr,
                self.bytes,
                self.location(),
                self.stream.cu_stream(),
            )
        }
        .map_err(drv("prefetching the managed states to the device"))
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; a failing context is already broken.
        if self.stream.context().bind_to_thread().is_ok() && self.stream.synchronize().is_ok() {
            // SAFETY: allocated by malloc_managed in `alloc`, freed only here, and the stream
            // (the only one that uses it) is idle.
            let _ = unsafe { result::memory_free(self.ptr) };
        }
    }
}

/// The states' allocation: `[m region | v region]` (see the module docs; `adamw8.rs` carves
/// its own regions from one).
pub(super) enum StateMem {
    Device(DevBuf<f32>),
    Managed(Managed),
}

impl StateMem {
    /// Device address of the allocation.
    pub(super) fn base(&self, stream: &CudaStream) -> u64 {
        match self {
            StateMem::Device(b) => b.device_ptr(stream).0,
            StateMem::Managed(m) => m.ptr,
        }
    }
}

/// Whether `dev` can keep the states in managed memory that kernels use while the host runs
/// (`MANAGED_MEMORY` and `CONCURRENT_MANAGED_ACCESS`).
pub(super) fn managed_supported(dev: &CudaDevice) -> Result<bool> {
    let ctx = dev.stream.context();
    for a in [
        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY,
        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS,
    ] {
        if ctx.attribute(a).map_err(drv("device attribute"))? == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

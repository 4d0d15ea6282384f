//! The CUDA device runtime: context, stream, the embedded kernel modules, and device memory with
//! peak tracking and out-of-memory errors that say how much was needed.
//!
//! Every allocation is a [`DevBuf`]: a `CudaSlice` that counts its bytes into the device's
//! meter while it lives and takes them out when dropped, so [`CudaDevice::peak_bytes`] is the
//! true high-water mark of qlora's own buffers (cuBLAS' workspace and the CUDA context itself
//! are not included; [`CudaDevice::mem_info`] gives the driver's view).
//!
//! cudarc loads libcuda dynamically and panics on first use when it is absent, so
//! [`CudaDevice::new`] checks [`super::driver_present`] before any other cudarc call; every
//! driver failure becomes an [`Error::Backend`] naming the device.

use crate::error::{Error, Result};
use cudarc::driver::ValidAsZeroBits;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr};
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Live and peak bytes of one device's buffers.
#[derive(Debug, Default)]
struct Meter {
    live: AtomicUsize,
    peak: AtomicUsize,
}

/// A device buffer whose bytes are metered while it lives. Dereferences to the `CudaSlice`, so
/// it goes wherever one does (`&buf` coerces to `&CudaSlice<T>`).
#[derive(Debug)]
pub struct DevBuf<T> {
    slice: CudaSlice<T>,
    bytes: usize,
    meter: Arc<Meter>,
}

impl<T> Deref for DevBuf<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> DerefMut for DevBuf<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

impl<T> Drop for DevBuf<T> {
    fn drop(&mut self) {
        self.meter.live.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Number of CUDA devices (0 when the driver reports none). Call only after
/// [`super::driver_present`] said the driver library exists (cudarc panics otherwise).
pub fn device_count() -> Result<usize> {
    use cudarc::driver::sys::cudaError_enum as E;
    match CudaContext::device_count() {
        Ok(n) => Ok(n.max(0) as usize),
        Err(cudarc::driver::DriverError(E::CUDA_ERROR_NO_DEVICE)) => Ok(0),
        Err(e) => Err(drv(
            "device count (is the NVIDIA driver 580 or newer installed?)",
            e,
        )),
    }
}

/// Bytes of an allocation made outside [`CudaDevice::zeros`] (managed memory, say), counted in
/// the device's meter while this guard lives.
#[derive(Debug)]
pub struct MeteredBytes {
    bytes: usize,
    meter: Arc<Meter>,
}

impl Drop for MeteredBytes {
    fn drop(&mut self) {
        self.meter.live.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Lowest supported compute capability: Ampere (sm_80), for bf16 tensor cores and cp.async.
pub const MIN_CAPABILITY: (i32, i32) = (8, 0);

/// One GPU with qlora's kernels loaded.
pub struct CudaDevice {
    pub ordinal: usize,
    pub name: String,
    pub capability: (i32, i32),
    pub stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    /// Kernel handles already looked up (one `cuModuleGetFunction` per kernel, not per launch).
    functions: std::sync::Mutex<HashMap<(String, String), CudaFunction>>,
    meter: Arc<Meter>,
    /// Counts the reallocations of [`CudaDevice::grown`] scratch buffers: a captured CUDA graph
    /// holds their addresses, so it is stale once this moves (`step.rs`).
    scratch_epoch: AtomicUsize,
    /// Set while the stream is captured into a graph: [`CudaDevice::grown`] then refuses to
    /// (re)allocate and sets `growth_refused` (a freed or graph-owned address would be kept).
    capturing: AtomicBool,
    growth_refused: AtomicBool,
}

fn drv(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Backend(format!("CUDA {what}: {e}"))
}

/// cudarc allocates with `cuMemAllocAsync` from the device's default memory pool, whose release
/// threshold is 0: at every synchronization (each step reads its loss) the driver hands all freed
/// memory back to the OS, and the next step maps it again (the same buffers, every step). An
/// unlimited threshold keeps freed blocks in the pool for reuse, so a steady-state step makes no
/// OS allocation — what PyTorch's caching allocator does. [`CudaDevice::release_cached`] gives
/// the cache back (before managed allocations, and before retrying an allocation that failed).
fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    use cudarc::driver::{result, sys};
    if !ctx.has_async_alloc() {
        return Ok(()); // plain cuMemAlloc: nothing is cached
    }
    let mut threshold = u64::MAX;
    // SAFETY: cu_device is this context's device; the attribute's value is a cuuint64_t, read
    // during the call only.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device())
            .map_err(|e| drv("default memory pool", e))?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .map_err(|e| drv("memory pool release threshold", e))
    }
}

impl CudaDevice {
    /// Opens device `ordinal`: checks the driver, the device count and the compute capability,
    /// then loads every embedded kernel module.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !super::driver_present() {
            return Err(Error::Backend(
                "no CUDA driver (libcuda) on this machine; use --device cpu".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| drv("device count", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Backend(format!(
                "CUDA device {ordinal} does not exist ({count} device(s) present)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| drv("context", e))?;
        let name = ctx.name().map_err(|e| drv("device name", e))?;
        let capability = ctx
            .compute_capability()
            .map_err(|e| drv("compute capability", e))?;
        if capability < MIN_CAPABILITY {
            return Err(Error::Backend(format!(
                "{name} (cuda:{ordinal}) has compute capability {}.{}; qlora needs sm_80 or newer (Ampere, Ada, Hopper)",
                capability.0, capability.1
            )));
        }
        let mut modules = HashMap::new();
        for (module, fatbin) in super::kernel_modules() {
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(fatbin.to_vec()))
                .map_err(|e| drv(&format!("loading kernels/{module}.cu"), e))?;
            modules.insert(*module, m);
        }
        // SAFETY: qlora issues all work (kernels, copies, cuBLAS) on this one stream, so stream
        // order alone keeps every use of a buffer after its allocation and before its free;
        // cudarc's per-buffer events (for multi-stream use) would only add driver calls.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory(&ctx)?;
        // A stream of our own, not the legacy default stream: only such a stream can be
        // captured into a CUDA graph (decode steps, `step.rs`).
        let stream = ctx.new_stream().map_err(|e| drv("stream", e))?;
        Ok(CudaDevice {
            ordinal,
            name,
            capability,
            stream,
            ctx,
            modules,
            functions: Default::default(),
            meter: Arc::new(Meter::default()),
            scratch_epoch: AtomicUsize::new(0),
            capturing: AtomicBool::new(false),
            growth_refused: AtomicBool::new(false),
        })
    }

    /// Kernel `name` of module `kernels/<module>.cu`.
    pub fn function(&self, module: &str, name: &str) -> Result<CudaFunction> {
        let key = (module.to_string(), name.to_string());
        let mut cache = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = cache.get(&key) {
            return Ok(f.clone());
        }
        let f = self.load_function(module, name)?;
        cache.insert(key, f.clone());
        Ok(f)
    }

    fn load_function(&self, module: &str, name: &str) -> Result<CudaFunction> {
        let m = self
            .modules
            .get(module)
            .ok_or_else(|| Error::Backend(format!("kernel module {module} is not embedded")))?;
        m.load_function(name)
            .map_err(|e| drv(&format!("kernel {module}::{name}"), e))
    }

    /// `(free, total)` device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(|e| drv("memory info", e))
    }

    fn metered<T>(&self, slice: CudaSlice<T>, bytes: usize) -> DevBuf<T> {
        let now = self.meter.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.meter.peak.fetch_max(now, Ordering::Relaxed);
        DevBuf {
            slice,
            bytes,
            meter: self.meter.clone(),
        }
    }

    /// Counts `bytes` of an allocation the caller made itself into the meter (peak included)
    /// until the returned guard is dropped.
    pub fn meter_external(&self, bytes: usize) -> MeteredBytes {
        let now = self.meter.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.meter.peak.fetch_max(now, Ordering::Relaxed);
        MeteredBytes {
            bytes,
            meter: self.meter.clone(),
        }
    }

    fn oom(&self, bytes: usize, e: impl std::fmt::Display) -> Error {
        let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
        match self.mem_info() {
            Ok((free, total)) => Error::Backend(format!(
                "out of device memory on {} (cuda:{}): needed {:.1} MiB, {:.1} MiB free of {:.1} MiB ({e})",
                self.name,
                self.ordinal,
                mib(bytes),
                mib(free),
                mib(total)
            )),
            Err(_) => Error::Backend(format!(
                "out of device memory on {}: needed {:.1} MiB ({e})",
                self.name,
                mib(bytes)
            )),
        }
    }

    /// A zeroed buffer of `len` elements. When the device is full, the pool's cached free
    /// blocks are given back once and the allocation retried (they may be fragmented).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<DevBuf<T>> {
        let bytes = len.max(1) * std::mem::size_of::<T>();
        let s = match self.stream.alloc_zeros::<T>(len.max(1)) {
            Ok(s) => s,
            Err(_) => {
                self.release_cached()?;
                self.stream
                    .alloc_zeros::<T>(len.max(1))
                    .map_err(|e| self.oom(bytes, e))?
            }
        };
        Ok(self.metered(s, bytes))
    }

    /// Waits for the stream, then returns the memory pool's cached free blocks (see
    /// [`keep_freed_memory`]) to the OS, so that `mem_info` shows them free again.
    pub fn release_cached(&self) -> Result<()> {
        use cudarc::driver::{result, sys};
        self.synchronize()?;
        if !self.ctx.has_async_alloc() {
            return Ok(());
        }
        // SAFETY: the pool is this context's device's default pool; after the synchronize no
        // queued work can still use a freed block.
        unsafe {
            let pool = result::device::get_default_mem_pool(self.ctx.cu_device())
                .map_err(|e| drv("default memory pool", e))?;
            sys::cuMemPoolTrimTo(pool, 0)
                .result()
                .map_err(|e| drv("memory pool trim", e))?;
            // Graph allocations (a captured decode step's temporaries) have their own pool.
            sys::cuDeviceGraphMemTrim(self.ctx.cu_device())
                .result()
                .map_err(|e| drv("graph memory trim", e))
        }
    }

    /// The scratch buffer in `slot`, reallocated (old one freed first) when shorter than `len`.
    pub fn grown<'a, T: DeviceRepr + ValidAsZeroBits>(
        &self,
        slot: &'a mut Option<DevBuf<T>>,
        len: usize,
    ) -> Result<&'a mut DevBuf<T>> {
        if slot.as_ref().is_none_or(|b| b.len() < len) {
            if self.capturing.load(Ordering::Relaxed) {
                self.growth_refused.store(true, Ordering::Relaxed);
                return Err(Error::Backend(
                    "a scratch buffer would be (re)allocated during a CUDA graph capture".into(),
                ));
            }
            self.scratch_epoch.fetch_add(1, Ordering::Relaxed);
            *slot = None;
            *slot = Some(self.zeros::<T>(len)?);
        }
        Ok(slot.as_mut().expect("allocated above"))
    }

    /// Drops a driver error cudarc recorded from a call that could not return it (a free in
    /// a destructor), after a failure that has been handled (an abandoned graph capture).
    pub fn clear_recorded_error(&self) {
        let _ = self.ctx.check_err();
    }

    /// The driver error cudarc recorded from a call that could not return it, if any (taken).
    pub fn take_recorded_error(&self) -> Result<()> {
        self.ctx
            .check_err()
            .map_err(|e| drv("earlier call (recorded)", e))
    }

    /// Marks the stream as captured (or not) for [`CudaDevice::grown`]; returns whether a
    /// growth was refused since the last call that set it.
    pub fn set_capturing(&self, on: bool) -> bool {
        self.capturing.store(on, Ordering::Relaxed);
        self.growth_refused.swap(false, Ordering::Relaxed)
    }

    /// Whether allocations are stream-ordered (`cuMemAllocAsync`), which a graph capture needs.
    pub fn has_async_alloc(&self) -> bool {
        self.ctx.has_async_alloc()
    }

    /// How many times a [`CudaDevice::grown`] buffer has been (re)allocated so far.
    pub fn scratch_epoch(&self) -> usize {
        self.scratch_epoch.load(Ordering::Relaxed)
    }

    /// Copies host data into a new buffer.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<DevBuf<T>> {
        let bytes = std::mem::size_of_val(data);
        if data.is_empty() {
            return Err(Error::Backend("cannot upload an empty buffer".into()));
        }
        let s = self
            .stream
            .clone_htod(data)
            .map_err(|e| self.oom(bytes, e))?;
        Ok(self.metered(s, bytes))
    }

    /// Copies a buffer back to the host (waits for the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(buf)
            .map_err(|e| drv("copy to host", e))
    }

    /// High-water mark of the bytes held in [`DevBuf`]s on this device.
    pub fn peak_bytes(&self) -> usize {
        self.meter.peak.load(Ordering::Relaxed)
    }

    /// Bytes held in [`DevBuf`]s right now.
    pub fn live_bytes(&self) -> usize {
        self.meter.live.load(Ordering::Relaxed)
    }

    /// Starts a new peak measurement from the bytes live now.
    pub fn reset_peak(&self) {
        let live = self.live_bytes();
        self.meter.peak.store(live, Ordering::Relaxed);
    }

    /// Theoretical memory bandwidth in bytes/s, from the driver's memory clock and bus width
    /// (`2 · clock · width / 8`, double data rate): ≈ 3.35e12 on an H100 SXM. `None` when the
    /// driver does not report them (the benches then take `QLORA_PEAK_GBS`).
    pub fn peak_bandwidth(&self) -> Option<f64> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        let clock_khz = self
            .ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)
            .ok()?;
        let bus_bits = self
            .ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)
            .ok()?;
        (clock_khz > 0 && bus_bits > 0)
            .then(|| 2.0 * clock_khz as f64 * 1e3 * bus_bits as f64 / 8.0)
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| drv("synchronize", e))
    }
}

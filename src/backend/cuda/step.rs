//! Decode steps as CUDA graphs: [`crate::backend::Backend::decode_step`] on CUDA.
//!
//! A 7B decode step is about 450 kernel launches (32 layers × 14, plus the head). Issued one by
//! one from the host at a few µs each, their launch cost is of the order of the ~1.1 ms the
//! step's 3.6 GB of NF4 weights take to stream at 3.35 TB/s. So the step is captured once per
//! KV cache into a CUDA graph and replayed: one graph launch per token.
//!
//! What changes from step to step — the token id and its position — lives in two device words
//! at a fixed address, `[token, pos]`, written before every step (two 4-byte memsets); while a
//! step's ops run, [`StepMode`] is set and the ops that depend on them read those words instead
//! of their host arguments: the embedding its id, RoPE its position, the cache write its offset
//! (`pos · kv_dim`), attention its length (planning its split on the device over a grid sized
//! for the whole cache, `decode_attention.rs`). Everything else a step touches (weights, adapter,
//! cache, the model's step scratch, the backend's scratch buffers) keeps its address for the
//! life of the cache. The graph is keyed by the cache's id and by the device's scratch epoch
//! ([`super::runtime::CudaDevice::scratch_epoch`], moved by any reallocation of a scratch
//! buffer), and recaptured when either changes. The backend keeps one graph, its last cache's:
//! caches decoded in turns run eagerly.
//!
//! Per cache: the first step (and the first after the scratch epoch moved) runs eagerly in step
//! mode — the same kernels and grids, growing every scratch buffer to its size outside any
//! capture; the next step is captured and launched; later ones are graph launches. Eager and
//! replayed steps compute the same bits. A scratch buffer that would grow during a capture is
//! refused (its old address may be in use, a new one would belong to the graph): that step runs
//! eagerly and the next is captured. If a capture or a launch fails otherwise (a driver that
//! refuses it, an op that would synchronise), graphs are turned off for the backend's life with
//! one warning and steps run eagerly in step mode; so they are on a device without
//! stream-ordered allocation, and with `QLORA_CUDA_GRAPHS=0`. Graphs are instantiated with
//! auto-free-on-launch, so a library workspace allocated during a capture cannot block a replay.
//!
//! Step mode belongs to the backend, not to a thread: while a step's ops are issued, no other
//! thread may issue ops on the same backend (they would read the step's words). qlora decodes
//! from one thread, and the backend's single stream serialises the device work anyway.

use super::backend::CudaBackend;
use super::ops::DevU32;
use super::runtime::DevBuf;
use crate::backend::DecodeStep;
use crate::error::{Error, Result};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, DevicePtr};

/// The device words of the step running now (set only while its ops are issued).
#[derive(Debug, Clone, Copy)]
pub struct StepMode {
    /// Address of the `u32` token id.
    pub token: u64,
    /// Address of the `u32` position (`token + 4`).
    pub pos: u64,
    /// The host values at the time the ops are issued (a capture records this step's).
    pub host_token: u32,
    pub host_pos: usize,
}

/// A captured step graph.
struct Captured {
    /// (cache id, scratch epoch) it was captured at.
    key: (u64, usize),
    graph: SendGraph,
}

/// A [`CudaGraph`] is not `Send` (raw driver handles): it is only used under
/// [`CudaBackend`]'s `steps` mutex, which serialises every access as the CUDA graph API
/// requires, from whichever thread holds it.
struct SendGraph(CudaGraph);
// SAFETY: see the type's doc: all access is serialised by the mutex that owns it.
unsafe impl Send for SendGraph {}

/// The backend's decode-step state.
pub struct Steps {
    /// `[token, pos]` of the current step.
    words: Option<DevBuf<u32>>,
    graph: Option<Captured>,
    /// (cache id, scratch epoch) after the last eager step: the next step of that cache, at
    /// that epoch, can be captured.
    warmed: Option<(u64, usize)>,
    /// Whether steps may be captured (see the module doc).
    enabled: bool,
    /// Steps run as graph launches so far (tests, benches).
    pub replays: usize,
}

impl Default for Steps {
    fn default() -> Self {
        Steps {
            words: None,
            graph: None,
            warmed: None,
            enabled: std::env::var("QLORA_CUDA_GRAPHS").map_or(true, |v| v != "0"),
            replays: 0,
        }
    }
}

/// Resets [`CudaBackend`]'s step mode when the step's ops have been issued (or failed).
struct ModeGuard<'a>(&'a CudaBackend);

impl Drop for ModeGuard<'_> {
    fn drop(&mut self) {
        *self.0.step_mode.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Ends a capture that is still active when dropped (an error or a panic skipped the normal
/// end), discarding what it recorded, and clears the device's capturing mark.
struct CaptureGuard<'a>(&'a CudaBackend);

impl Drop for CaptureGuard<'_> {
    fn drop(&mut self) {
        use cudarc::driver::{result, sys::CUstreamCaptureStatus as S};
        let dev = &self.0.dev;
        dev.set_capturing(false);
        let stream = dev.stream.cu_stream();
        // SAFETY: raw queries on this device's stream (cudarc's wrappers would first report an
        // unrelated recorded error and skip the call); a graph returned here is ours to destroy.
        unsafe {
            if let Ok(
                S::CU_STREAM_CAPTURE_STATUS_ACTIVE | S::CU_STREAM_CAPTURE_STATUS_INVALIDATED,
            ) = result::stream::is_capturing(stream)
            {
                if let Ok(g) = result::stream::end_capture(stream) {
                    if !g.is_null() {
                        let _ = result::graph::destroy(g);
                    }
                }
            }
        }
    }
}

fn drv(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Backend(format!("CUDA graph {what}: {e}"))
}

impl CudaBackend {
    /// Turns step graphs on or off (on by default unless `QLORA_CUDA_GRAPHS=0`); off, steps run
    /// eagerly in step mode (the same bits).
    pub fn set_step_graphs(&self, on: bool) {
        let mut steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
        steps.enabled = on;
        steps.graph = None;
        steps.warmed = None;
    }

    /// Decode steps run as graph launches so far.
    pub fn step_replays(&self) -> usize {
        self.steps.lock().unwrap_or_else(|p| p.into_inner()).replays
    }

    /// [`crate::backend::Backend::decode_step`]: see the module doc.
    pub(super) fn run_step(
        &self,
        st: DecodeStep,
        body: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        let mut steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
        let addr = self.write_words(&mut steps, st)?;
        let key = (st.cache, self.dev.scratch_epoch());
        if let Some(c) = steps.graph.as_ref().filter(|c| c.key == key) {
            match c.graph.0.launch() {
                Ok(()) => {
                    steps.replays += 1;
                    return Ok(());
                }
                Err(e) => self.give_up(&mut steps, &format!("launching it: {e}")),
            }
        }
        *self.step_mode.lock().unwrap_or_else(|p| p.into_inner()) = Some(StepMode {
            token: addr,
            pos: addr + 4,
            host_token: st.token,
            host_pos: st.pos,
        });
        let _reset = ModeGuard(self);
        let capturable = steps.enabled && self.dev.has_async_alloc();
        if !capturable || steps.warmed != Some(key) {
            steps.graph = None;
            body()?;
            steps.warmed = Some((st.cache, self.dev.scratch_epoch()));
            return Ok(());
        }
        let (captured, growth_refused) = self.capture(body);
        match captured.and_then(|g| g.launch().map(|()| g).map_err(drv("launch"))) {
            Ok(graph) => {
                steps.graph = Some(Captured {
                    key,
                    graph: SendGraph(graph),
                });
                steps.replays += 1;
                return Ok(());
            }
            // A scratch buffer had to grow while recording: warm up again (eagerly) first.
            Err(_) if growth_refused => self.dev.clear_recorded_error(),
            Err(e) => self.give_up(&mut steps, &e.to_string()),
        }
        body()?;
        steps.warmed = Some((st.cache, self.dev.scratch_epoch()));
        Ok(())
    }

    /// Writes the step's `[token, pos]` words (two stream-ordered 4-byte memsets: no host
    /// buffer); returns their device address.
    fn write_words(&self, steps: &mut Steps, st: DecodeStep) -> Result<u64> {
        let words = self.dev.grown(&mut steps.words, 2)?;
        let (addr, _) = words.device_ptr(&self.dev.stream);
        let stream = self.dev.stream.cu_stream();
        for (i, v) in [st.token, st.pos as u32].into_iter().enumerate() {
            // SAFETY: `words` holds 2 u32 at `addr`; the memset is ordered on the stream before
            // every later launch that reads it.
            unsafe { cudarc::driver::sys::cuMemsetD32Async(addr + 4 * i as u64, v, 1, stream) }
                .result()
                .map_err(drv("step words"))?;
        }
        Ok(addr)
    }

    /// Turns graphs off for the backend's life after `what` failed (one warning); the step
    /// then runs eagerly.
    fn give_up(&self, steps: &mut Steps, what: &str) {
        tracing::warn!("CUDA graph of a decode step failed ({what}); decoding without graphs");
        steps.enabled = false;
        steps.graph = None;
        self.dev.clear_recorded_error();
    }

    /// Records `body`'s launches on the device's stream into a graph (nothing runs), and
    /// whether a scratch buffer refused to grow meanwhile. The capture is ended whatever
    /// happens (an error, a panic in `body`), so the stream never stays in capture mode.
    fn capture(&self, body: &mut dyn FnMut() -> Result<()>) -> (Result<CudaGraph>, bool) {
        if let Err(e) = self.dev.take_recorded_error() {
            return (Err(e), false);
        }
        let stream = &self.dev.stream;
        if let Err(e) =
            stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        {
            return (Err(drv("begin capture")(e)), false);
        }
        let guard = CaptureGuard(self);
        self.dev.set_capturing(true);
        let issued = body();
        let growth_refused = self.dev.set_capturing(false);
        // Instantiated with AUTO_FREE_ON_LAUNCH: an allocation the step does not free (a
        // library's lazily allocated workspace) is freed at the next launch, not left to block it.
        let flags = CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
        let graph = stream.end_capture(flags);
        drop(guard);
        let graph = issued.and_then(|()| {
            graph
                .map_err(drv("end capture"))?
                .ok_or_else(|| Error::Backend("CUDA graph capture recorded nothing".into()))
        });
        (graph, growth_refused)
    }

    /// The device word a step-dependent op reads: null outside step mode, the step's word when
    /// `host` is the step's value (`which` picks token or position), an error when an op of a
    /// step is called with another value (the body is not a one-token step).
    pub(super) fn step_word(&self, which: StepWord, host: usize) -> Result<DevU32<'static>> {
        let Some(m) = *self.step_mode.lock().unwrap_or_else(|p| p.into_inner()) else {
            return Ok(DevU32::NULL);
        };
        let (addr, want) = match which {
            StepWord::Token => (m.token, m.host_token as usize),
            StepWord::Pos => (m.pos, m.host_pos),
        };
        if host != want {
            return Err(Error::Backend(format!(
                "decode step: an op asked for {which:?} {host}, the step is at {want}"
            )));
        }
        Ok(DevU32::Addr(addr))
    }
}

/// Which of a step's words an op reads.
#[derive(Debug, Clone, Copy)]
pub(super) enum StepWord {
    Token,
    Pos,
}

//! The device-memory plan (`qlora train --dry-run`, `qlora::train::plan`):
//! - Llama-2-7B at batch 4 × 512 tokens (r 16 all-linear and r 8 q,v; selective and full
//!   recompute) against figures computed here by hand, line by line;
//! - the replay of a training step against a metering wrapper around the CPU backend, which
//!   counts every buffer the model code allocates through the backend trait (bf16 stashes at 2
//!   bytes a value, as on CUDA) while tiny models train one step and evaluate;
//! - `qlora train --dry-run` (text and JSON) on the 7B fixture (config + shard index only) and on
//!   the tiny fixture, both with the guanaco dataset, and the "does not fit" advice.

use qlora::backend::cpu::{CpuBackend, CpuLinear};
use qlora::backend::{AttnShape, Backend, HostLinear, LoraShape, Packed, TrainBackend};
use qlora::config::ModelConfig;
use qlora::lora::{LoraConfig, LoraWeights};
use qlora::model::train::CE_CHUNK;
use qlora::model::{BaseQuant, Llama, Lora, Recompute, SeqInput};
use qlora::train::data::Example;
use qlora::train::plan::{
    plan, AdapterShape, MemoryPlan, ModelShape, RunShape, CUBLAS_WORKSPACE, SLACK_PERCENT,
};
use qlora::train::{AdamParamState, AdamW, OptimKind};
use qlora::weights::DType;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn fixture(p: &str) -> PathBuf {
    Path::new(ROOT).join("tests/fixtures").join(p)
}

// =============================================================================================
// Llama-2-7B by hand.
//
// Shapes (tests/fixtures/llama-2-7b-chat-hf/config.json): C = 4096 hidden, F = 11008
// intermediate, L = 32 layers, H = 32 heads of 128 (Q = K = 4096: no GQA), V = 32000, f16.
// Micro-batch: 4 sequences of S = 512 tokens packed along the token axis, T = 2048 rows.
// Dropout 0.1 (the tutorial's), paged_adamw_32bit, CE_CHUNK = 256 rows.

const C: usize = 4096;
const F: usize = 11008;
const L: usize = 32;
const H: usize = 32;
const V: usize = 32000;
const T: usize = 2048;
const S: usize = 512;

// ---- Persistent lines, the same for every plan below ----------------------------------------
//
// NF4, block 64, double quantization, one `[out, in]` weight of n values (DeviceNf4::upload):
//   packed codes n/2 B + f32 absmax placeholder 4 B + 8-bit scale codes n/64 B
//   + nested f32 absmax 4 B × n/64/256 + 256-entry f32 code table 1024 B.
// q, k, v, o: 4096 × 4096, n = 16,777,216:
//   8,388,608 + 4 + 262,144 + 4 × 1,024 + 1,024 = 8,655,876 B
const NF4_4096X4096: usize = 8_388_608 + 4 + 262_144 + 4 * 1_024 + 1_024;
// gate, up (11008 × 4096) and down (4096 × 11008), n = 45,088,768:
//   22,544,384 + 4 + 704,512 + 4 × 2,752 + 1,024 = 23,260,932 B
const NF4_4096X11008: usize = 22_544_384 + 4 + 704_512 + 4 * 2_752 + 1_024;
// 32 layers × (4 × 8,655,876 + 3 × 23,260,932) = 32 × 104,406,300 = 3,341,001,600 B
const BASE_NF4: usize = L * (4 * NF4_4096X4096 + 3 * NF4_4096X11008);
// lm_head: f16 in the checkpoint → CudaLinear::Half, 2 B × 32000 × 4096 = 262,144,000 B
const LM_HEAD: usize = 2 * V * C;
// embedding table uploaded as f32: 4 B × 32000 × 4096 = 524,288,000 B
const EMBED: usize = 4 * V * C;
// 2 norms per layer + the final one, f32: 65 × 4096 × 4 = 1,064,960; inv_freq 64 × 4 = 256
const NORMS: usize = (2 * L + 1) * C * 4 + 64 * 4;
// GEMM staging: lm_head's dy·W rounds the [256, 32000] logits gradient to 16 bits,
// 256 × 32000 × 2 = 16,384,000 B (its forward's [256, 4096] is smaller); RoPE positions 4 × T.
const STAGING: usize = 256 * V * 2 + 4 * T;

// ---- Activations one layer keeps (selective) -------------------------------------------------
// bf16 stashes of h [T, C], q [T, Q], k [T, K], v [T, K], att [T, Q], gate [T, F], up [T, F]:
//   2 B × 2048 × (4096 + 4096 + 4096 + 4096 + 4096 + 11008 + 11008) = 2 × 2048 × 42,496
//   = 174,063,616 B
const STASH_PER_LAYER: usize = 2 * T * (5 * C + 2 * F);
// the attention's log-sum-exp [T, H] f32: 2048 × 32 × 4 = 262,144 B
const LSE_PER_LAYER: usize = 4 * T * H;
// a stashed layer input [T, C] bf16: 2 × 2048 × 4096 = 16,777,216 B
const INPUT_STASH: usize = 2 * T * C;
// the residual stream x (or the unstashed layer input) and its gradient dx, f32 [T, C] each
const RESIDUAL: usize = 2 * (4 * T * C);

struct Expected {
    lora_params: usize,
    optimizer: usize,
    lora_scratch: usize,
    activations: usize,
    working_set: usize,
    dropout_masks: usize,
    peak_at: &'static str,
}

/// r 16 on q, k, v, o, gate, up, down.
fn r16_all_linear(recompute: Recompute) -> Expected {
    // LoRA values per layer: A [16, in] + B [out, 16]:
    //   q, k, v, o: 16·4096 + 4096·16 = 131,072 each → 524,288
    //   gate, up:   16·4096 + 11008·16 = 241,664 each; down: 16·11008 + 4096·16 = 241,664
    //   → 524,288 + 3 × 241,664 = 1,249,280; × 32 layers = 39,976,960 values, f32:
    let values = L * (4 * (16 * C + C * 16) + 3 * (16 * C + F * 16));
    assert_eq!(values, 39_976_960);
    let lora_params = 4 * values; // 159,907,840 B (and as much again for the gradients)
                                  // AdamW: every tensor's size is a multiple of 64, so P = 39,976,960; m and v: 2·P f32;
                                  // 448 tensors (A and B of 224 modules): launch table 48 B, scalars 8 B, f64 sums 8 B each,
                                  // and the 8-byte norm output.
    let optimizer = 2 * values * 4 + 448 * (48 + 8 + 8) + 8; // 319,844,360 B
                                                             // LoRA staging scratch, each buffer at its largest use (T rows):
                                                             //   bf16 x̃ [T, 11008] (down's input) 45,088,768; bf16 A [16, 11008] 352,256;
                                                             //   bf16 B [11008, 16] 352,256; bf16 xa [T, 16] 65,536; bf16 dy [T, 11008] (gate/up's
                                                             //   output gradient) 45,088,768; bf16 g [T, 16] 65,536; f32 g [T, 16] 131,072;
                                                             //   f32 ga [T, 11008] (dropout on) 90,177,536
    let lora_scratch = 2 * T * F
        + 2 * 16 * F
        + 2 * F * 16
        + 2 * T * 16
        + 2 * T * F
        + 2 * T * 16
        + 4 * T * 16
        + 4 * T * F; // 181,321,728 B
                     // The peak: backward of layer 31, MLP, when down_proj's dropout mask is rebuilt for its LoRA
                     // backward. Alive: gate and up (unstashed), m and dm: 4 × [T, F] f32 = 360,710,144 B; the
                     // mask [T, F] f32 = 90,177,536 B and one sequence's slice of it [S, F] f32 = 22,544,384 B.
    let working_set = 4 * (4 * T * F);
    let dropout_masks = 4 * T * F + 4 * S * F;
    // Kept per layer: the stashes, lse and 7 adapters' xa [T, 16] f32 (917,504 B).
    let per_layer = STASH_PER_LAYER + LSE_PER_LAYER + 7 * (4 * T * 16); // 175,243,264 B
    let activations = match recompute {
        // all 32 layers' sets, and the stashed inputs of layers 0..30 (layer 31's is unstashed)
        Recompute::Selective => 32 * per_layer + 31 * INPUT_STASH, // 6,127,878,144 B
        // layer 31's recomputed set and the stashed inputs of layers 0..30
        Recompute::Full => per_layer + 31 * INPUT_STASH, // 695,336,960 B
    };
    Expected {
        lora_params,
        optimizer,
        lora_scratch,
        activations,
        working_set,
        dropout_masks,
        peak_at: "backward, layer 31: down_proj dropout mask",
    }
}

/// r 8 on q and v (the tutorial's).
fn r8_q_v(recompute: Recompute) -> Expected {
    // q, v: 8·4096 + 4096·8 = 65,536 values each → 131,072 per layer, × 32 = 4,194,304
    let values = L * 2 * (8 * C + C * 8);
    assert_eq!(values, 4_194_304);
    let lora_params = 4 * values; // 16,777,216 B
                                  // 128 tensors, sizes multiples of 64
    let optimizer = 2 * values * 4 + 128 * (48 + 8 + 8) + 8; // 33,562,632 B
                                                             // bf16 x̃ [T, 4096] 16,777,216; A [8, 4096] 65,536; B [4096, 8] 65,536; xa [T, 8] 32,768;
                                                             // dy [T, 4096] 16,777,216; g [T, 8] 32,768; f32 g [T, 8] 65,536; f32 ga [T, 4096] 33,554,432
    let lora_scratch = 2 * T * C
        + 2 * 8 * C
        + 2 * C * 8
        + 2 * T * 8
        + 2 * T * C
        + 2 * T * 8
        + 4 * T * 8
        + 4 * T * C; // 67,371,008 B
                     // No adapter in the MLP, so no mask there: the peak is layer 31's SwiGLU backward, with
                     // gate, up (unstashed), dm, dg, du: 5 × [T, F] f32 = 450,887,680 B.
    let working_set = 5 * (4 * T * F);
    let per_layer = STASH_PER_LAYER + LSE_PER_LAYER + 2 * (4 * T * 8); // 174,456,832 B
    let activations = match recompute {
        Recompute::Selective => 32 * per_layer + 31 * INPUT_STASH, // 6,102,712,320 B
        Recompute::Full => per_layer + 31 * INPUT_STASH,           // 694,550,528 B
    };
    Expected {
        lora_params,
        optimizer,
        lora_scratch,
        activations,
        working_set,
        dropout_masks: 0,
        peak_at: "backward, layer 31: SwiGLU backward",
    }
}

fn llama7b() -> (ModelConfig, ModelShape) {
    let dir = fixture("llama-2-7b-chat-hf");
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let shape = ModelShape::from_dir(&dir, &cfg, BaseQuant::NF4).unwrap();
    (cfg, shape)
}

fn plan_7b(targets: &[&str], r: usize, recompute: Recompute) -> MemoryPlan {
    let (_, model) = llama7b();
    let mut lora = LoraConfig::new(r, 16.0, targets).unwrap();
    lora.lora_dropout = 0.1;
    let run = RunShape {
        model,
        adapter: AdapterShape::from_config(&lora),
        recompute,
        paged_optimizer: true,
        micro_batches: vec![vec![S; 4]],
        eval_len: None,
        ce_chunk: CE_CHUNK,
        device_internals: true,
    };
    plan(&run).unwrap()
}

fn check_7b(p: &MemoryPlan, e: &Expected) {
    let want = [
        ("base_nf4", BASE_NF4),
        ("base_dense", 0),
        ("lm_head", LM_HEAD),
        ("embedding", EMBED),
        ("norms", NORMS),
        ("lora_params", e.lora_params),
        ("lora_grads", e.lora_params),
        ("optimizer", e.optimizer),
        ("lora_scratch", e.lora_scratch),
        ("staging", STAGING),
        ("activations", e.activations),
        ("residual", RESIDUAL),
        ("working_set", e.working_set),
        ("dropout_masks", e.dropout_masks),
        ("cross_entropy", 0),
        ("eval", 0),
    ];
    for (key, bytes) in want {
        assert_eq!(p.line(key), bytes, "line {key}");
    }
    let metered: usize = want.iter().map(|w| w.1).sum();
    assert_eq!(p.metered_bytes, metered);
    let slack = (metered * SLACK_PERCENT).div_ceil(100);
    assert_eq!(p.line("allocator_slack"), slack);
    assert_eq!(p.line("cublas_workspace"), 32 << 20);
    assert_eq!(p.total_bytes, metered + CUBLAS_WORKSPACE + slack);
    assert_eq!(p.peak_at, e.peak_at);
    assert_eq!(p.micro_batch.tokens, T);
}

#[test]
fn llama7b_r16_all_linear_selective() {
    let p = plan_7b(&["all-linear"], 16, Recompute::Selective);
    check_7b(&p, &r16_all_linear(Recompute::Selective));
    // 11,634,291,848 B metered: 10.84 GiB
    assert_eq!(p.metered_bytes, 11_634_291_848);
}

#[test]
fn llama7b_r16_all_linear_full() {
    let p = plan_7b(&["all-linear"], 16, Recompute::Full);
    check_7b(&p, &r16_all_linear(Recompute::Full));
    assert_eq!(p.metered_bytes, 6_201_750_664);
}

#[test]
fn llama7b_r8_q_v_selective() {
    let p = plan_7b(&["q_proj", "v_proj"], 8, Recompute::Selective);
    check_7b(&p, &r8_q_v(Recompute::Selective));
    assert_eq!(p.metered_bytes, 10_900_087_944);
}

#[test]
fn llama7b_r8_q_v_full() {
    let p = plan_7b(&["q_proj", "v_proj"], 8, Recompute::Full);
    check_7b(&p, &r8_q_v(Recompute::Full));
    assert_eq!(p.metered_bytes, 5_491_926_152);
}

/// Without double quantization the scales are f32; with `--quant none` the f16 projections stay
/// 16-bit on the device; the lines follow.
#[test]
fn llama7b_other_base_formats() {
    let (cfg, _) = llama7b();
    let dir = fixture("llama-2-7b-chat-hf");
    let no_dq = BaseQuant::Nf4 {
        blocksize: 64,
        double_quant: false,
    };
    let shape = ModelShape::from_dir(&dir, &cfg, no_dq).unwrap();
    let lora = LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]).unwrap();
    let mut run = RunShape {
        model: shape,
        adapter: AdapterShape::from_config(&lora),
        recompute: Recompute::Full,
        paged_optimizer: false,
        micro_batches: vec![vec![S; 4]],
        eval_len: None,
        ce_chunk: CE_CHUNK,
        device_internals: true,
    };
    // packed n/2 + f32 absmax 4·n/64 + placeholders 1 + 4 + 4
    let w = |n: usize| n / 2 + 4 * (n / 64) + 9;
    assert_eq!(
        plan(&run).unwrap().line("base_nf4"),
        L * (4 * w(C * C) + 3 * w(C * F))
    );
    run.model = ModelShape::from_dir(&dir, &cfg, BaseQuant::None).unwrap();
    let p = plan(&run).unwrap();
    assert_eq!(p.line("base_nf4"), 0);
    assert_eq!(p.line("base_dense"), L * 2 * (4 * C * C + 3 * C * F));
    // --quant none: every projection's activations are staged in 16 bits; the largest uses are
    // down_proj's [T, 11008] input and gate/up's [T, 11008] output gradient (bf16), above
    // lm_head's [256, 32000].
    assert_eq!(p.line("staging"), 2 * T * F + 4 * T);
}

// =============================================================================================
// The replay against a metering wrapper around the CPU backend.

#[derive(Default)]
struct Meter {
    live: AtomicUsize,
    peak: AtomicUsize,
}

/// The CPU backend, with every buffer the model code allocates through the trait metered as the
/// CUDA backend meters it: `len.max(1)` values of 4 bytes (`zeros`, `unstash`), `len` for
/// uploads, and bf16 stashes at 2 bytes a value.
#[derive(Clone)]
struct Counting {
    cpu: CpuBackend,
    meter: Arc<Meter>,
}

struct MBuf {
    v: Vec<f32>,
    bytes: usize,
    meter: Arc<Meter>,
}

impl Drop for MBuf {
    fn drop(&mut self) {
        self.meter.live.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Counting {
    fn new() -> Self {
        Counting {
            cpu: CpuBackend::new(),
            meter: Arc::default(),
        }
    }

    fn wrap(&self, v: Vec<f32>, bytes: usize) -> MBuf {
        let now = self.meter.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.meter.peak.fetch_max(now, Ordering::Relaxed);
        MBuf {
            v,
            bytes,
            meter: self.meter.clone(),
        }
    }

    fn live(&self) -> usize {
        self.meter.live.load(Ordering::Relaxed)
    }

    /// Starts a peak measurement; returns the bytes live now.
    fn reset_peak(&self) -> usize {
        let live = self.live();
        self.meter.peak.store(live, Ordering::Relaxed);
        live
    }

    fn peak(&self) -> usize {
        self.meter.peak.load(Ordering::Relaxed)
    }
}

type R<T> = qlora::Result<T>;

impl Backend for Counting {
    type Buf = MBuf;
    type Linear = CpuLinear;
    /// Metered at 2 bytes a value: the CUDA backend's bf16 cache, which the plan models.
    type Kv = MBuf;

    fn name(&self) -> String {
        "metered cpu".into()
    }
    fn kv_new(&self, len: usize) -> R<MBuf> {
        Ok(self.wrap(vec![0.0; len], 2 * len.max(1)))
    }
    fn kv_write(&self, cache: &mut MBuf, off: usize, src: &MBuf, len: usize) -> R<()> {
        self.cpu.copy(&mut cache.v, off, &src.v, 0, len)
    }
    fn zeros(&self, len: usize) -> R<MBuf> {
        Ok(self.wrap(vec![0.0; len], 4 * len.max(1)))
    }
    fn upload(&self, data: &[f32]) -> R<MBuf> {
        Ok(self.wrap(data.to_vec(), 4 * data.len()))
    }
    fn download(&self, buf: &MBuf) -> R<Vec<f32>> {
        Ok(buf.v.clone())
    }
    fn linear(&self, w: HostLinear) -> R<CpuLinear> {
        self.cpu.linear(w)
    }
    fn linear_shape(&self, w: &CpuLinear) -> (usize, usize) {
        self.cpu.linear_shape(w)
    }
    fn linear_bytes(&self, w: &CpuLinear) -> usize {
        self.cpu.linear_bytes(w)
    }
    fn copy(&self, dst: &mut MBuf, d0: usize, src: &MBuf, s0: usize, len: usize) -> R<()> {
        self.cpu.copy(&mut dst.v, d0, &src.v, s0, len)
    }
    fn embedding(&self, out: &mut MBuf, table: &MBuf, ids: &[u32], dim: usize) -> R<()> {
        self.cpu.embedding(&mut out.v, &table.v, ids, dim)
    }
    fn rmsnorm(&self, o: &mut MBuf, x: &MBuf, w: &MBuf, rows: usize, dim: usize, e: f32) -> R<()> {
        self.cpu.rmsnorm(&mut o.v, &x.v, &w.v, rows, dim, e)
    }
    fn matmul(&self, out: &mut MBuf, x: &MBuf, w: &CpuLinear, rows: usize) -> R<()> {
        self.cpu.matmul(&mut out.v, &x.v, w, rows)
    }
    fn matmul_add(&self, out: &mut MBuf, x: &MBuf, w: &CpuLinear, rows: usize) -> R<()> {
        // A CUDA path's temporary is the backend's own (not the model's): not metered here.
        self.cpu.matmul_add(&mut out.v, &x.v, w, rows)
    }
    fn rope(&self, x: &mut MBuf, pos: &[u32], f: &MBuf, heads: usize, hd: usize) -> R<()> {
        self.cpu.rope(&mut x.v, pos, &f.v, heads, hd)
    }
    fn attention(&self, o: &mut MBuf, q: &MBuf, k: &MBuf, v: &MBuf, s: AttnShape) -> R<()> {
        self.cpu.attention(&mut o.v, &q.v, &k.v, &v.v, s)
    }
    fn swiglu(&self, out: &mut MBuf, g: &MBuf, u: &MBuf, len: usize) -> R<()> {
        self.cpu.swiglu(&mut out.v, &g.v, &u.v, len)
    }
    fn add_assign(&self, x: &mut MBuf, y: &MBuf, len: usize) -> R<()> {
        self.cpu.add_assign(&mut x.v, &y.v, len)
    }
    fn lora_forward_add(
        &self,
        y: &mut MBuf,
        xa: &mut MBuf,
        x: &MBuf,
        keep: Option<&MBuf>,
        a: &MBuf,
        b: &MBuf,
        scale: f32,
        sh: LoraShape,
    ) -> R<()> {
        let keep = keep.map(|k| &k.v);
        self.cpu
            .lora_forward_add(&mut y.v, &mut xa.v, &x.v, keep, &a.v, &b.v, scale, sh)
    }
    fn cross_entropy(&self, l: &mut MBuf, z: &MBuf, t: &[i32], vocab: usize) -> R<()> {
        self.cpu.cross_entropy(&mut l.v, &z.v, t, vocab)
    }
}

impl TrainBackend for Counting {
    type Saved = MBuf;
    type OptState = qlora::backend::cpu::CpuOptState;

    fn stash(&self, buf: MBuf, len: usize) -> R<MBuf> {
        // The bf16 copy exists before the f32 source is dropped, as on CUDA.
        let s = self.wrap(buf.v[..len].to_vec(), 2 * len.max(1));
        drop(buf);
        Ok(s)
    }
    fn unstash(&self, saved: &MBuf, len: usize) -> R<MBuf> {
        Ok(self.wrap(saved.v[..len].to_vec(), 4 * len.max(1)))
    }
    fn matmul_dx(&self, dx: &mut MBuf, dy: &MBuf, w: &CpuLinear, rows: usize, acc: bool) -> R<()> {
        self.cpu.matmul_dx(&mut dx.v, &dy.v, w, rows, acc)
    }
    fn rmsnorm_backward(
        &self,
        dx: &mut MBuf,
        dy: &MBuf,
        x: &MBuf,
        w: &MBuf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> R<()> {
        self.cpu
            .rmsnorm_backward(&mut dx.v, &dy.v, &x.v, &w.v, rows, dim, eps)
    }
    fn rope_backward(&self, dx: &mut MBuf, p: &[u32], f: &MBuf, h: usize, hd: usize) -> R<()> {
        self.cpu.rope_backward(&mut dx.v, p, &f.v, h, hd)
    }
    fn attention_train(
        &self,
        out: &mut MBuf,
        lse: &mut MBuf,
        q: &MBuf,
        k: &MBuf,
        v: &MBuf,
        p: Packed,
    ) -> R<()> {
        self.cpu
            .attention_train(&mut out.v, &mut lse.v, &q.v, &k.v, &v.v, p)
    }
    fn attention_backward(
        &self,
        dq: &mut MBuf,
        dk: &mut MBuf,
        dv: &mut MBuf,
        dout: &MBuf,
        q: &MBuf,
        k: &MBuf,
        v: &MBuf,
        out: &MBuf,
        lse: &MBuf,
        p: Packed,
    ) -> R<()> {
        self.cpu.attention_backward(
            &mut dq.v, &mut dk.v, &mut dv.v, &dout.v, &q.v, &k.v, &v.v, &out.v, &lse.v, p,
        )
    }
    fn swiglu_backward(
        &self,
        dg: &mut MBuf,
        du: &mut MBuf,
        dh: &MBuf,
        g: &MBuf,
        u: &MBuf,
        len: usize,
    ) -> R<()> {
        self.cpu
            .swiglu_backward(&mut dg.v, &mut du.v, &dh.v, &g.v, &u.v, len)
    }
    fn cross_entropy_fused(
        &self,
        z: &mut MBuf,
        l: &mut MBuf,
        t: &[i32],
        vocab: usize,
        scale: f32,
    ) -> R<()> {
        self.cpu
            .cross_entropy_fused(&mut z.v, &mut l.v, t, vocab, scale)
    }
    fn lora_backward(
        &self,
        dx: &mut MBuf,
        da: &mut MBuf,
        db: &mut MBuf,
        dy: &MBuf,
        x: &MBuf,
        keep: Option<&MBuf>,
        xa: &MBuf,
        a: &MBuf,
        b: &MBuf,
        scale: f32,
        sh: LoraShape,
    ) -> R<()> {
        let keep = keep.map(|k| &k.v);
        self.cpu.lora_backward(
            &mut dx.v, &mut da.v, &mut db.v, &dy.v, &x.v, keep, &xa.v, &a.v, &b.v, scale, sh,
        )
    }
    fn dropout_mask(&self, keep: &mut MBuf, len: usize, p: f32, seed: u64, off: u64) -> R<()> {
        self.cpu.dropout_mask(&mut keep.v, len, p, seed, off)
    }
    fn adamw_init(
        &self,
        sizes: &[usize],
        host: Option<Vec<AdamParamState>>,
        kind: OptimKind,
    ) -> R<Self::OptState> {
        self.cpu.adamw_init(sizes, host, kind)
    }
    fn adamw_download(&self, s: &Self::OptState) -> R<Vec<AdamParamState>> {
        self.cpu.adamw_download(s)
    }
    fn adamw_step(
        &self,
        state: &mut Self::OptState,
        params: &mut [&mut MBuf],
        grads: &mut [&mut MBuf],
        hyper: &AdamW,
        lr: f64,
        max_norm: f32,
    ) -> R<f32> {
        let mut p: Vec<&mut Vec<f32>> = params.iter_mut().map(|b| &mut b.v).collect();
        let mut g: Vec<&mut Vec<f32>> = grads.iter_mut().map(|b| &mut b.v).collect();
        self.cpu
            .adamw_step(state, &mut p, &mut g, hyper, lr, max_norm)
    }
    fn zero(&self, buf: &mut MBuf, len: usize) -> R<()> {
        self.cpu.zero(&mut buf.v, len)
    }
}

struct Case {
    model: &'static str,
    targets: &'static [&'static str],
    rank: usize,
    dropout: f32,
    recompute: Recompute,
    lens: &'static [usize],
    ce_chunk: usize,
}

/// Trains one step of `c` on the metered CPU backend (then evaluates the longest sequence) and
/// compares the peaks with the plan's replay of the same step.
fn replay_matches_the_model_code(c: &Case) {
    let cfg = ModelConfig::from_file(&fixture(c.model).join("config.json")).unwrap();
    let backend = Counting::new();
    let meter = backend.clone();
    let mut model = Llama::random(backend, &cfg, 3).unwrap();
    model.ce_chunk = c.ce_chunk;
    let mut lora_cfg = LoraConfig::new(c.rank, 16.0, c.targets).unwrap();
    lora_cfg.lora_dropout = c.dropout;
    let weights = LoraWeights::init(&lora_cfg, &cfg, 5).unwrap();
    model.lora = Some(Lora::new(&model.backend, &lora_cfg, &weights, &cfg).unwrap());
    let mut grads = model
        .lora
        .as_ref()
        .unwrap()
        .params
        .zeros_like(&model.backend)
        .unwrap();

    let run = RunShape {
        model: ModelShape::new(&cfg, BaseQuant::None, |_| DType::F32, true),
        adapter: AdapterShape::from_config(&lora_cfg),
        recompute: c.recompute,
        paged_optimizer: false,
        micro_batches: vec![c.lens.to_vec()],
        eval_len: c.lens.iter().copied().max(),
        ce_chunk: c.ce_chunk,
        device_internals: false,
    };
    let p = plan(&run).unwrap();
    let what = format!(
        "{} {:?} {:?} lens {:?}",
        c.model, c.targets, c.recompute, c.lens
    );
    // Persistent: embedding, norms, inv_freq, LoRA parameters and gradients (the rest is the
    // CUDA backend's own and not counted here).
    let live0 = meter.reset_peak();
    assert_eq!(p.persistent_bytes, live0, "persistent, {what}");

    let seqs_ids: Vec<Vec<u32>> = c
        .lens
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            (0..n)
                .map(|i| ((i * 31 + s * 7 + 1) % cfg.vocab_size) as u32)
                .collect()
        })
        .collect();
    let targets: Vec<Vec<i32>> = seqs_ids
        .iter()
        .map(|ids| {
            let mut t: Vec<i32> = ids.iter().skip(1).map(|&i| i as i32).collect();
            t.push(-100);
            t
        })
        .collect();
    let seqs: Vec<SeqInput> = seqs_ids
        .iter()
        .zip(&targets)
        .enumerate()
        .map(|(k, (ids, t))| SeqInput {
            ids,
            targets: t,
            dropout_seed: (c.dropout > 0.0).then_some(11 + k as u64),
        })
        .collect();
    model
        .forward_backward_packed(&seqs, 0.01, &mut grads, c.recompute)
        .unwrap();
    assert_eq!(
        meter.live(),
        live0,
        "the step frees what it allocates, {what}"
    );
    let step = meter.peak() - live0;
    let planned_step = p
        .phases
        .iter()
        .filter(|ph| ph.phase != "eval")
        .map(|ph| ph.bytes)
        .max()
        .unwrap()
        - p.persistent_bytes;
    assert_eq!(planned_step, step, "step peak, {what}");

    // Evaluation of the longest sequence (between steps).
    let longest = seqs_ids.iter().max_by_key(|s| s.len()).unwrap();
    let ex = Example {
        ids: longest.clone(),
        labels: longest.iter().map(|&i| i as i32).collect(),
    };
    meter.reset_peak();
    qlora::train::trainer::example_loss(&model, &ex).unwrap();
    let eval = meter.peak() - live0;
    let planned_eval = p.phases.iter().find(|ph| ph.phase == "eval").unwrap().bytes;
    assert_eq!(planned_eval - p.persistent_bytes, eval, "eval peak, {what}");
    // The plan's metered figure is the larger of the two.
    assert_eq!(p.step_bytes(), step.max(eval), "{what}");
}

#[test]
fn replay_gqa_all_linear_selective_packed_with_dropout() {
    replay_matches_the_model_code(&Case {
        model: "tiny/gqa",
        targets: &["all-linear"],
        rank: 4,
        dropout: 0.1,
        recompute: Recompute::Selective,
        lens: &[7, 13, 5],
        ce_chunk: 4,
    });
}

#[test]
fn replay_gqa_q_v_full_one_sequence_no_dropout() {
    replay_matches_the_model_code(&Case {
        model: "tiny/gqa",
        targets: &["q_proj", "v_proj"],
        rank: 2,
        dropout: 0.0,
        recompute: Recompute::Full,
        lens: &[9],
        ce_chunk: CE_CHUNK,
    });
}

#[test]
fn replay_tied_lm_head_adapted_full_with_dropout() {
    replay_matches_the_model_code(&Case {
        model: "tiny/tied",
        targets: &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "lm_head",
        ],
        rank: 3,
        dropout: 0.2,
        recompute: Recompute::Full,
        lens: &[6, 6],
        ce_chunk: 5,
    });
}

#[test]
fn replay_llama3_head_dim_mlp_targets_selective() {
    replay_matches_the_model_code(&Case {
        model: "tiny/llama3",
        targets: &["q_proj", "k_proj", "down_proj"],
        rank: 2,
        dropout: 0.05,
        recompute: Recompute::Selective,
        lens: &[1, 10, 3],
        ce_chunk: CE_CHUNK,
    });
}

// =============================================================================================
// The CLI.

fn qlora(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(args)
        .current_dir(ROOT)
        .env("HF_HUB_OFFLINE", "1")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run qlora");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !stderr.contains("panicked"),
        "panicked on {args:?}:\n{stderr}"
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        stderr,
    )
}

const LLAMA7B: &str = "tests/fixtures/llama-2-7b-chat-hf";
const GUANACO: &str = "tests/fixtures/guanaco-llama2-1k";

fn dry_run_7b(extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "train",
        "--model",
        LLAMA7B,
        "--dataset",
        GUANACO,
        "--output",
        "/nonexistent/never-written",
        "--dry-run",
        "--target-modules",
        "all-linear",
        "--lora-r",
        "16",
    ];
    args.extend_from_slice(extra);
    qlora(&args)
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}"))
}

/// The JSON lines add up: metered lines to `metered_bytes`, counted lines to `total_bytes`.
fn check_json_sums(v: &serde_json::Value) {
    let lines = v["lines"].as_array().unwrap();
    let sum = |f: &dyn Fn(&serde_json::Value) -> bool| -> u64 {
        lines
            .iter()
            .filter(|l| f(l))
            .map(|l| l["bytes"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(
        sum(&|l| l["metered"] == true),
        v["metered_bytes"].as_u64().unwrap()
    );
    assert_eq!(
        sum(&|l| l["counted"] == true),
        v["total_bytes"].as_u64().unwrap()
    );
    for key in [
        "base_nf4",
        "lm_head",
        "embedding",
        "lora_params",
        "optimizer",
        "activations",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l["key"] == key && l["bytes"].as_u64() > Some(0)),
            "no {key} line"
        );
    }
}

/// On the 7B fixture (config.json and the shard index only, no weights) with the real guanaco
/// data: text and JSON, fitting a 24 GiB card.
#[test]
fn dry_run_7b_text_and_json() {
    let (code, out, err) = dry_run_7b(&["--gpu-memory", "24GiB"]);
    assert_eq!(code, 0, "{err}");
    for needle in [
        "memory plan of this run on the CUDA backend",
        "32 layers, hidden 4096, intermediate 11008",
        "base: NF4 decoder projections (block 64, double quant)",
        "activations kept for the backward (selective)",
        "metered subtotal (CudaDevice::peak_bytes)",
        "cuBLAS workspace",
        "allocator slack (5% of metered)",
        "CUDA context (estimate; not in the total)",
        "peak at  backward, layer 31",
        "fits: needs",
    ] {
        assert!(out.contains(needle), "stdout lacks {needle:?}:\n{out}");
    }
    assert!(!Path::new("/nonexistent/never-written").exists());

    let (code, out, err) = dry_run_7b(&["--gpu-memory", "24GiB", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    check_json_sums(&v);
    assert_eq!(v["fit"]["verdict"], "fits");
    // Guanaco rows run up to 512 tokens after truncation: the longest micro-batch holds at most
    // 4 × 512, and here four long rows (group_by_length puts similar lengths together).
    let tokens = v["micro_batch"]["tokens"].as_u64().unwrap();
    assert!(tokens > 1500 && tokens <= 2048, "{tokens}");
    assert_eq!(v["micro_batch"]["sequences"], 4);
    // The 7B plan at this micro-batch is below the hand-checked 4 × 512 one and near it.
    let total = v["total_bytes"].as_u64().unwrap() as usize;
    let full_batch = plan_7b(&["all-linear"], 16, Recompute::Selective).total_bytes;
    assert!(
        total <= full_batch && total * 10 > full_batch * 8,
        "{total} vs {full_batch}"
    );
}

/// A tiny model with the real dataset: the plan's micro-batch is the longest of the epoch, as
/// the trainer forms it (batches of 4, grouped by length, packed along the token axis).
#[test]
fn dry_run_tiny_with_guanaco() {
    let (code, out, err) = qlora(&[
        "train",
        "--model",
        "tests/fixtures/tiny/gqa",
        "--dataset",
        GUANACO,
        "--dry-run",
        "--json",
        "--max-seq-len",
        "128",
        "--lora-r",
        "4",
        "--target-modules",
        "all-linear",
        "--gpu-memory",
        "1GiB",
    ]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    check_json_sums(&v);
    // The tiny f32 checkpoint: lm_head f32 [384, 64].
    let line = |k: &str| {
        v["lines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["key"] == k)
            .unwrap()["bytes"]
            .as_u64()
            .unwrap() as usize
    };
    assert_eq!(line("lm_head"), 4 * 384 * 64);
    assert_eq!(line("embedding"), 4 * 384 * 64);

    // The longest micro-batch, recomputed from the data with the library's own pieces.
    let dir = fixture("tiny/gqa");
    let tok = qlora::tokenizer::Tokenizer::from_dir(&dir).unwrap();
    let data = fixture("guanaco-llama2-1k");
    let rows = qlora::data::load_rows(&data, None).unwrap();
    let opts = qlora::train::data::SftOptions {
        text_field: "text".into(),
        messages_field: "messages".into(),
        completion_only_loss: false,
        max_seq_len: 128,
    };
    let (examples, _) = qlora::train::data::build_examples(&rows, &tok, &opts, &data).unwrap();
    let lengths: Vec<usize> = examples.iter().map(Example::len).collect();
    let batch = qlora::train::data::BatchOptions {
        batch_size: 4,
        group_by_length: true,
        packing: false,
        max_seq_len: 128,
        seed: 42,
        drop_last: false,
    };
    let longest = qlora::train::data::epoch_batches(&lengths, &batch, 0)
        .iter()
        .map(|b| b.iter().flatten().map(|&i| lengths[i]).sum::<usize>())
        .max()
        .unwrap();
    assert_eq!(
        v["micro_batch"]["tokens"].as_u64().unwrap() as usize,
        longest
    );
    assert_eq!(v["fit"]["verdict"], "fits");
}

/// 4 GiB cannot hold Llama-2-7B's QLoRA whatever the knobs: the error says so, with the fixed
/// part; at 10 GiB the selective plan does not fit and the error names the knobs that do.
#[test]
fn dry_run_that_does_not_fit_names_the_knobs() {
    let (code, _, err) = dry_run_7b(&["--gpu-memory", "4GiB"]);
    assert_ne!(code, 0);
    for needle in [
        "does not fit",
        "--gpu-memory 4.00 GiB",
        "No setting of --recompute (--recompute full:",
        "--batch-size or --max-seq-len fits",
        "alone take",
    ] {
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    }

    let (code, out, err) = dry_run_7b(&["--gpu-memory", "10GiB"]);
    assert_ne!(code, 0);
    assert!(out.contains("does not fit"), "{out}");
    for needle in [
        "does not fit",
        "These settings fit:",
        "--recompute full ",
        "--batch-size ",
        "--max-seq-len ",
    ] {
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    }

    let (code, out, _) = dry_run_7b(&["--gpu-memory", "10GiB", "--json"]);
    assert_ne!(code, 0);
    let v = json(&out);
    assert_eq!(v["fit"]["verdict"], "does_not_fit");
    let alts = v["fit"]["alternatives"].as_array().unwrap();
    let full = alts
        .iter()
        .find(|a| a["flags"] == "--recompute full")
        .unwrap();
    assert_eq!(full["fits"], true);
    assert!(full["total_bytes"].as_u64().unwrap() <= 10 << 30);
}

#[test]
fn json_needs_dry_run_and_sizes_are_checked() {
    let (code, _, err) = qlora(&["train", "--model", LLAMA7B, "--dataset", GUANACO, "--json"]);
    assert_ne!(code, 0);
    assert!(err.contains("--dry-run"), "{err}");
    let (code, _, err) = dry_run_7b(&["--gpu-memory", "lots"]);
    assert_ne!(code, 0);
    assert!(err.contains("not a memory size"), "{err}");
}

//! Gradient checks for the CPU backward ops (`qlora::backend::cpu::backward`).
//!
//! 1. Every backward op, run in f64, against central finite differences (`h = 1e-6`) of an f64
//!    twin of its forward written here; the twins are themselves checked against the production
//!    f32 forward ops.
//! 2. A whole Llama decoder layer with LoRA on q_proj (with dropout), v_proj and down_proj, in
//!    f64: `loss = Σ layer_out ⊙ R`, gradients w.r.t. the input and the LoRA A/B matrices.
//! 3. Every op's f32 instantiation (the production code) against its f64 instantiation on odd
//!    shapes.
//!
//! Errors are `max_i |g_i − n_i| / max(|g_i|, |n_i|, 1e-3 · max_j |n_j|)` (elementwise relative
//! error, floored at a thousandth of the largest entry so exact zeros do not divide by zero).
//! Run with `--nocapture` to see them.

use qlora::backend::cpu::backward::{
    attention_backward, cross_entropy_backward, cross_entropy_fused, lora_backward,
    lora_forward_add, matmul_dx, mean_scale, rmsnorm_backward, rope_backward, swiglu_backward,
    Float, LoraShape,
};
use qlora::backend::cpu::{attention, cross_entropy, matmul_wt, rmsnorm, rope, swiglu};
use qlora::backend::AttnShape;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const H: f64 = 1e-6;
const TOL64: f64 = 1e-6;
const TOL32: f64 = 1e-4;

fn rvec(rng: &mut StdRng, n: usize, amp: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-amp..amp)).collect()
}

/// Rounds to f32 (the inputs of the f32-vs-f64 comparisons are exactly representable in both).
fn r32(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| x as f32 as f64).collect()
}
fn to32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}
fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}
fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Central differences of `f` at `x`.
fn numeric(x: &[f64], mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let o = xp[i];
            xp[i] = o + H;
            let lp = f(&xp);
            xp[i] = o - H;
            let lm = f(&xp);
            xp[i] = o;
            (lp - lm) / (2.0 * H)
        })
        .collect()
}

fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "reference gradient is identically zero");
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / g.abs().max(w.abs()).max(1e-3 * scale))
        .fold(0.0, f64::max)
}

fn check(name: &str, got: &[f64], want: &[f64], tol: f64) {
    let e = rel_err(got, want);
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| {
            (
                (g - w).abs() / g.abs().max(w.abs()).max(1e-3 * scale),
                *g,
                *w,
            )
        })
        .fold((0.0, 0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a });
    println!(
        "{name:<44} max rel err {e:.2e}  (worst: analytic {:.6e} fd {:.6e}, max|fd| {scale:.3e})",
        worst.1, worst.2
    );
    assert!(e < tol, "{name}: max relative error {e:e} ≥ {tol:e}");
}

// ---------------------------------------------------------------------------------------------
// f64 twins of the forward ops (same formulas as src/backend/cpu/*.rs).

fn rmsnorm64(x: &[f64], w: &[f64], dim: usize, eps: f64) -> Vec<f64> {
    x.chunks(dim)
        .flat_map(|r| {
            let inv = 1.0 / (r.iter().map(|v| v * v).sum::<f64>() / dim as f64 + eps).sqrt();
            r.iter().zip(w).map(move |(v, w)| w * v * inv)
        })
        .collect()
}

fn rope64(x: &mut [f64], positions: &[u32], inv_freq: &[f64], heads: usize, d: usize) {
    let half = d / 2;
    for (row, &p) in x.chunks_mut(heads * d).zip(positions) {
        for i in 0..half {
            let (s, c) = (p as f64 * inv_freq[i]).sin_cos();
            for h in row.chunks_mut(d) {
                let (a, b) = (h[i], h[i + half]);
                h[i] = a * c - b * s;
                h[i + half] = b * c + a * s;
            }
        }
    }
}

fn attention64(q: &[f64], k: &[f64], v: &[f64], s: AttnShape) -> Vec<f64> {
    let d = s.head_dim;
    let group = s.heads / s.kv_heads;
    let mut out = vec![0.0; s.batch * s.q_len * s.heads * d];
    for (idx, o) in out.chunks_mut(d).enumerate() {
        let h = idx % s.heads;
        let t = (idx / s.heads) % s.q_len;
        let b = idx / (s.heads * s.q_len);
        let row = |j: usize| ((b * s.cache_cap + j) * s.kv_heads + h / group) * d;
        let qv = &q[idx * d..(idx + 1) * d];
        let sc: Vec<f64> = (0..=s.pos0 + t)
            .map(|j| dot(qv, &k[row(j)..row(j) + d]) / (d as f64).sqrt())
            .collect();
        let max = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = sc.iter().map(|x| (x - max).exp()).collect();
        let den: f64 = e.iter().sum();
        for (j, ej) in e.iter().enumerate() {
            for (o, vv) in o.iter_mut().zip(&v[row(j)..row(j) + d]) {
                *o += ej / den * vv;
            }
        }
    }
    out
}

fn silu64(g: f64) -> f64 {
    g / (1.0 + (-g).exp())
}

fn swiglu64(g: &[f64], u: &[f64]) -> Vec<f64> {
    g.iter().zip(u).map(|(&g, &u)| silu64(g) * u).collect()
}

fn ce64(logits: &[f64], targets: &[i32], vocab: usize) -> Vec<f64> {
    logits
        .chunks(vocab)
        .zip(targets)
        .map(|(r, &t)| {
            if t < 0 {
                return 0.0;
            }
            let max = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            max + r.iter().map(|v| (v - max).exp()).sum::<f64>().ln() - r[t as usize]
        })
        .collect()
}

/// `x[m, k] · Wᵀ`, `W` `[n, k]`.
fn linear64(x: &[f64], w: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = dot(&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
        }
    }
    y
}

fn inv_freq(d: usize, base: f64) -> Vec<f64> {
    (0..d / 2)
        .map(|i| 1.0 / base.powf(2.0 * i as f64 / d as f64))
        .collect()
}

/// The f64 twins compute what the production f32 forward ops compute.
#[test]
fn f64_twins_match_production_forward() {
    let mut rng = StdRng::seed_from_u64(1);
    let close = |name: &str, a: &[f32], b: &[f64]| {
        let e = rel_err(&to64(a), b);
        println!("forward twin {name:<31} max rel err {e:.2e}");
        assert!(e < TOL32, "{name}: {e:e}");
    };
    let (rows, dim) = (5, 33);
    let x = r32(&rvec(&mut rng, rows * dim, 2.0));
    let w = r32(&rvec(&mut rng, dim, 1.5));
    let mut o = vec![0.0f32; rows * dim];
    rmsnorm(&mut o, &to32(&x), &to32(&w), dim, 1e-5);
    close("rmsnorm", &o, &rmsnorm64(&x, &w, dim, 1e-5));

    let (heads, d) = (3, 10);
    let pos = [0u32, 1, 7, 31, 64];
    let f = r32(&inv_freq(d, 10000.0));
    let x = r32(&rvec(&mut rng, pos.len() * heads * d, 1.0));
    let mut x32 = to32(&x);
    rope(&mut x32, &pos, &to32(&f), heads, d);
    let mut x64 = x.clone();
    rope64(&mut x64, &pos, &f, heads, d);
    close("rope", &x32, &x64);

    let s = AttnShape {
        batch: 2,
        q_len: 4,
        pos0: 3,
        cache_cap: 9,
        heads: 6,
        kv_heads: 2,
        head_dim: 8,
    };
    let q = r32(&rvec(&mut rng, 2 * 4 * 6 * 8, 1.5));
    let k = r32(&rvec(&mut rng, 2 * 9 * 2 * 8, 1.5));
    let v = r32(&rvec(&mut rng, 2 * 9 * 2 * 8, 1.0));
    let mut o = vec![0.0f32; q.len()];
    attention(&mut o, &to32(&q), &to32(&k), &to32(&v), s);
    close("attention", &o, &attention64(&q, &k, &v, s));

    let g = r32(&rvec(&mut rng, 101, 6.0));
    let u = r32(&rvec(&mut rng, 101, 2.0));
    let mut o = vec![0.0f32; 101];
    swiglu(&mut o, &to32(&g), &to32(&u));
    close("swiglu", &o, &swiglu64(&g, &u));

    let (rows, vocab) = (4, 77);
    let z = r32(&rvec(&mut rng, rows * vocab, 5.0));
    let t = [3, -100, 76, 0];
    let mut l = vec![0.0f32; rows];
    cross_entropy(&mut l, &to32(&z), &t, vocab);
    close("cross_entropy", &l, &ce64(&z, &t, vocab));

    let (m, k, n) = (3, 11, 5);
    let x = r32(&rvec(&mut rng, m * k, 1.0));
    let w = r32(&rvec(&mut rng, n * k, 1.0));
    let mut y = vec![0.0f32; m * n];
    matmul_wt(&mut y, &to32(&x), &to32(&w), m, k, n);
    close("matmul_wt", &y, &linear64(&x, &w, m, k, n));
}

// ---------------------------------------------------------------------------------------------
// 1. Each op against finite differences, f64.

#[test]
fn gradcheck_rmsnorm() {
    let mut rng = StdRng::seed_from_u64(2);
    let (rows, dim, eps) = (3, 7, 1e-5);
    let x = rvec(&mut rng, rows * dim, 2.0);
    let w = rvec(&mut rng, dim, 1.5);
    let r = rvec(&mut rng, rows * dim, 1.0);
    let mut dx = vec![f64::NAN; rows * dim];
    rmsnorm_backward(&mut dx, &r, &x, &w, rows, dim, eps);
    let n = numeric(&x, |x| dot(&rmsnorm64(x, &w, dim, eps), &r));
    check("rmsnorm_backward dx", &dx, &n, TOL64);
}

#[test]
fn gradcheck_rope() {
    let mut rng = StdRng::seed_from_u64(3);
    let (heads, d) = (3, 6);
    let pos = [0u32, 3, 7, 2, 100];
    let f = inv_freq(d, 10000.0);
    let x = rvec(&mut rng, pos.len() * heads * d, 1.0);
    let r = rvec(&mut rng, x.len(), 1.0);
    let mut dx = r.clone();
    rope_backward(&mut dx, &pos, &f, heads, d);
    let n = numeric(&x, |x| {
        let mut y = x.to_vec();
        rope64(&mut y, &pos, &f, heads, d);
        dot(&y, &r)
    });
    check("rope_backward dx", &dx, &n, TOL64);
}

fn gradcheck_attention_shape(s: AttnShape, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let qn = s.batch * s.q_len * s.heads * s.head_dim;
    let kvn = s.batch * s.cache_cap * s.kv_heads * s.head_dim;
    let q = rvec(&mut rng, qn, 1.5);
    let k = rvec(&mut rng, kvn, 1.5);
    let v = rvec(&mut rng, kvn, 1.0);
    let r = rvec(&mut rng, qn, 1.0);
    let (mut dq, mut dk, mut dv) = (vec![f64::NAN; qn], vec![f64::NAN; kvn], vec![f64::NAN; kvn]);
    attention_backward(&mut dq, &mut dk, &mut dv, &r, &q, &k, &v, s);
    let tag = format!("b{} t{} pos0 {}", s.batch, s.q_len, s.pos0);
    let nq = numeric(&q, |q| dot(&attention64(q, &k, &v, s), &r));
    check(&format!("attention_backward dq ({tag})"), &dq, &nq, TOL64);
    let nk = numeric(&k, |k| dot(&attention64(&q, k, &v, s), &r));
    check(&format!("attention_backward dk ({tag})"), &dk, &nk, TOL64);
    let nv = numeric(&v, |v| dot(&attention64(&q, &k, v, s), &r));
    check(&format!("attention_backward dv ({tag})"), &dv, &nv, TOL64);
}

#[test]
fn gradcheck_attention() {
    // Training shape: batch 2, GQA 4 heads over 2 kv heads.
    gradcheck_attention_shape(
        AttnShape {
            batch: 2,
            q_len: 5,
            pos0: 0,
            cache_cap: 5,
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
        },
        4,
    );
    // A cached prefix and unused cache rows (their gradient must be zero, which FD confirms).
    gradcheck_attention_shape(
        AttnShape {
            batch: 1,
            q_len: 3,
            pos0: 2,
            cache_cap: 7,
            heads: 3,
            kv_heads: 1,
            head_dim: 5,
        },
        5,
    );
}

#[test]
fn gradcheck_swiglu() {
    let mut rng = StdRng::seed_from_u64(6);
    let n = 37;
    let g = rvec(&mut rng, n, 6.0);
    let u = rvec(&mut rng, n, 2.0);
    let r = rvec(&mut rng, n, 1.0);
    let (mut dg, mut du) = (vec![f64::NAN; n], vec![f64::NAN; n]);
    swiglu_backward(&mut dg, &mut du, &r, &g, &u);
    check(
        "swiglu_backward dgate",
        &dg,
        &numeric(&g, |g| dot(&swiglu64(g, &u), &r)),
        TOL64,
    );
    check(
        "swiglu_backward dup",
        &du,
        &numeric(&u, |u| dot(&swiglu64(&g, u), &r)),
        TOL64,
    );
}

#[test]
fn gradcheck_cross_entropy() {
    let mut rng = StdRng::seed_from_u64(7);
    let (rows, vocab) = (6, 9);
    let z = rvec(&mut rng, rows * vocab, 3.0);
    let t = [2, -100, 8, 0, -100, 5];
    let scale: f64 = mean_scale(&t);
    assert_eq!(scale, 0.25);
    let mut dz = vec![f64::NAN; z.len()];
    cross_entropy_backward(&mut dz, &z, &t, vocab, scale);
    let n = numeric(&z, |z| scale * ce64(z, &t, vocab).iter().sum::<f64>());
    check("cross_entropy_backward dlogits", &dz, &n, TOL64);
    assert!(dz[vocab..2 * vocab].iter().all(|&v| v == 0.0));

    // The fused variant: same gradient in place, and the forward's losses.
    let mut fused = z.clone();
    let mut losses = vec![f64::NAN; rows];
    cross_entropy_fused(&mut fused, &mut losses, &t, vocab, scale);
    check("cross_entropy_fused dlogits", &fused, &n, TOL64);
    let want = ce64(&z, &t, vocab);
    for (a, b) in losses.iter().zip(&want) {
        assert!((a - b).abs() < 1e-12, "fused loss {a} vs {b}");
    }
    assert_eq!(mean_scale::<f32>(&[-100, -100]), 0.0);
}

/// `y = x·Wᵀ + s·((x ⊙ keep)·Aᵀ)·Bᵀ`, the naive way.
#[allow(clippy::too_many_arguments)]
fn lora_linear64(
    x: &[f64],
    keep: Option<&[f64]>,
    w: &[f64],
    a: &[f64],
    b: &[f64],
    s: f64,
    sh: LoraShape,
) -> Vec<f64> {
    let (m, k, n, r) = (sh.rows, sh.in_features, sh.out_features, sh.rank);
    let xt: Vec<f64> = match keep {
        Some(kp) => x.iter().zip(kp).map(|(x, k)| x * k).collect(),
        None => x.to_vec(),
    };
    let xa = linear64(&xt, a, m, k, r);
    let mut y = linear64(x, w, m, k, n);
    for (y, d) in y.iter_mut().zip(linear64(&xa, b, m, r, n)) {
        *y += s * d;
    }
    y
}

fn gradcheck_lora_case(dropout: bool, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let sh = LoraShape {
        rows: 5,
        in_features: 7,
        out_features: 6,
        rank: 3,
    };
    let (m, k, n, r) = (sh.rows, sh.in_features, sh.out_features, sh.rank);
    let s = 2.0 / 3.0;
    let x = rvec(&mut rng, m * k, 1.0);
    let w = rvec(&mut rng, n * k, 0.5);
    let a = rvec(&mut rng, r * k, 0.5);
    let b = rvec(&mut rng, n * r, 0.5);
    let dy = rvec(&mut rng, m * n, 1.0);
    let keep: Option<Vec<f64>> = dropout.then(|| {
        (0..m * k)
            .map(|_| if rng.random_bool(0.3) { 0.0 } else { 1.0 / 0.7 })
            .collect()
    });
    let keep = keep.as_deref();
    let tag = if dropout { "dropout" } else { "no dropout" };

    // The forward helper adds exactly the adapter term and keeps xa.
    let mut y = linear64(&x, &w, m, k, n);
    let mut xa = vec![f64::NAN; m * r];
    lora_forward_add(&mut y, &mut xa, &x, keep, &a, &b, s, sh);
    let want = lora_linear64(&x, keep, &w, &a, &b, s, sh);
    check(&format!("lora_forward_add y ({tag})"), &y, &want, 1e-12);

    // Accumulation: gradients land on top of what the buffers held.
    let (c_a, c_b, c_x) = (0.25, -0.5, 0.75);
    let (mut da, mut db, mut dx) = (vec![c_a; r * k], vec![c_b; n * r], vec![c_x; m * k]);
    lora_backward(&mut dx, &mut da, &mut db, &dy, &x, keep, &xa, &a, &b, s, sh);
    let mut base = vec![f64::NAN; m * k];
    matmul_dx(&mut base, &dy, &w, m, k, n, false);
    let da: Vec<f64> = da.iter().map(|v| v - c_a).collect();
    let db: Vec<f64> = db.iter().map(|v| v - c_b).collect();
    let dx: Vec<f64> = dx.iter().zip(&base).map(|(v, b)| v - c_x + b).collect();
    let loss = |x: &[f64], a: &[f64], b: &[f64]| dot(&lora_linear64(x, keep, &w, a, b, s, sh), &dy);
    check(
        &format!("lora_backward dA ({tag})"),
        &da,
        &numeric(&a, |a| loss(&x, a, &b)),
        TOL64,
    );
    check(
        &format!("lora_backward dB ({tag})"),
        &db,
        &numeric(&b, |b| loss(&x, &a, b)),
        TOL64,
    );
    check(
        &format!("lora_backward + matmul_dx dx ({tag})"),
        &dx,
        &numeric(&x, |x| loss(x, &a, &b)),
        TOL64,
    );
}

#[test]
fn gradcheck_lora() {
    gradcheck_lora_case(false, 8);
    gradcheck_lora_case(true, 9);
}

// ---------------------------------------------------------------------------------------------
// 2. A whole decoder layer with LoRA on q_proj (with dropout), v_proj and down_proj.

const C: usize = 16; // hidden
const NH: usize = 4; // heads
const NKV: usize = 2; // kv heads
const HD: usize = 4; // head_dim
const FF: usize = 24; // intermediate
const T: usize = 5; // seq
const B: usize = 2; // batch
const RANK: usize = 2;
const ROWS: usize = B * T;
const QD: usize = NH * HD;
const KVD: usize = NKV * HD;
const EPS: f64 = 1e-5;

/// Frozen weights and fixed data of the test layer.
struct Frozen {
    w_attn: Vec<f64>,
    w_mlp: Vec<f64>,
    wq: Vec<f64>,
    wk: Vec<f64>,
    wv: Vec<f64>,
    wo: Vec<f64>,
    wg: Vec<f64>,
    wu: Vec<f64>,
    wd: Vec<f64>,
    inv_freq: Vec<f64>,
    positions: Vec<u32>,
    keep_q: Vec<f64>,
    s: f64,
    r: Vec<f64>,
}

/// What the gradient is taken with respect to.
#[derive(Clone)]
struct Params {
    x: Vec<f64>,
    aq: Vec<f64>,
    bq: Vec<f64>,
    av: Vec<f64>,
    bv: Vec<f64>,
    ad: Vec<f64>,
    bd: Vec<f64>,
}

const SHAPE: AttnShape = AttnShape {
    batch: B,
    q_len: T,
    pos0: 0,
    cache_cap: T,
    heads: NH,
    kv_heads: NKV,
    head_dim: HD,
};

fn lsh(in_features: usize, out_features: usize) -> LoraShape {
    LoraShape {
        rows: ROWS,
        in_features,
        out_features,
        rank: RANK,
    }
}

/// Activations the backward needs.
struct Saved {
    n1: Vec<f64>,
    xa_q: Vec<f64>,
    xa_v: Vec<f64>,
    q: Vec<f64>, // after rope
    k: Vec<f64>, // after rope
    v: Vec<f64>,
    h: Vec<f64>,
    gate: Vec<f64>,
    up: Vec<f64>,
    act: Vec<f64>,
    xa_d: Vec<f64>,
}

fn layer_forward(f: &Frozen, p: &Params) -> (Vec<f64>, Saved) {
    let n1 = rmsnorm64(&p.x, &f.w_attn, C, EPS);
    let mut q = linear64(&n1, &f.wq, ROWS, C, QD);
    let mut xa_q = vec![0.0; ROWS * RANK];
    lora_forward_add(
        &mut q,
        &mut xa_q,
        &n1,
        Some(&f.keep_q),
        &p.aq,
        &p.bq,
        f.s,
        lsh(C, QD),
    );
    let mut k = linear64(&n1, &f.wk, ROWS, C, KVD);
    let mut v = linear64(&n1, &f.wv, ROWS, C, KVD);
    let mut xa_v = vec![0.0; ROWS * RANK];
    lora_forward_add(&mut v, &mut xa_v, &n1, None, &p.av, &p.bv, f.s, lsh(C, KVD));
    rope64(&mut q, &f.positions, &f.inv_freq, NH, HD);
    rope64(&mut k, &f.positions, &f.inv_freq, NKV, HD);
    let att = attention64(&q, &k, &v, SHAPE);
    let o = linear64(&att, &f.wo, ROWS, QD, C);
    let h: Vec<f64> = p.x.iter().zip(&o).map(|(a, b)| a + b).collect();
    let n2 = rmsnorm64(&h, &f.w_mlp, C, EPS);
    let gate = linear64(&n2, &f.wg, ROWS, C, FF);
    let up = linear64(&n2, &f.wu, ROWS, C, FF);
    let act = swiglu64(&gate, &up);
    let mut d = linear64(&act, &f.wd, ROWS, FF, C);
    let mut xa_d = vec![0.0; ROWS * RANK];
    lora_forward_add(&mut d, &mut xa_d, &act, None, &p.ad, &p.bd, f.s, lsh(FF, C));
    let out: Vec<f64> = h.iter().zip(&d).map(|(a, b)| a + b).collect();
    let saved = Saved {
        n1,
        xa_q,
        xa_v,
        q,
        k,
        v,
        h,
        gate,
        up,
        act,
        xa_d,
    };
    (out, saved)
}

/// `Σ (out − out0) ⊙ R`: the gradient of `Σ out ⊙ R`, with the constant `Σ out0 ⊙ R` taken out
/// elementwise (exactly, by Sterbenz) before the sum, so the sum's rounding — which the central
/// difference divides by `2h` — is that of a small number rather than of `|Σ out ⊙ R| ≈ 36`.
fn layer_loss(f: &Frozen, p: &Params, out0: &[f64]) -> f64 {
    let out = layer_forward(f, p).0;
    out.iter()
        .zip(out0)
        .zip(&f.r)
        .map(|((o, o0), r)| (o - o0) * r)
        .sum()
}

/// The composed backward of the layer for `dout = R`; returns gradients shaped like `Params`.
fn layer_backward(f: &Frozen, p: &Params, sv: &Saved) -> Params {
    let mut g = Params {
        x: vec![0.0; ROWS * C],
        aq: vec![0.0; p.aq.len()],
        bq: vec![0.0; p.bq.len()],
        av: vec![0.0; p.av.len()],
        bv: vec![0.0; p.bv.len()],
        ad: vec![0.0; p.ad.len()],
        bd: vec![0.0; p.bd.len()],
    };
    let dout = &f.r;
    // out = h + down(act): both branches receive dout.
    let mut dh = dout.clone();
    let mut dact = vec![0.0; ROWS * FF];
    matmul_dx(&mut dact, dout, &f.wd, ROWS, FF, C, false);
    lora_backward(
        &mut dact,
        &mut g.ad,
        &mut g.bd,
        dout,
        &sv.act,
        None,
        &sv.xa_d,
        &p.ad,
        &p.bd,
        f.s,
        lsh(FF, C),
    );
    let (mut dgate, mut dup) = (vec![0.0; ROWS * FF], vec![0.0; ROWS * FF]);
    swiglu_backward(&mut dgate, &mut dup, &dact, &sv.gate, &sv.up);
    let mut dn2 = vec![0.0; ROWS * C];
    matmul_dx(&mut dn2, &dgate, &f.wg, ROWS, C, FF, false);
    matmul_dx(&mut dn2, &dup, &f.wu, ROWS, C, FF, true);
    let mut tmp = vec![0.0; ROWS * C];
    rmsnorm_backward(&mut tmp, &dn2, &sv.h, &f.w_mlp, ROWS, C, EPS);
    for (a, b) in dh.iter_mut().zip(&tmp) {
        *a += b;
    }
    // h = x + o_proj(att).
    g.x.copy_from_slice(&dh);
    let mut datt = vec![0.0; ROWS * QD];
    matmul_dx(&mut datt, &dh, &f.wo, ROWS, QD, C, false);
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; ROWS * QD],
        vec![0.0; ROWS * KVD],
        vec![0.0; ROWS * KVD],
    );
    attention_backward(&mut dq, &mut dk, &mut dv, &datt, &sv.q, &sv.k, &sv.v, SHAPE);
    rope_backward(&mut dq, &f.positions, &f.inv_freq, NH, HD);
    rope_backward(&mut dk, &f.positions, &f.inv_freq, NKV, HD);
    let mut dn1 = vec![0.0; ROWS * C];
    matmul_dx(&mut dn1, &dq, &f.wq, ROWS, C, QD, false);
    lora_backward(
        &mut dn1,
        &mut g.aq,
        &mut g.bq,
        &dq,
        &sv.n1,
        Some(&f.keep_q),
        &sv.xa_q,
        &p.aq,
        &p.bq,
        f.s,
        lsh(C, QD),
    );
    matmul_dx(&mut dn1, &dk, &f.wk, ROWS, C, KVD, true);
    matmul_dx(&mut dn1, &dv, &f.wv, ROWS, C, KVD, true);
    lora_backward(
        &mut dn1,
        &mut g.av,
        &mut g.bv,
        &dv,
        &sv.n1,
        None,
        &sv.xa_v,
        &p.av,
        &p.bv,
        f.s,
        lsh(C, KVD),
    );
    rmsnorm_backward(&mut tmp, &dn1, &p.x, &f.w_attn, ROWS, C, EPS);
    for (a, b) in g.x.iter_mut().zip(&tmp) {
        *a += b;
    }
    g
}

#[test]
fn gradcheck_decoder_layer() {
    let mut rng = StdRng::seed_from_u64(10);
    let mut w = |n: usize, fan_in: usize| rvec(&mut rng, n, 1.5 / (fan_in as f64).sqrt());
    let f = Frozen {
        w_attn: w(C, 1).iter().map(|v| 1.0 + 0.2 * v).collect(),
        w_mlp: w(C, 1).iter().map(|v| 1.0 + 0.2 * v).collect(),
        wq: w(QD * C, C),
        wk: w(KVD * C, C),
        wv: w(KVD * C, C),
        wo: w(C * QD, QD),
        wg: w(FF * C, C),
        wu: w(FF * C, C),
        wd: w(C * FF, FF),
        inv_freq: inv_freq(HD, 10000.0),
        positions: (0..B).flat_map(|_| 0..T as u32).collect(),
        keep_q: w(ROWS * C, 1)
            .iter()
            .map(|v| if *v < -0.3 { 0.0 } else { 1.0 / 0.9 })
            .collect(),
        s: 4.0 / RANK as f64,
        r: w(ROWS * C, 1),
    };
    let p = Params {
        x: w(ROWS * C, 1),
        aq: w(RANK * C, C),
        bq: w(QD * RANK, RANK),
        av: w(RANK * C, C),
        bv: w(KVD * RANK, RANK),
        ad: w(RANK * FF, FF),
        bd: w(C * RANK, RANK),
    };
    assert!(f.keep_q.contains(&0.0), "mask drops something");
    let (out0, saved) = layer_forward(&f, &p);
    let g = layer_backward(&f, &p, &saved);

    type Field = fn(&mut Params) -> &mut Vec<f64>;
    let fields: [(&str, Field); 7] = [
        ("x", |p| &mut p.x),
        ("q_proj lora_A", |p| &mut p.aq),
        ("q_proj lora_B", |p| &mut p.bq),
        ("v_proj lora_A", |p| &mut p.av),
        ("v_proj lora_B", |p| &mut p.bv),
        ("down_proj lora_A", |p| &mut p.ad),
        ("down_proj lora_B", |p| &mut p.bd),
    ];
    for (name, field) in fields {
        let mut pp = p.clone();
        let x0 = field(&mut pp).clone();
        let n = numeric(&x0, |v| {
            field(&mut pp).copy_from_slice(v);
            layer_loss(&f, &pp, &out0)
        });
        let got = field(&mut g.clone()).clone();
        check(&format!("decoder layer d[{name}]"), &got, &n, TOL64);
    }
}

// ---------------------------------------------------------------------------------------------
// 3. f32 (production) against f64, odd shapes.

fn close32(name: &str, a: &[f32], b: &[f64]) {
    let a = to64(a);
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let e = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale;
    println!("f32 vs f64 {name:<33} max err / max|ref| {e:.2e}");
    assert!(e < TOL32, "{name}: f32 vs f64 error {e:e}");
}

#[test]
fn f32_matches_f64() {
    let mut rng = StdRng::seed_from_u64(11);

    let (rows, dim) = (5, 33);
    let x = r32(&rvec(&mut rng, rows * dim, 2.0));
    let w = r32(&rvec(&mut rng, dim, 1.5));
    let dy = r32(&rvec(&mut rng, rows * dim, 1.0));
    let mut d64 = vec![0.0f64; rows * dim];
    rmsnorm_backward(&mut d64, &dy, &x, &w, rows, dim, 1e-5);
    let mut d32 = vec![0.0f32; rows * dim];
    rmsnorm_backward(&mut d32, &to32(&dy), &to32(&x), &to32(&w), rows, dim, 1e-5);
    close32("rmsnorm_backward", &d32, &d64);

    // Moderate positions: θ is an f32 product in production, so its rounding grows with p.
    let (heads, d) = (3, 10);
    let pos = [0u32, 1, 9, 40, 77, 5, 128];
    let f = r32(&inv_freq(d, 500000.0));
    let dy = r32(&rvec(&mut rng, pos.len() * heads * d, 1.0));
    let mut d64 = dy.clone();
    rope_backward(&mut d64, &pos, &f, heads, d);
    let mut d32 = to32(&dy);
    rope_backward(&mut d32, &pos, &to32(&f), heads, d);
    close32("rope_backward", &d32, &d64);

    for s in [
        AttnShape {
            batch: 3,
            q_len: 7,
            pos0: 0,
            cache_cap: 7,
            heads: 6,
            kv_heads: 2,
            head_dim: 12,
        },
        AttnShape {
            batch: 1,
            q_len: 5,
            pos0: 4,
            cache_cap: 11,
            heads: 5,
            kv_heads: 5,
            head_dim: 7,
        },
    ] {
        let qn = s.batch * s.q_len * s.heads * s.head_dim;
        let kvn = s.batch * s.cache_cap * s.kv_heads * s.head_dim;
        let q = r32(&rvec(&mut rng, qn, 2.0));
        let k = r32(&rvec(&mut rng, kvn, 2.0));
        let v = r32(&rvec(&mut rng, kvn, 1.0));
        let dy = r32(&rvec(&mut rng, qn, 1.0));
        let (mut a, mut b, mut c) = (vec![0.0f64; qn], vec![0.0f64; kvn], vec![0.0f64; kvn]);
        attention_backward(&mut a, &mut b, &mut c, &dy, &q, &k, &v, s);
        let (mut a32, mut b32, mut c32) = (vec![0.0f32; qn], vec![0.0f32; kvn], vec![0.0f32; kvn]);
        attention_backward(
            &mut a32,
            &mut b32,
            &mut c32,
            &to32(&dy),
            &to32(&q),
            &to32(&k),
            &to32(&v),
            s,
        );
        close32(
            &format!("attention_backward dq (pos0 {})", s.pos0),
            &a32,
            &a,
        );
        close32(
            &format!("attention_backward dk (pos0 {})", s.pos0),
            &b32,
            &b,
        );
        close32(
            &format!("attention_backward dv (pos0 {})", s.pos0),
            &c32,
            &c,
        );
    }

    let n = 1001;
    let g = r32(&rvec(&mut rng, n, 8.0));
    let u = r32(&rvec(&mut rng, n, 2.0));
    let dh = r32(&rvec(&mut rng, n, 1.0));
    let (mut dg, mut du) = (vec![0.0f64; n], vec![0.0f64; n]);
    swiglu_backward(&mut dg, &mut du, &dh, &g, &u);
    let (mut dg32, mut du32) = (vec![0.0f32; n], vec![0.0f32; n]);
    swiglu_backward(&mut dg32, &mut du32, &to32(&dh), &to32(&g), &to32(&u));
    close32("swiglu_backward dgate", &dg32, &dg);
    close32("swiglu_backward dup", &du32, &du);

    let (rows, vocab) = (5, 1003);
    let z = r32(&rvec(&mut rng, rows * vocab, 8.0));
    let t = [17, -100, 1002, 0, 500];
    let mut dz = vec![0.0f64; z.len()];
    cross_entropy_backward(&mut dz, &z, &t, vocab, mean_scale(&t));
    let mut dz32 = to32(&z);
    let mut l32 = vec![0.0f32; rows];
    cross_entropy_fused(&mut dz32, &mut l32, &t, vocab, mean_scale(&t));
    close32("cross_entropy_fused dlogits", &dz32, &dz);
    close32("cross_entropy_fused losses", &l32, &ce64(&z, &t, vocab));

    let sh = LoraShape {
        rows: 13,
        in_features: 37,
        out_features: 29,
        rank: 5,
    };
    let (m, k, n, r) = (sh.rows, sh.in_features, sh.out_features, sh.rank);
    let x = r32(&rvec(&mut rng, m * k, 1.0));
    let w = r32(&rvec(&mut rng, n * k, 0.3));
    let a = r32(&rvec(&mut rng, r * k, 0.3));
    let b = r32(&rvec(&mut rng, n * r, 0.3));
    let dy = r32(&rvec(&mut rng, m * n, 1.0));
    let keep: Vec<f64> = (0..m * k)
        .map(|i| if i % 7 == 3 { 0.0 } else { 1.25 })
        .collect();
    let s = 16.0 / r as f64;
    let mut y = vec![0.0f64; m * n];
    let mut xa = vec![0.0f64; m * r];
    lora_forward_add(&mut y, &mut xa, &x, Some(&keep), &a, &b, s, sh);
    let (mut da, mut db, mut dx) = (vec![0.0; r * k], vec![0.0; n * r], vec![0.0; m * k]);
    matmul_dx(&mut dx, &dy, &w, m, k, n, false);
    lora_backward(
        &mut dx,
        &mut da,
        &mut db,
        &dy,
        &x,
        Some(&keep),
        &xa,
        &a,
        &b,
        s,
        sh,
    );
    let (x32, a32, b32, dy32, keep32) = (to32(&x), to32(&a), to32(&b), to32(&dy), to32(&keep));
    let mut y32 = vec![0.0f32; m * n];
    let mut xa32 = vec![0.0f32; m * r];
    lora_forward_add(
        &mut y32,
        &mut xa32,
        &x32,
        Some(&keep32),
        &a32,
        &b32,
        s as f32,
        sh,
    );
    let (mut da32, mut db32, mut dx32) = (
        vec![0.0f32; r * k],
        vec![0.0f32; n * r],
        vec![0.0f32; m * k],
    );
    matmul_dx(&mut dx32, &dy32, &to32(&w), m, k, n, false);
    lora_backward(
        &mut dx32,
        &mut da32,
        &mut db32,
        &dy32,
        &x32,
        Some(&keep32),
        &xa32,
        &a32,
        &b32,
        s as f32,
        sh,
    );
    close32("lora_forward_add y", &y32, &y);
    close32("lora_backward dA", &da32, &da);
    close32("lora_backward dB", &db32, &db);
    close32("lora_backward + matmul_dx dx", &dx32, &dx);
}

/// `Float` is what the ops are generic over; both instantiations exist.
#[test]
fn float_trait_basics() {
    assert_eq!(<f32 as Float>::from_f64(0.5), 0.5f32);
    assert_eq!(<f64 as Float>::ONE.ln(), 0.0);
}

// Causal GQA attention for training, FlashAttention-2 style: forward (saving the per-row
// log-sum-exp) and backward. CPU spec: src/backend/cpu/flash_attention.rs (derivation there);
// launchers: src/backend/cuda/flash_attention.rs.
//
//   Packed (variable-length) batch, FlashAttention's varlen layout: the B sequences of a batch are
//   concatenated along the token axis, rows = Σ lens; sequence s owns rows
//   cu_seqlens[s]..cu_seqlens[s + 1] (int32, B + 1 values, cu_seqlens[0] = 0).
//   q, out, dq, dout: f32 [rows, H, D]; k, v, dk, dv: f32 [rows, KV, D]; lse, delta: f32 [rows, H].
//   Query t of a sequence (its row cu_seqlens[s] + t), head h (kv head g = h / (H / KV)) sees
//   that sequence's keys j ≤ t (positions restart at 0 in every sequence; nothing crosses a
//   sequence boundary). c = 1/√D, s_j = c·q·k_j:
//     forward   out = Σ_j softmax(s)_j v_j,  lse = ln Σ_j e^{s_j}   (online softmax over key tiles)
//     backward  P = e^{s − lse}, Δ = rowsum(dout ⊙ out), dS = P ⊙ (dout·vᵀ − Δ),
//               dv = Pᵀ·dout, dk = c·dSᵀ·q, dq = c·dS·k     (summed over the H/KV heads of a group)
// No T×T matrix ever reaches global memory. A single sequence is the batch of one.
//
// Tile table (built by the launcher on the host, int32 pairs): entry i = (sequence, tile), tile
// = 64-row block of that sequence (queries for the forward, keys for the backward); every
// sequence has ceil(len / 64) entries, so a tile never crosses a sequence boundary (rows past
// the sequence's end are masked). The launcher orders the entries by decreasing work (forward:
// tile index, i.e. key tiles to walk; backward: len − 64·tile, queries that see the keys) so the
// longest CTAs start first across all sequences; the 1-D grid is entries × heads, entry-major.
//
// Tensor-core path (D = 64, 128): Q, K, V, dout are rounded to bf16 as they are staged in shared
// memory, P and dS are rounded to bf16 as mma operands; every product is mma.sync.m16n8k16
// (bf16 × bf16 → f32); softmax statistics, lse, Δ and all accumulators are f32.
//   flash_attention_fwd_bf16_d{64,128}: grid (entries·H), 128 threads (4 warps). A CTA (entry
//     blockIdx.x / H, head blockIdx.x % H) owns 64 queries of one sequence and head, each warp
//     16 of them, with Q as mma A fragments in registers and the output accumulator in
//     registers; it walks the sequence's key tiles 0..=its own (64 keys each, K and V in shared
//     memory), masking only the diagonal tile. The running max m (in log2 units) and
//     denominator l are rescaled per key tile; P goes from the S accumulator straight into the
//     A fragments of P·V (the C layout of two n8 tiles is the A layout of one k16 step).
//     Static shared memory: 2 × 64 × (D+8) bf16 (Q is staged through the K buffer).
//   flash_attention_bwd_bf16_d{64,128}: grid (entries·KV), 128 threads. A CTA (entry
//     blockIdx.x / KV, kv head blockIdx.x % KV) owns 64 keys of one sequence and kv head (each
//     warp 16, K and V resident in shared memory, dK and dV accumulated in registers) and loops
//     over the group's query heads and the sequence's query tiles (BQ = 64 for D = 64, 32 for
//     D = 128, to stay within 255 registers) that can see its keys. Per query tile:
//     Sᵀ = K·Qᵀ and dPᵀ = V·doutᵀ (warp-local, A = K or V rows), Pᵀ = 2^{Sᵀ·c·log2e − lse·log2e},
//     dV += Pᵀ·dout and dK += dSᵀ·Q (A from registers, B by ldmatrix.trans), dS goes to shared
//     memory, then dQ += c·dS·K is split over the 4 warps and added with f32 atomicAdd (dq was
//     zeroed by flash_attention_delta_f32). Dynamic shared memory: (128 + 2·BQ) × (D+8) bf16
//     for K, V, Q, dout, BQ × 72 bf16 for dS, 2·BQ f32 for lse and Δ (45.5 KiB for D = 64,
//     55.8 KiB for D = 128; the launcher raises the 48 KiB default).
// mma.m16n8k16 fragments (lane l, g = l / 4, t = l % 4; each register holds two bf16, the lower k
// in the low half): A (16×16 row-major) a0 = A[g][2t..], a1 = A[g+8][2t..], a2 = A[g][2t+8..],
// a3 = A[g+8][2t+8..]; B (16×8, stored as rows of n) b0 = B[n=g][k=2t..], b1 = B[g][2t+8..];
// C (16×8) c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]. ldmatrix.x4.trans on a [k][n]
// tile gives the B fragments of two n8 tiles. Shared rows are padded by 8 bf16 (16 bytes), so
// fragment loads and ldmatrix rows are bank-conflict free.
//
// General path (any D ≤ 256, e.g. the tiny fixtures' 12/16/24): the same math in f32 without
// tensor cores or tiles, one warp per row (each lane holds D/32 values):
//   flash_attention_fwd_f32: one warp per query row (row, h), online softmax key by key.
//   flash_attention_bwd_dq_f32: one warp per query row; writes dq.
//   flash_attention_bwd_dkdv_f32: one warp per key row (row, g), looping over the sequence's
//     queries t ≥ j and the group's heads; writes dk, dv.
//   Each warp finds its row's sequence by binary search in cu_seqlens (no tile table).
// Both paths start the backward with flash_attention_delta_f32 (one warp per (row, head):
// Δ = dout·out, and dq = 0 for the tensor-core path's atomics). Grids of the f32 kernels:
// ceil(rows·H / 4) (dkdv: ceil(rows·KV / 4)) blocks of 128 threads; delta: ceil(rows·H / 8)
// blocks of 256.
// Fragment loads, the tile loader and the reductions are in flash_attention.cuh.
#include "flash_attention.cuh"

#define FA_BK 64       // keys per tile
#define FA_BQ_FWD 64   // queries per forward CTA
#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f

// ---------------------------------------------------------------------------------------------
// Tensor-core forward.

template <int D>
__device__ __forceinline__ void fwd_bf16(float* __restrict__ out, float* __restrict__ lse,
                                         const float* __restrict__ q, const float* __restrict__ k,
                                         const float* __restrict__ v,
                                         const int* __restrict__ cu_seqlens,
                                         const int* __restrict__ tiles, int H, int KV) {
  constexpr int BQ = FA_BQ_FWD, BK = FA_BK, SD = D + 8;
  constexpr int KT = D / 16, NS = BK / 8, NO = D / 8;
  static_assert(BQ == BK, "the diagonal key tile is the CTA's own query tile");
  __shared__ __align__(16) bf16 sK[BK * SD];
  __shared__ __align__(16) bf16 sV[BK * SD];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int ent = (int)blockIdx.x / H, h = (int)blockIdx.x - ent * H, kvh = h / (H / KV);
  const int seq = tiles[2 * ent], qb = tiles[2 * ent + 1];  // the table puts the longest first
  const int row0 = cu_seqlens[seq], T = cu_seqlens[seq + 1] - row0, q0 = qb * BQ;
  const int64_t q_row0 = row0, kv_row0 = row0;  // this sequence's first row (q and k, v)
  const float sl2 = FA_LOG2E * rsqrtf((float)D);  // scores in log2 units: s·log2(e)

  // Q: staged through sK, then held as A fragments (this warp's 16 rows).
  load_tile<BQ, D>(sK, q + ((q_row0 + q0) * H + h) * D, (int64_t)H * D, T - q0);
  __syncthreads();
  uint32_t qf[KT][4];
#pragma unroll
  for (int kt = 0; kt < KT; kt++) lds_a(qf[kt], sK, SD, warp * 16, kt * 16);

  float o[NO][4];
#pragma unroll
  for (int n = 0; n < NO; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g and g + 8, per lane
  const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};

  for (int kb = 0; kb <= qb; kb++) {
    const int k0 = kb * BK;
    __syncthreads();  // everyone is done with the previous tile (and with Q in sK)
    load_tile<BK, D>(sK, k + ((kv_row0 + k0) * KV + kvh) * D, (int64_t)KV * D, T - k0);
    load_tile<BK, D>(sV, v + ((kv_row0 + k0) * KV + kvh) * D, (int64_t)KV * D, T - k0);
    __syncthreads();

    // S = Q·Kᵀ for 16 rows × 64 keys, in log2 units, causally masked on the diagonal tile.
    float s[NS][4];
#pragma unroll
    for (int n = 0; n < NS; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kt = 0; kt < KT; kt++)
#pragma unroll
      for (int n = 0; n < NS; n++) {
        const bf16* kp = sK + (n * 8 + g) * SD + kt * 16 + 2 * t;
        mma_bf16_16x8x16(s[n], qf[kt], lds32(kp), lds32(kp + 8));
      }
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int n = 0; n < NS; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int key = k0 + n * 8 + 2 * t + (e & 1);
        s[n][e] = (kb == qb && key > row[e >> 1]) ? -INFINITY : s[n][e] * sl2;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
      }
    // Online softmax: new max, rescale l and o, P = 2^{s − m} (f32; bf16 only as mma operand).
    float corr[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
      mx[i] = quad_max(mx[i]);
      const float mref = mx[i] == -INFINITY ? 0.f : mx[i];  // a fully masked row stays 0
      corr[i] = exp2f(m[i] - mref);
      m[i] = mx[i];
      l[i] *= corr[i];
#pragma unroll
      for (int n = 0; n < NS; n++) {
        s[n][2 * i] = exp2f(s[n][2 * i] - mref);
        s[n][2 * i + 1] = exp2f(s[n][2 * i + 1] - mref);
        l[i] += s[n][2 * i] + s[n][2 * i + 1];  // this lane's part; quad-summed at the end
      }
    }
#pragma unroll
    for (int n = 0; n < NO; n++) {
      o[n][0] *= corr[0];
      o[n][1] *= corr[0];
      o[n][2] *= corr[1];
      o[n][3] *= corr[1];
    }
    // O += P·V: the C fragments of key n-tiles 2kk, 2kk+1 are the A fragment of k16 step kk.
#pragma unroll
    for (int kk = 0; kk < BK / 16; kk++) {
      const uint32_t a[4] = {pack_bf16x2(s[2 * kk][0], s[2 * kk][1]),
                             pack_bf16x2(s[2 * kk][2], s[2 * kk][3]),
                             pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dn = 0; dn < D / 16; dn++) {
        uint32_t bv[4];
        ldsm_x4_trans(bv, sV, SD, kk * 16, dn * 16);
        mma_bf16_16x8x16(o[2 * dn], a, bv[0], bv[1]);
        mma_bf16_16x8x16(o[2 * dn + 1], a, bv[2], bv[3]);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 2; i++) {
    const float li = quad_sum(l[i]);
    if (row[i] >= T) continue;
    const float inv = 1.f / li;
    float* orow = out + ((q_row0 + row[i]) * H + h) * D + 2 * t;
#pragma unroll
    for (int n = 0; n < NO; n++)
      *reinterpret_cast<float2*>(orow + n * 8) =
          make_float2(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
    if (t == 0) lse[(q_row0 + row[i]) * H + h] = (m[i] + log2f(li)) * FA_LN2;
  }
}

#define FA_FWD_ARGS                                                                       \
  float *__restrict__ out, float *__restrict__ lse, const float *__restrict__ q,         \
      const float *__restrict__ k, const float *__restrict__ v,                          \
      const int *__restrict__ cu_seqlens, const int *__restrict__ tiles, int H, int KV

extern "C" __global__ void __launch_bounds__(FA_THREADS)
    flash_attention_fwd_bf16_d64(FA_FWD_ARGS) {
  fwd_bf16<64>(out, lse, q, k, v, cu_seqlens, tiles, H, KV);
}
extern "C" __global__ void __launch_bounds__(FA_THREADS)
    flash_attention_fwd_bf16_d128(FA_FWD_ARGS) {
  fwd_bf16<128>(out, lse, q, k, v, cu_seqlens, tiles, H, KV);
}

// ---------------------------------------------------------------------------------------------
// Δ = rowsum(dout ⊙ out) and dq = 0: one warp per query row, 8 warps per block.

extern "C" __global__ void flash_attention_delta_f32(float* __restrict__ delta,
                                                     float* __restrict__ dq,
                                                     const float* __restrict__ dout,
                                                     const float* __restrict__ out, int64_t rows,
                                                     int d) {
  const int lane = threadIdx.x & 31;
  const int64_t w = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (w >= rows) return;
  float acc = 0.f;
  for (int e = lane; e < d; e += 32) {
    acc += dout[w * d + e] * out[w * d + e];
    dq[w * d + e] = 0.f;
  }
  acc = warp_sum(acc);
  if (lane == 0) delta[w] = acc;
}

// ---------------------------------------------------------------------------------------------
// Tensor-core backward.

template <int D, int BQ>
__device__ __forceinline__ void bwd_bf16(float* __restrict__ dq, float* __restrict__ dk,
                                         float* __restrict__ dv, const float* __restrict__ dout,
                                         const float* __restrict__ q, const float* __restrict__ k,
                                         const float* __restrict__ v, const float* __restrict__ lse,
                                         const float* __restrict__ delta,
                                         const int* __restrict__ cu_seqlens,
                                         const int* __restrict__ tiles, int H, int KV) {
  constexpr int BK = FA_BK, SD = D + 8, SS = BK + 8;
  constexpr int KT = D / 16, NQ = BQ / 8, ND = D / 8;
  // dQ tile (BQ × D) over the 4 warps: MQ row blocks of 16, each split into WN column ranges.
  constexpr int MQ = BQ / 16, WN = 4 / MQ, NDW = ND / WN;
  static_assert(BK % BQ == 0 && MQ * WN == 4 && NDW % 2 == 0, "tile shapes");
  extern __shared__ __align__(16) unsigned char fa_smem[];
  bf16* sK = reinterpret_cast<bf16*>(fa_smem);  // [BK][SD]
  bf16* sV = sK + BK * SD;                       // [BK][SD]
  bf16* sQ = sV + BK * SD;                       // [BQ][SD]
  bf16* sdO = sQ + BQ * SD;                      // [BQ][SD]
  bf16* sdS = sdO + BQ * SD;                     // [BQ][SS]: dS, query-major
  float* sL = reinterpret_cast<float*>(sdS + BQ * SS);  // lse·log2(e) of the tile's rows
  float* sD = sL + BQ;                                   // Δ of the tile's rows

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int ent = (int)blockIdx.x / KV, kvh = (int)blockIdx.x - ent * KV, group = H / KV;
  const int seq = tiles[2 * ent], k0 = tiles[2 * ent + 1] * BK;  // longest first (the table)
  const int row0 = cu_seqlens[seq], T = cu_seqlens[seq + 1] - row0;
  const int64_t q_row0 = row0, kv_row0 = row0;  // this sequence's first row (q and k, v)
  const float c = rsqrtf((float)D), sl2 = FA_LOG2E * c;

  load_tile<BK, D>(sK, k + ((kv_row0 + k0) * KV + kvh) * D, (int64_t)KV * D, T - k0);
  load_tile<BK, D>(sV, v + ((kv_row0 + k0) * KV + kvh) * D, (int64_t)KV * D, T - k0);

  float dka[ND][4], dva[ND][4];
#pragma unroll
  for (int n = 0; n < ND; n++)
#pragma unroll
    for (int e = 0; e < 4; e++) dka[n][e] = dva[n][e] = 0.f;
  const int kr = warp * 16 + g;  // this lane's key rows in the tile: kr, kr + 8
  const int key[2] = {k0 + kr, k0 + kr + 8};
  const int nqt = (T + BQ - 1) / BQ;

  for (int hh = 0; hh < group; hh++) {
    const int h = kvh * group + hh;
    // Query tiles from the one holding position k0 (earlier queries cannot see these keys).
    for (int qt = k0 / BQ; qt < nqt; qt++) {
      const int q0 = qt * BQ;
      __syncthreads();  // the previous tile's readers of sQ, sdO, sdS are done
      load_tile<BQ, D>(sQ, q + ((q_row0 + q0) * H + h) * D, (int64_t)H * D, T - q0);
      load_tile<BQ, D>(sdO, dout + ((q_row0 + q0) * H + h) * D, (int64_t)H * D, T - q0);
      if (tid < BQ) {
        const bool ok = q0 + tid < T;
        sL[tid] = ok ? lse[(q_row0 + q0 + tid) * H + h] * FA_LOG2E : 0.f;
        sD[tid] = ok ? delta[(q_row0 + q0 + tid) * H + h] : 0.f;
      }
      __syncthreads();

      // Sᵀ = K·Qᵀ and dPᵀ = V·doutᵀ for this warp's 16 keys × BQ queries.
      float st[NQ][4], dpt[NQ][4];
#pragma unroll
      for (int n = 0; n < NQ; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) st[n][e] = dpt[n][e] = 0.f;
#pragma unroll
      for (int kt = 0; kt < KT; kt++) {
        uint32_t ak[4], av[4];
        lds_a(ak, sK, SD, warp * 16, kt * 16);
        lds_a(av, sV, SD, warp * 16, kt * 16);
#pragma unroll
        for (int n = 0; n < NQ; n++) {
          const bf16* qp = sQ + (n * 8 + g) * SD + kt * 16 + 2 * t;
          const bf16* op = sdO + (n * 8 + g) * SD + kt * 16 + 2 * t;
          mma_bf16_16x8x16(st[n], ak, lds32(qp), lds32(qp + 8));
          mma_bf16_16x8x16(dpt[n], av, lds32(op), lds32(op + 8));
        }
      }
      // Pᵀ = 2^{s·c·log2e − lse·log2e} (0 where masked or past T), dSᵀ = Pᵀ ⊙ (dPᵀ − Δ).
#pragma unroll
      for (int n = 0; n < NQ; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int qc = n * 8 + 2 * t + (e & 1), qpos = q0 + qc;
          const bool seen = key[e >> 1] <= qpos && qpos < T;
          const float p = seen ? exp2f(fmaf(st[n][e], sl2, -sL[qc])) : 0.f;
          st[n][e] = p;
          dpt[n][e] = p * (dpt[n][e] - sD[qc]);
        }
      // dV += Pᵀ·dout, dK += dSᵀ·Q (c applied at the store); A fragments from the C registers.
#pragma unroll
      for (int kk = 0; kk < BQ / 16; kk++) {
        const uint32_t ap[4] = {pack_bf16x2(st[2 * kk][0], st[2 * kk][1]),
                                pack_bf16x2(st[2 * kk][2], st[2 * kk][3]),
                                pack_bf16x2(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                                pack_bf16x2(st[2 * kk + 1][2], st[2 * kk + 1][3])};
        const uint32_t as[4] = {pack_bf16x2(dpt[2 * kk][0], dpt[2 * kk][1]),
                                pack_bf16x2(dpt[2 * kk][2], dpt[2 * kk][3]),
                                pack_bf16x2(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                                pack_bf16x2(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
        for (int dn = 0; dn < D / 16; dn++) {
          uint32_t bb[4];
          ldsm_x4_trans(bb, sdO, SD, kk * 16, dn * 16);
          mma_bf16_16x8x16(dva[2 * dn], ap, bb[0], bb[1]);
          mma_bf16_16x8x16(dva[2 * dn + 1], ap, bb[2], bb[3]);
          ldsm_x4_trans(bb, sQ, SD, kk * 16, dn * 16);
          mma_bf16_16x8x16(dka[2 * dn], as, bb[0], bb[1]);
          mma_bf16_16x8x16(dka[2 * dn + 1], as, bb[2], bb[3]);
        }
      }
      // dS to shared memory, transposed to [query][key], for the dQ product.
#pragma unroll
      for (int n = 0; n < NQ; n++)
#pragma unroll
        for (int e = 0; e < 4; e++)
          sdS[(n * 8 + 2 * t + (e & 1)) * SS + kr + 8 * (e >> 1)] =
              __float2bfloat16_rn(dpt[n][e]);
      __syncthreads();

      // dQ += c·dS·K: warp takes query rows (warp % MQ)·16.. and NDW columns of D.
      {
        const int mrow = (warp % MQ) * 16, ncol0 = (warp / MQ) * NDW * 8;
        uint32_t a[BK / 16][4];
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) lds_a(a[kk], sdS, SS, mrow, kk * 16);
        const int r0 = q0 + mrow + g;
#pragma unroll
        for (int dn = 0; dn < NDW / 2; dn++) {
          float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
          for (int kk = 0; kk < BK / 16; kk++) {
            uint32_t bb[4];
            ldsm_x4_trans(bb, sK, SD, kk * 16, ncol0 + dn * 16);
            mma_bf16_16x8x16(acc[0], a[kk], bb[0], bb[1]);
            mma_bf16_16x8x16(acc[1], a[kk], bb[2], bb[3]);
          }
#pragma unroll
          for (int j = 0; j < 2; j++)
#pragma unroll
            for (int i = 0; i < 2; i++) {
              if (r0 + 8 * i >= T) continue;
              float* dst =
                  dq + ((q_row0 + r0 + 8 * i) * H + h) * D + ncol0 + dn * 16 + j * 8 + 2 * t;
              atomicAdd(dst, c * acc[j][2 * i]);
              atomicAdd(dst + 1, c * acc[j][2 * i + 1]);
            }
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 2; i++) {
    if (key[i] >= T) continue;
    const int64_t at = ((kv_row0 + key[i]) * KV + kvh) * D + 2 * t;
#pragma unroll
    for (int n = 0; n < ND; n++) {
      *reinterpret_cast<float2*>(dk + at + n * 8) =
          make_float2(c * dka[n][2 * i], c * dka[n][2 * i + 1]);
      *reinterpret_cast<float2*>(dv + at + n * 8) = make_float2(dva[n][2 * i], dva[n][2 * i + 1]);
    }
  }
}

#define FA_BWD_ARGS                                                                        \
  float *__restrict__ dq, float *__restrict__ dk, float *__restrict__ dv,                 \
      const float *__restrict__ dout, const float *__restrict__ q,                        \
      const float *__restrict__ k, const float *__restrict__ v,                           \
      const float *__restrict__ lse, const float *__restrict__ delta,                     \
      const int *__restrict__ cu_seqlens, const int *__restrict__ tiles, int H, int KV

extern "C" __global__ void __launch_bounds__(FA_THREADS)
    flash_attention_bwd_bf16_d64(FA_BWD_ARGS) {
  bwd_bf16<64, 64>(dq, dk, dv, dout, q, k, v, lse, delta, cu_seqlens, tiles, H, KV);
}
extern "C" __global__ void __launch_bounds__(FA_THREADS)
    flash_attention_bwd_bf16_d128(FA_BWD_ARGS) {
  bwd_bf16<128, 32>(dq, dk, dv, dout, q, k, v, lse, delta, cu_seqlens, tiles, H, KV);
}

// ---------------------------------------------------------------------------------------------
// General f32 path (any D ≤ 256): one warp per row, lane l holds elements l, l + 32, ...

// Forward: one warp per query row (row, h); out and lse.
extern "C" __global__ void flash_attention_fwd_f32(float* __restrict__ out, float* __restrict__ lse,
                                                   const float* __restrict__ q,
                                                   const float* __restrict__ k,
                                                   const float* __restrict__ v,
                                                   const int* __restrict__ cu_seqlens, int nseq,
                                                   int H, int KV, int d) {
  const int lane = threadIdx.x & 31;
  const int64_t w = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (w >= (int64_t)cu_seqlens[nseq] * H) return;
  const int h = (int)(w % H), r = (int)(w / H), g = h / (H / KV);
  const int row0 = cu_seqlens[seq_of(cu_seqlens, nseq, r)];  // keys row0..=r
  const float c = rsqrtf((float)d);
  float qv[FA_PER], o[FA_PER];
  lane_load(qv, q + w * d, d);
#pragma unroll
  for (int i = 0; i < FA_PER; i++) o[i] = 0.f;
  float m = -INFINITY, l = 0.f;
  for (int j = row0; j <= r; j++) {
    const float* kr = k + ((int64_t)j * KV + g) * d;
    const float* vr = v + ((int64_t)j * KV + g) * d;
    const float s = warp_sum(lane_dot(qv, kr, d)) * c;
    const float mn = fmaxf(m, s), corr = expf(m - mn), e = expf(s - mn);
    l = l * corr + e;
#pragma unroll
    for (int i = 0; i < FA_PER; i++)
      if (lane + 32 * i < d) o[i] = o[i] * corr + e * vr[lane + 32 * i];
    m = mn;
  }
  const float inv = 1.f / l;
#pragma unroll
  for (int i = 0; i < FA_PER; i++)
    if (lane + 32 * i < d) out[w * d + lane + 32 * i] = o[i] * inv;
  if (lane == 0) lse[w] = m + logf(l);
}

// Backward dq: one warp per query row (row, h); dq = c·Σ_{j≤t} P_j (dout·v_j − Δ) k_j.
extern "C" __global__ void flash_attention_bwd_dq_f32(float* __restrict__ dq,
                                                      const float* __restrict__ dout,
                                                      const float* __restrict__ q,
                                                      const float* __restrict__ k,
                                                      const float* __restrict__ v,
                                                      const float* __restrict__ lse,
                                                      const float* __restrict__ delta,
                                                      const int* __restrict__ cu_seqlens, int nseq,
                                                      int H, int KV, int d) {
  const int lane = threadIdx.x & 31;
  const int64_t w = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (w >= (int64_t)cu_seqlens[nseq] * H) return;
  const int h = (int)(w % H), r = (int)(w / H), g = h / (H / KV);
  const int row0 = cu_seqlens[seq_of(cu_seqlens, nseq, r)];  // keys row0..=r
  const float c = rsqrtf((float)d), L = lse[w], dl = delta[w];
  float qv[FA_PER], go[FA_PER], acc[FA_PER];
  lane_load(qv, q + w * d, d);
  lane_load(go, dout + w * d, d);
#pragma unroll
  for (int i = 0; i < FA_PER; i++) acc[i] = 0.f;
  for (int j = row0; j <= r; j++) {
    const float* kr = k + ((int64_t)j * KV + g) * d;
    const float sc = warp_sum(lane_dot(qv, kr, d));
    const float dp = warp_sum(lane_dot(go, v + ((int64_t)j * KV + g) * d, d));
    const float p = expf(sc * c - L), ds = p * (dp - dl);
#pragma unroll
    for (int i = 0; i < FA_PER; i++)
      if (lane + 32 * i < d) acc[i] += ds * kr[lane + 32 * i];
  }
#pragma unroll
  for (int i = 0; i < FA_PER; i++)
    if (lane + 32 * i < d) dq[w * d + lane + 32 * i] = c * acc[i];
}

// Backward dk, dv: one warp per key row (row j, g), over the sequence's queries t ≥ j of the
// group's heads: dv = Σ P·dout, dk = c·Σ P (dout·v − Δ) q.
extern "C" __global__ void flash_attention_bwd_dkdv_f32(float* __restrict__ dk,
                                                        float* __restrict__ dv,
                                                        const float* __restrict__ dout,
                                                        const float* __restrict__ q,
                                                        const float* __restrict__ k,
                                                        const float* __restrict__ v,
                                                        const float* __restrict__ lse,
                                                        const float* __restrict__ delta,
                                                        const int* __restrict__ cu_seqlens,
                                                        int nseq, int H, int KV, int d) {
  const int lane = threadIdx.x & 31;
  const int64_t w = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (w >= (int64_t)cu_seqlens[nseq] * KV) return;
  const int g = (int)(w % KV), j = (int)(w / KV), group = H / KV;
  const int end = cu_seqlens[seq_of(cu_seqlens, nseq, j) + 1];  // queries j..end − 1
  const float c = rsqrtf((float)d);
  float kv_k[FA_PER], kv_v[FA_PER], ak[FA_PER], av[FA_PER];
  lane_load(kv_k, k + w * d, d);
  lane_load(kv_v, v + w * d, d);
#pragma unroll
  for (int i = 0; i < FA_PER; i++) ak[i] = av[i] = 0.f;
  for (int t = j; t < end; t++)
    for (int h = g * group; h < (g + 1) * group; h++) {
      const int64_t r = (int64_t)t * H + h;
      const float* qr = q + r * d;
      const float* gr = dout + r * d;
      const float sc = warp_sum(lane_dot(kv_k, qr, d));
      const float dp = warp_sum(lane_dot(kv_v, gr, d));
      const float p = expf(sc * c - lse[r]), ds = p * (dp - delta[r]);
#pragma unroll
      for (int i = 0; i < FA_PER; i++)
        if (lane + 32 * i < d) {
          ak[i] += ds * qr[lane + 32 * i];
          av[i] += p * gr[lane + 32 * i];
        }
    }
#pragma unroll
  for (int i = 0; i < FA_PER; i++)
    if (lane + 32 * i < d) {
      dk[w * d + lane + 32 * i] = c * ak[i];
      dv[w * d + lane + 32 * i] = av[i];
    }
}

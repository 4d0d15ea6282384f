// Host emulation of the CUDA device-side API subset that qlora's kernels use, so the real
// kernels/*.cu sources compile with g++ (C++20) and run on the CPU. run.sh force-includes this
// file (-include shim.h) before every kernel source; the tensor-core instructions of
// kernels/mma.cuh are emulated in scripts/cuda_emu/mma.cuh, which run.sh puts in place of the
// real one.
//
// Execution model. A launch runs its blocks one after another, in a seeded random order. Every
// CUDA thread of a block is a fiber (its own 256 KiB stack with a guard page; switched by a few
// instructions of assembly on x86-64, by ucontext elsewhere) on the one OS thread; a fiber runs
// until it reaches a synchronisation point and then hands over to a runnable fiber chosen by a
// seeded PRNG (EMU_SEED, default 1; EMU_SCHED=order takes the lowest thread index instead), so
// every run is deterministic. Then:
// - __syncthreads() is a barrier of the block's live threads; a thread that has exited counts
//   as arrived (as on sm_70+). A block in which nobody can run while threads still wait (e.g. a
//   warp collective in divergent code) is reported as a deadlock.
// - Warp collectives (shuffles, __syncwarp, mma.sync, ldmatrix) are barriers of the 32 lanes of a
//   warp: each lane deposits its operands, and the last lane to arrive computes every lane's
//   result. All 32 lanes must be live and at the same kind of collective, with the full mask
//   (0xffffffff, the only one the kernels use); anything else aborts with a message.
// - Between two synchronisation points the threads' code runs in a random interleaving of whole
//   segments, so a missing barrier (a read of a value another thread writes in the same segment)
//   gives wrong results for some orders; the mutants in mutants.sh show it does for ours.
// - Shared memory: run.sh rewrites the two declaration forms (the only source rewrites besides
//   adamw.cu's PTX arithmetic): `__shared__ T x[N];` becomes a function-local static registered
//   with emu::shared_var, `extern __shared__ T x[];` a pointer to the launch's dynamic shared
//   memory (emu::dyn_smem(), a heap buffer of exactly the launch's size). Before each block all of
//   it is filled with 0xff bytes (a NaN in f32 and bf16), so a read of shared memory nobody wrote
//   in this block shows up as NaN. A launch may use at most 48 KiB of static and 99 KiB of all
//   shared memory (the smallest per-block limits of sm_80/86/89/90); ldmatrix checks that its
//   row addresses are shared and 16-byte aligned, __ldg that its address is aligned to the type.
// - Built as run.sh builds (-fsanitize=address,undefined), out-of-bounds accesses to device
//   buffers (allocated by the drivers with their exact sizes), shared arrays and the fibers'
//   stacks, misaligned typed loads and stores (a float4 access must be 16-byte aligned, as on the
//   GPU) and integer overflow are reported (the fiber switches are annotated for ASan).
// - Atomics are plain read-modify-writes (one OS thread, no preemption between fibers).
//
// Arithmetic: f32 and f64 operations are IEEE with round-to-nearest-even on the host, and run.sh
// compiles with -ffp-contract=off, so a·b + c is never fused. That matches the _rn intrinsics and
// the exact-math files (nf4*.cu, adamw.cu's PTX helpers) bit for bit, but not nvcc's default FMA
// contraction nor --use_fast_math (approximate __expf/exp2f/rsqrtf, flush-to-zero) of the other
// files: those differ by rounding, which the drivers' bounds (the GPU checks' bounds) absorb.
//
// Not emulated (a kernel using them does not compile or aborts): multi-dimensional blocks,
// partial warps, shuffles with a partial mask, __ballot_sync and other vote/match intrinsics,
// cooperative groups, f16 arithmetic (only `__half`/`__half2` storage and the conversions are),
// textures, async copies (cp.async), clusters. A shim is included in one translation unit per
// program (it defines the emu_switch symbol).
#pragma once

#include <pthread.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

// ---------------------------------------------------------------------------------------------
// Qualifiers.

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__ static
// Block-shared storage is rewritten by run.sh (see emu::shared_var); no `__shared__` is left.

// ---------------------------------------------------------------------------------------------
// Built-in vector types (CUDA's alignments) and index variables.

struct __align__(8) float2 { float x, y; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(8) uint2 { unsigned x, y; };
struct __align__(16) uint4 { unsigned x, y, z, w; };
struct __align__(8) int2 { int x, y; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(16) double2 { double x, y; };
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3() = default;
  constexpr dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

// The current fiber's thread index (set by the scheduler at every switch) and the launch's
// block index and sizes.
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// bf16 (cuda_bf16.h): storage type and the round-to-nearest-even conversions.

struct __align__(2) __nv_bfloat16 {
  uint16_t bits;
};
struct __align__(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;  // x in the low 16 bits
};

namespace emu {
inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// f32 → bf16, round to nearest even (cvt.rn.bf16.f32); NaN stays a (quiet) NaN.
inline uint16_t bf16_bits(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
inline float bf16_float(uint16_t b) { return bits_f32((uint32_t)b << 16); }
}  // namespace emu

inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {emu::bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return {emu::bf16_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return emu::bf16_float(b.bits); }
// f16 (cuda_fp16.h): storage (__half, __half2), the exact widening to f32 (normal, subnormal,
// ±0, ±inf, NaN) and the rounding conversion __float2half_rn.
struct __align__(2) __half {
  uint16_t bits;
};
inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1fu,
                 m = h.bits & 0x3ffu;
  if (e == 0x1f) return emu::bits_f32(sign | 0x7f800000u | (m << 13));  // inf, NaN (payload kept)
  if (e != 0) return emu::bits_f32(sign | ((e + 112) << 23) | (m << 13));
  const float mag = std::ldexp((float)m, -24);  // subnormal or zero: m·2⁻²⁴, exact
  return sign ? -mag : mag;
}
// f32 → f16, round to nearest even (cvt.rn.f16.f32), by arithmetic rather than bit surgery: the
// magnitude scaled to an 11-bit (normal) or 2⁻²⁴-unit (subnormal) integer, rounded by
// nearbyint in the default mode (ties to even), the carry of 2047.5 → 2048 running into the
// exponent; at least 65520 (the tie between 65504 and 2¹⁶) is inf. A NaN gives 0x7fff (the
// drivers check only that the result is a NaN).
inline __half __float2half_rn(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000u : 0u;
  if (std::isnan(f)) return {0x7fffu};
  const double a = std::fabs((double)f);
  if (a < 0x1p-14) return {(uint16_t)(sign | (uint16_t)std::nearbyint(a * 0x1p24))};
  if (std::isinf(f) || a >= 65520.0) return {(uint16_t)(sign | 0x7c00u)};
  const int e = std::ilogb(a);                                   // -14 .. 15
  const unsigned r = (unsigned)std::nearbyint(std::ldexp(a, 10 - e));  // 1024 .. 2048
  return {(uint16_t)(sign | (((unsigned)(e + 15) << 10) + (r - 1024u)))};
}
struct __align__(4) __half2 {
  __half x, y;  // x in the low 16 bits
};
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {{emu::bf16_bits(lo)}, {emu::bf16_bits(hi)}};
}

// ---------------------------------------------------------------------------------------------
// Math intrinsics. The _rn ones are exact IEEE operations (no contraction: -ffp-contract=off);
// the fast-math approximations (__expf, __logf) are the exact libm functions here.

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __expf(float x) { return std::exp(x); }
using std::isfinite;  // CUDA's device isfinite(float)
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline unsigned __float_as_uint(float f) { return emu::f32_bits(f); }
inline float __uint_as_float(unsigned u) { return emu::bits_f32(u); }
inline int __float_as_int(float f) { return (int)emu::f32_bits(f); }
inline float __int_as_float(int i) { return emu::bits_f32((uint32_t)i); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
// CUDA's device min/max overloads (same-type arguments).
template <class T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

// Inline-PTX arithmetic (adamw.cu's IEEE helpers): run.sh rewrites
// `asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));` into
// `r = emu::ptx_add_rn_f32(a, b);`. All are IEEE-754 operations with round-to-nearest-even and
// no flush-to-zero (no .ftz), which is what the host's SSE/NEON arithmetic does by default.
namespace emu {
inline float ptx_add_rn_f32(float a, float b) { return a + b; }
inline float ptx_sub_rn_f32(float a, float b) { return a - b; }
inline float ptx_mul_rn_f32(float a, float b) { return a * b; }
inline float ptx_div_rn_f32(float a, float b) { return a / b; }
inline float ptx_sqrt_rn_f32(float a) { return std::sqrt(a); }
inline float ptx_fma_rn_f32(float a, float b, float c) { return std::fma(a, b, c); }
inline double ptx_cvt_f64_f32(float a) { return (double)a; }
inline float ptx_cvt_rn_f32_f64(double a) { return (float)a; }
// `{ setp.gt.f32 p, a, b; selp.u32 r, 1, 0, p; }`: ordered IEEE comparisons (false with a NaN).
inline unsigned ptx_setp_gt_f32(float a, float b) { return a > b ? 1u : 0u; }
inline unsigned ptx_setp_lt_f32(float a, float b) { return a < b ? 1u : 0u; }
}  // namespace emu

// ---------------------------------------------------------------------------------------------
// The fiber scheduler.

namespace emu {

[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Synchronisation point kinds: the lanes of a warp must all be at the same one.
enum Op : int {
  OP_SYNCTHREADS = 1,
  OP_SYNCWARP,
  OP_SHFL_XOR,
  OP_SHFL_DOWN,
  OP_SHFL_UP,
  OP_SHFL_IDX,
  OP_MMA,
  OP_LDMATRIX,
  OP_LDMATRIX_T,
};
inline const char* op_name(int op) {
  static const char* const names[] = {"?",         "__syncthreads",    "__syncwarp",
                                      "__shfl_xor", "__shfl_down",      "__shfl_up",
                                      "__shfl",     "mma.sync",         "ldmatrix",
                                      "ldmatrix.trans"};
  return op >= 0 && op <= OP_LDMATRIX_T ? names[op] : "?";
}

struct Barrier {
  int expected = 0;  // live participants
  int arrived = 0;
  int op = 0;  // what the arrived ones are waiting at
  std::vector<int> waiters;
};

// Per-warp exchange slots of a collective: each lane's operands and results.
struct WarpState {
  Barrier bar;
  int dead = 0;  // lanes that have exited
  alignas(16) unsigned char in[32][64];
  alignas(16) unsigned char out[32][64];
};

// Fiber contexts. On x86-64 a fiber switch is emu_switch below (saves the callee-saved
// registers, MXCSR and the x87 control word on the old stack, loads the new stack pointer): a
// few nanoseconds, where glibc's swapcontext makes a system call and, under ASan, clears the
// whole target stack's shadow. Elsewhere (or with -DEMU_UCONTEXT) ucontext is used.
#if defined(__x86_64__) && !defined(EMU_UCONTEXT)
#define EMU_FAST_SWITCH 1
extern "C" void emu_switch(void** save_sp, void* to_sp);
asm(R"(
  .text
  .globl emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
)");
struct Ctx {
  void* sp = nullptr;
};
inline void ctx_switch(Ctx* from, Ctx* to) { emu_switch(&from->sp, to->sp); }
// A context that starts entry() on the given stack (entry never returns): the frame emu_switch
// pops, with entry as the return address, 16-byte aligned as at a call.
inline void ctx_make(Ctx* c, unsigned char* stack, size_t size, void (*entry)()) {
  uint64_t* top = (uint64_t*)(((uintptr_t)(stack + size)) & ~(uintptr_t)15);
  top[-1] = 0;                        // entry's (never used) return address
  top[-2] = (uint64_t)(uintptr_t)entry;
  for (int i = 3; i <= 8; i++) top[-i] = 0;  // rbp, rbx, r12 .. r15
  uint32_t ctl[2] = {0x1f80u, 0x037fu};      // default MXCSR, x87 control word
  std::memcpy(&top[-9], ctl, 8);
  c->sp = &top[-9];
}
#else
#define EMU_FAST_SWITCH 0
struct Ctx {
  ucontext_t uc;
};
inline void ctx_switch(Ctx* from, Ctx* to) { swapcontext(&from->uc, &to->uc); }
inline void ctx_make(Ctx* c, unsigned char* stack, size_t size, void (*entry)()) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack;
  c->uc.uc_stack.ss_size = size;
  c->uc.uc_link = nullptr;
  makecontext(&c->uc, entry, 0);
}
#endif

struct Fiber {
  Ctx ctx;
  unsigned char* stack = nullptr;  // usable part (a guard page lies below it)
  size_t size = 0;
  void* fake_stack = nullptr;  // ASan bookkeeping
};

constexpr size_t kStack = 256 * 1024;

struct Runtime {
  std::vector<Fiber> fibers;
  std::vector<int> runnable;
  std::vector<WarpState> warps;
  Barrier block;
  int cur = -1;  // running fiber, -1: the scheduler (main stack)
  int live = 0;
  Ctx main_ctx;
  const void* main_bottom = nullptr;
  size_t main_size = 0;
  void* main_fake = nullptr;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  uint64_t rng = 1;
  bool random_order = true;
  bool configured = false;
  const char* kernel = "";
  unsigned char* dyn = nullptr;
  size_t dyn_size = 0;
  uint64_t switches = 0;
  uint64_t launch_id = 0;
  size_t static_smem = 0;  // static shared memory used by the running launch
};
inline Runtime rt;

inline uint64_t next_random() {
  uint64_t z = (rt.rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline void configure() {
  if (rt.configured) return;
  rt.configured = true;
  if (const char* s = std::getenv("EMU_SEED")) rt.rng = std::strtoull(s, nullptr, 10);
  if (const char* s = std::getenv("EMU_SCHED")) rt.random_order = std::strcmp(s, "order") != 0;
  // The main stack's bounds (for ASan's fiber-switch annotations).
  pthread_attr_t a;
  void* addr = nullptr;
  if (pthread_getattr_np(pthread_self(), &a) == 0) {
    pthread_attr_getstack(&a, &addr, &rt.main_size);
    pthread_attr_destroy(&a);
  }
  rt.main_bottom = addr;
}

inline void fail(const char* fmt, ...) {
  std::fflush(stdout);
  std::fprintf(stderr, "EMU ERROR in %s, block (%u,%u,%u), thread %d: ", rt.kernel, blockIdx.x,
               blockIdx.y, blockIdx.z, rt.cur);
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  std::_Exit(3);
}

// The next fiber to run (removed from the runnable set), -1 if none: a random one, or with
// EMU_SCHED=order the lowest thread index.
inline int pick_runnable() {
  if (rt.runnable.empty()) return -1;
  size_t pick = 0;
  if (rt.random_order) {
    pick = (size_t)(next_random() % rt.runnable.size());
  } else {
    for (size_t i = 1; i < rt.runnable.size(); i++)
      if (rt.runnable[i] < rt.runnable[pick]) pick = i;
  }
  const int id = rt.runnable[pick];
  rt.runnable[pick] = rt.runnable.back();
  rt.runnable.pop_back();
  return id;
}

// Leaves the running fiber (blocked, or finished) for the next runnable one, or for the
// scheduler on the main stack when there is none (end of the block, or a deadlock).
inline void yield(bool finished) {
  const int me = rt.cur;
  Fiber& f = rt.fibers[me];
  const int next = pick_runnable();
  Ctx* to = &rt.main_ctx;
  const void* bottom = rt.main_bottom;
  size_t size = rt.main_size;
  if (next >= 0) {
    to = &rt.fibers[next].ctx;
    bottom = rt.fibers[next].stack;
    size = rt.fibers[next].size;
    threadIdx = {(unsigned)next, 0, 0};
    rt.switches++;
  }
  rt.cur = next;
  if (next == me) return;  // (cannot happen: a yielding fiber is not runnable)
#if EMU_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, bottom, size);
#else
  (void)bottom, (void)size, (void)finished;
#endif
  ctx_switch(&f.ctx, to);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

inline void release(Barrier& b) {
  for (int w : b.waiters) rt.runnable.push_back(w);
  b.waiters.clear();
  b.arrived = 0;
}

// Arrives at `b` for `op`; returns true for the arrival that completes the barrier (that fiber
// goes on running), false after having waited for the others.
inline bool arrive(Barrier& b, int op) {
  if (b.arrived > 0 && b.op != op)
    fail("threads meet at different synchronisation points (%s and %s)", op_name(b.op),
         op_name(op));
  b.op = op;
  if (++b.arrived == b.expected) {
    release(b);
    return true;
  }
  b.waiters.push_back(rt.cur);
  yield(false);
  return false;
}

inline void fiber_entry() {
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  rt.body(rt.body_arg);
  // Thread exit: it no longer takes part in __syncthreads, and its warp can no longer meet in a
  // collective.
  const int tid = rt.cur;
  rt.live--;
  Barrier& blk = rt.block;
  blk.expected--;
  if (blk.arrived > 0 && blk.arrived == blk.expected) release(blk);
  WarpState& w = rt.warps[tid / 32];
  w.dead++;
  w.bar.expected--;
  if (w.bar.arrived > 0)
    fail("thread exited while lanes of its warp wait in %s", op_name(w.bar.op));
  yield(true);
  fail("a finished fiber was resumed");
}

inline unsigned char* new_stack() {
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  void* p = mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
                 0);
  if (p == MAP_FAILED) fail("cannot map a fiber stack");
  mprotect(p, page, PROT_NONE);  // guard page: a stack overflow faults
  return (unsigned char*)p + page;
}

// Shared memory. run.sh rewrites each `__shared__ T x[...];` into `static T x[...];` followed
// by emu::shared_var(&x, sizeof x), which registers the array (and fills it with 0xff the first
// time); before each block every registered array and the dynamic buffer are filled with 0xff.
struct Region {
  unsigned char* p;
  size_t n;
  uint64_t launch;  // the last launch that used it
};
inline std::vector<Region> shared_regions;

// Per-block shared memory limits of the project's targets (sm_80/86/89/90): 48 KiB of static
// shared memory, and 99 KiB in all (the opt-in maximum of sm_86 and sm_89; the launcher must
// raise the 48 KiB default for dynamic shared memory beyond it, which the emulator cannot see).
constexpr size_t kMaxStaticSmem = 48 * 1024, kMaxSmem = 99 * 1024;

inline void account_static(size_t n) {
  rt.static_smem += n;
  if (rt.static_smem > kMaxStaticSmem)
    fail("%zu bytes of static shared memory (limit %zu)", rt.static_smem, kMaxStaticSmem);
  if (rt.static_smem + rt.dyn_size > kMaxSmem)
    fail("%zu + %zu bytes of static + dynamic shared memory (limit %zu)", rt.static_smem,
         rt.dyn_size, kMaxSmem);
}
inline void poison_shared() {
  for (const Region& r : shared_regions) std::memset(r.p, 0xff, r.n);
  if (rt.dyn) std::memset(rt.dyn, 0xff, rt.dyn_size);
}
inline void shared_var(void* p, size_t n) {
  for (Region& r : shared_regions)
    if (r.p == p) {
      if (r.launch != rt.launch_id) {
        r.launch = rt.launch_id;
        account_static(n);
      }
      return;
    }
  shared_regions.push_back({(unsigned char*)p, n, rt.launch_id});
  account_static(n);
  std::memset(p, 0xff, n);
}

inline bool in_shared(const void* p, size_t n) {
  const unsigned char* c = (const unsigned char*)p;
  for (const Region& r : shared_regions)
    if (c >= r.p && c + n <= r.p + r.n) return true;
  return rt.dyn && c >= rt.dyn && c + n <= rt.dyn + rt.dyn_size;
}

// Runs one block: `threads` fibers, each calling body(arg), until all have exited.
inline void run_block(unsigned threads) {
  const int n = (int)threads;
  if (rt.fibers.size() < (size_t)n) rt.fibers.resize(n);
  rt.warps.assign(n / 32, WarpState{});
  for (auto& w : rt.warps) w.bar.expected = 32;
  rt.block = Barrier{};
  rt.block.expected = n;
  rt.runnable.clear();
  poison_shared();
  for (int i = 0; i < n; i++) {
    Fiber& f = rt.fibers[i];
    if (!f.stack) {
      f.stack = new_stack();
      f.size = kStack;
    }
#if EMU_ASAN
    __asan_unpoison_memory_region(f.stack, f.size);
#endif
    ctx_make(&f.ctx, f.stack, f.size, fiber_entry);
    rt.runnable.push_back(i);
  }
  rt.live = n;
  const int first = pick_runnable();
  rt.cur = first;
  threadIdx = {(unsigned)first, 0, 0};
  rt.switches++;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(&rt.main_fake, rt.fibers[first].stack, rt.fibers[first].size);
#endif
  ctx_switch(&rt.main_ctx, &rt.fibers[first].ctx);  // back when no fiber can run
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(rt.main_fake, nullptr, nullptr);
#endif
  if (rt.live > 0) {
    int at_warp = 0;
    for (auto& w : rt.warps) at_warp += w.bar.arrived;
    fail("deadlock: %d live threads, %d wait at __syncthreads, %d in warp collectives", rt.live,
         rt.block.arrived, at_warp);
  }
}

// Launches `kernel` (a callable running one thread's code) on a grid of `grid` blocks of
// `threads` threads with `dyn_smem` bytes of dynamic shared memory.
template <class F>
void launch(const char* name, dim3 grid, unsigned threads, size_t dyn_smem, F&& kernel) {
  configure();
  if (threads == 0 || threads % 32 != 0 || threads > 1024)
    fail("launch of %s: %u threads per block (the emulator takes whole warps, <= 1024)", name,
         threads);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    fail("launch of %s: grid (%u,%u,%u)", name, grid.x, grid.y, grid.z);
  rt.kernel = name;
  rt.launch_id++;
  rt.static_smem = 0;
  gridDim = grid;
  blockDim = dim3(threads, 1, 1);
  rt.dyn_size = dyn_smem;
  rt.dyn = nullptr;
  if (dyn_smem > kMaxSmem) fail("launch of %s: %zu bytes of dynamic shared memory", name, dyn_smem);
  if (dyn_smem) {
    void* p = nullptr;
    if (posix_memalign(&p, 128, dyn_smem)) fail("out of memory");
    rt.dyn = (unsigned char*)p;
  }
  using Fn = std::remove_reference_t<F>;
  rt.body = [](void* a) { (*(Fn*)a)(); };
  rt.body_arg = (void*)&kernel;
  // Blocks in a random order (a kernel must not depend on it).
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < grid.z; z++)
    for (unsigned y = 0; y < grid.y; y++)
      for (unsigned x = 0; x < grid.x; x++) blocks.push_back({x, y, z});
  if (rt.random_order)
    for (size_t i = blocks.size(); i > 1; i--) std::swap(blocks[i - 1], blocks[next_random() % i]);
  for (const uint3& b : blocks) {
    blockIdx = b;
    run_block(threads);
  }
  std::free(rt.dyn);
  rt.dyn = nullptr;
  rt.dyn_size = 0;
}

inline void* dyn_smem() {
  if (!rt.dyn) fail("dynamic shared memory used, but the launch has none");
  return rt.dyn;
}

inline int lane() { return rt.cur & 31; }
inline WarpState& warp() { return rt.warps[rt.cur / 32]; }

// A warp collective: every lane deposits `in`; the lane that completes the barrier runs
// compute(ins[32], outs[32]); each lane returns its `out`.
template <class Out, class In, class F>
Out collective(int op, unsigned mask, const In& in, F compute) {
  static_assert(sizeof(In) <= 64 && sizeof(Out) <= 64, "collective slot size");
  static_assert(std::is_trivially_copyable_v<In> && std::is_trivially_copyable_v<Out>);
  if (mask != 0xffffffffu) fail("%s with mask %#x (only full warps are emulated)", op_name(op), mask);
  WarpState& w = warp();
  if (w.dead) fail("%s in a warp with %d exited lanes", op_name(op), w.dead);
  const int l = lane();
  std::memcpy(w.in[l], &in, sizeof(In));
  if (arrive(w.bar, op)) {
    In ins[32];
    Out outs[32];
    for (int i = 0; i < 32; i++) std::memcpy(&ins[i], w.in[i], sizeof(In));
    compute(ins, outs);
    for (int i = 0; i < 32; i++) std::memcpy(w.out[i], &outs[i], sizeof(Out));
  }
  Out r;
  std::memcpy(&r, w.out[l], sizeof(Out));
  return r;
}

template <class T>
struct ShflIn {
  T v;
  int arg;
};

}  // namespace emu

// ---------------------------------------------------------------------------------------------
// Synchronisation and warp shuffles (width 32 or a power of two dividing it).

inline void __syncthreads() {
  if (emu::rt.cur < 0) emu::fail("__syncthreads outside a kernel");
  emu::arrive(emu::rt.block, emu::OP_SYNCTHREADS);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  emu::collective<int>(emu::OP_SYNCWARP, mask, 0, [](const int*, int* o) {
    for (int i = 0; i < 32; i++) o[i] = 0;
  });
}

namespace emu {
template <class T, class Src>
T shfl(int op, unsigned mask, T v, int arg, int width, Src src) {
  if (width <= 0 || width > 32 || (width & (width - 1))) fail("shuffle width %d", width);
  return collective<T>(op, mask, ShflIn<T>{v, arg}, [&](const ShflIn<T>* in, T* out) {
    for (int l = 0; l < 32; l++) {
      const int s = src(l, in[l].arg, width);
      out[l] = in[s >= 0 ? s : l].v;
    }
  });
}
}  // namespace emu

// Lane l reads lane l ^ m (within its width segment).
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
  return emu::shfl(emu::OP_SHFL_XOR, mask, v, m, width, [](int l, int a, int w) {
    const int s = l ^ a;
    return (s / w == l / w) ? s : -1;
  });
}
// Lane l reads lane l + d if that is in its segment, else keeps its own value.
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return emu::shfl(emu::OP_SHFL_DOWN, mask, v, (int)d, width, [](int l, int a, int w) {
    return (l % w) + a < w ? l + a : -1;
  });
}
// Lane l reads lane l − d if that is in its segment, else keeps its own value.
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return emu::shfl(emu::OP_SHFL_UP, mask, v, (int)d, width, [](int l, int a, int w) {
    return (l % w) - a >= 0 ? l - a : -1;
  });
}
// Lane l reads lane s % width of its segment.
template <class T>
T __shfl_sync(unsigned mask, T v, int s, int width = 32) {
  return emu::shfl(emu::OP_SHFL_IDX, mask, v, s, width, [](int l, int a, int w) {
    return (l / w) * w + (((a % w) + w) % w);
  });
}

// ---------------------------------------------------------------------------------------------
// Memory.

// Read-only cache load: a plain load whose address must be aligned to the type (a misaligned
// vector load faults on the GPU).
template <class T>
inline T __ldg(const T* p) {
  if ((uintptr_t)p % alignof(T) != 0)
    emu::fail("__ldg of a %zu-byte type at misaligned address %p", sizeof(T), (const void*)p);
  return *p;
}
inline float atomicAdd(float* p, float v) {
  const float o = *p;
  *p = o + v;
  return o;
}
inline double atomicAdd(double* p, double v) {
  const double o = *p;
  *p = o + v;
  return o;
}
inline int atomicAdd(int* p, int v) {
  const int o = *p;
  *p = o + v;
  return o;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned o = *p;
  *p = o + v;
  return o;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long o = *p;
  *p = o + v;
  return o;
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  const unsigned long long o = *p;
  *p = v < o ? v : o;
  return o;
}
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  const unsigned long long o = *p;
  *p = o < v ? v : o;
  return o;
}
// The shared-window address of a shared-memory pointer (checked to point into shared memory).
inline size_t __cvta_generic_to_shared(const void* p) {
  if (!emu::in_shared(p, 1)) emu::fail("__cvta_generic_to_shared of a non-shared address %p", p);
  return (size_t)(uintptr_t)p;
}

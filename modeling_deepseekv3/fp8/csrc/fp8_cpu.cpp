// Block-scaled FP8 matmuls on CPU that read the float8_e4m3fn weight directly (1 byte per parameter).
//
// Format (fp8/format.py): weight W_q [M, N] float8_e4m3fn, scale S [ceil(M/bm), ceil(N/bn)] float32,
// W[i, j] = float(W_q[i, j]) * S[i / bm, j / bn]; the last block of a dimension may be partial.
//
// Why these kernels look the way they do:
// * Decode is memory-bound: one token multiplies every weight once. Reading 1 byte per weight instead of
//   4 (fp32) or 2 (bf16) is the whole gain, so the "stream" kernels read each weight row once, widen the
//   codes in registers and accumulate in fp32 -- no dequantized copy is ever written.
// * e4m3 -> float without a lookup: sign-extend the byte to 16 bits and shift left by 7. The 4 exponent and
//   3 mantissa bits land in the low exponent / high mantissa bits of an IEEE half, the sign in bit 15, and
//   bit 14 is cleared: that half is exactly code * 2^-8 (subnormal codes included, since e4m3 subnormals
//   map onto half subnormals bit for bit). F16C / AVX-512 convert halves to float. The 2^8 goes into the
//   scale. e4m3fn has no infinities; its NaN codes (S.1111.111) would decode as +-1.875 * 2^-8, so they are
//   turned into half NaNs explicitly -- a weight NaN propagates as it does in the reference.
// * Block scales: for output rows inside one 128-row block the scale depends only on the K block, so the
//   input row is multiplied once by the scale row (x_s[k] = x[k] * S[rb, k / bn] * 2^8, T x N work per row
//   block, 1/128 of the matmul) and the inner loop is a plain FMA of widened codes with x_s. For the
//   transposed product (x @ W, used by the absorbed MLA's W_UK) the scale varies along the output instead:
//   partial sums over each row block are kept in registers and multiplied by the scale row once per block,
//   which is the reference formula as written.
// * Three shapes of work for y = x @ W.T, picked by the number of input rows T:
//   - T <= tt_max (decode; 4 with AVX-512, 2 with AVX2): "tiles" widen the codes of 4 weight rows in
//     registers straight into the FMAs -- as "direct" floats (code * 2^-120, 3 ops per 8-16 codes, or with
//     GFNI + VBMI 4 ops per 64), not through halves (see "direct tiles");
//   - up to max_stream_rows (24, from Python; batched decode, MoE experts at prefill): each K chunk of 4 weight
//     rows is widened once into an L1-sized fp32 buffer and every input row runs against it (re-widening per
//     input tile would otherwise cost more than the FMAs);
//   - more rows (prefill) are compute-bound, and BLAS is better at that than anything short here: the weight
//     is dequantized chunk by chunk into a reused fp32 buffer (bit-identical to block_dequantize) and
//     multiplied with aten::mm into the output's columns. The weight stays FP8 in memory throughout.
// * Dense weights too (dense_linear): the BF16 / FP32 output head is the largest single read of a decode step and
//   torch's CPU product of one row with it reads about half the bandwidth these tiles do (see "dense tiles").
// * One translation unit, per-function target attributes and run-time dispatch through cpuid: one build
//   runs on any x86-64. Variants: AVX2+FMA+F16C (16 codes per step), AVX-512 F/BW/VL (32) and AVX-512 with
//   GFNI + VBMI (the same, with the GFNI decode tiles). Elsewhere no variant exists and Python falls back.
//   (Measured and left out: an AVX-512 VBMI variant looking exact bf16 values up in byte tables was 10% faster
//   on cached weights, no faster from DRAM than the half tiles; AMX would speed up the multiply-adds, which
//   decode is not bound by.)
// * Threads: torch's intra-op pool through the stable ABI (torch::stable::parallel_for), so
//   torch.set_num_threads applies and the kernel never oversubscribes the cores torch already uses. Small
//   products run on the calling thread (see MIN_THREAD_WORK): waking the pool costs more than they do.
//
// Built against torch's stable C ABI (no pybind11, no ATen headers): compiles in seconds, loads in < 1 ms.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(DSV3_NO_SIMD)  // DSV3_NO_SIMD: build as elsewhere
#include <cpuid.h>
#include <immintrin.h>
#define DSV3_X86 1
#else
#define DSV3_X86 0
#endif

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int64_t ISA_AUTO = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512_GFNI = 3;
constexpr int64_t KPAD = 64;  // scaled-input rows are zero-padded to a multiple of this (>= any vector step)
// Software prefetch. The widening costs enough per byte that the hardware prefetcher alone leaves memory
// idle. Measured from DRAM, one thread: 1 KiB ahead along each row into L1 (512 B and 2 KiB: less) plus
// the same columns of the next tile's rows into L2 -- 2048x7168 8.1 -> 9.9 G codes/s, 2048x1024
// (short rows, where in-row lookahead alone reaches little) 4.6 -> 7.7.
constexpr int64_t PREFETCH = 1024;
// The direct tiles prefetch into L2 the rows at least this many bytes after the tile's (the next tiles' rows, at
// the same columns): one tile ahead is too close for short rows (K = 1024-1536: 15 -> 20 GB/s, Zen 4, one thread).
constexpr int64_t PREFETCH_L2_BYTES = 16384;
inline int64_t l2_rows_ahead(int64_t R, int64_t ldw) { return std::max(R, (PREFETCH_L2_BYTES + ldw - 1) / ldw); }
// The dense tiles read 2-4 bytes per value, so their rows are 2-4x longer for the same K: 32 KiB ahead (the output
// head 163840 x 2048 bf16, Zen 4, one thread: 16 KiB 18.2 GB/s, 32 KiB 19.8, 64 KiB 19.7).
inline int64_t dense_rows_ahead(int64_t R, int64_t ldw) { return std::max(R, (2 * PREFETCH_L2_BYTES + ldw - 1) / ldw); }
#define DSV3_PREFETCH(p) __builtin_prefetch((p), 0, 3)     // prefetcht0
#define DSV3_PREFETCH_L2(p) __builtin_prefetch((p), 0, 2)  // prefetcht1
constexpr int64_t KCHUNK = 512;  // codes per row widened at a time when more rows than a tile takes (4 rows: 8 KiB of L1)
// Least work (weight codes x input rows) per thread: below it a product runs on fewer threads (a tiny
// model's 256x256 linear on one). Waking a pool thread costs ~10 us, and on a busy machine a parallel region
// waits for a descheduled thread for a whole time slice.
constexpr int64_t MIN_THREAD_WORK = int64_t(1) << 18;

int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, MIN_THREAD_WORK / std::max<int64_t>(1, work_per_item));
}

// ---- CPU features ----------------------------------------------------------------------------------------

int64_t detect_isa_mask() {
#if DSV3_X86
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!(osxsave && avx && fma && f16c)) return 0;
  unsigned xlo = 0, xhi = 0;
  __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));  // which register states the OS saves
  if ((xlo & 0x6) != 0x6) return 0;                             // XMM + YMM
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
  int64_t mask = 0;
  if (b & (1u << 5)) mask |= 1 << ISA_AVX2;
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 31));  // F, BW, VL
  if ((mask & (1 << ISA_AVX2)) && avx512 && (xlo & 0xE6) == 0xE6) mask |= 1 << ISA_AVX512;  // + opmask, ZMM
  const bool vbmi = c & (1u << 1), gfni = c & (1u << 8);
  if ((mask & (1 << ISA_AVX512)) && vbmi && gfni) mask |= 1 << ISA_AVX512_GFNI;
  return mask;
#else
  return 0;
#endif
}

int64_t isa_mask() {
  static const int64_t mask = detect_isa_mask();
  return mask;
}

int64_t resolve_isa(int64_t isa) {
  const int64_t mask = isa_mask();
  if (isa == ISA_AUTO) {
    if (mask & (1 << ISA_AVX512_GFNI)) return ISA_AVX512_GFNI;
    if (mask & (1 << ISA_AVX512)) return ISA_AVX512;
    if (mask & (1 << ISA_AVX2)) return ISA_AVX2;
    STD_TORCH_CHECK(false, "deepseekv3_fp8: this CPU has no AVX2+FMA+F16C; use the torch fallback");
  }
  STD_TORCH_CHECK(isa == ISA_AVX2 || isa == ISA_AVX512 || isa == ISA_AVX512_GFNI, "deepseekv3_fp8: unknown isa ", isa);
  STD_TORCH_CHECK(mask & (1 << isa), "deepseekv3_fp8: isa ", isa, " is not supported by this CPU");
  return isa;
}

// ---- scalar helpers --------------------------------------------------------------------------------------

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float read_x(const void* base, ScalarType dt, int64_t off) {
  return dt == ScalarType::Float ? static_cast<const float*>(base)[off]
                                 : bf16_to_float(static_cast<const uint16_t*>(base)[off]);
}

inline void write_out(void* base, ScalarType dt, int64_t off, float v) {
  if (dt == ScalarType::Float) {
    static_cast<float*>(base)[off] = v;
  } else {
    static_cast<uint16_t*>(base)[off] = float_to_bf16(v);
  }
}

// ---- per-ISA inner kernels -------------------------------------------------------------------------------
// code(w) below is float(code) * 2^-8 (the half trick); the scale rows passed in carry the 2^8.
// tile<R, TT>: res[r * TT + t] = sum_k xs[t * ldx + k] * code(w[r * ldw + k]) for k < K, where xs has
//   zero padding up to a multiple of KPAD (so the weight tail may be read from a zero-padded copy).
// col<TT>: acc[t * lda + j] += scale[j] * sum_{i < n_rows} x[t * ldx + i] * code(w[i * ldw + j]) for
//   the CW columns j of one column tile (ncols <= CW of them real; the rest come from zero-padded copies).
// dequant_row: dst[j] = code(w[j]) * scale[j] for j < N.
using TileFn = void (*)(const float* xs, int64_t ldx, const uint8_t* w, int64_t ldw, int64_t K, float* res);
using ColFn = void (*)(const float* x, int64_t ldx, const uint8_t* w, int64_t ldw, int64_t n_rows, int64_t ncols,
                       const float* scale, float* acc, int64_t lda);
using DequantFn = void (*)(const uint8_t* w, int64_t N, const float* scale, float* dst);
// conv: dst[k] = code(w[k]) for k < n real codes, zeros up to n_pad (a KPAD multiple)
using ConvFn = void (*)(const uint8_t* w, int64_t n, int64_t n_pad, float* dst);
// fma<R, TT>: acc[r * lda + t * VW + lane] += sum over the n (a KPAD multiple) columns of wbuf[r] * xs[t]
using FmaFn = void (*)(const float* wbuf, int64_t ldw, const float* xs, int64_t ldx, int64_t n, float* acc, int64_t lda);
// outer<TT>: out[t * ldo + j] = sum_{i < n_rows} x[t * ldx + i] * wbuf[i * ldb + j] for the col_width columns j of
//   one column tile (wbuf, out padded to whole tiles)
using OuterFn = void (*)(const float* x, int64_t ldx, const float* wbuf, int64_t ldb, int64_t n_rows, float* out,
                         int64_t ldo);

struct Kernels {
  int tt_max;            // input rows per tile
  int col_tt_max;        // input rows per column tile
  int64_t col_width;     // columns per column tile
  TileFn tile[2][5];     // [R == 4][TT]
  TileFn direct[2][5];   // [R == 4][TT]: the same product on direct codes (see "direct tiles" below)
  ColFn col[5];          // [TT]
  DequantFn dequant_row;
  int vw;                // floats per vector
  int fma_tt_max;        // input rows per fma tile
  ConvFn conv;
  FmaFn fma[2][5];       // [R == 4][TT]
  OuterFn outer[5];      // [TT], TT <= col_tt_max
  TileFn dense[2][2][5];  // [bf16][R == 4][TT]: dense weights (see "dense tiles" below), ldw in bytes
};

#if DSV3_X86

#define DSV3_AVX2 __attribute__((target("avx2,fma,f16c")))
#define DSV3_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline
#define DSV3_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")))
#define DSV3_AVX512_INLINE __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl"), always_inline)) inline

// -- AVX2 + FMA + F16C: 16 codes -> two 8-float vectors
DSV3_AVX2_INLINE void cvt16(const uint8_t* p, __m256& lo, __m256& hi) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7), _mm256_set1_epi16(short(0xBF80)));
  const __m256i nan = _mm256_cmpeq_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x7FFF)), _mm256_set1_epi16(0x3F80));
  h = _mm256_or_si256(h, _mm256_and_si256(nan, _mm256_set1_epi16(0x7C00)));
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

DSV3_AVX2_INLINE float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int R, int TT>
DSV3_AVX2_INLINE void step_avx2(const uint8_t* const (&wp)[R], const float* xs, int64_t ldx, __m256 (&acc)[R][TT]) {
  __m256 xl[TT], xh[TT];
  for (int t = 0; t < TT; ++t) {
    xl[t] = _mm256_loadu_ps(xs + t * ldx);
    xh[t] = _mm256_loadu_ps(xs + t * ldx + 8);
  }
  for (int r = 0; r < R; ++r) {
    __m256 lo, hi;
    cvt16(wp[r], lo, hi);
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_fmadd_ps(hi, xh[t], _mm256_fmadd_ps(lo, xl[t], acc[r][t]));
  }
}

template <int R, int TT>
DSV3_AVX2 void tile_avx2(const float* xs, int64_t ldx, const uint8_t* w, int64_t ldw, int64_t K, float* res) {
  __m256 acc[R][TT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_setzero_ps();
  const int64_t kmain = K & ~int64_t(15);
  for (int64_t k = 0; k < kmain; k += 16) {
    const uint8_t* wp[R];
    if ((k & 63) == 0)
      for (int r = 0; r < R; ++r) {
        DSV3_PREFETCH(w + r * ldw + k + PREFETCH);
        DSV3_PREFETCH_L2(w + (r + R) * ldw + k);  // the next tile's rows (a unit's rows are contiguous)
      }
    for (int r = 0; r < R; ++r) wp[r] = w + r * ldw + k;
    step_avx2<R, TT>(wp, xs + k, ldx, acc);
  }
  if (kmain < K) {  // tail: zero-padded copies of the last codes (xs is zero-padded there too)
    alignas(32) uint8_t pad[R][16] = {};
    const uint8_t* wp[R];
    for (int r = 0; r < R; ++r) {
      std::memcpy(pad[r], w + r * ldw + kmain, size_t(K - kmain));
      wp[r] = pad[r];
    }
    step_avx2<R, TT>(wp, xs + kmain, ldx, acc);
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) res[r * TT + t] = hsum256(acc[r][t]);
}

// -- direct tiles (decode). Widening through halves costs ~13 vector ops per 16 codes (two of them F16C
// converts), which caps one core at ~11 GB/s of weights, well under DRAM. A float can hold an e4m3 code
// directly: sign to bit 31, the 4 exponent and 3 mantissa bits to bits 26..20, everything else zero. That float
// is exactly code * 2^-120 -- normal codes land on normal floats with exponents 1..15, subnormal codes on float
// subnormals bit for bit -- so 8 codes take 3 ops (sign-extend to 32 bits, shift, mask). The driver scales the
// input by 2^(120 - d) instead of 2^8, d >= 0 chosen so that the scaled input cannot overflow, and multiplies
// the result by 2^d. NaN codes (S.1111.111) would read as 1.875 * 2^-105: each row's codes are also max-reduced
// (as 7-bit magnitudes) and a row that held one gives NaN, as the reference does. Float subnormals make these
// kernels wrong under denormals-are-zero (MXCSR.DAZ, torch.set_flush_denormal(True)); the driver then uses the
// half tiles. Measured on a Zen 4 core, one thread, weights from DRAM: the inner loop alone reads 14.0 GB/s with
// half tiles, 17.9 direct; the whole op on 8192x3072 (one input row) 11.9 -> 15.8 GB/s (GFNI: 16.6).
// direct<R, TT>: res[r * TT + t] = sum_k xs[t * ldx + k] * code(w[r * ldw + k]) * 2^-120, NaN for a row with a
// NaN code; xs zero-padded to a multiple of KPAD as for the half tiles.
constexpr uint32_t DIRECT_MASK = 0x87F00000u;

DSV3_AVX2_INLINE __m256 direct8(const uint8_t* p) {
  const __m256i d = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(d, 20), _mm256_set1_epi32(int(DIRECT_MASK))));
}

// 32 codes of each of R rows into acc[r][t]; nan[r] keeps the largest 7-bit magnitude seen
template <int R, int TT>
DSV3_AVX2_INLINE void direct_step_avx2(const uint8_t* const (&wp)[R], const float* xs, int64_t ldx,
                                       __m256 (&acc)[R][TT], __m256i (&nan)[R]) {
  for (int r = 0; r < R; ++r) {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp[r]));
    nan[r] = _mm256_max_epu8(nan[r], _mm256_and_si256(c, _mm256_set1_epi8(0x7F)));
  }
  for (int q = 0; q < 4; ++q) {
    __m256 x[TT];
    for (int t = 0; t < TT; ++t) x[t] = _mm256_loadu_ps(xs + t * ldx + 8 * q);
    for (int r = 0; r < R; ++r) {
      const __m256 f = direct8(wp[r] + 8 * q);
      for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_fmadd_ps(f, x[t], acc[r][t]);
    }
  }
}

template <int R, int TT>
DSV3_AVX2 void direct_avx2(const float* xs, int64_t ldx, const uint8_t* w, int64_t ldw, int64_t K, float* res) {
  __m256 acc[R][TT];
  __m256i nan[R];
  for (int r = 0; r < R; ++r) {
    nan[r] = _mm256_setzero_si256();
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_setzero_ps();
  }
  const int64_t kmain = K & ~int64_t(31), ahead = l2_rows_ahead(R, ldw);
  for (int64_t k = 0; k < kmain; k += 32) {
    const uint8_t* wp[R];
    if ((k & 63) == 0)
      for (int r = 0; r < R; ++r) {
        DSV3_PREFETCH(w + r * ldw + k + PREFETCH);
        DSV3_PREFETCH_L2(w + (r + ahead) * ldw + k);
      }
    for (int r = 0; r < R; ++r) wp[r] = w + r * ldw + k;
    direct_step_avx2<R, TT>(wp, xs + k, ldx, acc, nan);
  }
  if (kmain < K) {  // tail: zero-padded copies of the last codes (xs is zero-padded there too)
    alignas(32) uint8_t pad[R][32] = {};
    const uint8_t* wp[R];
    for (int r = 0; r < R; ++r) {
      std::memcpy(pad[r], w + r * ldw + kmain, size_t(K - kmain));
      wp[r] = pad[r];
    }
    direct_step_avx2<R, TT>(wp, xs + kmain, ldx, acc, nan);
  }
  for (int r = 0; r < R; ++r) {
    const bool has_nan = _mm256_movemask_epi8(_mm256_cmpeq_epi8(nan[r], _mm256_set1_epi8(0x7F))) != 0;
    for (int t = 0; t < TT; ++t) res[r * TT + t] = has_nan ? __builtin_nanf("") : hsum256(acc[r][t]);
  }
}

// -- dense tiles: bf16 or fp32 weights (the output head, 163840 x 2048 in Moonlight: the largest single read of a
// decode step). torch's CPU product of one row with a bf16 weight reads ~11 GB/s on a Zen 4 core; a bf16 value is
// the high half of its float, so widening is one zero-extend and one shift per 8-16 values and these tiles stream
// the weight at DRAM speed. dense<R, TT, BF16>: res[r * TT + t] = sum_k xs[t * ldx + k] * w[r][k] (exact fp32
// products, fp32 sums), w's rows ldw bytes apart, xs zero-padded to a multiple of KPAD as above.
template <bool BF16>
DSV3_AVX2_INLINE __m256 dense8(const uint8_t* p) {
  if constexpr (BF16) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  } else {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  }
}

template <int R, int TT, bool BF16>
DSV3_AVX2_INLINE void dense_step_avx2(const uint8_t* const (&wp)[R], const float* xs, int64_t ldx,
                                      __m256 (&acc)[R][TT]) {
  constexpr int E = BF16 ? 2 : 4;
  for (int q = 0; q < 4; ++q) {
    __m256 x[TT];
    for (int t = 0; t < TT; ++t) x[t] = _mm256_loadu_ps(xs + t * ldx + 8 * q);
    for (int r = 0; r < R; ++r) {
      const __m256 f = dense8<BF16>(wp[r] + 8 * q * E);
      for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_fmadd_ps(f, x[t], acc[r][t]);
    }
  }
}

template <int R, int TT, bool BF16>
DSV3_AVX2 void dense_avx2(const float* xs, int64_t ldx, const uint8_t* w, int64_t ldw, int64_t K, float* res) {
  constexpr int E = BF16 ? 2 : 4;
  __m256 acc[R][TT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_setzero_ps();
  const int64_t kmain = K & ~int64_t(31), ahead = dense_rows_ahead(R, ldw);
  for (int64_t k = 0; k < kmain; k += 32) {
    const uint8_t* wp[R];
    for (int r = 0; r < R; ++r) {
      wp[r] = w + r * ldw + k * E;
      for (int b = 0; b < 32 * E; b += 64) {
        DSV3_PREFETCH(wp[r] + b + PREFETCH);
        DSV3_PREFETCH_L2(wp[r] + b + ahead * ldw);
      }
    }
    dense_step_avx2<R, TT, BF16>(wp, xs + k, ldx, acc);
  }
  if (kmain < K) {  // tail: zero-padded copies of the last values (xs is zero-padded there too)
    alignas(32) uint8_t pad[R][32 * E] = {};
    const uint8_t* wp[R];
    for (int r = 0; r < R; ++r) {
      std::memcpy(pad[r], w + r * ldw + kmain * E, size_t((K - kmain) * E));
      wp[r] = pad[r];
    }
    dense_step_avx2<R, TT, BF16>(wp, xs + kmain, ldx, acc);
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) res[r * TT + t] = hsum256(acc[r][t]);
}

template <int TT>
DSV3_AVX2 void col_avx2(const float* x, int64_t ldx, const uint8_t* w, int64_t ldw, int64_t n_rows, int64_t ncols,
                        const float* scale, float* acc_out, int64_t lda) {
  constexpr int CW = 32;
  __m256 acc[TT][4];
  for (int t = 0; t < TT; ++t)
    for (int q = 0; q < 4; ++q) acc[t][q] = _mm256_setzero_ps();
  alignas(32) uint8_t pad[CW] = {};
  for (int64_t i = 0; i < n_rows; ++i) {
    const uint8_t* wp = w + i * ldw;
    DSV3_PREFETCH(wp + (PREFETCH / 64) * ldw);  // the same columns, rows ahead
    if (ncols < CW) {
      std::memcpy(pad, wp, size_t(ncols));
      wp = pad;
    }
    __m256 v[4];
    cvt16(wp, v[0], v[1]);
    cvt16(wp + 16, v[2], v[3]);
    for (int t = 0; t < TT; ++t) {
      const __m256 xb = _mm256_broadcast_ss(x + t * ldx + i);
      for (int q = 0; q < 4; ++q) acc[t][q] = _mm256_fmadd_ps(v[q], xb, acc[t][q]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int q = 0; q < 4; ++q) {  // acc_out and scale are padded to whole column tiles
      float* o = acc_out + t * lda + 8 * q;
      _mm256_storeu_ps(o, _mm256_fmadd_ps(acc[t][q], _mm256_loadu_ps(scale + 8 * q), _mm256_loadu_ps(o)));
    }
}

DSV3_AVX2 void dequant_row_avx2(const uint8_t* w, int64_t N, const float* scale, float* dst) {
  alignas(32) uint8_t pad[16];
  alignas(32) float tmp[16];
  for (int64_t j = 0; j < N; j += 16) {
    if ((j & 63) == 0) DSV3_PREFETCH(w + j + PREFETCH);
    const bool tail = j + 16 > N;
    const uint8_t* wp = w + j;
    if (tail) {
      std::memset(pad, 0, 16);
      std::memcpy(pad, wp, size_t(N - j));
      wp = pad;
    }
    __m256 lo, hi;
    cvt16(wp, lo, hi);
    lo = _mm256_mul_ps(lo, _mm256_loadu_ps(scale + j));  // scale is padded to a multiple of KPAD
    hi = _mm256_mul_ps(hi, _mm256_loadu_ps(scale + j + 8));
    if (!tail) {
      _mm256_storeu_ps(dst + j, lo);
      _mm256_storeu_ps(dst + j + 8, hi);
    } else {
      _mm256_store_ps(tmp, lo);
      _mm256_store_ps(tmp + 8, hi);
      std::memcpy(dst + j, tmp, size_t(N - j) * sizeof(float));
    }
  }
}


DSV3_AVX2 void conv_avx2(const uint8_t* w, int64_t n, int64_t n_pad, float* dst) {
  alignas(32) uint8_t pad[16];
  for (int64_t k = 0; k < n_pad; k += 16) {
    if ((k & 63) == 0) DSV3_PREFETCH(w + k + PREFETCH);
    const uint8_t* wp = w + k;
    if (k + 16 > n) {
      std::memset(pad, 0, 16);
      if (k < n) std::memcpy(pad, w + k, size_t(n - k));
      wp = pad;
    }
    __m256 lo, hi;
    cvt16(wp, lo, hi);
    _mm256_storeu_ps(dst + k, lo);
    _mm256_storeu_ps(dst + k + 8, hi);
  }
}

template <int R, int TT>
DSV3_AVX2 void fma_avx2(const float* wb, int64_t ldw, const float* xs, int64_t ldx, int64_t n, float* acc_mem,
                        int64_t lda) {
  __m256 acc[R][TT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_loadu_ps(acc_mem + r * lda + t * 8);
  for (int64_t k = 0; k < n; k += 8) {
    __m256 xv[TT];
    for (int t = 0; t < TT; ++t) xv[t] = _mm256_loadu_ps(xs + t * ldx + k);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_loadu_ps(wb + r * ldw + k);
      for (int t = 0; t < TT; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) _mm256_storeu_ps(acc_mem + r * lda + t * 8, acc[r][t]);
}


template <int TT>
DSV3_AVX2 void outer_avx2(const float* x, int64_t ldx, const float* wb, int64_t ldb, int64_t n_rows, float* out,
                          int64_t ldo) {
  __m256 acc[TT][4];
  for (int t = 0; t < TT; ++t)
    for (int q = 0; q < 4; ++q) acc[t][q] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n_rows; ++i) {
    __m256 v[4];
    for (int q = 0; q < 4; ++q) v[q] = _mm256_loadu_ps(wb + i * ldb + 8 * q);
    for (int t = 0; t < TT; ++t) {
      const __m256 xb = _mm256_broadcast_ss(x + t * ldx + i);
      for (int q = 0; q < 4; ++q) acc[t][q] = _mm256_fmadd_ps(v[q], xb, acc[t][q]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(out + t * ldo + 8 * q, acc[t][q]);
}

// -- AVX-512 F/BW/VL: 32 codes -> two 16-float vectors
DSV3_AVX512_INLINE void cvt32(const uint8_t* p, __m512& lo, __m512& hi) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  __m512i h = _mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(b), 7), _mm512_set1_epi16(short(0xBF80)));
  const __mmask32 nan = _mm256_cmpeq_epi8_mask(_mm256_and_si256(b, _mm256_set1_epi8(0x7F)), _mm256_set1_epi8(0x7F));
  h = _mm512_mask_mov_epi16(h, nan, _mm512_set1_epi16(0x7E00));  // a quiet half NaN
  lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
  hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}

template <int R, int TT>
DSV3_AVX512_INLINE void step_avx512(const uint8_t* const (&wp)[R], const float* xs, int64_t ldx,
                                    __m512 (&acc)[R][TT]) {
  __m512 xl[TT], xh[TT];
  for (int t = 0; t < TT; ++t) {
    xl[t] = _mm512_loadu_ps(xs + t * ldx);
    xh[t] = _mm512_loadu_ps(xs + t * ldx + 16);
  }
  for (int r = 0; r < R; ++r) {
    __m512 lo, hi;
    cvt32(wp[r], lo, hi);
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_fmadd_ps(hi, xh[t], _mm512_fmadd_ps(lo, xl[t], acc[r][t]));
  }
}

template <int R, int TT>
DSV3_AVX512 void tile_avx512(const float* xs, int64_t ldx, const uint8_t* w, int64_t ldw, int64_t K, float* res) {
  __m512 acc[R][TT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t kmain = K & ~int64_t(31);
  for (int64_t k = 0; k < kmain; k += 32) {
    const uint8_t* wp[R];
    if ((k & 63) == 0)
      for (int r = 0; r < R; ++r) {
        DSV3_PREFETCH(w + r * ldw + k + PREFETCH);
        DSV3_PREFETCH_L2(w + (r + R) * ldw + k);  // the next tile's rows (a unit's rows are contiguous)
      }
    for (int r = 0; r < R; ++r) wp[r] = w + r * ldw + k;
    step_avx512<R, TT>(wp, xs + k, ldx, acc);
  }
  if (kmain < K) {
    alignas(64) uint8_t pad[R][32] = {};
    const uint8_t* wp[R];
    for (int r = 0; r < R; ++r) {
      std::memcpy(pad[r], w + r * ldw + kmain, size_t(K - kmain));
      wp[r] = pad[r];
    }
    step_avx512<R, TT>(wp, xs + kmain, ldx, acc);
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) res[r * TT + t] = _mm512_reduce_add_ps(acc[r][t]);
}

// -- direct tiles, AVX-512: 16 codes per vector as above (Zen 4: 23 GB/s from L2, 18 from DRAM, one thread);
// with GFNI + VBMI, 64 codes take 4 ops instead of 12: two GF(2) affine maps move each code's bits into the two
// bytes its float needs (byte 3: sign and the top three exponent bits; byte 2: the last exponent bit and the
// mantissa), and one two-source byte permute per 16 codes places both bytes into each float, zeroing the rest
// (Zen 4: 26 GB/s from L2, 22 from DRAM -- 77% of the core's read bandwidth -- one thread).
DSV3_AVX512_INLINE __m512 direct16(const uint8_t* p) {
  const __m512i d = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(d, 20), _mm512_set1_epi32(int(DIRECT_MASK))));
}

DSV3_AVX512_INLINE __m512i nan_max(__m512i acc, __m512i codes) {
  return _mm512_max_epu8(acc, _mm512_and_si512(codes, _mm512_set1_epi8(0x7F)));
}

template <int R, int TT>
DSV3_AVX512_INLINE void direct_step_avx512(const uint8_t* const (&wp)[R], const float* xs, int64_t ldx,
                                           __m512 (&acc)[R][TT], __m512i (&nan)[R]) {
  for (int r = 0; r < R; ++r) nan[r] = nan_max(nan[r], _mm512_loadu_si512(wp[r]));
  for (int q = 0; q < 4; ++q) {
    __m512 x[TT];
    for (int t = 0; t < TT; ++t) x[t] = _mm512_loadu_ps(xs + t * ldx + 16 * q);
    for (int r = 0; r < R; ++r) {
      const __m512 f = direct16(wp[r] + 16 * q);
      for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_fmadd_ps(f, x[t], acc[r][t]);
    }
  }
}

#define DSV3_GFNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vbmi,gfni")))
#define DSV3_GFNI_INLINE __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vbmi,gfni"), always_inline)) inline

// The 8x8 bit matrix of gf2p8affineqb that sets output bit i to input bit src[i] (-1: zero); the row of output
// bit i is byte 7 - i of the matrix's qword.
constexpr uint64_t bit_select(const std::array<int, 8>& src) {
  uint64_t q = 0;
  for (int i = 0; i < 8; ++i)
    if (src[i] >= 0) q |= uint64_t(1u << src[i]) << (8 * (7 - i));
  return q;
}
// code bits: s 7, exponent 6..3, mantissa 2..0. Float byte 3 = s 0000 e3 e2 e1; byte 2 = e0 m2 m1 m0 0000.
constexpr uint64_t GF_HI = bit_select({4, 5, 6, -1, -1, -1, -1, 7}), GF_LO = bit_select({-1, -1, -1, -1, 0, 1, 2, 3});

// permute indices: float j of quarter q takes byte 3 from hi[16 q + j] and byte 2 from lo[16 q + j] (index + 64)
struct GfniIndex {
  alignas(64) uint8_t b[4][64];
  constexpr GfniIndex() : b{} {
    for (int q = 0; q < 4; ++q)
      for (int j = 0; j < 16; ++j) {
        b[q][4 * j + 2] = uint8_t(64 + 16 * q + j);
        b[q][4 * j + 3] = uint8_t(16 * q + j);
      }
  }
};
constexpr GfniIndex GFNI_INDEX{};

template <int R, int TT>
DSV3_GFNI_INLINE void gfni_step(const uint8_t* const (&wp)[R], const float* xs, int64_t ldx, const __m512i (&idx)[4],
                                __m512 (&acc)[R][TT], __m512i (&nan)[R]) {
  constexpr __mmask64 bytes23 = 0xCCCCCCCCCCCCCCCCull;
  __m512 x[TT][4];
  for (int t = 0; t < TT; ++t)
    for (int q = 0; q < 4; ++q) x[t][q] = _mm512_loadu_ps(xs + t * ldx + 16 * q);
  for (int r = 0; r < R; ++r) {
    const __m512i c = _mm512_loadu_si512(wp[r]);
    nan[r] = nan_max(nan[r], c);
    const __m512i hi = _mm512_gf2p8affine_epi64_epi8(c, _mm512_set1_epi64(int64_t(GF_HI)), 0);
    const __m512i lo = _mm512_gf2p8affine_epi64_epi8(c, _mm512_set1_epi64(int64_t(GF_LO)), 0);
    for (int q = 0; q < 4; ++q) {
      const __m512 f = _mm512_castsi512_ps(_mm512_maskz_permutex2var_epi8(bytes23, hi, idx[q], lo));
      for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_fmadd_ps(f, x[t][q], acc[r][t]);
    }
  }
}

// The loop both 64-code direct tiles share, STEP(wp, x) being their step on 64 codes of each row at wp[r] (a
// macro, not a template: the two must be compiled for different targets).
#define DSV3_DIRECT_LOOP_512(STEP)                                                                                \
  __m512 acc[R][TT];                                                                                              \
  __m512i nan[R];                                                                                                 \
  for (int r = 0; r < R; ++r) {                                                                                   \
    nan[r] = _mm512_setzero_si512();                                                                              \
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_setzero_ps();                                                 \
  }                                                                                                               \
  const int64_t kmain = K & ~int64_t(63), ahead = l2_rows_ahead(R, ldw);                                          \
  for (int64_t k = 0; k < kmain; k += 64) {                                                                       \
    const uint8_t* wp[R];                                                                                         \
    for (int r = 0; r < R; ++r) {                                                                                 \
      DSV3_PREFETCH(w + r * ldw + k + PREFETCH);                                                                  \
      DSV3_PREFETCH_L2(w + (r + ahead) * ldw + k); /* next tiles' rows */                                         \
      wp[r] = w + r * ldw + k;                                                                                    \
    }                                                                                                             \
    STEP(wp, xs + k);                                                                                             \
  }                                                                                                               \
  if (kmain < K) { /* tail: zero-padded copies of the last codes (xs is zero-padded there too) */                \
    alignas(64) uint8_t pad[R][64] = {};                                                                          \
    const uint8_t* wp[R];                                                                                         \
    for (int r = 0; r < R; ++r) {                                                                                 \
      std::memcpy(pad[r], w + r * ldw + kmain, size_t(K - kmain));                                                \
      wp[r] = pad[r];                                                                                             \
    }                                                                                                             \
    STEP(wp, xs + kmain);                                                                                         \
  }                                                                                                               \
  for (int r = 0; r < R; ++r) {                                                                                   \
    const bool has_nan = _mm512_cmpeq_epi8_mask(nan[r], _mm512_set1_epi8(0x7F)) != 0;                             \
    for (int t = 0; t < TT; ++t) res[r * TT + t] = has_nan ? __builtin_nanf("") : _mm512_reduce_add_ps(acc[r][t]); \
  }

template <int R, int TT>
DSV3_AVX512 void direct_avx512(const float* xs, int64_t ldx, const uint8_t* w, int64_t ldw, int64_t K, float* res) {
#define DSV3_STEP(wp, x) direct_step_avx512<R, TT>(wp, x, ldx, acc, nan)
  DSV3_DIRECT_LOOP_512(DSV3_STEP)
#undef DSV3_STEP
}

template <int R, int TT>
DSV3_GFNI void direct_gfni(const float* xs, int64_t ldx, const uint8_t* w, int64_t ldw, int64_t K, float* res) {
  const __m512i idx[4] = {_mm512_load_si512(GFNI_INDEX.b[0]), _mm512_load_si512(GFNI_INDEX.b[1]),
                          _mm512_load_si512(GFNI_INDEX.b[2]), _mm512_load_si512(GFNI_INDEX.b[3])};
#define DSV3_STEP(wp, x) gfni_step<R, TT>(wp, x, ldx, idx, acc, nan)
  DSV3_DIRECT_LOOP_512(DSV3_STEP)
#undef DSV3_STEP
}

// -- dense tiles, AVX-512 (see the AVX2 ones): 16 values per vector
template <bool BF16>
DSV3_AVX512_INLINE __m512 dense16(const uint8_t* p) {
  if constexpr (BF16) {
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  } else {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
  }
}

template <int R, int TT, bool BF16>
DSV3_AVX512_INLINE void dense_step_avx512(const uint8_t* const (&wp)[R], const float* xs, int64_t ldx,
                                          __m512 (&acc)[R][TT]) {
  constexpr int E = BF16 ? 2 : 4;
  for (int q = 0; q < 2; ++q) {
    __m512 x[TT];
    for (int t = 0; t < TT; ++t) x[t] = _mm512_loadu_ps(xs + t * ldx + 16 * q);
    for (int r = 0; r < R; ++r) {
      const __m512 f = dense16<BF16>(wp[r] + 16 * q * E);
      for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_fmadd_ps(f, x[t], acc[r][t]);
    }
  }
}

template <int R, int TT, bool BF16>
DSV3_AVX512 void dense_avx512(const float* xs, int64_t ldx, const uint8_t* w, int64_t ldw, int64_t K, float* res) {
  constexpr int E = BF16 ? 2 : 4;
  __m512 acc[R][TT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t kmain = K & ~int64_t(31), ahead = dense_rows_ahead(R, ldw);
  for (int64_t k = 0; k < kmain; k += 32) {
    const uint8_t* wp[R];
    for (int r = 0; r < R; ++r) {
      wp[r] = w + r * ldw + k * E;
      for (int b = 0; b < 32 * E; b += 64) {
        DSV3_PREFETCH(wp[r] + b + PREFETCH);
        DSV3_PREFETCH_L2(wp[r] + b + ahead * ldw);
      }
    }
    dense_step_avx512<R, TT, BF16>(wp, xs + k, ldx, acc);
  }
  if (kmain < K) {  // tail: zero-padded copies of the last values (xs is zero-padded there too)
    alignas(64) uint8_t pad[R][32 * E] = {};
    const uint8_t* wp[R];
    for (int r = 0; r < R; ++r) {
      std::memcpy(pad[r], w + r * ldw + kmain * E, size_t((K - kmain) * E));
      wp[r] = pad[r];
    }
    dense_step_avx512<R, TT, BF16>(wp, xs + kmain, ldx, acc);
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) res[r * TT + t] = _mm512_reduce_add_ps(acc[r][t]);
}

template <int TT>
DSV3_AVX512 void col_avx512(const float* x, int64_t ldx, const uint8_t* w, int64_t ldw, int64_t n_rows,
                            int64_t ncols, const float* scale, float* acc_out, int64_t lda) {
  constexpr int CW = 64;
  __m512 acc[TT][4];
  for (int t = 0; t < TT; ++t)
    for (int q = 0; q < 4; ++q) acc[t][q] = _mm512_setzero_ps();
  alignas(64) uint8_t pad[CW] = {};
  for (int64_t i = 0; i < n_rows; ++i) {
    const uint8_t* wp = w + i * ldw;
    DSV3_PREFETCH(wp + (PREFETCH / 64) * ldw);  // the same columns, rows ahead
    if (ncols < CW) {
      std::memcpy(pad, wp, size_t(ncols));
      wp = pad;
    }
    __m512 v[4];
    cvt32(wp, v[0], v[1]);
    cvt32(wp + 32, v[2], v[3]);
    for (int t = 0; t < TT; ++t) {
      const __m512 xb = _mm512_set1_ps(x[t * ldx + i]);
      for (int q = 0; q < 4; ++q) acc[t][q] = _mm512_fmadd_ps(v[q], xb, acc[t][q]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int q = 0; q < 4; ++q) {
      float* o = acc_out + t * lda + 16 * q;
      _mm512_storeu_ps(o, _mm512_fmadd_ps(acc[t][q], _mm512_loadu_ps(scale + 16 * q), _mm512_loadu_ps(o)));
    }
}


DSV3_AVX512 void conv_avx512(const uint8_t* w, int64_t n, int64_t n_pad, float* dst) {
  alignas(64) uint8_t pad[32];
  for (int64_t k = 0; k < n_pad; k += 32) {
    if ((k & 63) == 0) DSV3_PREFETCH(w + k + PREFETCH);
    const uint8_t* wp = w + k;
    if (k + 32 > n) {
      std::memset(pad, 0, 32);
      if (k < n) std::memcpy(pad, w + k, size_t(n - k));
      wp = pad;
    }
    __m512 lo, hi;
    cvt32(wp, lo, hi);
    _mm512_storeu_ps(dst + k, lo);
    _mm512_storeu_ps(dst + k + 16, hi);
  }
}

template <int R, int TT>
DSV3_AVX512 void fma_avx512(const float* wb, int64_t ldw, const float* xs, int64_t ldx, int64_t n, float* acc_mem,
                            int64_t lda) {
  __m512 acc[R][TT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_loadu_ps(acc_mem + r * lda + t * 16);
  for (int64_t k = 0; k < n; k += 16) {
    __m512 xv[TT];
    for (int t = 0; t < TT; ++t) xv[t] = _mm512_loadu_ps(xs + t * ldx + k);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_loadu_ps(wb + r * ldw + k);
      for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TT; ++t) _mm512_storeu_ps(acc_mem + r * lda + t * 16, acc[r][t]);
}


template <int TT>
DSV3_AVX512 void outer_avx512(const float* x, int64_t ldx, const float* wb, int64_t ldb, int64_t n_rows, float* out,
                              int64_t ldo) {
  __m512 acc[TT][4];
  for (int t = 0; t < TT; ++t)
    for (int q = 0; q < 4; ++q) acc[t][q] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n_rows; ++i) {
    __m512 v[4];
    for (int q = 0; q < 4; ++q) v[q] = _mm512_loadu_ps(wb + i * ldb + 16 * q);
    for (int t = 0; t < TT; ++t) {
      const __m512 xb = _mm512_set1_ps(x[t * ldx + i]);
      for (int q = 0; q < 4; ++q) acc[t][q] = _mm512_fmadd_ps(v[q], xb, acc[t][q]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int q = 0; q < 4; ++q) _mm512_storeu_ps(out + t * ldo + 16 * q, acc[t][q]);
}

DSV3_AVX512 void dequant_row_avx512(const uint8_t* w, int64_t N, const float* scale, float* dst) {
  alignas(64) uint8_t pad[32];
  for (int64_t j = 0; j < N; j += 32) {
    if ((j & 63) == 0) DSV3_PREFETCH(w + j + PREFETCH);
    const int64_t n = std::min<int64_t>(32, N - j);
    const uint8_t* wp = w + j;
    if (n < 32) {
      std::memset(pad, 0, 32);
      std::memcpy(pad, wp, size_t(n));
      wp = pad;
    }
    __m512 lo, hi;
    cvt32(wp, lo, hi);
    lo = _mm512_mul_ps(lo, _mm512_loadu_ps(scale + j));
    hi = _mm512_mul_ps(hi, _mm512_loadu_ps(scale + j + 16));
    const __mmask16 mlo = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
    const __mmask16 mhi = n >= 32 ? __mmask16(0xFFFF) : n <= 16 ? __mmask16(0) : __mmask16((1u << (n - 16)) - 1);
    _mm512_mask_storeu_ps(dst + j, mlo, lo);
    _mm512_mask_storeu_ps(dst + j + 16, mhi, hi);
  }
}


#define DSV3_TILES(fn) \
  {{fn<1, 1>, fn<1, 1>, fn<1, 2>, fn<1, 3>, fn<1, 4>}, {fn<4, 1>, fn<4, 1>, fn<4, 2>, fn<4, 3>, fn<4, 4>}}
#define DSV3_COLS(fn) {fn<1>, fn<1>, fn<2>, fn<3>, fn<4>}
#define DSV3_FMAS(fn) DSV3_TILES(fn)
#define DSV3_DENSE_TILES(fn, BF16)                                                                    \
  {{fn<1, 1, BF16>, fn<1, 1, BF16>, fn<1, 2, BF16>, fn<1, 3, BF16>, fn<1, 4, BF16>},                  \
   {fn<4, 1, BF16>, fn<4, 1, BF16>, fn<4, 2, BF16>, fn<4, 3, BF16>, fn<4, 4, BF16>}}
#define DSV3_DENSE(fn) {DSV3_DENSE_TILES(fn, false), DSV3_DENSE_TILES(fn, true)}

const Kernels kAvx2 = {2, 2, 32, DSV3_TILES(tile_avx2), DSV3_TILES(direct_avx2), DSV3_COLS(col_avx2),
                       dequant_row_avx2, 8, 2, conv_avx2, DSV3_FMAS(fma_avx2), DSV3_COLS(outer_avx2),
                       DSV3_DENSE(dense_avx2)};
const Kernels kAvx512 = {4, 4, 64, DSV3_TILES(tile_avx512), DSV3_TILES(direct_avx512), DSV3_COLS(col_avx512),
                         dequant_row_avx512, 16, 4, conv_avx512, DSV3_FMAS(fma_avx512), DSV3_COLS(outer_avx512),
                         DSV3_DENSE(dense_avx512)};
const Kernels kAvx512Gfni = {4, 4, 64, DSV3_TILES(tile_avx512), DSV3_TILES(direct_gfni), DSV3_COLS(col_avx512),
                             dequant_row_avx512, 16, 4, conv_avx512, DSV3_FMAS(fma_avx512), DSV3_COLS(outer_avx512),
                             DSV3_DENSE(dense_avx512)};

const Kernels& kernels_for(int64_t isa) {
  switch (resolve_isa(isa)) {
    case ISA_AVX512_GFNI: return kAvx512Gfni;
    case ISA_AVX512: return kAvx512;
    default: return kAvx2;
  }
}

#else  // no x86: Python never calls in (the ISA mask is 0); keep the ops defined with a clear error

const Kernels& kernels_for(int64_t isa) {
  resolve_isa(isa);  // throws
  static const Kernels none{};
  return none;
}

#endif

// ---- argument checks -------------------------------------------------------------------------------------

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }

void check_weight(const Tensor& weight, const Tensor& scale, int64_t bm, int64_t bn) {
  STD_TORCH_CHECK(weight.is_cpu() && scale.is_cpu(), "deepseekv3_fp8: weight and scale_inv must be on the CPU");
  STD_TORCH_CHECK(weight.scalar_type() == ScalarType::Float8_e4m3fn, "deepseekv3_fp8: weight must be float8_e4m3fn");
  STD_TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "deepseekv3_fp8: weight must be a contiguous 2-D tensor");
  STD_TORCH_CHECK(scale.scalar_type() == ScalarType::Float && scale.is_contiguous(),
                  "deepseekv3_fp8: scale_inv must be a contiguous float32 tensor");
  STD_TORCH_CHECK(bm > 0 && bn > 0, "deepseekv3_fp8: block sizes must be positive");
  STD_TORCH_CHECK(scale.dim() == 2 && scale.size(0) == cdiv(weight.size(0), bm) && scale.size(1) == cdiv(weight.size(1), bn),
                  "deepseekv3_fp8: scale_inv must have shape [ceil(M/bm), ceil(N/bn)] = [", cdiv(weight.size(0), bm),
                  ", ", cdiv(weight.size(1), bn), "]");
}

void check_input(const Tensor& x) {
  STD_TORCH_CHECK(x.is_cpu(), "deepseekv3_fp8: the input must be on the CPU");
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::Float || x.scalar_type() == ScalarType::BFloat16,
                  "deepseekv3_fp8: the input must be float32 or bfloat16");
}

// ---- shared pieces of the drivers ------------------------------------------------------------------------

// x [G, T, K] (any strides, fp32/bf16) -> contiguous fp32
std::vector<float> input_f32(const Tensor& x, int64_t G, int64_t T, int64_t K) {
  std::vector<float> out(size_t(G * T * K));
  const void* base = x.const_data_ptr();
  const ScalarType dt = x.scalar_type();
  const int64_t sg = x.dim() == 3 ? x.stride(0) : 0, st = x.stride(x.dim() - 2), sk = x.stride(x.dim() - 1);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = 0; t < T; ++t) {
      float* dst = out.data() + (g * T + t) * K;
      const int64_t o = g * sg + t * st;
      if (dt == ScalarType::Float && sk == 1) {
        std::memcpy(dst, static_cast<const float*>(base) + o, size_t(K) * sizeof(float));
      } else {
        for (int64_t k = 0; k < K; ++k) dst[k] = read_x(base, dt, o + k * sk);
      }
    }
  return out;
}

// scale row of row block rb, expanded per column and times `unit` (the reciprocal of the widened codes' unit:
// 2^8 for halves; a power of two, so exact), zero-padded
void scale_row(const float* scale, int64_t nb, int64_t rb, int64_t N, int64_t bn, float* dst, int64_t Np,
               float unit = 256.0f) {
  const float* s = scale + rb * nb;
  for (int64_t j0 = 0, b = 0; j0 < N; j0 += bn, ++b)  // per block, not j / bn per column: a division per
    std::fill(dst + j0, dst + std::min(N, j0 + bn), s[b] * unit);  // column cost more than a decode row block
  std::fill(dst + N, dst + Np, 0.0f);
}

// For the direct tiles (codes read as code * 2^-120): the exponent d >= 0 such that the scaled input
// x * S * 2^(120 - d) and the scale row S * 2^(120 - d) stay finite, given the largest |x| of the rows and the
// largest scale of the row block. d = 0 unless |x * S| reaches 2^6 (products then have the reference's
// magnitudes exactly); the tile's sums are multiplied by 2^d afterwards.
int direct_shift(float x_max, const float* scale_row_rb, int64_t nb) {
  float s_max = 0.0f;
  for (int64_t j = 0; j < nb; ++j) s_max = std::max(s_max, scale_row_rb[j]);
  if (!(x_max > 0.0f && s_max > 0.0f) || !std::isfinite(x_max) || !std::isfinite(s_max)) return 0;  // NaN/Inf propagate
  const int ex = std::ilogb(x_max) + 1, es = std::ilogb(s_max) + 1;  // |x| < 2^ex, S < 2^es
  return std::max({0, ex + es - 7, es - 7});  // 2^(ex + es + 120 - d) <= 2^127
}

// denormals-are-zero (MXCSR bit 6) would read subnormal codes as zero in the direct tiles
bool denormals_are_zero() {
#if DSV3_X86
  return (_mm_getcsr() & 0x40) != 0;
#else
  return false;
#endif
}

// ---- stream: out[g, t, r] = x[g, t, :] @ W[row(g, r), :] ----------------------------------------------------
// row(g, r) = g * row_stride + row_offset + r, r < rows. The plain linear is G = 1, row_stride = row_offset = 0.

void stream(const Kernels& kn, const std::vector<float>& x32, int64_t G, int64_t T, int64_t K, const Tensor& weight,
            const Tensor& scale, int64_t bm, int64_t bn, int64_t row_stride, int64_t row_offset, int64_t rows,
            void* out, ScalarType out_dt) {
  const uint8_t* w = static_cast<const uint8_t*>(weight.const_data_ptr());
  const float* s = static_cast<const float*>(scale.const_data_ptr());
  const int64_t N = weight.size(1), nb = scale.size(1), Kp = round_up(K, KPAD);
  // row stride of the scaled input: one cache line more than Kp, so that its rows (V3: 7168 floats = 7 x 4 KiB)
  // do not all fall into the same L1 sets
  const int64_t ldx = Kp + 16;
  // units of work: (group, first row, end row), never crossing a row block, at most `chunk` rows
  const int64_t chunk = 32;
  struct Unit { int64_t g, r0, r1; };
  std::vector<Unit> units;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t base = g * row_stride + row_offset;
    for (int64_t r = 0; r < rows;) {
      const int64_t block_end = ((base + r) / bm + 1) * bm - base;
      const int64_t r1 = std::min({rows, block_end, r + chunk});
      units.push_back({g, r, r1});
      r = r1;
    }
  }
  const int64_t unit_work = std::min(chunk, rows) * K * T;
  // few rows (decode): the direct tiles, unless denormals-are-zero is on (then the half tiles)
  const bool direct = T <= kn.tt_max && !denormals_are_zero();
  std::vector<float> x_max(direct ? size_t(G) : 0, 0.0f);  // largest |x| of each group's rows
  for (size_t i = 0; i < x_max.size(); ++i)
    for (int64_t j = 0; j < T * K; ++j) x_max[i] = std::max(x_max[i], std::fabs(x32[i * size_t(T * K) + size_t(j)]));
  torch::stable::parallel_for(0, int64_t(units.size()), grain(unit_work), [&](int64_t u0, int64_t u1) {
    std::vector<float> xs(static_cast<size_t>(T * ldx), 0.0f), srow(static_cast<size_t>(Kp));
    std::vector<float> wbuf(T > kn.tt_max ? size_t(4 * KCHUNK) : 0), accm(T > kn.tt_max ? size_t(4 * T * kn.vw) : 0);
    int64_t have_g = -1, have_rb = -1;
    float res[4 * 4], res_unit = 1.0f;
    for (int64_t u = u0; u < u1; ++u) {
      const Unit& unit = units[size_t(u)];
      const int64_t base = unit.g * row_stride + row_offset;
      const int64_t rb = (base + unit.r0) / bm;
      if (unit.g != have_g || rb != have_rb) {  // x_s[t, k] = x[g, t, k] * S[rb, k / bn] * (1 / the codes' unit)
        const int shift = direct ? direct_shift(x_max[size_t(unit.g)], s + rb * nb, nb) : 0;
        scale_row(s, nb, rb, K, bn, srow.data(), Kp, direct ? std::ldexp(1.0f, 120 - shift) : 256.0f);
        res_unit = std::ldexp(1.0f, shift);
        for (int64_t t = 0; t < T; ++t) {
          const float* xr = x32.data() + (unit.g * T + t) * K;
          float* d = xs.data() + t * ldx;
          for (int64_t k = 0; k < K; ++k) d[k] = xr[k] * srow[size_t(k)];
        }
        have_g = unit.g;
        have_rb = rb;
      }
      if (T <= kn.tt_max) {  // few rows: widen the codes in registers, straight into the FMAs
        const int tt = int(T);
        for (int64_t r = unit.r0; r < unit.r1;) {
          const int R = unit.r1 - r >= 4 ? 4 : 1;
          (direct ? kn.direct : kn.tile)[R == 4][tt](xs.data(), ldx, w + (base + r) * N, N, K, res);
          for (int i = 0; i < R; ++i)
            for (int t = 0; t < tt; ++t)
              write_out(out, out_dt, (unit.g * T + t) * rows + r + i, res[i * tt + t] * res_unit);
          r += R;
        }
        continue;
      }
      // more rows: widen each K chunk of R weight rows once into an L1-sized buffer, then run every input
      // row against it (widening, not the FMAs, would otherwise dominate: it would repeat per tile)
      for (int64_t r = unit.r0; r < unit.r1;) {
        const int R = unit.r1 - r >= 4 ? 4 : 1;
        const int64_t lda = T * kn.vw;
        std::fill(accm.begin(), accm.begin() + R * lda, 0.0f);
        for (int64_t kc = 0; kc < Kp; kc += KCHUNK) {
          const int64_t n = std::min(KCHUNK, Kp - kc);
          for (int i = 0; i < R; ++i)
            kn.conv(w + (base + r + i) * N + kc, std::max<int64_t>(0, std::min(n, K - kc)), n, wbuf.data() + i * KCHUNK);
          for (int64_t t0 = 0; t0 < T; t0 += kn.fma_tt_max) {
            const int tt = int(std::min<int64_t>(kn.fma_tt_max, T - t0));
            kn.fma[R == 4][tt](wbuf.data(), KCHUNK, xs.data() + t0 * ldx + kc, ldx, n, accm.data() + t0 * kn.vw, lda);
          }
        }
        for (int i = 0; i < R; ++i)
          for (int64_t t = 0; t < T; ++t) {
            const float* a = accm.data() + i * lda + t * kn.vw;
            float sum = 0.0f;
            for (int l = 0; l < kn.vw; ++l) sum += a[l];
            write_out(out, out_dt, (unit.g * T + t) * rows + r + i, sum);
          }
        r += R;
      }
    }
  });
}

// ---- cols: out[g, t, j] = x[g, t, :] @ W[row(g, 0) : row(g, 0) + rows, j] (contraction over weight rows) ----

void cols(const Kernels& kn, const std::vector<float>& x32, int64_t G, int64_t T, const Tensor& weight,
          const Tensor& scale, int64_t bm, int64_t bn, int64_t row_stride, int64_t row_offset, int64_t rows,
          void* out, ScalarType out_dt) {
  const uint8_t* w = static_cast<const uint8_t*>(weight.const_data_ptr());
  const float* s = static_cast<const float*>(scale.const_data_ptr());
  const int64_t N = weight.size(1), nb = scale.size(1), CW = kn.col_width, Np = round_up(N, std::max(CW, KPAD));
  const bool many = T > kn.col_tt_max;
  torch::stable::parallel_for(0, G, grain(rows * N * T), [&](int64_t g0, int64_t g1) {
    std::vector<float> acc(static_cast<size_t>(T * Np)), srow(static_cast<size_t>(Np));
    std::vector<float> wbuf(many ? static_cast<size_t>(rows * Np) : 0, 0.0f);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t base = g * row_stride + row_offset;
      const float* xg = x32.data() + g * T * rows;
      if (many) {  // dequantize the group's rows once (exact values, L2-sized), then a plain fp32 product
        int64_t have_rb = -1;
        for (int64_t i = 0; i < rows; ++i) {
          if ((base + i) / bm != have_rb) {
            have_rb = (base + i) / bm;
            scale_row(s, nb, have_rb, N, bn, srow.data(), Np);
          }
          kn.dequant_row(w + (base + i) * N, N, srow.data(), wbuf.data() + i * Np);
        }
        for (int64_t j0 = 0; j0 < N; j0 += CW)
          for (int64_t t0 = 0; t0 < T; t0 += kn.col_tt_max) {
            const int tt = int(std::min<int64_t>(kn.col_tt_max, T - t0));
            kn.outer[tt](xg + t0 * rows, rows, wbuf.data() + j0, Np, rows, acc.data() + t0 * Np + j0, Np);
          }
      } else {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t i = 0; i < rows;) {  // one row block at a time: its scale row multiplies its partial sums
          const int64_t rb = (base + i) / bm;
          const int64_t i1 = std::min(rows, (rb + 1) * bm - base);
          scale_row(s, nb, rb, N, bn, srow.data(), Np);
          // the column tiles read this segment with a stride of a row; bring the next group's segment into L2
          // meanwhile, a share per column tile (its first pass would otherwise wait on DRAM row by row)
          const uint8_t* next = w + ((g + 1 < g1 ? base + row_stride : base) + i) * N;
          const int64_t seg_bytes = (i1 - i) * N, share = round_up(cdiv(seg_bytes, cdiv(N, CW)), 64);
          for (int64_t j0 = 0, c = 0; j0 < N; j0 += CW, c += share) {
            if (g + 1 < g1)
              for (int64_t b = c; b < std::min(c + share, seg_bytes); b += 64) DSV3_PREFETCH_L2(next + b);
            for (int64_t t0 = 0; t0 < T; t0 += kn.col_tt_max) {
              const int tt = int(std::min<int64_t>(kn.col_tt_max, T - t0));
              kn.col[tt](xg + t0 * rows + i, rows, w + (base + i) * N + j0, N, i1 - i, std::min(CW, N - j0),
                         srow.data() + j0, acc.data() + t0 * Np + j0, Np);
            }
          }
          i = i1;
        }
      }
      for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < N; ++j) write_out(out, out_dt, (g * T + t) * N + j, acc[size_t(t * Np + j)]);
    }
  });
}

// ---- dequantize rows [r0, r1) of the weight into dst [r1 - r0, N] fp32 -------------------------------------

void dequant_rows(const Kernels& kn, const Tensor& weight, const Tensor& scale, int64_t bm, int64_t bn, int64_t r0,
                  int64_t r1, float* dst, bool parallel = true) {
  const uint8_t* w = static_cast<const uint8_t*>(weight.const_data_ptr());
  const float* s = static_cast<const float*>(scale.const_data_ptr());
  const int64_t N = weight.size(1), nb = scale.size(1), Np = round_up(N, KPAD);
  const int64_t g = parallel ? std::max<int64_t>(16, grain(N)) : r1 - r0;
  torch::stable::parallel_for(r0, r1, g, [&](int64_t a, int64_t b) {
    std::vector<float> srow(static_cast<size_t>(Np));
    int64_t have_rb = -1;
    for (int64_t i = a; i < b; ++i) {
      if (i / bm != have_rb) {
        have_rb = i / bm;
        scale_row(s, nb, have_rb, N, bn, srow.data(), Np);
      }
      kn.dequant_row(w + i * N, N, srow.data(), dst + (i - r0) * N);
    }
  });
}


void mm_out(const Tensor& a, const Tensor& b, const Tensor& out) {
  std::array<StableIValue, 3> stack{torch::stable::detail::from(a), torch::stable::detail::from(b),
                                    torch::stable::detail::from(out)};
  STD_TORCH_CHECK(torch_call_dispatcher("aten::mm", "out", stack.data(), TORCH_ABI_VERSION) == AOTI_TORCH_SUCCESS,
                  "deepseekv3_fp8: aten::mm.out failed");
  (void)torch::stable::detail::to<Tensor>(stack[0]);  // release the returned handle
}

// ---- many rows per group: dequantize each group's rows once (exact values) and let BLAS multiply ----------
// aten::mm runs on the pool thread that handles the group (single-threaded inside the parallel region).

void groups_blas(const Kernels& kn, const std::vector<float>& x32, int64_t G, int64_t T, int64_t K,
                 const Tensor& weight, const Tensor& scale, int64_t bm, int64_t bn, int64_t row_stride,
                 int64_t row_offset, int64_t rows, bool transpose, void* out, ScalarType out_dt) {
  const uint8_t* w = static_cast<const uint8_t*>(weight.const_data_ptr());
  const float* s = static_cast<const float*>(scale.const_data_ptr());
  const int64_t N = weight.size(1), nb = scale.size(1), Np = round_up(N, KPAD), n_out = transpose ? N : rows;
  const torch::stable::Device cpu(torch::headeronly::DeviceType::CPU);
  torch::stable::parallel_for(0, G, grain(rows * N * T), [&](int64_t g0, int64_t g1) {
    std::vector<float> wbuf(static_cast<size_t>(rows * N)), srow(static_cast<size_t>(Np));
    std::vector<float> obuf(out_dt == ScalarType::Float ? 0 : static_cast<size_t>(T * n_out));
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t base = g * row_stride + row_offset;
      int64_t have_rb = -1;
      for (int64_t i = 0; i < rows; ++i) {
        if ((base + i) / bm != have_rb) {
          have_rb = (base + i) / bm;
          scale_row(s, nb, have_rb, N, bn, srow.data(), Np);
        }
        kn.dequant_row(w + (base + i) * N, N, srow.data(), wbuf.data() + i * N);
      }
      Tensor wg = torch::stable::from_blob(wbuf.data(), {rows, N}, {N, 1}, cpu, ScalarType::Float);  // W_g
      Tensor xg = torch::stable::from_blob(const_cast<float*>(x32.data()) + g * T * K, {T, K}, {K, 1}, cpu,
                                           ScalarType::Float);
      float* od = out_dt == ScalarType::Float ? static_cast<float*>(out) + g * T * n_out : obuf.data();
      Tensor og = torch::stable::from_blob(od, {T, n_out}, {n_out, 1}, cpu, ScalarType::Float);
      mm_out(xg, transpose ? wg : torch::stable::transpose(wg, 0, 1), og);
      if (out_dt != ScalarType::Float)
        for (int64_t i = 0; i < T * n_out; ++i) write_out(out, out_dt, g * T * n_out + i, obuf[size_t(i)]);
    }
  });
}

// ---- ops -------------------------------------------------------------------------------------------------

// y [T, M] = x [T, N] @ dequant(weight [M, N], scale).T in x's dtype, fp32 accumulation.
// T <= max_stream_rows: stream the weight once. More rows: chunked dequantization + aten::mm.
Tensor linear(Tensor x, Tensor weight, Tensor scale, int64_t bm, int64_t bn, int64_t max_stream_rows, int64_t isa) {
  check_weight(weight, scale, bm, bn);
  check_input(x);
  STD_TORCH_CHECK(x.dim() == 2 && x.size(1) == weight.size(1), "deepseekv3_fp8.linear: x must be [T, ", weight.size(1),
                  "]");
  const Kernels& kn = kernels_for(isa);
  const int64_t T = x.size(0), N = weight.size(1), M = weight.size(0);
  Tensor out = torch::stable::new_empty(x, {T, M});
  if (T == 0 || M == 0) return out;
  if (T <= max_stream_rows) {
    const std::vector<float> x32 = input_f32(x, 1, T, N);
    stream(kn, x32, 1, T, N, weight, scale, bm, bn, 0, 0, M, out.mutable_data_ptr(), x.scalar_type());
    return out;
  }
  const bool f32 = x.scalar_type() == ScalarType::Float;
  Tensor x32 = f32 ? x : torch::stable::to(x, ScalarType::Float);
  Tensor y32 = f32 ? out : torch::stable::new_empty(x, {T, M}, ScalarType::Float);
  // ~16 MB of fp32 per chunk, dequantized on this thread while BLAS multiplies with all of them. Measured on
  // 2048x7168: 4 MB chunks lose BLAS efficiency, 8 and 16 MB are equal on one thread; dequantizing a chunk
  // is 1.5-15% of its multiply (512-32 rows), so doing it serially costs at most half that on two idle
  // cores, and it saves a parallel region per chunk -- on a busy machine each region waits for a descheduled
  // thread, and 16 MB serial was 2.6x faster than 8 MB parallel at 32 rows there
  const int64_t chunk = std::max<int64_t>(bm, ((int64_t(4) << 20) / std::max<int64_t>(N, 1)) / bm * bm);
  thread_local std::vector<float> buf;  // reused across calls: no page faults on every prefill GEMM
  buf.resize(size_t(std::min(chunk, M) * N));
  for (int64_t r0 = 0; r0 < M; r0 += chunk) {
    const int64_t rc = std::min(chunk, M - r0);
    dequant_rows(kn, weight, scale, bm, bn, r0, r0 + rc, buf.data(), /*parallel=*/false);
    Tensor wc = torch::stable::from_blob(buf.data(), {rc, N}, {N, 1}, torch::stable::Device(torch::headeronly::DeviceType::CPU),
                                         ScalarType::Float);
    mm_out(x32, torch::stable::transpose(wc, 0, 1), torch::stable::narrow(y32, 1, r0, rc));
  }
  return f32 ? out : torch::stable::to(y32, ScalarType::BFloat16);
}

// Per-group products with row ranges of one weight (the absorbed MLA: group = head, kv_b_proj rows
// [h * row_stride + row_offset, + rows)). transpose = false: out [G, T, rows] = x [G, T, N] @ W_g.T;
// transpose = true: out [G, T, N] = x [G, T, rows] @ W_g.
// T >= blas_min_rows: groups_blas.
Tensor head_matmul(Tensor x, Tensor weight, Tensor scale, int64_t bm, int64_t bn, int64_t row_stride, int64_t row_offset,
                   int64_t rows, bool transpose, int64_t blas_min_rows, int64_t isa) {
  check_weight(weight, scale, bm, bn);
  check_input(x);
  STD_TORCH_CHECK(x.dim() == 3, "deepseekv3_fp8.head_matmul: x must be [G, T, K]");
  const int64_t G = x.size(0), T = x.size(1), K = x.size(2), N = weight.size(1), M = weight.size(0);
  STD_TORCH_CHECK(rows >= 0 && row_offset >= 0 && row_stride >= 0 &&
                      (G == 0 || (G - 1) * row_stride + row_offset + rows <= M),
                  "deepseekv3_fp8.head_matmul: group rows run past the weight's ", M, " rows");
  STD_TORCH_CHECK(K == (transpose ? rows : N), "deepseekv3_fp8.head_matmul: x's last dimension must be ",
                  transpose ? rows : N);
  const Kernels& kn = kernels_for(isa);
  Tensor out = torch::stable::new_empty(x, {G, T, transpose ? N : rows});
  if (G == 0 || T == 0 || rows == 0 || N == 0) {
    if (out.numel()) torch::stable::zero_(out);
    return out;
  }
  const std::vector<float> x32 = input_f32(x, G, T, K);
  if (T >= blas_min_rows) {
    groups_blas(kn, x32, G, T, K, weight, scale, bm, bn, row_stride, row_offset, rows, transpose, out.mutable_data_ptr(),
                x.scalar_type());
  } else if (transpose) {
    cols(kn, x32, G, T, weight, scale, bm, bn, row_stride, row_offset, rows, out.mutable_data_ptr(), x.scalar_type());
  } else {
    stream(kn, x32, G, T, K, weight, scale, bm, bn, row_stride, row_offset, rows, out.mutable_data_ptr(),
           x.scalar_type());
  }
  return out;
}

// y [T, M] = x [T, N] @ weight [M, N].T for a bf16 or fp32 weight, in x's dtype, fp32 products and sums: the weight
// streamed once per tt_max input rows (decode; the caller sends prefill-sized inputs to BLAS).
Tensor dense_linear(Tensor x, Tensor weight, int64_t isa) {
  check_input(x);
  STD_TORCH_CHECK(weight.is_cpu() && weight.dim() == 2 && weight.is_contiguous(),
                  "deepseekv3_fp8.dense_linear: weight must be a contiguous 2-D CPU tensor");
  const ScalarType wt = weight.scalar_type();
  STD_TORCH_CHECK(wt == ScalarType::BFloat16 || wt == ScalarType::Float,
                  "deepseekv3_fp8.dense_linear: weight must be bfloat16 or float32");
  STD_TORCH_CHECK(x.dim() == 2 && x.size(1) == weight.size(1), "deepseekv3_fp8.dense_linear: x must be [T, ",
                  weight.size(1), "]");
  const Kernels& kn = kernels_for(isa);
  const int64_t T = x.size(0), K = weight.size(1), M = weight.size(0), Kp = round_up(K, KPAD), ldx = Kp + 16;
  const int64_t E = wt == ScalarType::BFloat16 ? 2 : 4, ldw = K * E;
  Tensor out = torch::stable::new_empty(x, {T, M});
  if (T == 0 || M == 0) return out;
  std::vector<float> xs(size_t(T * ldx), 0.0f);  // zero-padded rows, as the tiles read them
  const std::vector<float> x32 = input_f32(x, 1, T, K);
  for (int64_t t = 0; t < T; ++t) std::copy_n(x32.data() + t * K, K, xs.data() + t * ldx);
  const uint8_t* w = static_cast<const uint8_t*>(weight.const_data_ptr());
  const auto& tiles = kn.dense[wt == ScalarType::BFloat16];
  void* const y = out.mutable_data_ptr();
  const ScalarType y_dt = x.scalar_type();
  const int64_t chunk = 64;  // rows per unit of work
  torch::stable::parallel_for(0, cdiv(M, chunk), grain(chunk * K * T), [&](int64_t u0, int64_t u1) {
    float res[4 * 4];
    for (int64_t r = u0 * chunk, r_end = std::min(M, u1 * chunk); r < r_end;) {
      const int R = r_end - r >= 4 ? 4 : 1;
      for (int64_t t0 = 0; t0 < T; t0 += kn.tt_max) {
        const int tt = int(std::min<int64_t>(kn.tt_max, T - t0));
        tiles[R == 4][tt](xs.data() + t0 * ldx, ldx, w + r * ldw, ldw, K, res);
        for (int i = 0; i < R; ++i)
          for (int t = 0; t < tt; ++t) write_out(y, y_dt, (t0 + t) * M + r + i, res[i * tt + t]);
      }
      r += R;
    }
  });
  return out;
}

// aten ops the experts op applies between its products, through the dispatcher: torch's own kernels, so the result
// is the module path's bit for bit
void call_inplace(const char* op, const char* overload, std::initializer_list<Tensor> args) {
  std::array<StableIValue, 2> stack{};
  size_t n = 0;
  for (const Tensor& t : args) stack[n++] = torch::stable::detail::from(t);
  STD_TORCH_CHECK(torch_call_dispatcher(op, overload, stack.data(), TORCH_ABI_VERSION) == AOTI_TORCH_SUCCESS,
                  "deepseekv3_fp8: ", op, " failed");
  (void)torch::stable::detail::to<Tensor>(stack[0]);  // release the returned handle
}

// The routed experts of one MoE layer on rows sorted by expert (inference): x [A, D], counts[e] rows for the e-th
// expert given, weights / scales (gate, up, down) per expert. Rows of expert e: down(silu(gate(x_e)) * up(x_e)), each
// product `linear`'s, silu and the product torch's. One call per layer instead of three per active expert: what a
// compiled decode step runs (the Python between the products was most of a small model's expert time).
Tensor experts(Tensor x, std::vector<int64_t> counts, std::vector<Tensor> weights, std::vector<Tensor> scales,
               int64_t bm, int64_t bn, int64_t max_stream_rows, int64_t isa) {
  check_input(x);
  const int64_t n = int64_t(counts.size());
  STD_TORCH_CHECK(int64_t(weights.size()) == 3 * n && int64_t(scales.size()) == 3 * n,
                  "deepseekv3_fp8.experts: 3 weights and 3 scales per expert");
  STD_TORCH_CHECK(x.dim() == 2, "deepseekv3_fp8.experts: x must be [A, D]");
  int64_t total = 0;
  for (int64_t c : counts) {
    STD_TORCH_CHECK(c >= 0, "deepseekv3_fp8.experts: negative row count");
    total += c;
  }
  STD_TORCH_CHECK(total == x.size(0), "deepseekv3_fp8.experts: the counts add up to ", total, ", x has ", x.size(0),
                  " rows");
  for (int64_t i = 0; i < 3 * n; ++i) check_weight(weights[size_t(i)], scales[size_t(i)], bm, bn);
  const int64_t d_out = n ? weights[2].size(0) : x.size(1);
  Tensor out = torch::stable::new_empty(x, {x.size(0), d_out});
  for (int64_t e = 0, start = 0; e < n; start += counts[size_t(e)], ++e) {
    if (counts[size_t(e)] == 0) continue;
    const Tensor* w = weights.data() + 3 * e;
    const Tensor* s = scales.data() + 3 * e;
    STD_TORCH_CHECK(w[0].size(1) == x.size(1) && w[1].size(1) == x.size(1) && w[0].size(0) == w[1].size(0) &&
                        w[2].size(1) == w[0].size(0) && w[2].size(0) == d_out,
                    "deepseekv3_fp8.experts: expert ", e, "'s weights do not chain (gate/up [I, D], down [D, I])");
    Tensor xe = torch::stable::narrow(x, 0, start, counts[size_t(e)]);
    Tensor gate = linear(xe, w[0], s[0], bm, bn, max_stream_rows, isa);
    Tensor up = linear(xe, w[1], s[1], bm, bn, max_stream_rows, isa);
    call_inplace("aten::silu_", "", {gate});
    call_inplace("aten::mul_", "Tensor", {gate, up});
    Tensor ye = torch::stable::narrow(out, 0, start, counts[size_t(e)]);
    torch::stable::copy_(ye, linear(gate, w[2], s[2], bm, bn, max_stream_rows, isa));
  }
  return out;
}

// The dense fp32 weight, bit-identical to block_dequantize (float(code) * scale, rounded once).
Tensor dequantize(Tensor weight, Tensor scale, int64_t bm, int64_t bn, int64_t isa) {
  check_weight(weight, scale, bm, bn);
  const Kernels& kn = kernels_for(isa);
  Tensor out = torch::stable::new_empty(weight, {weight.size(0), weight.size(1)}, ScalarType::Float);
  if (out.numel()) dequant_rows(kn, weight, scale, bm, bn, 0, weight.size(0), static_cast<float*>(out.mutable_data_ptr()));
  return out;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int64_t deepseekv3_fp8_isa_mask() { return isa_mask(); }

STABLE_TORCH_LIBRARY(deepseekv3_fp8, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor scale_inv, int block_m, int block_n, int max_stream_rows, int isa) -> Tensor");
  m.def("head_matmul(Tensor x, Tensor weight, Tensor scale_inv, int block_m, int block_n, int row_stride, "
        "int row_offset, int rows, bool transpose, int blas_min_rows, int isa) -> Tensor");
  m.def("dequantize(Tensor weight, Tensor scale_inv, int block_m, int block_n, int isa) -> Tensor");
  m.def("dense_linear(Tensor x, Tensor weight, int isa) -> Tensor");
  m.def("experts(Tensor x, int[] counts, Tensor[] weights, Tensor[] scales, int block_m, int block_n, "
        "int max_stream_rows, int isa) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(deepseekv3_fp8, CPU, m) {
  m.impl("linear", TORCH_BOX(&linear));
  m.impl("head_matmul", TORCH_BOX(&head_matmul));
  m.impl("dequantize", TORCH_BOX(&dequantize));
  m.impl("dense_linear", TORCH_BOX(&dense_linear));
  m.impl("experts", TORCH_BOX(&experts));
}

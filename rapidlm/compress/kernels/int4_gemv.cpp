// int4 weight-only matmul for the CPU: y = x @ W^T (+ bias), W = scale * q + offset per group, fp32 accumulation.
//
// Weights: 4-bit codes q (N, K) in 0..15 and fp32 scale / offset (N, K / group_size), group_size 32..256
// (llama.cpp's Q4_0: offset = -8 scale; Q4_1: offset = min). x is (..., K) fp32 or bf16; y is (..., N) in x's
// dtype. Built by int4_cpu.py with -O3 -march=native (and -fopenmp when ATen's backend is OpenMP, so
// at::parallel_for runs on torch's own OpenMP runtime and honours torch.set_num_threads).
//
// The identity the kernel uses: y[n] = sum_g ( scale[n][g] * sum_{k in g} q[n][k] x[k]  +  offset[n][g] * Sx[g] )
// with Sx[g] = sum_{k in g} x[k], computed once per call and row of x: the inner loop is codes . x only.
//
// Packed layout (made once by int4_cpu.pack_int4): blocks of 16 output rows (N padded with zero rows). A block is
// K / 8 chunks of 64 bytes; chunk c covers inputs 8c .. 8c+7 of the block's 16 rows as 32 little-endian 16-bit
// words, word w = 2 r + e holding in its nibble i the code of row r, input 8 c + 2 i + e:
//     packed[b][c][2 w + h] = q[16b + w/2][8c + 4h + w%2] | q[16b + w/2][8c + 4h + 2 + w%2] << 4   (NB, K/8, 64) u8
//     scales_zeros[b][g][0][r] = scale[16 b + r][g],  scales_zeros[b][g][1][r] = offset[16 b + r][g]  (NB, G, 2, 16)
// So (v >> 4 i) & 0xF over the 32 words of a chunk gives, for input pair i, all 16 rows x 2 inputs in the order
// of vdpbf16ps's lanes: one shift and one logic op per 32 codes, no shuffles. A block is one sequential stream.
// scales_zeros is fp32, or fp16 where every value converts exactly (GGUF's Q4_0/Q4_1 scales are fp16: 20 bytes
// per 32 weights instead of 24); the kernel widens them to fp32 either way.
//   * bf16 x on AVX512-BF16: each word becomes the bf16 0x4300 | q = 128 + q (exact; one vpternlogd), and
//     vdpbf16ps with the broadcast x pair accumulates the exact products (128 + q) x in fp32; per group
//     tot += scale * acc + (offset - 128 scale) * Sx. (The +128 costs a few bits of the fp32 sums: ~1e-6
//     relative, far below the bf16 output's rounding.) Codes are read from memory once for all rows of x (up to
//     8 per pass; more rows take further passes over the block while it is in L1).
//   * fp32 x (and bf16 x elsewhere, widened once): codes -> fp32 (vpmovzxwd + vcvtdq2ps), times the group scale
//     of each lane's row, FMA with the broadcast pair; offset * Sx is added per group at the end.
//   * no AVX2/AVX512: plain loops over the same layout.
// Large bf16 batches (M > kKernelMaxMBf16, prefill) dequantize a few MiB of rows at a time to bf16 and call
// at::linear (oneDNN), which is faster there.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define RAPIDLM_BF16_DOT 1
#endif

#ifndef RAPIDLM_INT4_U
#define RAPIDLM_INT4_U 2
#endif

namespace {

constexpr int RB = 16;           // output rows per packed block
constexpr int CHUNK_BYTES = 64;  // one chunk: 16 rows x 8 inputs
constexpr int CHUNK_K = 8;
constexpr int kPrefetchBytes = 2048;

#ifdef RAPIDLM_BF16_DOT
constexpr int kMtMaxBf16 = 8;  // rows of x per pass over a block
#endif
#if defined(__AVX512F__)
constexpr int kMtMax = 8;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kMtMax = 2;
#else
constexpr int kMtMax = 4;
#endif
constexpr int kMtCap = 8;  // >= every kMtMax*

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Scales and offsets are stored as fp32, or as fp16 where that is exact (GGUF's Q4_0/Q4_1 scales are fp16):
// S is float or c10::Half, always widened to fp32 before use.
inline float scale_to_float(float v) { return v; }
inline float scale_to_float(c10::Half v) { return static_cast<float>(v); }
#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif
#if defined(__AVX2__) && defined(__FMA__)
inline __m128 load4(const float* p) { return _mm_loadu_ps(p); }
inline __m128 load4(const c10::Half* p) {
#ifdef __F16C__
  return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  return _mm_setr_ps(scale_to_float(p[0]), scale_to_float(p[1]), scale_to_float(p[2]), scale_to_float(p[3]));
#endif
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// fp32 widening path: vectors of W fp32 lanes = W/2 rows x 2 inputs.

#if defined(__AVX512F__)
struct Simd {
  static constexpr int W = 16;
  static constexpr const char* name = "avx512";
  using V = __m512;
  static inline V zero() { return _mm512_setzero_ps(); }
  // The 32 words of chunk p, nibble i, as H = 2 vectors of fp32 codes (rows 0-7, rows 8-15).
  static inline void codes(const uint8_t* p, int i, V out[2]) {
    const __m512i v = _mm512_loadu_si512(p);
    const __m512i a = _mm512_and_si512(_mm512_srli_epi16(v, 4 * i), _mm512_set1_epi16(0xF));
    out[0] = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(a)));
    out[1] = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(a, 1)));
  }
  static inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline V bcast_pair(const float* p) {  // [p0, p1, p0, p1, ...]
    double d;
    std::memcpy(&d, p, sizeof d);
    return _mm512_castpd_ps(_mm512_set1_pd(d));
  }
  static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  // Lanes (2i, 2i+1) of vector h hold row h * W / 2 + i: each of the 16 scales twice.
  template <typename S>
  static inline void dup_scales(const S* s, V out[2]) {
    const __m512 v = load16(s);
    out[0] = _mm512_permutexvar_ps(_mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0), v);
    out[1] = _mm512_permutexvar_ps(_mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8), v);
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Simd {
  static constexpr int W = 8;
  static constexpr const char* name = "avx2";
  using V = __m256;
  static inline V zero() { return _mm256_setzero_ps(); }
  static inline void codes(const uint8_t* p, int i, V out[4]) {
    const __m256i m = _mm256_set1_epi16(0xF);
    for (int half = 0; half < 2; ++half) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * half));
      const __m256i a = _mm256_and_si256(_mm256_srli_epi16(v, 4 * i), m);
      out[2 * half] = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(a)));
      out[2 * half + 1] = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(a, 1)));
    }
  }
  static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline V bcast_pair(const float* p) {
    double d;
    std::memcpy(&d, p, sizeof d);
    return _mm256_castpd_ps(_mm256_set1_pd(d));
  }
  static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
  template <typename S>
  static inline void dup_scales(const S* s, V out[4]) {
    const __m256i idx = _mm256_set_epi32(3, 3, 2, 2, 1, 1, 0, 0);
    for (int h = 0; h < 4; ++h)
      out[h] = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(load4(s + 4 * h)), idx);
  }
};
#endif

// Epilogue shared by the fp32 paths: out[m][r] += sum_g offset[g][r] * Sx[m][g]
template <typename S>
inline void add_offsets(int mt, const S* sp, const float* xs, int64_t G, float out[][RB]) {
  for (int m = 0; m < mt; ++m) {
    float o[RB] = {};
    for (int64_t g = 0; g < G; ++g) {
      const float sx = xs[m * G + g];
      const S* og = sp + g * 2 * RB + RB;
      for (int r = 0; r < RB; ++r) o[r] += scale_to_float(og[r]) * sx;
    }
    for (int r = 0; r < RB; ++r) out[m][r] += o[r];
  }
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// One block of 16 rows against MT rows of fp32 x (stride K): out[m][r] = sum_k x[m][k] w[r][k].
// Each widened code vector is multiplied by its lanes' group scales, then FMA'd into every row of x.
template <int MT, int GS, typename S>
inline void block_f32(const uint8_t* __restrict p, const S* __restrict sp, const float* __restrict x,
                      const float* __restrict xs, int64_t K, int64_t G, int64_t gs_runtime, float out[][RB]) {
  using V = Simd::V;
  constexpr int W = Simd::W;
  constexpr int H = 2 * RB / W;  // vectors per input pair
  constexpr int U = MT == 1 ? 2 : 1;  // accumulator sets (FMA latency)
  const int64_t gs = GS > 0 ? GS : gs_runtime;
  const int64_t chunks = gs / CHUNK_K;
  V acc[U][H][MT];
#pragma GCC unroll 2
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 4
    for (int h = 0; h < H; ++h)
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) acc[u][h][m] = Simd::zero();
  for (int64_t g = 0; g < G; ++g) {
    V sv[H];
    Simd::dup_scales(sp + g * 2 * RB, sv);
    const uint8_t* pg = p + g * chunks * CHUNK_BYTES;
    const float* xg = x + g * gs;
    for (int64_t c = 0; c < chunks; ++c) {
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        V w[H];
        Simd::codes(pg + c * CHUNK_BYTES, i, w);
#pragma GCC unroll 4
        for (int h = 0; h < H; ++h) w[h] = Simd::mul(w[h], sv[h]);
#pragma GCC unroll 8
        for (int m = 0; m < MT; ++m) {
          const V xv = Simd::bcast_pair(xg + m * K + c * CHUNK_K + 2 * i);
#pragma GCC unroll 4
          for (int h = 0; h < H; ++h) acc[i % U][h][m] = Simd::fma(w[h], xv, acc[i % U][h][m]);
        }
      }
    }
  }
  alignas(64) float buf[2 * RB];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) {
#pragma GCC unroll 4
    for (int h = 0; h < H; ++h) {
      V a = acc[0][h][m];
      if constexpr (U > 1) a = Simd::add(a, acc[1][h][m]);
      Simd::store(buf + h * W, a);
    }
    for (int r = 0; r < RB; ++r) out[m][r] = buf[2 * r] + buf[2 * r + 1];
  }
  add_offsets(MT, sp, xs, G, out);
}
#endif

#ifdef RAPIDLM_BF16_DOT
// One block of 16 rows against MT rows of bf16 x: vdpbf16ps of (128 + q) as bf16 with the broadcast x pairs.
template <int MT, int GS, typename S>
inline void block_bf16(const uint8_t* __restrict p, const S* __restrict sp, const uint16_t* __restrict x,
                       const float* __restrict xs, int64_t K, int64_t G, int64_t gs_runtime, float out[][RB]) {
  // Accumulator sets hide vdpbf16ps latency. U is the same for every MT so that a row's sum is added in the same
  // order whatever the batch: a sequence decoded alone or in a batch gets bit-identical outputs.
  constexpr int U = RAPIDLM_INT4_U;
  constexpr int CU = U > 4 ? U / 4 : 1;  // chunks per step (chunks per group is a multiple of 4)
  const int64_t gs = GS > 0 ? GS : gs_runtime;
  const int64_t chunks = gs / CHUNK_K;
  const __m512i mask = _mm512_set1_epi16(0xF);
  const __m512i bias = _mm512_set1_epi16(0x4300);  // bf16 128.0: 0x4300 | q is 128 + q
  const __m512 m128 = _mm512_set1_ps(-128.f);
  __m512 tot[MT];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) tot[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[U][MT];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) acc[u][m] = _mm512_setzero_ps();
    const uint8_t* pg = p + g * chunks * CHUNK_BYTES;
    const uint16_t* xg = x + g * gs;
#pragma GCC unroll 4
    for (int64_t c0 = 0; c0 < chunks; c0 += CU) {
#pragma GCC unroll 2
      for (int cu = 0; cu < CU; ++cu) {
        const int64_t c = c0 + cu;
        // Software prefetch 2 KiB ahead: +10-15% at M = 8 (codes streamed from DRAM), neutral at M = 1.
        _mm_prefetch(reinterpret_cast<const char*>(pg + c * CHUNK_BYTES) + kPrefetchBytes, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(pg + c * CHUNK_BYTES);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const __m512i a = i == 0 ? v : _mm512_srli_epi16(v, 4 * i);
          const __m512bh w = (__m512bh)_mm512_ternarylogic_epi32(a, mask, bias, 0xEA);  // (a & mask) | bias
          const int u = (cu * 4 + i) % U;
#pragma GCC unroll 8
          for (int m = 0; m < MT; ++m) {
            uint32_t xp;
            std::memcpy(&xp, xg + m * K + c * CHUNK_K + 2 * i, sizeof xp);
            acc[u][m] = _mm512_dpbf16_ps(acc[u][m], w, (__m512bh)_mm512_set1_epi32(static_cast<int>(xp)));
          }
        }
      }
    }
    _mm_prefetch(reinterpret_cast<const char*>(sp + g * 2 * RB) + kPrefetchBytes / 4, _MM_HINT_T0);
    const __m512 s = load16(sp + g * 2 * RB);
    const __m512 o = _mm512_fmadd_ps(s, m128, load16(sp + g * 2 * RB + RB));  // offset - 128 scale
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      __m512 a = acc[0][m];
#pragma GCC unroll 4
      for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[u][m]);
      tot[m] = _mm512_fmadd_ps(a, s, tot[m]);
      tot[m] = _mm512_fmadd_ps(o, _mm512_set1_ps(xs[m * G + g]), tot[m]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(out[m], tot[m]);
}
#endif

// Any ISA: plain loops over the same layout.
template <typename X>
inline float to_float(X v) {
  return static_cast<float>(v);
}
template <>
inline float to_float<uint16_t>(uint16_t v) {
  return bf16_to_float(v);
}

// Code of row r, input k (0 <= k < 8) of a chunk.
inline int chunk_code(const uint8_t* pc, int r, int k) {
  const int i = k / 2, e = k % 2, w = 2 * r + e;
  const int byte = pc[2 * w + i / 2];
  return (i % 2 ? byte >> 4 : byte) & 0xF;
}

template <typename X, typename S>
void block_scalar(int mt, const uint8_t* p, const S* sp, const X* x, const float* xs, int64_t K, int64_t G,
                  int64_t gs, float out[][RB]) {
  const int64_t chunks = gs / CHUNK_K;
  for (int m = 0; m < mt; ++m)
    for (int r = 0; r < RB; ++r) {
      float tot = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        float acc = 0.f;
        for (int64_t c = g * chunks; c < (g + 1) * chunks; ++c)
          for (int k = 0; k < CHUNK_K; ++k)
            acc += static_cast<float>(chunk_code(p + c * CHUNK_BYTES, r, k)) * to_float(x[m * K + c * CHUNK_K + k]);
        tot += acc * scale_to_float(sp[g * 2 * RB + r]);
      }
      out[m][r] = tot;
    }
  add_offsets(mt, sp, xs, G, out);
}

// ---------------------------------------------------------------------------------------------------------------
// Driver: blocks of rows over threads; tiles of x's rows inside a block (a block's codes stay in L1 while every
// tile passes over them, so the weight is read from memory once whatever M is).

template <typename X, int GS, typename S>
inline void block_dispatch(int mt, const uint8_t* p, const S* sp, const X* x, const float* xs, int64_t K,
                           int64_t G, int64_t gs, float out[][RB]) {
  constexpr bool kBf16 = std::is_same_v<X, uint16_t>;
#if defined(RAPIDLM_BF16_DOT) || defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  switch (mt) {
#ifdef RAPIDLM_BF16_DOT
#define RAPIDLM_BLOCK(MT)                                                          \
  if constexpr (kBf16) block_bf16<MT, GS, S>(p, sp, x, xs, K, G, gs, out);           \
  else block_f32<MT, GS, S>(p, sp, reinterpret_cast<const float*>(x), xs, K, G, gs, out);
#else
#define RAPIDLM_BLOCK(MT)                                                                  \
  if constexpr (kBf16) block_scalar<X, S>(MT, p, sp, x, xs, K, G, gs, out);                  \
  else block_f32<MT, GS, S>(p, sp, reinterpret_cast<const float*>(x), xs, K, G, gs, out);
#endif
#define RAPIDLM_CASE(MT)          \
  case MT:                        \
    if constexpr (MT <= kMtCap) { \
      RAPIDLM_BLOCK(MT)           \
    }                             \
    return;
    RAPIDLM_CASE(1)
    RAPIDLM_CASE(2)
    RAPIDLM_CASE(3)
    RAPIDLM_CASE(4)
    RAPIDLM_CASE(5)
    RAPIDLM_CASE(6)
    RAPIDLM_CASE(7)
    RAPIDLM_CASE(8)
#undef RAPIDLM_CASE
#undef RAPIDLM_BLOCK
    default:
      break;
  }
  TORCH_CHECK(false, "rapidlm_int4: bad row tile ", mt);
#else
  block_scalar<X, S>(mt, p, sp, x, xs, K, G, gs, out);
#endif
}

// Sums of x over each group: xs[m][g] (fp32). With AVX512 (group sizes are multiples of 16), 16 lanes at a time
// and one reduction per group: the scalar loop cost ~10-20 us a call at M = 16 (run on one thread, before the
// parallel region), about a tenth of the call. The order depends on nothing but the row, so the sums, like the
// products, are the same whether a row is alone or in a batch.
template <typename X>
void group_sums(const X* x, int64_t M, int64_t K, int64_t gs, float* xs) {
  const int64_t G = K / gs;
#if defined(__AVX512F__)
  if (gs % 16 == 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        const X* xg = x + m * K + g * gs;
        __m512 s = _mm512_setzero_ps();
        for (int64_t k = 0; k < gs; k += 16) {
          if constexpr (std::is_same_v<X, uint16_t>) {
            const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + k));
            s = _mm512_add_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
          } else {
            s = _mm512_add_ps(s, _mm512_loadu_ps(reinterpret_cast<const float*>(xg + k)));
          }
        }
        xs[m * G + g] = _mm512_reduce_add_ps(s);
      }
    return;
  }
#endif
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const X* xg = x + m * K + g * gs;
      float s = 0.f;
      for (int64_t k = 0; k < gs; ++k) s += to_float(xg[k]);
      xs[m * G + g] = s;
    }
}

// y[r] = out[r] + bias[r] for one block's RB outputs, converted to out_t. bf16 outputs are rounded to nearest even
// exactly as c10::BFloat16(float) does, 16 at a time (the scalar conversion cost more than a tenth of a call at
// M = 16, N = 3072).
template <typename out_t>
inline void store_block(out_t* y, const float* out, const float* bias, int64_t rows) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (rows == RB) {
    __m512 v = _mm512_loadu_ps(out);
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
    if constexpr (std::is_same_v<out_t, float>) {
      _mm512_storeu_ps(y, v);
      return;
    } else if constexpr (std::is_same_v<out_t, c10::BFloat16>) {
      // c10::round_to_nearest_even: (bits + 0x7FFF + lsb) >> 16; NaN -> 0x7FC0
      const __m512i bits = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
      r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), _mm512_cvtepi32_epi16(r));
      return;
    }
  }
#endif
  for (int64_t r = 0; r < rows; ++r) y[r] = static_cast<out_t>(out[r] + (bias ? bias[r] : 0.f));
}

template <typename X, typename out_t, typename S>
void run_small(const X* x, const uint8_t* packed, const S* psc, const float* bias, int64_t M, int64_t N,
               int64_t K, int64_t gs, out_t* y) {
  const int64_t NB = (N + RB - 1) / RB, G = K / gs;
  constexpr bool kBf16 = std::is_same_v<X, uint16_t>;
#ifdef RAPIDLM_BF16_DOT
  const int mt_max = kBf16 ? kMtMaxBf16 : kMtMax;
#else
  const int mt_max = kMtMax;
#endif
  constexpr int64_t kStackSums = 4096;  // no heap allocation for the sums of small batches
  float xs_stack[kStackSums];
  std::vector<float> xs_heap(M * G > kStackSums ? static_cast<size_t>(M * G) : 0);
  float* xs = M * G > kStackSums ? xs_heap.data() : xs_stack;
  group_sums(x, M, K, gs, xs);
  // Give each thread at least ~48 KiB of weights (less for larger M): below that fork/join costs more than it saves.
  const int64_t block_bytes = RB * K / 2 + G * 2 * RB * static_cast<int64_t>(sizeof(S));
  const int64_t grain = std::max<int64_t>(1, (int64_t{48} << 10) / (block_bytes * std::min<int64_t>(M, 4)));
  at::parallel_for(0, NB, grain, [&](int64_t b0, int64_t b1) {
    float out[kMtCap][RB];
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* p = packed + b * RB * K / 2;
      const S* sp = psc + b * G * 2 * RB;
      const int64_t rows = std::min<int64_t>(RB, N - b * RB);
      for (int64_t m0 = 0; m0 < M; m0 += mt_max) {
        const int mt = static_cast<int>(std::min<int64_t>(mt_max, M - m0));
        const X* xm = x + m0 * K;
        const float* xsm = xs + m0 * G;
        switch (gs) {
          case 32: block_dispatch<X, 32, S>(mt, p, sp, xm, xsm, K, G, gs, out); break;
          case 64: block_dispatch<X, 64, S>(mt, p, sp, xm, xsm, K, G, gs, out); break;
          case 128: block_dispatch<X, 128, S>(mt, p, sp, xm, xsm, K, G, gs, out); break;
          default: block_dispatch<X, 0, S>(mt, p, sp, xm, xsm, K, G, gs, out); break;
        }
        for (int m = 0; m < mt; ++m) store_block(y + (m0 + m) * N + b * RB, out[m], bias ? bias + b * RB : nullptr, rows);
      }
    }
  });
  (void)kBf16;
}

// Rows [n0, n0 + rows) (n0 a multiple of RB) dequantized into w (rows x K, row-major).
#ifdef RAPIDLM_BF16_DOT
// A full block of 16 rows to bf16 rows of w (row stride K): per chunk, the 4 input pairs are widened, scaled and
// rounded (32 bf16 each, word order 2r + e), then a 4 x 16 transpose of 32-bit pairs gives each row its 8
// consecutive inputs (16 bytes). ~0.5 instructions per weight instead of ~10 for the scalar loop.
template <typename S>
inline void dequantize_block_bf16(const uint8_t* p, const S* sp, int64_t K, int64_t G, int64_t chunks,
                                  uint16_t* w) {
  const __m512i mask = _mm512_set1_epi16(0xF);
  for (int64_t g = 0; g < G; ++g) {
    __m512 sv[2], ov[2];
    Simd::dup_scales(sp + g * 2 * RB, sv);
    Simd::dup_scales(sp + g * 2 * RB + RB, ov);
    for (int64_t c = g * chunks; c < (g + 1) * chunks; ++c) {
      const __m512i v = _mm512_loadu_si512(p + c * CHUNK_BYTES);
      __m512i B[4];
      for (int i = 0; i < 4; ++i) {
        const __m512i a = _mm512_and_si512(_mm512_srli_epi16(v, 4 * i), mask);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(a)));     // rows 0-7
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(a, 1)));  // 8-15
        B[i] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(hi, sv[1], ov[1]), _mm512_fmadd_ps(lo, sv[0], ov[0]));
      }
      // dword r of B[i] = row r, inputs 8c + 2i, 8c + 2i + 1
      const __m512i a_lo = _mm512_unpacklo_epi32(B[0], B[1]), a_hi = _mm512_unpackhi_epi32(B[0], B[1]);
      const __m512i c_lo = _mm512_unpacklo_epi32(B[2], B[3]), c_hi = _mm512_unpackhi_epi32(B[2], B[3]);
      const __m512i R[4] = {_mm512_unpacklo_epi64(a_lo, c_lo), _mm512_unpackhi_epi64(a_lo, c_lo),
                            _mm512_unpacklo_epi64(a_hi, c_hi), _mm512_unpackhi_epi64(a_hi, c_hi)};
      // 128-bit lane L of R[j] = row 4L + j
      uint16_t* wc = w + c * CHUNK_K;
      for (int j = 0; j < 4; ++j) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(wc + (0 + j) * K), _mm512_extracti32x4_epi32(R[j], 0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(wc + (4 + j) * K), _mm512_extracti32x4_epi32(R[j], 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(wc + (8 + j) * K), _mm512_extracti32x4_epi32(R[j], 2));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(wc + (12 + j) * K), _mm512_extracti32x4_epi32(R[j], 3));
      }
    }
  }
}
#endif

template <typename w_t, typename S>
void dequantize_into(const uint8_t* packed, const S* psc, int64_t n0, int64_t rows, int64_t K, int64_t gs,
                     w_t* w) {
  const int64_t G = K / gs, chunks = gs / CHUNK_K;
  const int64_t nb0 = n0 / RB, nb1 = (n0 + rows + RB - 1) / RB;
  at::parallel_for(nb0, nb1, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* p = packed + b * RB * K / 2;
      const S* sp = psc + b * G * 2 * RB;
      const int64_t nr = std::min<int64_t>(RB, n0 + rows - b * RB);
#ifdef RAPIDLM_BF16_DOT
      if (std::is_same_v<w_t, c10::BFloat16> && nr == RB) {
        dequantize_block_bf16(p, sp, K, G, chunks, reinterpret_cast<uint16_t*>(w) + (b * RB - n0) * K);
        continue;
      }
#endif
      for (int64_t r = 0; r < nr; ++r) {
        w_t* wr = w + (b * RB + r - n0) * K;
        for (int64_t g = 0; g < G; ++g) {
          const float s = scale_to_float(sp[g * 2 * RB + r]), o = scale_to_float(sp[g * 2 * RB + RB + r]);
          for (int64_t c = g * chunks; c < (g + 1) * chunks; ++c) {
            // Row r's 8 codes of chunk c are words 2r (even inputs) and 2r+1 (odd): one 32-bit load.
            uint32_t u;
            std::memcpy(&u, p + c * CHUNK_BYTES + 4 * r, sizeof u);
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
            const uint8_t* pb = p + c * CHUNK_BYTES + 4 * r;
            u = pb[0] | pb[1] << 8 | pb[2] << 16 | static_cast<uint32_t>(pb[3]) << 24;
#endif
            w_t* wc = wr + c * CHUNK_K;
            for (int k = 0; k < CHUNK_K; ++k) {
              const int q = (u >> (16 * (k % 2) + 4 * (k / 2))) & 0xF;
              wc[k] = static_cast<w_t>(s * static_cast<float>(q) + o);
            }
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Ops

std::tuple<int64_t, int64_t> check_packed(const at::Tensor& packed, const at::Tensor& psc, int64_t N,
                                          int64_t group_size) {
  TORCH_CHECK(packed.device().is_cpu() && psc.device().is_cpu(), "rapidlm_int4: CPU tensors only");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(2) == CHUNK_BYTES &&
                  packed.is_contiguous(),
              "rapidlm_int4: packed must be a contiguous (N/16, K/8, 64) uint8 tensor, got ", packed.sizes());
  const int64_t NB = packed.size(0), K = packed.size(1) * CHUNK_K;
  TORCH_CHECK(N > (NB - 1) * RB && N <= NB * RB, "rapidlm_int4: out_features ", N, " does not match ", NB,
              " blocks of ", RB, " rows");
  TORCH_CHECK(group_size > 0 && group_size % CHUNK_K == 0 && K % group_size == 0, "rapidlm_int4: group_size ",
              group_size, " must be a multiple of 8 and divide K = ", K);
  TORCH_CHECK((psc.scalar_type() == at::kFloat || psc.scalar_type() == at::kHalf) && psc.is_contiguous() && psc.dim() == 4 && psc.size(0) == NB &&
                  psc.size(1) == K / group_size && psc.size(2) == 2 && psc.size(3) == RB,
              "rapidlm_int4: scales_zeros must be a contiguous (N/16, K/group_size, 2, 16) fp32 or fp16 tensor, got ",
              psc.sizes());
  return {NB, K};
}

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu(), "rapidlm_int4: x must be on the CPU");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "rapidlm_int4: x's last dimension must be ", K, ", got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "rapidlm_int4: x must be fp32 or bf16, got ", x.scalar_type());
}

// bf16 batches above this many rows dequantize + at::linear (oneDNN): measured with benchmarks/int4_kernel.py
// (2 Zen4 threads) the kernel is 10-50% faster up to M = 64, about equal at 128, and 10-30% slower from 256
// (3072x576 at M = 2048: 33 vs 24 ms; oneDNN's GEMM reuses each loaded x across many rows, the kernel does not).
constexpr int64_t kKernelMaxMBf16 = 128;

template <typename S>
void small_m_into(const at::Tensor& x2, const uint8_t* p, const S* s, int64_t N, int64_t gs, const float* bias,
                  at::Tensor& y) {
  const int64_t M = x2.size(0), K = x2.size(1);
  if (x2.scalar_type() == at::kBFloat16) {
    auto* yp = y.data_ptr<c10::BFloat16>();
#if defined(RAPIDLM_BF16_DOT) || !(defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)))
    const at::Tensor xc = x2.contiguous();
    run_small(reinterpret_cast<const uint16_t*>(xc.data_ptr<c10::BFloat16>()), p, s, bias, M, N, K, gs, yp);
#else
    const at::Tensor xf = x2.to(at::kFloat).contiguous();  // widened once; the fp32 FMA path
    run_small(xf.data_ptr<float>(), p, s, bias, M, N, K, gs, yp);
#endif
    return;
  }
  const at::Tensor xf = x2.contiguous();
  run_small(xf.data_ptr<float>(), p, s, bias, M, N, K, gs, y.data_ptr<float>());
}

at::Tensor small_m(const at::Tensor& x2, const at::Tensor& packed, const at::Tensor& psc, int64_t N, int64_t gs,
                   const float* bias) {
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, N}, x2.options());
  if (M == 0 || N == 0) return y;
  const uint8_t* p = packed.data_ptr<uint8_t>();
  if (psc.scalar_type() == at::kHalf)
    small_m_into(x2, p, psc.data_ptr<c10::Half>(), N, gs, bias, y);
  else
    small_m_into(x2, p, psc.data_ptr<float>(), N, gs, bias, y);
  return y;
}

// Rows [n0, n0 + rows) dequantized into w, whatever the scale dtype.
template <typename w_t>
void dequantize_rows(const at::Tensor& packed, const at::Tensor& psc, int64_t n0, int64_t rows, int64_t K,
                     int64_t gs, w_t* w) {
  if (psc.scalar_type() == at::kHalf)
    dequantize_into(packed.data_ptr<uint8_t>(), psc.data_ptr<c10::Half>(), n0, rows, K, gs, w);
  else
    dequantize_into(packed.data_ptr<uint8_t>(), psc.data_ptr<float>(), n0, rows, K, gs, w);
}

at::Tensor dequantize(const at::Tensor& packed, const at::Tensor& psc, int64_t N, int64_t group_size,
                      at::ScalarType dtype) {
  const auto [NB, K] = check_packed(packed, psc, N, group_size);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "rapidlm_int4::dequantize: fp32 or bf16 only");
  at::Tensor w = at::empty({N, K}, packed.options().dtype(dtype));
  if (N == 0) return w;
  if (dtype == at::kFloat)
    dequantize_rows(packed, psc, 0, N, K, group_size, w.data_ptr<float>());
  else
    dequantize_rows(packed, psc, 0, N, K, group_size, w.data_ptr<c10::BFloat16>());
  return w;
}

// Large M: dequantize a few MiB of rows at a time into one reused buffer (in x's dtype) and at::linear them.
at::Tensor dequantize_matmul(const at::Tensor& x2, const at::Tensor& packed, const at::Tensor& psc, int64_t N,
                             int64_t gs) {
  const int64_t M = x2.size(0), K = x2.size(1);
  const int64_t chunk = std::max<int64_t>(RB, (int64_t{4} << 20) / (K * x2.element_size()) / RB * RB);
  at::Tensor y = at::empty({M, N}, x2.options());
  if (M == 0 || N == 0) return y;
  at::Tensor wbuf = at::empty({std::min(chunk, N), K}, x2.options());
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t rows = std::min(chunk, N - n0);
    at::Tensor wc = wbuf.narrow(0, 0, rows);
    if (x2.scalar_type() == at::kFloat)
      dequantize_rows(packed, psc, n0, rows, K, gs, wc.data_ptr<float>());
    else
      dequantize_rows(packed, psc, n0, rows, K, gs, wc.data_ptr<c10::BFloat16>());
    if (rows == N) return at::linear(x2, wc);
    y.narrow(1, n0, rows).copy_(at::linear(x2, wc));
  }
  return y;
}

const float* bias_pointer(const c10::optional<at::Tensor>& bias, int64_t N, at::Tensor& holder) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->numel() == N, "rapidlm_int4::gemm: bias must have ", N, " elements");
  holder = bias->to(at::kFloat).contiguous();
  return holder.data_ptr<float>();
}

at::Tensor gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& psc, int64_t N, int64_t group_size,
                const c10::optional<at::Tensor>& bias) {
  const auto [NB, K] = check_packed(packed, psc, N, group_size);
  check_x(x, K);
  at::Tensor bias_f;
  const float* bias_ptr = bias_pointer(bias, N, bias_f);
  const int64_t M = x.numel() / K;
  const bool flat = x.dim() == 2;
  const at::Tensor x2 = flat ? x : x.reshape({M, K});
  at::Tensor y;
  if (x.scalar_type() == at::kBFloat16 && M > kKernelMaxMBf16) {
    y = dequantize_matmul(x2, packed, psc, N, group_size);
    if (bias_ptr) y.add_(bias_f);
  } else {
    y = small_m(x2, packed, psc, N, group_size, bias_ptr);
  }
  if (flat) return y;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  return y.view(out_shape);
}

// The kernel at any M (never the dequantize path): for tests and for measuring the crossover.
at::Tensor gemm_small(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& psc, int64_t N,
                      int64_t group_size, const c10::optional<at::Tensor>& bias) {
  const auto [NB, K] = check_packed(packed, psc, N, group_size);
  check_x(x, K);
  TORCH_CHECK(x.dim() == 2, "rapidlm_int4::gemm_small: x must be (M, K)");
  at::Tensor bias_f;
  const float* bias_ptr = bias_pointer(bias, N, bias_f);
  return small_m(x, packed, psc, N, group_size, bias_ptr);
}

// The large-M path at any M: for tests and for measuring the crossover.
at::Tensor dequantize_matmul_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& psc, int64_t N,
                                int64_t group_size) {
  const auto [NB, K] = check_packed(packed, psc, N, group_size);
  check_x(x, K);
  TORCH_CHECK(x.dim() == 2, "rapidlm_int4::dequantize_matmul: x must be (M, K)");
  return dequantize_matmul(x, packed, psc, N, group_size);
}

int64_t kernel_max_m_bf16() { return kKernelMaxMBf16; }

std::string simd_name() {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  std::string s = Simd::name;
#else
  std::string s = "scalar";
#endif
#ifdef RAPIDLM_BF16_DOT
  s += "+bf16dot";
#endif
  return s;
}

}  // namespace

TORCH_LIBRARY(rapidlm_int4, m) {
  m.def("gemm(Tensor x, Tensor packed, Tensor scales_zeros, int out_features, int group_size, Tensor? bias) -> Tensor");
  m.def(
      "gemm_small(Tensor x, Tensor packed, Tensor scales_zeros, int out_features, int group_size, Tensor? bias) -> "
      "Tensor");
  m.def(
      "dequantize_matmul(Tensor x, Tensor packed, Tensor scales_zeros, int out_features, int group_size) -> Tensor");
  m.def("dequantize(Tensor packed, Tensor scales_zeros, int out_features, int group_size, ScalarType dtype) -> Tensor");
  m.def("simd() -> str", &simd_name);
  m.def("kernel_max_m_bf16() -> int", &kernel_max_m_bf16);
}

TORCH_LIBRARY_IMPL(rapidlm_int4, CPU, m) {
  m.impl("gemm", &gemm);
  m.impl("gemm_small", &gemm_small);
  m.impl("dequantize", &dequantize);
  m.impl("dequantize_matmul", &dequantize_matmul_op);
}

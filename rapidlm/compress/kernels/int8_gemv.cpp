// int8 weight-only matmul for the CPU: y = x @ (q * scale)^T (+ bias), accumulated in fp32.
//
// Weights: int8 codes q (N, K), the full range -128..127, and fp32 scales (N, K / group_size): one per output
// row (group_size == K) or per group of inputs along K (llama.cpp's Q8_0: group_size == 32). x is (M, K) fp32 or
// bf16; y is (M, N) in x's dtype. Built by int8_cpu.py with -O3 -march=native (and -fopenmp when ATen's
// backend is OpenMP, so at::parallel_for runs on torch's own OpenMP runtime and honours torch.set_num_threads).
//
// Packed layout (made once by int8_cpu.pack_int8): blocks of 16 output rows (N padded with zero rows), and in a
// block the codes of each pair of inputs (2j, 2j+1) for its 16 rows lie together:
//     packed[b][j][r][p] = q[16 b + r][2 j + p]            (N/16, K/2, 16, 2) int8
//     packed_scale[b][g][r] = scale[16 b + r][g]            (N/16, G, 16) fp32
// so a block is one sequential 16*K-byte stream, and one 32-byte load feeds 16 rows x 2 inputs of an
// outer-product update: the x values are broadcast, never re-loaded per row, and each widened weight vector is
// multiplied into every row of x (up to kMtMax per pass) while it is in a register.
//   * bf16 x on AVX512-BF16: codes -> bf16 (exact, |q| <= 128) and vdpbf16ps with the broadcast x pair: exact
//     products accumulated in fp32 (per group), then times the 16 rows' group scales (one vector) into totals.
//   * fp32 x (and bf16 x elsewhere, widened once): codes -> fp32, times the group scale of each lane's row, and
//     FMAs with the broadcast pair (x[2j], x[2j+1]); the two halves of each lane pair are added at the end.
// Decode (M = 1) reads each weight byte once, as fast as memory streams. When several tiles of x's rows pass over
// a block (M > kMtMax, bf16), the block is widened to bf16 once into an L1 buffer. For large bf16 batches
// (M > kKernelMaxMBf16, prefill) `gemm` dequantizes a few MiB of rows at a time and calls at::linear (oneDNN).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
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

namespace {

constexpr int RB = 16;  // output rows per packed block

// ---------------------------------------------------------------------------------------------------------------
// fp32 vectors of the widest kind the compiler targets (W lanes = W/2 rows x 2 inputs of a block).

#if defined(__AVX512F__)
struct Simd {
  static constexpr int W = 16;
  static constexpr const char* name = "avx512";
  using V = __m512;
  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V load_q(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static inline V load(const float* p) { return _mm512_loadu_ps(p); }
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
  static inline void dup_scales(const float* s, V out[2 * RB / W]) {
    const __m512 v = _mm512_loadu_ps(s);
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
  static inline V load_q(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline V bcast_pair(const float* p) {
    double d;
    std::memcpy(&d, p, sizeof d);
    return _mm256_castpd_ps(_mm256_set1_pd(d));
  }
  static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
  static inline void dup_scales(const float* s, V out[2 * RB / W]) {
    const __m256i idx = _mm256_set_epi32(3, 3, 2, 2, 1, 1, 0, 0);
    for (int h = 0; h < 4; ++h)
      out[h] = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s + 4 * h)), idx);
  }
};
#endif

// Rows of x per pass over a block (the accumulators must fit the vector registers).
#ifdef __AVX512F__
constexpr int kMtMax = 8;  // 32 zmm: fp32 path 2 * MT accumulators, bf16 path 2 * MT (+ 2 more at MT <= 3)
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kMtMax = 2;  // 16 ymm: 4 * MT accumulators + 4 weights + 4 scales
#else
constexpr int kMtMax = 4;
#endif

// ---------------------------------------------------------------------------------------------------------------
// One block of 16 rows against MT rows of x: out[m][r] = sum_k x[m][k] * q[r][k] * scale[r][k / gs].
// p: the block's codes, sp: its scales (G x 16), x: MT rows with stride K. GS: 32 or 0 (runtime gs) for
// per-group scales, -1 for one scale per row (G == 1, applied once at the end).

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
template <int MT, int GS>
inline void block_f32(const int8_t* __restrict p, const float* __restrict sp, const float* __restrict x, int64_t K,
                      int64_t G, int64_t gs_runtime, float out[][RB]) {
  using V = Simd::V;
  constexpr int W = Simd::W;
  constexpr int H = 2 * RB / W;  // vectors per input pair
  // Per-group scales: either each weight vector is multiplied by its lanes' scales before the MT FMAs
  // (PRESCALE: fewest registers, best from MT = 3), or partial sums per group are scaled into totals (fewer
  // instructions per weight: M = 1 on the 49152x576 head measured 1.27 -> ~1.0 ms with this).
  constexpr bool PRESCALE = GS >= 0 && (MT > 2 || H > 2);
  constexpr bool TOTALS = GS >= 0 && !PRESCALE;
  constexpr int U = MT == 1 ? (H == 2 ? 4 : 2) : (MT == 2 && H == 2 ? 2 : 1);  // accumulator sets (FMA latency)
  const int64_t gs = GS > 0 ? GS : (GS < 0 ? K : gs_runtime);
  const int64_t pairs = gs / 2;
  V acc[U][H][MT];
  V tot[TOTALS ? H : 1][TOTALS ? MT : 1];
  auto zero_acc = [&]() __attribute__((always_inline)) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 4
      for (int h = 0; h < H; ++h)
#pragma GCC unroll 8
        for (int m = 0; m < MT; ++m) acc[u][h][m] = Simd::zero();
  };
  zero_acc();
  if constexpr (TOTALS) {
#pragma GCC unroll 4
    for (int h = 0; h < H; ++h)
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) tot[h][m] = Simd::zero();
  }
  V sv[H];
  for (int64_t g = 0; g < G; ++g) {
    if constexpr (GS >= 0) Simd::dup_scales(sp + g * RB, sv);
    const int64_t j0 = g * pairs, j1 = j0 + pairs;
    auto step = [&](int64_t j, V(&a)[H][MT]) __attribute__((always_inline)) {
      V w[H];
#pragma GCC unroll 4
      for (int h = 0; h < H; ++h) {
        w[h] = Simd::load_q(p + j * 2 * RB + h * W);
        if constexpr (PRESCALE) w[h] = Simd::mul(w[h], sv[h]);
      }
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
        const V xv = Simd::bcast_pair(x + m * K + 2 * j);
#pragma GCC unroll 4
        for (int h = 0; h < H; ++h) a[h][m] = Simd::fma(w[h], xv, a[h][m]);
      }
    };
    int64_t j = j0;
    for (; j + U <= j1; j += U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) step(j + u, acc[u]);
    }
    for (; j < j1; ++j) step(j, acc[0]);
    if constexpr (TOTALS) {
#pragma GCC unroll 4
      for (int h = 0; h < H; ++h)
#pragma GCC unroll 8
        for (int m = 0; m < MT; ++m) {
          V a = acc[0][h][m];
#pragma GCC unroll 4
          for (int u = 1; u < U; ++u) a = Simd::add(a, acc[u][h][m]);
          tot[h][m] = Simd::fma(a, sv[h], tot[h][m]);
        }
      zero_acc();
    }
  }
  alignas(64) float buf[2 * RB];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) {
#pragma GCC unroll 4
    for (int h = 0; h < H; ++h) {
      V a;
      if constexpr (TOTALS) {
        a = tot[h][m];
      } else {
        a = acc[0][h][m];
#pragma GCC unroll 4
        for (int u = 1; u < U; ++u) a = Simd::add(a, acc[u][h][m]);
      }
      Simd::store(buf + h * W, a);
    }
    for (int r = 0; r < RB; ++r) {
      const float v = buf[2 * r] + buf[2 * r + 1];
      out[m][r] = GS < 0 ? v * sp[r] : v;
    }
  }
}
#endif

#ifdef RAPIDLM_BF16_DOT
inline __m512bh codes_to_bf16(const int8_t* p) {  // 32 codes -> 32 bf16, exact (|q| <= 128)
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
  return _mm512_cvtne2ps_pbh(hi, lo);  // element i from code i
}

// A block's codes widened to bf16 once (RB * K values, same order), when several tiles of x's rows will pass
// over it: saves re-widening per tile (~25% of the instructions at M = 64).
inline void block_to_bf16(const int8_t* p, int64_t K, uint16_t* wb) {
  for (int64_t j = 0; j < K / 2; ++j) _mm512_storeu_si512(wb + j * 2 * RB, (__m512i)codes_to_bf16(p + j * 2 * RB));
}

// PRE: p points at block_to_bf16's output instead of the int8 codes.
template <int MT, int GS, bool PRE>
inline void block_bf16(const int8_t* __restrict p, const float* __restrict sp, const uint16_t* __restrict x,
                       int64_t K, int64_t G, int64_t gs_runtime, float out[][RB]) {
  // Accumulator sets hide vdpbf16ps latency. U is the same for every MT so that a row's sum is added in the same
  // order whatever the batch: a sequence decoded alone or in a batch gets bit-identical logits.
  constexpr int U = 2;
  const int64_t gs = GS > 0 ? GS : (GS < 0 ? K : gs_runtime);
  const int64_t pairs = gs / 2;
  __m512 tot[MT];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) tot[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[U][MT];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) acc[u][m] = _mm512_setzero_ps();
    const int64_t j0 = g * pairs, j1 = j0 + pairs;
    auto step = [&](int64_t j, __m512(&a)[MT]) __attribute__((always_inline)) {
      // bf16 element i = code i: lane r holds row r's pair (2j, 2j+1)
      const __m512bh w = PRE ? (__m512bh)_mm512_loadu_si512(reinterpret_cast<const uint16_t*>(p) + j * 2 * RB)
                             : codes_to_bf16(p + j * 2 * RB);
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
        uint32_t xp;
        std::memcpy(&xp, x + m * K + 2 * j, sizeof xp);
        a[m] = _mm512_dpbf16_ps(a[m], w, (__m512bh)_mm512_set1_epi32(static_cast<int>(xp)));
      }
    };
    int64_t j = j0;
    for (; j + U <= j1; j += U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) step(j + u, acc[u]);
    }
    for (; j < j1; ++j) step(j, acc[0]);
    const __m512 s = GS < 0 ? _mm512_set1_ps(1.f) : _mm512_loadu_ps(sp + g * RB);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      __m512 a = acc[0][m];
#pragma GCC unroll 4
      for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[u][m]);
      tot[m] = GS < 0 ? _mm512_add_ps(tot[m], a) : _mm512_fmadd_ps(a, s, tot[m]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) {
    const __m512 v = GS < 0 ? _mm512_mul_ps(tot[m], _mm512_loadu_ps(sp)) : tot[m];
    _mm512_storeu_ps(out[m], v);
  }
}
#endif

// Any ISA: plain loops over the same layout (used where neither AVX2+FMA nor AVX512 is targeted).
template <typename X>
inline float to_float(X v) {
  return static_cast<float>(v);
}
template <>
inline float to_float<uint16_t>(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename X>
void block_scalar(int mt, const int8_t* p, const float* sp, const X* x, int64_t K, int64_t G, int64_t gs,
                  float out[][RB]) {
  const int64_t pairs = gs / 2;
  for (int m = 0; m < mt; ++m)
    for (int r = 0; r < RB; ++r) {
      float tot = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        float acc = 0.f;
        for (int64_t j = g * pairs; j < (g + 1) * pairs; ++j)
          for (int e = 0; e < 2; ++e)
            acc += static_cast<float>(p[(j * RB + r) * 2 + e]) * to_float(x[m * K + 2 * j + e]);
        tot += acc * sp[g * RB + r];
      }
      out[m][r] = tot;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Driver: blocks of rows over threads; tiles of x's rows inside a block (the block's codes stay in L1/L2 while
// every tile passes over them, so the weight is read from memory once whatever M is).

template <typename X, int GS, bool PRE = false>
inline void block_dispatch(int mt, const int8_t* p, const float* sp, const X* x, int64_t K, int64_t G, int64_t gs,
                           float out[][RB]) {
  [[maybe_unused]] constexpr bool kBf16 = std::is_same_v<X, uint16_t>;
#if defined(RAPIDLM_BF16_DOT) || defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  switch (mt) {
#ifdef RAPIDLM_BF16_DOT
#define RAPIDLM_BLOCK(MT)                                                          \
  if constexpr (kBf16) block_bf16<MT, GS, PRE>(p, sp, x, K, G, gs, out);          \
  else block_f32<MT, GS>(p, sp, reinterpret_cast<const float*>(x), K, G, gs, out);
#else
#define RAPIDLM_BLOCK(MT)                                                                        \
  if constexpr (kBf16) block_scalar<X>(MT, p, sp, x, K, G, gs, out);                            \
  else block_f32<MT, GS>(p, sp, reinterpret_cast<const float*>(x), K, G, gs, out);
#endif
#define RAPIDLM_CASE(MT)                   \
  case MT:                                 \
    if constexpr (MT <= kMtMax) {          \
      RAPIDLM_BLOCK(MT)                    \
    }                                      \
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
  TORCH_CHECK(false, "rapidlm_int8: bad row tile ", mt);
#else
  block_scalar<X>(mt, p, sp, x, K, G, gs, out);
#endif
}

template <typename X, typename out_t>
void run_small(const X* x, const int8_t* packed, const float* psc, const float* bias, int64_t M, int64_t N,
               int64_t K, int64_t gs, out_t* y) {
  const int64_t NB = (N + RB - 1) / RB, G = K / gs;
  // Give each thread at least ~64 KiB of codes (less for larger M): below that fork/join costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (RB * K * std::min<int64_t>(M, 4)));
#ifdef RAPIDLM_BF16_DOT
  constexpr bool kCanPre = std::is_same_v<X, uint16_t>;
#else
  constexpr bool kCanPre = false;
#endif
  const bool pre = kCanPre && M > kMtMax;
  at::parallel_for(0, NB, grain, [&](int64_t b0, int64_t b1) {
    float out[kMtMax][RB];
    std::vector<uint16_t> wbuf(pre ? RB * K : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* p = packed + b * RB * K;
      const float* sp = psc + b * G * RB;
      const int64_t rows = std::min<int64_t>(RB, N - b * RB);
#ifdef RAPIDLM_BF16_DOT
      if (pre) {
        block_to_bf16(p, K, wbuf.data());
        p = reinterpret_cast<const int8_t*>(wbuf.data());
      }
#endif
      for (int64_t m0 = 0; m0 < M; m0 += kMtMax) {
        const int mt = static_cast<int>(std::min<int64_t>(kMtMax, M - m0));
        const X* xm = x + m0 * K;
        if (pre) {
          if constexpr (kCanPre) {
            if (gs == 32)
              block_dispatch<X, 32, true>(mt, p, sp, xm, K, G, gs, out);
            else if (G == 1)
              block_dispatch<X, -1, true>(mt, p, sp, xm, K, G, gs, out);
            else
              block_dispatch<X, 0, true>(mt, p, sp, xm, K, G, gs, out);
          }
        } else if (gs == 32)
          block_dispatch<X, 32>(mt, p, sp, xm, K, G, gs, out);
        else if (G == 1)
          block_dispatch<X, -1>(mt, p, sp, xm, K, G, gs, out);
        else
          block_dispatch<X, 0>(mt, p, sp, xm, K, G, gs, out);
        for (int m = 0; m < mt; ++m) {
          out_t* yr = y + (m0 + m) * N + b * RB;
          for (int64_t r = 0; r < rows; ++r)
            yr[r] = static_cast<out_t>(out[m][r] + (bias ? bias[b * RB + r] : 0.f));
        }
      }
    }
  });
}

template <typename w_t>
void dequantize_into(const int8_t* packed, const float* psc, int64_t N, int64_t K, int64_t gs, w_t* w) {
  const int64_t NB = (N + RB - 1) / RB, G = K / gs, pairs = gs / 2;
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) float buf[2 * RB];  // one input pair of the block's 16 rows, dequantized: buf[2 r + e]
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* p = packed + b * RB * K;
      const float* sp = psc + b * G * RB;
      const int64_t rows = std::min<int64_t>(RB, N - b * RB);
      w_t* wb = w + b * RB * K;
      for (int64_t g = 0; g < G; ++g) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
        Simd::V sv[2 * RB / Simd::W];
        Simd::dup_scales(sp + g * RB, sv);
#endif
        for (int64_t j = g * pairs; j < (g + 1) * pairs; ++j) {
          const int8_t* pj = p + j * 2 * RB;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
          for (int h = 0; h < 2 * RB / Simd::W; ++h)
            Simd::store(buf + h * Simd::W, Simd::mul(Simd::load_q(pj + h * Simd::W), sv[h]));
#else
          for (int i = 0; i < 2 * RB; ++i) buf[i] = static_cast<float>(pj[i]) * sp[g * RB + i / 2];
#endif
          for (int64_t r = 0; r < rows; ++r) {
            wb[r * K + 2 * j] = static_cast<w_t>(buf[2 * r]);
            wb[r * K + 2 * j + 1] = static_cast<w_t>(buf[2 * r + 1]);
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
  TORCH_CHECK(packed.device().is_cpu() && psc.device().is_cpu(), "rapidlm_int8: CPU tensors only");
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 && packed.size(2) == RB &&
                  packed.size(3) == 2 && packed.is_contiguous(),
              "rapidlm_int8: packed must be a contiguous (N/16, K/2, 16, 2) int8 tensor, got ", packed.sizes());
  const int64_t NB = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(N > (NB - 1) * RB && N <= NB * RB, "rapidlm_int8: out_features ", N, " does not match ", NB,
              " blocks of ", RB, " rows");
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && K % group_size == 0, "rapidlm_int8: group_size ",
              group_size, " must be even and divide K = ", K);
  TORCH_CHECK(psc.scalar_type() == at::kFloat && psc.is_contiguous() && psc.dim() == 3 && psc.size(0) == NB &&
                  psc.size(1) == K / group_size && psc.size(2) == RB,
              "rapidlm_int8: packed_scale must be a contiguous (N/16, K/group_size, 16) fp32 tensor, got ",
              psc.sizes());
  return {NB, K};
}

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu(), "rapidlm_int8: x must be on the CPU");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "rapidlm_int8: x's last dimension must be ", K, ", got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "rapidlm_int8: x must be fp32 or bf16, got ", x.scalar_type());
}

// bf16 batches above this many rows dequantize + at::linear (oneDNN). Measured on 49152x576, 3072x576, 576x1536
// and 576x576 (2 Zen4 threads): the kernel is ahead up to M ~ 256, they are about equal at 512, and dequantize +
// oneDNN is 0-10% faster from 1024. fp32 batches always run the kernel: MKL's fp32 GEMM on the dequantized
// weight was never faster (M <= 1024).
constexpr int64_t kKernelMaxMBf16 = 512;

at::Tensor small_m(const at::Tensor& x2, const at::Tensor& packed, const at::Tensor& psc, int64_t N, int64_t gs,
                   const float* bias) {
  const int64_t M = x2.size(0), K = x2.size(1);
  at::Tensor y = at::empty({M, N}, x2.options());
  if (M == 0 || N == 0) return y;
  const int8_t* p = packed.data_ptr<int8_t>();
  const float* s = psc.data_ptr<float>();
  if (x2.scalar_type() == at::kBFloat16) {
    auto* yp = y.data_ptr<c10::BFloat16>();
#ifdef RAPIDLM_BF16_DOT
    // Every M takes the bf16 dot-product path (M = 1 too, where it is bound by the weight bytes either way): one
    // arithmetic for all batch sizes, so a row's output does not depend on which other rows share its batch.
    {
      const at::Tensor xc = x2.contiguous();
      run_small(reinterpret_cast<const uint16_t*>(xc.data_ptr<c10::BFloat16>()), p, s, bias, M, N, K, gs, yp);
      return y;
    }
#endif
    const at::Tensor xf = x2.to(at::kFloat).contiguous();
    run_small(xf.data_ptr<float>(), p, s, bias, M, N, K, gs, yp);
    return y;
  }
  const at::Tensor xf = x2.contiguous();
  run_small(xf.data_ptr<float>(), p, s, bias, M, N, K, gs, y.data_ptr<float>());
  return y;
}

at::Tensor dequantize(const at::Tensor& packed, const at::Tensor& psc, int64_t N, int64_t group_size,
                      at::ScalarType dtype) {
  const auto [NB, K] = check_packed(packed, psc, N, group_size);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "rapidlm_int8::dequantize: fp32 or bf16 only");
  at::Tensor w = at::empty({N, K}, packed.options().dtype(dtype));
  if (dtype == at::kFloat)
    dequantize_into(packed.data_ptr<int8_t>(), psc.data_ptr<float>(), N, K, group_size, w.data_ptr<float>());
  else
    dequantize_into(packed.data_ptr<int8_t>(), psc.data_ptr<float>(), N, K, group_size,
                    w.data_ptr<c10::BFloat16>());
  return w;
}

// Large M: dequantize a few MiB of rows at a time into one reused buffer (in x's dtype) and at::linear them.
// Chunks, not the whole matrix: a 56 MiB bf16 head would be a fresh mmap on every call, and its page faults
// alone cost ~20 ms here; a chunk stays in the cache between being written and being read.
at::Tensor dequantize_matmul(const at::Tensor& x2, const at::Tensor& packed, const at::Tensor& psc, int64_t N,
                             int64_t gs) {
  const int64_t M = x2.size(0), K = x2.size(1), G = K / gs;
  const int64_t chunk = std::max<int64_t>(RB, (int64_t{4} << 20) / (K * x2.element_size()) / RB * RB);
  at::Tensor y = at::empty({M, N}, x2.options());
  at::Tensor wbuf = at::empty({std::min(chunk, N), K}, x2.options());
  const int8_t* p = packed.data_ptr<int8_t>();
  const float* s = psc.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t rows = std::min(chunk, N - n0);
    at::Tensor wc = wbuf.narrow(0, 0, rows);
    const int8_t* pc = p + n0 * K;  // n0 is a multiple of RB: block n0 / RB
    const float* sc = s + n0 / RB * G * RB;
    if (x2.scalar_type() == at::kFloat)
      dequantize_into(pc, sc, rows, K, gs, wc.data_ptr<float>());
    else
      dequantize_into(pc, sc, rows, K, gs, wc.data_ptr<c10::BFloat16>());
    if (rows == N) return at::linear(x2, wc);
    y.narrow(1, n0, rows).copy_(at::linear(x2, wc));
  }
  return y;
}

at::Tensor gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& psc, int64_t N, int64_t group_size,
                const c10::optional<at::Tensor>& bias) {
  const auto [NB, K] = check_packed(packed, psc, N, group_size);
  check_x(x, K);
  const float* bias_ptr = nullptr;
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "rapidlm_int8::gemm: bias must have ", N, " elements");
    bias_f = bias->to(at::kFloat).contiguous();
    bias_ptr = bias_f.data_ptr<float>();
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const int64_t M = x.numel() / K;
  const at::Tensor x2 = x.reshape({M, K});
  if (x.scalar_type() == at::kBFloat16 && M > kKernelMaxMBf16) {
    at::Tensor y = dequantize_matmul(x2, packed, psc, N, group_size);
    if (bias_ptr) y.add_(bias_f);
    return y.view(out_shape);
  }
  return small_m(x2, packed, psc, N, group_size, bias_ptr).view(out_shape);
}

// The kernel at any M (never the dequantize path): for tests and for measuring the crossover.
at::Tensor gemm_small(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& psc, int64_t N,
                      int64_t group_size) {
  const auto [NB, K] = check_packed(packed, psc, N, group_size);
  check_x(x, K);
  TORCH_CHECK(x.dim() == 2, "rapidlm_int8::gemm_small: x must be (M, K)");
  return small_m(x, packed, psc, N, group_size, nullptr);
}

// The large-M path at any M: for measuring the crossover.
at::Tensor dequantize_matmul_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& psc, int64_t N,
                                int64_t group_size) {
  const auto [NB, K] = check_packed(packed, psc, N, group_size);
  check_x(x, K);
  TORCH_CHECK(x.dim() == 2, "rapidlm_int8::dequantize_matmul: x must be (M, K)");
  return dequantize_matmul(x, packed, psc, N, group_size);
}

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

TORCH_LIBRARY(rapidlm_int8, m) {
  m.def("gemm(Tensor x, Tensor packed, Tensor packed_scale, int out_features, int group_size, Tensor? bias) -> Tensor");
  m.def("gemm_small(Tensor x, Tensor packed, Tensor packed_scale, int out_features, int group_size) -> Tensor");
  m.def("dequantize_matmul(Tensor x, Tensor packed, Tensor packed_scale, int out_features, int group_size) -> Tensor");
  m.def("dequantize(Tensor packed, Tensor packed_scale, int out_features, int group_size, ScalarType dtype) -> Tensor");
  m.def("simd() -> str", &simd_name);
}

TORCH_LIBRARY_IMPL(rapidlm_int8, CPU, m) {
  m.impl("gemm", &gemm);
  m.impl("gemm_small", &gemm_small);
  m.impl("dequantize", &dequantize);
  m.impl("dequantize_matmul", &dequantize_matmul_op);
}

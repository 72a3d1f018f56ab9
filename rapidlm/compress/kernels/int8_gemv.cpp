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
// multiplied into every row of x (up to MT_MAX per pass) while it is in a register.
//   * bf16 x on AVX512-BF16: codes -> bf16 (exact, |q| <= 128) and vdpbf16ps with the broadcast x pair: exact
//     products accumulated in fp32 (per group), then times the 16 rows' group scales (one vector) into totals.
//   * fp32 x (and bf16 x elsewhere, widened once): codes -> fp32, times the group scale of each lane's row, and
//     FMAs with the broadcast pair (x[2j], x[2j+1]); the two halves of each lane pair are added at the end.
// Decode (M = 1) reads each weight byte once, as fast as memory streams. Large M (prefill) is compute-bound:
// `gemm` then dequantizes to x's dtype and calls at::linear (oneDNN / MKL), faster there.

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
  static constexpr int MT_MAX = 8;  // rows of x per pass (accumulators: 2 * MT zmm of 32)
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
  static constexpr int MT_MAX = 2;  // 16 ymm: 4 * MT accumulators + 4 weights + 4 scales
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

#ifdef __AVX512F__
constexpr int kMtMax = 8;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kMtMax = 2;
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
  constexpr int H = 2 * RB / W;                             // vectors per input pair
  constexpr int U = MT == 1 ? (H == 2 ? 4 : 2) : (MT == 2 && H == 2 ? 2 : 1);  // accumulator sets (FMA latency)
  const int64_t gs = GS > 0 ? GS : (GS < 0 ? K : gs_runtime);
  const int64_t pairs = gs / 2;
  V acc[U][H][MT];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 4
    for (int h = 0; h < H; ++h)
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) acc[u][h][m] = Simd::zero();
  V sv[H];
  for (int64_t g = 0; g < G; ++g) {
    if constexpr (GS >= 0) Simd::dup_scales(sp + g * RB, sv);
    const int64_t j0 = g * pairs, j1 = j0 + pairs;
    auto step = [&](int64_t j, V(&a)[H][MT]) __attribute__((always_inline)) {
      V w[H];
#pragma GCC unroll 4
      for (int h = 0; h < H; ++h) {
        w[h] = Simd::load_q(p + j * 2 * RB + h * W);
        if constexpr (GS >= 0) w[h] = Simd::mul(w[h], sv[h]);
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
  }
  alignas(64) float buf[2 * RB];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) {
#pragma GCC unroll 4
    for (int h = 0; h < H; ++h) {
      V a = acc[0][h][m];
#pragma GCC unroll 4
      for (int u = 1; u < U; ++u) a = Simd::add(a, acc[u][h][m]);
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
template <int MT, int GS>
inline void block_bf16(const int8_t* __restrict p, const float* __restrict sp, const uint16_t* __restrict x,
                       int64_t K, int64_t G, int64_t gs_runtime, float out[][RB]) {
  constexpr int U = MT == 1 ? 4 : (MT <= 3 ? 2 : 1);  // accumulator sets: vdpbf16ps latency
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
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j * 2 * RB));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
      const __m512bh w = _mm512_cvtne2ps_pbh(hi, lo);  // bf16 i: code i (exact); lane r: row r's pair
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

template <typename X, int GS>
inline void block_dispatch(int mt, const int8_t* p, const float* sp, const X* x, int64_t K, int64_t G, int64_t gs,
                           float out[][RB]) {
  constexpr bool kBf16 = std::is_same_v<X, uint16_t>;
#if defined(RAPIDLM_BF16_DOT) || defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  switch (mt) {
#ifdef RAPIDLM_BF16_DOT
#define RAPIDLM_BLOCK(MT)                                                          \
  if constexpr (kBf16) block_bf16<MT, GS>(p, sp, x, K, G, gs, out);               \
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
  at::parallel_for(0, NB, grain, [&](int64_t b0, int64_t b1) {
    float out[kMtMax][RB];
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* p = packed + b * RB * K;
      const float* sp = psc + b * G * RB;
      const int64_t rows = std::min<int64_t>(RB, N - b * RB);
      for (int64_t m0 = 0; m0 < M; m0 += kMtMax) {
        const int mt = static_cast<int>(std::min<int64_t>(kMtMax, M - m0));
        const X* xm = x + m0 * K;
        if (gs == 32)
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
  const int64_t NB = (N + RB - 1) / RB, G = K / gs;
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* p = packed + b * RB * K;
      const float* sp = psc + b * G * RB;
      const int64_t rows = std::min<int64_t>(RB, N - b * RB);
      for (int64_t r = 0; r < rows; ++r) {
        w_t* wr = w + (b * RB + r) * K;
        for (int64_t g = 0; g < G; ++g) {
          const float s = sp[g * RB + r];
          for (int64_t k = g * gs; k < (g + 1) * gs; ++k)
            wr[k] = static_cast<w_t>(static_cast<float>(p[((k >> 1) * RB + r) * 2 + (k & 1)]) * s);
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

// Batches above this many rows dequantize + at::linear (crossover measured with benchmarks/int8_kernel.py).
constexpr int64_t kSmallMMax = 16;

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
    // M = 1 is bound by the weight bytes either way; bf16 dot products pay off from M = 2.
    if (M > 1) {
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
  if (M > kSmallMMax) {
    at::Tensor y = at::linear(x2, dequantize(packed, psc, N, group_size, x.scalar_type()));
    if (bias_ptr) y.add_(bias_f);
    return y.view(out_shape);
  }
  return small_m(x2, packed, psc, N, group_size, bias_ptr).view(out_shape);
}

// The small-M kernel at any M (never the dequantize path): for tests and for measuring the crossover.
at::Tensor gemm_small(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& psc, int64_t N,
                      int64_t group_size) {
  const auto [NB, K] = check_packed(packed, psc, N, group_size);
  check_x(x, K);
  TORCH_CHECK(x.dim() == 2, "rapidlm_int8::gemm_small: x must be (M, K)");
  return small_m(x, packed, psc, N, group_size, nullptr);
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
  m.def("dequantize(Tensor packed, Tensor packed_scale, int out_features, int group_size, ScalarType dtype) -> Tensor");
  m.def("simd() -> str", &simd_name);
}

TORCH_LIBRARY_IMPL(rapidlm_int8, CPU, m) {
  m.impl("gemm", &gemm);
  m.impl("gemm_small", &gemm_small);
  m.impl("dequantize", &dequantize);
}

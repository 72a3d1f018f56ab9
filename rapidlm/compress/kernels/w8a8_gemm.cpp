// W8A8 dynamic matmul for the CPU: y = (per-token int8 x) @ (per-channel int8 W)^T (+ bias), exact int32 sums.
//
// Weights: symmetric int8 codes q (N, K) in [-127, 127] with one fp32 scale per output row. x is (M, K) fp32 or
// bf16; each row of x is quantized here, at run time, to codes a in [-127, 127] with scale s_m = max|x_m| / 127
// (round half to even, as torch.round), so
//     y[m][n] = float(sum_k a[m][k] * q[n][k]) * s_m * scale[n] (+ bias[n]),
// and the integer sum is exact: the result does not depend on how M or N are tiled (batched == single).
//
// AVX512-VNNI's vpdpbusd multiplies unsigned by signed bytes, 4 at a time, into int32 lanes. The activation codes
// are stored offset by 128 (u = a + 128 in 0..254), and the offset's contribution 128 * sum_k q[n][k] is taken
// back out with the row sums made at pack time (`wsum`).
//
// Packed layout (made once by w8a8_cpu.pack_w8a8): blocks of 16 output rows (N padded with zero rows), K padded
// with zero codes to a multiple of 4, and in a block the 4 codes of inputs 4j..4j+3 of its 16 rows lie together:
//     packed[b][j][r][p] = q[16 b + r][4 j + p]            (N/16, K/4, 16, 4) int8
// so one 64-byte load is the operand of one vpdpbusd for 16 rows, and the 4 activation bytes it multiplies are one
// broadcast int32. A micro-tile holds MT rows of x x NT blocks (16 NT outputs) in MT * NT registers; each weight
// vector is loaded once per tile and used MT times. Threads split the blocks (each reads its weights once).
// Without VNNI the same layout and arithmetic run as plain loops (correct, not fast; w8a8_cpu.py then prefers
// fbgemm where it exists).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define RAPIDLM_VNNI 1
#include <immintrin.h>
#endif

namespace {

constexpr int RB = 16;     // output rows per packed block
constexpr int KG = 4;      // inputs per vpdpbusd lane
constexpr int kNt = 3;     // blocks per micro-tile (48 outputs; 3 x 16 x 576 bytes of weights stay in a 32 KiB L1)
constexpr int kMtMax = 8;  // rows of x per micro-tile: 8 x 3 = 24 accumulators + 3 weights + 1 broadcast <= 32

// ---------------------------------------------------------------------------------------------------------------
// Per-token activation quantization: xq (M, Kp) uint8 = code + 128 (padding 128, i.e. code 0), xs (M) fp32.

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int64_t Kp, uint8_t* xq, float* xs) {
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    std::vector<float> row(K);
    for (int64_t m = m0; m < m1; ++m) {
      const T* xm = x + m * K;
      float amax = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        row[k] = static_cast<float>(xm[k]);
        amax = std::max(amax, std::fabs(row[k]));
      }
      // The same fp32 operations as primitives.quantize_per_token_int8: scale = max(amax, 1e-8) / 127, x / scale.
      const float s = std::max(amax, 1e-8f) / 127.0f;
      xs[m] = s;
      uint8_t* qm = xq + m * Kp;
      for (int64_t k = 0; k < K; ++k) {
        const float v = std::min(127.f, std::max(-127.f, std::nearbyint(row[k] / s)));
        qm[k] = static_cast<uint8_t>(static_cast<int32_t>(v) + 128);
      }
      for (int64_t k = K; k < Kp; ++k) qm[k] = 128;
    }
  });
}

// The epilogue of one output: exact integer sum -> float, times the two scales, plus bias (same order everywhere).
inline float finish(int32_t acc, int32_t wsum, float xs, float ws, const float* bias, int64_t n) {
  const float v = static_cast<float>(acc - 128 * wsum) * xs * ws;
  return bias ? v + bias[n] : v;
}

template <typename T>
inline void store_row(T* y, const float* v, int count) {
  for (int i = 0; i < count; ++i) y[i] = static_cast<T>(v[i]);
}

#ifdef RAPIDLM_VNNI
// The integer sums of one micro-tile: MT rows of x (xq rows at stride Kp) against NT blocks from w0, into
// sums[i][16 j + r]. Kept apart from the epilogue so the compiler holds all MT * NT accumulators in registers.
template <int MT, int NT>
__attribute__((always_inline)) inline void dot_tile(const uint8_t* xq, int64_t Kp, const int8_t* w0, int64_t bstride,
                                                    int32_t* sums) {
  const int64_t K4 = Kp / KG;
  __m512i acc[MT * NT];
#pragma GCC unroll 32
  for (int t = 0; t < MT * NT; ++t) acc[t] = _mm512_setzero_si512();
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    __m512i w[NT];
#pragma GCC unroll 8
    for (int j = 0; j < NT; ++j) w[j] = _mm512_loadu_si512(w0 + j * bstride + k4 * RB * KG);
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) {
      const __m512i a = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xq + i * Kp + k4 * KG));
#pragma GCC unroll 8
      for (int j = 0; j < NT; ++j) acc[i * NT + j] = _mm512_dpbusd_epi32(acc[i * NT + j], a, w[j]);
    }
  }
#pragma GCC unroll 32
  for (int t = 0; t < MT * NT; ++t) _mm512_storeu_si512(sums + t * RB, acc[t]);
}

// One micro-tile: MT rows of x against NT blocks starting at block b0, written to y (rows at stride N).
template <int MT, int NT, typename T>
void tile_vnni(const uint8_t* xq, const float* xs, int64_t Kp, const int8_t* packed, const int32_t* wsum,
               const float* ws, const float* bias, int64_t b0, int64_t N, T* y) {
  const int64_t bstride = Kp * RB;  // bytes per block
  alignas(64) int32_t sums[MT * NT * RB];
  dot_tile<MT, NT>(xq, Kp, packed + b0 * bstride, bstride, sums);
  const __m512i off = _mm512_set1_epi32(128);
  for (int j = 0; j < NT; ++j) {
    const int64_t n0 = (b0 + j) * RB;
    if (n0 >= N) break;
    const int count = static_cast<int>(std::min<int64_t>(RB, N - n0));
    const __mmask16 mask = count == RB ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
    const __m512i corr = _mm512_mullo_epi32(off, _mm512_loadu_si512(wsum + n0));
    const __m512 wsv = _mm512_loadu_ps(ws + n0);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
    for (int i = 0; i < MT; ++i) {
      // Same order as finish(): float(acc - 128 wsum) * xs * ws (+ bias).
      __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(sums + (i * NT + j) * RB), corr));
      v = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(xs[i])), wsv);
      if (bias) v = _mm512_add_ps(v, bv);
      T* yr = y + i * N + n0;
      if constexpr (std::is_same_v<T, float>) {
        _mm512_mask_storeu_ps(yr, mask, v);
      } else {
        alignas(64) float tmp[RB];
        _mm512_store_ps(tmp, v);
        store_row(yr, tmp, count);
      }
    }
  }
}

template <int NT, typename T>
void rows_vnni(const uint8_t* xq, const float* xs, int64_t M, int64_t Kp, const int8_t* packed, const int32_t* wsum,
               const float* ws, const float* bias, int64_t b0, int64_t N, T* y) {
  int64_t m = 0;
  for (; m + kMtMax <= M; m += kMtMax)
    tile_vnni<kMtMax, NT>(xq + m * Kp, xs + m, Kp, packed, wsum, ws, bias, b0, N, y + m * N);
  const uint8_t* xr = xq + m * Kp;
  T* yr = y + m * N;
  switch (M - m) {
    case 1: tile_vnni<1, NT>(xr, xs + m, Kp, packed, wsum, ws, bias, b0, N, yr); break;
    case 2: tile_vnni<2, NT>(xr, xs + m, Kp, packed, wsum, ws, bias, b0, N, yr); break;
    case 3: tile_vnni<3, NT>(xr, xs + m, Kp, packed, wsum, ws, bias, b0, N, yr); break;
    case 4: tile_vnni<4, NT>(xr, xs + m, Kp, packed, wsum, ws, bias, b0, N, yr); break;
    case 5: tile_vnni<5, NT>(xr, xs + m, Kp, packed, wsum, ws, bias, b0, N, yr); break;
    case 6: tile_vnni<6, NT>(xr, xs + m, Kp, packed, wsum, ws, bias, b0, N, yr); break;
    case 7: tile_vnni<7, NT>(xr, xs + m, Kp, packed, wsum, ws, bias, b0, N, yr); break;
    default: break;
  }
}
#endif

// Plain loops over the same layout (machines without AVX512-VNNI).
template <typename T>
void blocks_scalar(const uint8_t* xq, const float* xs, int64_t M, int64_t Kp, const int8_t* packed,
                   const int32_t* wsum, const float* ws, const float* bias, int64_t b0, int64_t b1, int64_t N, T* y) {
  const int64_t K4 = Kp / KG;
  int32_t acc[RB];
  float out[RB];
  for (int64_t b = b0; b < b1; ++b) {
    const int8_t* wb = packed + b * K4 * RB * KG;
    const int64_t n0 = b * RB;
    const int count = static_cast<int>(std::min<int64_t>(RB, N - n0));
    for (int64_t m = 0; m < M; ++m) {
      std::fill(acc, acc + RB, 0);
      const uint8_t* xm = xq + m * Kp;
      for (int64_t k4 = 0; k4 < K4; ++k4)
        for (int r = 0; r < RB; ++r)
          for (int p = 0; p < KG; ++p)
            acc[r] += static_cast<int32_t>(xm[k4 * KG + p]) * static_cast<int32_t>(wb[(k4 * RB + r) * KG + p]);
      for (int r = 0; r < count; ++r) out[r] = finish(acc[r], wsum[n0 + r], xs[m], ws[n0 + r], bias, n0 + r);
      store_row(y + m * N + n0, out, count);
    }
  }
}

template <typename T>
void run_blocks(const uint8_t* xq, const float* xs, int64_t M, int64_t Kp, const int8_t* packed, const int32_t* wsum,
                const float* ws, const float* bias, int64_t b0, int64_t b1, int64_t N, T* y) {
#ifdef RAPIDLM_VNNI
  int64_t b = b0;
  for (; b + kNt <= b1; b += kNt) rows_vnni<kNt>(xq, xs, M, Kp, packed, wsum, ws, bias, b, N, y);
  switch (b1 - b) {
    case 1: rows_vnni<1>(xq, xs, M, Kp, packed, wsum, ws, bias, b, N, y); break;
    case 2: rows_vnni<2>(xq, xs, M, Kp, packed, wsum, ws, bias, b, N, y); break;
    default: break;
  }
#else
  blocks_scalar(xq, xs, M, Kp, packed, wsum, ws, bias, b0, b1, N, y);
#endif
}

at::Tensor gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& wsum, const at::Tensor& scale,
                int64_t N, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 && packed.size(2) == RB &&
                  packed.size(3) == KG && packed.is_contiguous(),
              "rapidlm_w8a8::gemm: packed must be a contiguous (N/16, K/4, 16, 4) int8 tensor");
  const int64_t NB = packed.size(0), Kp = packed.size(1) * KG;
  TORCH_CHECK(N > 0 && (N + RB - 1) / RB == NB, "rapidlm_w8a8::gemm: out_features ", N, " does not match ", NB,
              " packed blocks");
  TORCH_CHECK(wsum.scalar_type() == at::kInt && wsum.numel() == NB * RB && wsum.is_contiguous(),
              "rapidlm_w8a8::gemm: wsum must be a contiguous int32 tensor of ", NB * RB, " elements");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == NB * RB && scale.is_contiguous(),
              "rapidlm_w8a8::gemm: scale must be a contiguous fp32 tensor of ", NB * RB, " elements");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "rapidlm_w8a8::gemm: x must be fp32 or bf16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "rapidlm_w8a8::gemm: x must have at least one dimension");
  const int64_t K = x.size(-1);
  TORCH_CHECK(K <= Kp && Kp - K < KG, "rapidlm_w8a8::gemm: x has ", K, " inputs; the weight has ", Kp, " (padded)");
  const float* bias_ptr = nullptr;
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "rapidlm_w8a8::gemm: bias must have ", N, " elements");
    bias_f = bias->to(at::kFloat).contiguous();
    bias_ptr = bias_f.data_ptr<float>();
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const int64_t M = x.numel() / K;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y.view(out_shape);
  const at::Tensor x2 = x.reshape({M, K}).contiguous();
  at::Tensor xq = at::empty({M, Kp}, x.options().dtype(at::kByte));
  at::Tensor xs = at::empty({M}, x.options().dtype(at::kFloat));
  const int8_t* pw = packed.data_ptr<int8_t>();
  const int32_t* psum = wsum.data_ptr<int32_t>();
  const float* psc = scale.data_ptr<float>();
  uint8_t* pq = xq.data_ptr<uint8_t>();
  float* ps = xs.data_ptr<float>();
  // One weight block is 16 Kp bytes; a few per task keeps the parallel overhead small next to streaming them.
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(kNt, NB / std::max(1, at::get_num_threads())));
  if (x.scalar_type() == at::kFloat) {
    quantize_rows(x2.data_ptr<float>(), M, K, Kp, pq, ps);
    float* py = y.data_ptr<float>();
    at::parallel_for(0, NB, grain, [&](int64_t b0, int64_t b1) {
      run_blocks(pq, ps, M, Kp, pw, psum, psc, bias_ptr, b0, b1, N, py);
    });
  } else {
    quantize_rows(x2.data_ptr<c10::BFloat16>(), M, K, Kp, pq, ps);
    c10::BFloat16* py = y.data_ptr<c10::BFloat16>();
    at::parallel_for(0, NB, grain, [&](int64_t b0, int64_t b1) {
      run_blocks(pq, ps, M, Kp, pw, psum, psc, bias_ptr, b0, b1, N, py);
    });
  }
  return y.view(out_shape);
}

std::string simd_name() {
#ifdef RAPIDLM_VNNI
  return "avx512-vnni";
#else
  return "scalar";
#endif
}

}  // namespace

TORCH_LIBRARY(rapidlm_w8a8, m) {
  m.def("gemm(Tensor x, Tensor packed, Tensor wsum, Tensor scale, int out_features, Tensor? bias) -> Tensor");
  m.def("simd() -> str", &simd_name);
}

TORCH_LIBRARY_IMPL(rapidlm_w8a8, CPU, m) { m.impl("gemm", &gemm); }

// Shared by paged_attention.cpp and paged_chunks.h: the vector type for this CPU, loading pool rows as fp32,
// walking a block table.

#pragma once

// at::vec picks its implementation from CPU_CAPABILITY_* macros that only ATen's own build defines. This file is
// compiled with -march=native, so select the widest one the compiler was told it may use (and an inline namespace
// of our own, so no symbol can clash with ATen's copies of the same inline functions).
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY_AVX2 1
#endif
#endif
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY rapidlm_paged_native
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

// Threads get at least this many multiply-adds each (scores + weighted sums): a parallel region costs a few
// microseconds, more than a short sequence's attention.
constexpr int64_t kMinTaskWork = 1 << 15;

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// Calls fn(i0, row0, count, j) for each run of consecutive positions of [start, end) that lie in one block:
// i0 = first position - start, row0 = its pool row (block * bs + offset), count = run length, j = the block's index
// in the table. One division per sequence, none per token.
template <typename Fn>
inline void for_each_run(const int32_t* table, int64_t bs, int64_t start, int64_t end, Fn&& fn) {
  if (start >= end) return;
  int64_t blk = start / bs;
  int64_t off = start - blk * bs;
  for (int64_t p = start; p < end; ++blk, off = 0) {
    const int64_t count = std::min(end - p, bs - off);
    fn(p - start, static_cast<int64_t>(table[blk]) * bs + off, count, blk);
    p += count;
  }
}

// Asks for `rows` rows of `len` elements (`stride` apart) to be brought towards the core (into L2: prefetcht2), one
// request per cache line. The next block is random in the pool, so the hardware prefetchers cannot guess it; see
// attend for what is asked for when.
template <typename T>
inline void prefetch_rows(const T* p, int64_t rows, int64_t stride, int64_t len) {
#if defined(__GNUC__)
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < len; i += kLine) __builtin_prefetch(p + r * stride + i, 0, 1);
#endif
}

// Pool rows as fp32 vectors: load(p) reads kW elements, load(p, count) the first count (the rest zero). fp32 rows
// are loaded as they are; bf16 rows are widened in registers (zero-extend each 16-bit lane to 32 bits, shift left
// 16: exact).
inline Vec load(const float* p) { return Vec::loadu(p); }
inline Vec load(const float* p, int count) { return Vec::loadu(p, count); }

inline Vec load(const at::BFloat16* p) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
  float buf[kW];
  for (int64_t i = 0; i < kW; ++i) buf[i] = static_cast<float>(p[i]);
  return Vec::loadu(buf);
#endif
}

inline Vec load(const at::BFloat16* p, int count) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m256i h = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << count) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
  float buf[kW] = {};
  for (int i = 0; i < count; ++i) buf[i] = static_cast<float>(p[i]);
  return Vec::loadu(buf);
#endif
}

struct Shapes {
  int64_t G, hd, bs, stride;  // heads per group, head dim, block size, elements between pool rows (nkv * hd)
  float scale;
};

}  // namespace

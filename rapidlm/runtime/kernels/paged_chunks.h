// Paged attention for prompt chunks on the CPU: see the comment below. Included by paged_attention.cpp.

#pragma once

#include "paged_common.h"

#include <limits>

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Prompt chunks. The engine sends a prompt chunk as one row per query token: consecutive rows of one sequence, with
// one table and lengths L, L + 1, ... (rapidlm/runtime/paged_kv.py). Row by row, every row re-reads and re-widens
// the keys, and each dot product ends in a horizontal sum. A segment of at least kChunkMinRows such rows (window
// start 0, hd a multiple of 16, AVX512) runs here instead, as small GEMMs with the query vectors in the lanes: its
// (row, query head) pairs of one kv head, 16 at a time (a tile), against the sequence's keys and values widened once
// to fp32 scratch:
//   scores  S[i][l] = scale * sum_d k_i[d] q_l[d]    (one FMA chain per lane over d, k_i[d] broadcast)
//   softmax per lane over its own keys i < n_l (masked max, exp, sum in key order)
//   output  o_l[d] = sum_i S[i][l] v_i[d] / sum_l    (one FMA chain per lane and d over i, v_i[d] broadcast)
// A lane's arithmetic depends only on its own q, keys and values, never on the other lanes of its tile or on the
// thread, so a segment gets the same bits alone or in any batch. They are not the row-by-row path's bits (another
// summation order), so which path a row takes depends only on its segment's length: the same rule as the linears'
// (rapidlm/runtime/cpu_linear.py).
//
// Measured (SmolLM2-135M's shapes: 9 heads, 3 kv heads, hd 64; bf16 pool; 2 Zen4 threads; one layer, median of 15
// interleaved runs of both paths, ms): 200-token chunk at position 0: 0.50 -> 0.32; 240 tokens at position 1400:
// 8.3 -> 4.8 (~170 GFLOP/s, near the fp32 FMA peak); 32 tokens at 500: 0.55 -> 0.28; 16 at 500: 0.21 -> 0.14;
// 12 at 50: 0.022 -> 0.021. Below 12 rows the part-empty tiles lose: 6 at 500: 0.086 -> 0.110.

constexpr int64_t kChunkMinRows = 12;
constexpr int64_t kLanes = 16;

struct Segment {
  int64_t b0, rows;  // rows b0 .. b0 + rows - 1; row b0 + t attends to positions [0, ends[b0] + t)
};

// The tiles need AVX512 (16 fp32 lanes, masks) and a head dim of whole 16-float vectors.
inline bool chunk_path_supports(int64_t hd) {
#if defined(CPU_CAPABILITY_AVX512)
  return hd % kLanes == 0;
#else
  (void)hd;
  return false;
#endif
}

// The segments of rows that run_chunks takes: maximal runs of consecutive rows of one table (the entries they read
// equal) with window start 0 and lengths rising by 1, of at least kChunkMinRows rows.
inline std::vector<Segment> find_segments(const int32_t* pt, int64_t max_blocks, int64_t bs, int64_t B,
                                          const std::vector<int64_t>& starts, const std::vector<int64_t>& ends) {
  std::vector<Segment> segs;
  int64_t b0 = 0;
  for (int64_t b = 1; b <= B; ++b) {
    const bool joins = b < B && starts[b] == 0 && starts[b - 1] == 0 && ends[b - 1] > 0 && ends[b] == ends[b - 1] + 1 &&
                       std::equal(pt + b * max_blocks, pt + b * max_blocks + (ends[b] - 1) / bs + 1,
                                  pt + (b - 1) * max_blocks);
    if (!joins) {
      if (b - b0 >= kChunkMinRows) segs.push_back({b0, b - b0});
      b0 = b;
    }
  }
  return segs;
}

#if defined(CPU_CAPABILITY_AVX512)
// dst rows [from, to) = keys or values of positions [from, to) of one kv head (pool already offset to it) as fp32,
// and zeros up to the next multiple of kLanes (the scores loop reads 16 keys at a time).
template <typename T>
void widen_positions(const T* pool, const int32_t* table, int64_t bs, int64_t stride, int64_t hd, int64_t from,
                     int64_t to, float* dst) {
  for_each_run(table, bs, from, to, [&](int64_t i0, int64_t row0, int64_t count, int64_t) {
    for (int64_t r = 0; r < count; ++r) {
      const T* src = pool + (row0 + r) * stride;
      float* d = dst + (from + i0 + r) * hd;
      for (int64_t c = 0; c < hd; c += kW) load(src + c).store(d + c);
    }
  });
  const int64_t padded = (to + kLanes - 1) / kLanes * kLanes;
  std::fill(dst + to * hd, dst + padded * hd, 0.f);
}

// One tile: `lanes` (<= 16) query vectors q_l of hd floats, lane l attending to keys [0, n[l]); nmax = max n.
// K32/V32: the kv head's keys/values as fp32 rows (K32 zero-padded to a multiple of 16 rows). Scratch: qt (hd * 16),
// s (nmax rounded up to 16, * 16).
void chunk_tile(const float* const* q, float* const* out, const int32_t* n, int lanes, int64_t nmax, const float* K32,
                const float* V32, int64_t hd, float scale, float* qt, float* s) {
  // qt[d][l] = q_l[d]; lanes past `lanes` are zero and attend to key 0 only (their results are dropped)
  for (int64_t d = 0; d < hd; ++d)
    for (int l = 0; l < kLanes; ++l) qt[d * kLanes + l] = l < lanes ? q[l][d] : 0.f;
  alignas(64) int32_t nl[kLanes];
  for (int l = 0; l < kLanes; ++l) nl[l] = l < lanes ? n[l] : 1;
  const __m512i nv = _mm512_load_si512(nl);
  const __m512 sv = _mm512_set1_ps(scale);
  // 1. scores, 16 keys at a time: acc[u] lanes = q_l . k_{i0+u}
  for (int64_t i0 = 0; i0 < nmax; i0 += kLanes) {
    __m512 acc[kLanes];
    for (int u = 0; u < kLanes; ++u) acc[u] = _mm512_setzero_ps();
    const float* kr = K32 + i0 * hd;
    for (int64_t d = 0; d < hd; ++d) {
      const __m512 qd = _mm512_load_ps(qt + d * kLanes);
      for (int u = 0; u < kLanes; ++u) acc[u] = _mm512_fmadd_ps(_mm512_set1_ps(kr[u * hd + d]), qd, acc[u]);
    }
    for (int u = 0; u < kLanes; ++u) _mm512_store_ps(s + (i0 + u) * kLanes, _mm512_mul_ps(acc[u], sv));
  }
  // 2. per lane: max over its keys, p = exp(s - max) (0 past its keys), sum in key order
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < nmax; ++i) {
    const __mmask16 m = _mm512_cmpgt_epi32_mask(nv, _mm512_set1_epi32(static_cast<int32_t>(i)));
    mx = _mm512_mask_max_ps(mx, m, mx, _mm512_load_ps(s + i * kLanes));
  }
  const Vec mxv(mx);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < nmax; ++i) {
    const __mmask16 m = _mm512_cmpgt_epi32_mask(nv, _mm512_set1_epi32(static_cast<int32_t>(i)));
    const __m512 p = _mm512_maskz_mov_ps(m, (Vec(_mm512_load_ps(s + i * kLanes)) - mxv).exp_u20());
    _mm512_store_ps(s + i * kLanes, p);
    sum = _mm512_add_ps(sum, p);
  }
  const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), sum);
  // 3. outputs, 16 dims at a time: acc[u] lanes = sum_i p_l[i] v_i[d0 + u]
  alignas(64) float tmp[kLanes * kLanes];
  for (int64_t d0 = 0; d0 < hd; d0 += kLanes) {
    __m512 acc[kLanes];
    for (int u = 0; u < kLanes; ++u) acc[u] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nmax; ++i) {
      const __m512 p = _mm512_load_ps(s + i * kLanes);
      const float* vr = V32 + i * hd + d0;
      for (int u = 0; u < kLanes; ++u) acc[u] = _mm512_fmadd_ps(_mm512_set1_ps(vr[u]), p, acc[u]);
    }
    for (int u = 0; u < kLanes; ++u) _mm512_store_ps(tmp + u * kLanes, _mm512_mul_ps(acc[u], inv));
    for (int l = 0; l < lanes; ++l)
      for (int u = 0; u < kLanes; ++u) out[l][d0 + u] = tmp[u * kLanes + l];
  }
}

// Every tile of every segment: (segment, kv head, tile) tasks in that order, cut into one contiguous range per thread
// of about equal cost (a tile costs its longest lane). A range widens a kv head's keys and values once, growing them
// tile by tile (a later tile of a segment only attends further).
template <typename T>
void run_chunks(const at::Tensor& q, const T* pk, const T* pv, const int32_t* pt, int64_t max_blocks,
                const std::vector<Segment>& segs, const std::vector<int64_t>& ends, int64_t nkv, const Shapes& s,
                at::Tensor& out) {
  if (segs.empty()) return;
  const int64_t nh = q.size(1), hd = q.size(2), G = s.G;
  struct Task {
    int64_t seg, g, first;  // lanes first .. first + 15 of the segment's (row, head) pairs for kv head g
    int64_t cost;           // ~ the tile's last row's length
  };
  std::vector<Task> tasks;
  int64_t max_len = 0;
  for (int64_t si = 0; si < static_cast<int64_t>(segs.size()); ++si) {
    const Segment& sg = segs[si];
    const int64_t pairs = sg.rows * G;
    max_len = std::max(max_len, ends[sg.b0] + sg.rows - 1);
    for (int64_t g = 0; g < nkv; ++g)
      for (int64_t f = 0; f < pairs; f += kLanes)
        tasks.push_back({si, g, f, ends[sg.b0] + std::min(f + kLanes, pairs) / G});
  }
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  int64_t total = 0;
  for (const Task& t : tasks) total += t.cost;
  const int64_t parts = std::clamp<int64_t>(total * kLanes * 4 * hd / kMinTaskWork, 1,
                                            std::min<int64_t>(at::get_num_threads(), ntasks));
  std::vector<int64_t> cuts(parts + 1, ntasks);
  cuts[0] = 0;
  for (int64_t i = 0, acc = 0, part = 1; i < ntasks && part < parts; ++i) {
    acc += tasks[i].cost;
    while (part < parts && acc * parts >= part * total) cuts[part++] = i + 1;
  }
  const float* pq = q.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t padded = (max_len + kLanes - 1) / kLanes * kLanes;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    thread_local std::vector<float> scratch;  // kept between calls: no allocation (or page faults) per layer
    const size_t need = 2 * padded * hd + hd * kLanes + padded * kLanes + kLanes;
    if (scratch.size() < need) scratch.resize(need);
    float* K32 = scratch.data();
    float* V32 = K32 + padded * hd;
    float* qt = V32 + padded * hd;
    qt += (kLanes - reinterpret_cast<uintptr_t>(qt) / sizeof(float) % kLanes) % kLanes;  // 64-byte aligned
    float* sc = qt + hd * kLanes;
    for (int64_t part = p0; part < p1; ++part) {
      int64_t cur_seg = -1, cur_g = -1, widened = 0;
      for (int64_t ti = cuts[part]; ti < cuts[part + 1]; ++ti) {
        const Task& t = tasks[ti];
        const Segment& sg = segs[t.seg];
        const int64_t pairs = sg.rows * G, L0 = ends[sg.b0];
        const int lanes = static_cast<int>(std::min<int64_t>(kLanes, pairs - t.first));
        const float* qp[kLanes];
        float* op[kLanes];
        int32_t n[kLanes];
        for (int l = 0; l < lanes; ++l) {
          const int64_t row = (t.first + l) / G, head = t.g * G + (t.first + l) % G;
          qp[l] = pq + ((sg.b0 + row) * nh + head) * hd;
          op[l] = po + ((sg.b0 + row) * nh + head) * hd;
          n[l] = static_cast<int32_t>(L0 + row);
        }
        const int64_t nmax = n[lanes - 1];
        if (t.seg != cur_seg || t.g != cur_g) cur_seg = t.seg, cur_g = t.g, widened = 0;
        if (nmax > widened) {
          const int32_t* table = pt + sg.b0 * max_blocks;
          widen_positions(pk + t.g * hd, table, s.bs, s.stride, hd, widened, nmax, K32);
          widen_positions(pv + t.g * hd, table, s.bs, s.stride, hd, widened, nmax, V32);
          widened = nmax;
        }
        chunk_tile(qp, op, n, lanes, nmax, K32, V32, hd, s.scale, qt, sc);
      }
    }
  });
}

#else
template <typename T>
void run_chunks(const at::Tensor&, const T*, const T*, const int32_t*, int64_t, const std::vector<Segment>&,
                const std::vector<int64_t>&, int64_t, const Shapes&, at::Tensor&) {}  // no segments without AVX512
#endif

}  // namespace

// Paged-attention decode for the CPU: one query token per sequence against K/V rows kept in a pool of blocks.
//
//   q            (B, nh, hd)                      fp32
//   k_pool/v_pool (num_blocks, bs, nkv, hd)       fp32 or bf16 (both the same), contiguous
//   block_tables (B, max_blocks)                  int32: logical position p of sequence b is row p % bs of block
//                                                 block_tables[b][p / bs]
//   seq_lens     (B,)                             int32: sequence b attends to [max(0, len - window), len)
//   out          (B, nh, hd)                      fp32; a sequence of length 0 gets zeros
//
// Work: at::parallel_for over the B * nkv (sequence, kv head) pairs, b-major, one contiguous range of about equal cost
// per thread (see run); a range is walked in pieces, and a piece (one sequence's kv heads [g0, g1)) walks the
// sequence's block table one block at a time (one division per sequence, none per token), all of its kv heads
// within a block before the next block (prefetching keys and values ahead, see attend): a block's rows are streamed
// from memory together, and each key/value row slice is used by all G = nh / nkv query heads of its group while in
// L1 (the gather + SDPA path copies every block first, then reads the copy). Per piece:
//   1. scores s[h][i] = scale * q_h . k_i over the window's positions;
//   2. p[h][i] = exp(s[h][i] - max_i s[h][i]) (vectorized) and sum_h = sum_i p[h][i];
//   3. acc[h] = sum_i p[h][i] * v_i, out_h = acc[h] / sum_h.
// Everything accumulates in fp32: bf16 pool rows are widened to fp32 in registers as they are loaded (a bf16 value
// is the top half of the fp32 with the same value, so the widening is exact: a zero-extend and a 16-bit shift).
// Scratch (scores, accumulators) is allocated once per thread's range, never per token. Only the table entries
// covering a sequence's window are read, after they are checked to lie in [0, num_blocks); entries past them are
// never read, and no pool row outside a window enters the arithmetic.
//
// The pools are fp32 or bf16 (the loops are templates on the pool's element type; q, the scratch and the output
// are fp32 either way). A bf16 pool halves the bytes read, which is what bounds the kernel at decode.
// Vectors are at::vec::Vectorized<float> (16 lanes with AVX512, 8 with AVX2). When hd is 1, 2, 4, 8 or 16 vectors
// (hd 64 and 128 are), steps 1 and 3 run register-tiled kernels: a tile of GT query heads keeps q (step 1) or its
// output accumulators (step 3) in registers across a block's rows, and step 1 finishes four rows' dot products
// with shared shuffles. Other head dims run plain loops over heads, with one masked partial vector per row.
//
// Prompt chunks arrive as one row per query token (consecutive rows of one sequence, lengths L, L + 1, ...). Runs
// of 12 or more such rows run in paged_chunks.h instead (with AVX512 and hd a multiple of 16), as tiles of 16
// (row, head) pairs against keys and values widened once: up to ~2x faster (paged_chunks.h has the numbers). Its
// bits differ from the row-by-row path's (another summation order); a row's path depends only on its own chunk.

#include "paged_chunks.h"
#include "paged_common.h"

namespace {

// The register-tiled path holds a tile of GT query heads x NV vectors (hd = NV * kW) in registers: q while scoring,
// the output accumulators while summing values. kAccRegs bounds GT * NV so that fits the register file.
constexpr int kMaxTile = 8;
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kAccRegs = 24;  // of 32 zmm
constexpr int kRegs = 32;
#else
constexpr int kAccRegs = 12;  // of 16 ymm
constexpr int kRegs = 16;
#endif

// One task: sequence b's kv heads [g0, g1) and their query heads. T: the pool's element type (float, BFloat16).
template <typename T>
struct Work {
  const float* q;  // the first query row of the task's heads ((g1 - g0) * G rows of hd)
  const T* kp;     // pools, offset to kv head g0: row r of kv head g0 + j at kp + r * stride + j * hd
  const T* vp;
  const int32_t* table;
  int64_t start, end;  // logical positions attended to
  int64_t kv_heads;    // g1 - g0
  float* out;          // the task's output rows, like q
};

// ---------------------------------------------------------------------------------------------------------------
// Register-tiled kernels: hd = NV * kW, GT query heads at a time.

// dst[j] = scale * (sum of a[j]'s lanes), j < 4: four dot products finished together. With AVX512/AVX2 the four
// horizontal sums share their shuffles (13 instructions instead of 32 with AVX512).
inline void store_sums4(const Vec (&a)[4], float scale, float* dst) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
  // per 128-bit lane: [a0, a1, a0, a1] and [a2, a3, a2, a3] partial sums, then [a0, a1, a2, a3]
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 t = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));  // 4 lanes -> 2
  const __m128 u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));      // 2 lanes -> 1
  _mm_storeu_ps(dst, _mm_mul_ps(u, _mm_set1_ps(scale)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
  const __m256 s01 = _mm256_add_ps(_mm256_unpacklo_ps(a0, a1), _mm256_unpackhi_ps(a0, a1));
  const __m256 s23 = _mm256_add_ps(_mm256_unpacklo_ps(a2, a3), _mm256_unpackhi_ps(a2, a3));
  const __m256 s = _mm256_add_ps(_mm256_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm256_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m128 u = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  _mm_storeu_ps(dst, _mm_mul_ps(u, _mm_set1_ps(scale)));
#else
  for (int j = 0; j < 4; ++j) dst[j] = hsum(a[j]) * scale;
#endif
}

// scores[h * n + r] = scale * q_h . k_r for `count` consecutive pool rows from k; rows four at a time.
template <typename T, int NV, int GT>
void scores_tile(const float* q, const T* k, int64_t count, int64_t stride, float scale, float* scores,
                 int64_t n) {
  constexpr int64_t hd = NV * kW;
  Vec qv[GT][NV];
  for (int h = 0; h < GT; ++h)
    for (int c = 0; c < NV; ++c) qv[h][c] = Vec::loadu(q + h * hd + c * kW);
  int64_t r = 0;
  if constexpr (GT * 4 + GT * NV + NV <= kRegs) {
    // Four rows x GT heads of accumulators fit beside q: each key row is loaded (and widened) once for all heads.
    for (; r + 4 <= count; r += 4) {
      const T* kr = k + r * stride;
      Vec acc[GT][4];
      for (int j = 0; j < 4; ++j) {
        Vec kv[NV];
        for (int c = 0; c < NV; ++c) kv[c] = load(kr + j * stride + c * kW);
        for (int h = 0; h < GT; ++h) {
          acc[h][j] = qv[h][0] * kv[0];
          for (int c = 1; c < NV; ++c) acc[h][j] = at::vec::fmadd(qv[h][c], kv[c], acc[h][j]);
        }
      }
      for (int h = 0; h < GT; ++h) store_sums4(acc[h], scale, scores + h * n + r);
    }
  }
  for (; r + 4 <= count; r += 4) {  // larger tiles: per head, each row reloaded
    const T* kr = k + r * stride;
    for (int h = 0; h < GT; ++h) {
      Vec acc[4];
      for (int j = 0; j < 4; ++j) acc[j] = qv[h][0] * load(kr + j * stride);
      for (int c = 1; c < NV; ++c)
        for (int j = 0; j < 4; ++j) acc[j] = at::vec::fmadd(qv[h][c], load(kr + j * stride + c * kW), acc[j]);
      store_sums4(acc, scale, scores + h * n + r);
    }
  }
  for (; r < count; ++r) {
    const T* kr = k + r * stride;
    for (int h = 0; h < GT; ++h) {
      Vec acc = qv[h][0] * load(kr);
      for (int c = 1; c < NV; ++c) acc = at::vec::fmadd(qv[h][c], load(kr + c * kW), acc);
      scores[h * n + r] = hsum(acc) * scale;
    }
  }
}

// acc[h] += sum_r w[h * n + r] * v_r over `count` consecutive pool rows from v (acc: GT rows of hd).
template <typename T, int NV, int GT>
void values_tile(const float* w, int64_t n, const T* v, int64_t count, int64_t stride, float* acc) {
  constexpr int64_t hd = NV * kW;
  Vec a[GT][NV];
  for (int h = 0; h < GT; ++h)
    for (int c = 0; c < NV; ++c) a[h][c] = Vec::loadu(acc + h * hd + c * kW);
  for (int64_t r = 0; r < count; ++r) {
    const T* vr = v + r * stride;
    for (int h = 0; h < GT; ++h) {
      const Vec wv(w[h * n + r]);
      for (int c = 0; c < NV; ++c) a[h][c] = at::vec::fmadd(wv, load(vr + c * kW), a[h][c]);
    }
  }
  for (int h = 0; h < GT; ++h)
    for (int c = 0; c < NV; ++c) a[h][c].store(acc + h * hd + c * kW);
}

template <typename T>
struct TileFns {
  using ScoresFn = void (*)(const float*, const T*, int64_t, int64_t, float, float*, int64_t);
  using ValuesFn = void (*)(const float*, int64_t, const T*, int64_t, int64_t, float*);
  ScoresFn scores[kMaxTile];
  ValuesFn values[kMaxTile];
};

template <typename T, int NV, int... I>
constexpr TileFns<T> make_tile_fns(std::integer_sequence<int, I...>) {
  return TileFns<T>{{&scores_tile<T, NV, I + 1>...}, {&values_tile<T, NV, I + 1>...}};
}

template <typename T, int NV>
constexpr TileFns<T> kTileFns = make_tile_fns<T, NV>(std::make_integer_sequence<int, kMaxTile>{});

// The tiled kernels for this head dim, or nullptr (the generic path) when hd is not 1, 2, 4, 8 or 16 vectors.
template <typename T>
const TileFns<T>* tile_fns(int64_t hd) {
  if (hd % kW != 0) return nullptr;
  switch (hd / kW) {
    case 1: return &kTileFns<T, 1>;
    case 2: return &kTileFns<T, 2>;
    case 4: return &kTileFns<T, 4>;
    case 8: return &kTileFns<T, 8>;
    case 16: return &kTileFns<T, 16>;
    default: return nullptr;
  }
}

// Splits G heads into balanced tiles of at most cap heads: (first head, heads) pairs.
std::vector<std::pair<int64_t, int>> head_tiles(int64_t G, int64_t cap) {
  const int64_t tiles = (G + cap - 1) / cap;
  std::vector<std::pair<int64_t, int>> out;
  int64_t h0 = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t size = G / tiles + (t < G % tiles ? 1 : 0);
    out.emplace_back(h0, static_cast<int>(size));
    h0 += size;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Generic kernels (any hd): the same loops over heads with full vectors then one masked partial vector.

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  Vec acc0(0.f), acc1(0.f);
  int64_t d = 0;
  for (; d + 2 * kW <= n; d += 2 * kW) {
    acc0 = at::vec::fmadd(Vec::loadu(a + d), load(b + d), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + d + kW), load(b + d + kW), acc1);
  }
  if (d + kW <= n) {
    acc0 = at::vec::fmadd(Vec::loadu(a + d), load(b + d), acc0);
    d += kW;
  }
  if (d < n) {  // partial vector: loadu(ptr, count) / load(ptr, count) zero-fill the lanes past count
    const int count = static_cast<int>(n - d);
    acc1 = at::vec::fmadd(Vec::loadu(a + d, count), load(b + d, count), acc1);
  }
  return hsum(acc0 + acc1);
}

template <typename T>
inline void axpy(float* y, float w, const T* x, int64_t n) {  // y += w * x
  const Vec wv(w);
  int64_t d = 0;
  for (; d + kW <= n; d += kW) at::vec::fmadd(wv, load(x + d), Vec::loadu(y + d)).store(y + d);
  if (d < n) {
    const int count = static_cast<int>(n - d);
    at::vec::fmadd(wv, load(x + d, count), Vec::loadu(y + d, count)).store(y + d, count);
  }
}

// ---------------------------------------------------------------------------------------------------------------

// p = exp(s - max(s)) in place over n scores; returns sum(p).
float softmax_numerators(float* s, int64_t n) {
  const float mx = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, s, n);
  const Vec mv(mx);
  Vec total(0.f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const Vec e = (Vec::loadu(s + i) - mv).exp_u20();
    e.store(s + i);
    total = total + e;
  }
  float sum = hsum(total);
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - mx);
    sum += s[i];
  }
  return sum;
}

// One task. Scratch: scores (kv_heads * G) * n, acc (kv_heads * G) * hd, sums kv_heads * G floats. Key and value
// rows are visited block by block, every kv head of the task within a block before the next block, so a block's
// rows (all kv heads side by side) are streamed from memory together and each row slice is used by all G query
// heads of its group while in L1.
template <typename T>
void attend(const Work<T>& w, const Shapes& s, const TileFns<T>* fns, const std::vector<std::pair<int64_t, int>>& tiles,
            float* scores, float* acc, float* sums) {
  const int64_t G = s.G, hd = s.hd, n = w.end - w.start, stride = s.stride, heads = w.kv_heads * G;
  if (n <= 0) {
    std::fill(w.out, w.out + heads * hd, 0.f);
    return;
  }
  // Prefetches (all into L2): while scoring block j, the keys of blocks j + 1 and j + 2 and the values of block j + 1,
  // so the value pass finds its rows in L2. Asking for j + 1 again although j - 1 asked for it as j + 2 is not a
  // slip: measured (SmolLM2's shapes, 16 rows at 250 positions, bf16 pools cold, 30 layers, interleaved): keys and
  // values 1 ahead 6.4-6.5 ms, this 5.6-6.1, keys 2 ahead and values 1 ahead without the repeat 7.4-7.6.
  const int64_t last_blk = (w.end - 1) / s.bs, row_len = w.kv_heads * hd;
  const auto block_rows = [&](const T* pool, int64_t j) {
    return pool + static_cast<int64_t>(w.table[j]) * s.bs * stride;
  };
  prefetch_rows(block_rows(w.vp, w.start / s.bs), s.bs, stride, row_len);
  // 1. scores s[h][i] = scale * q_h . k_i
  for_each_run(w.table, s.bs, w.start, w.end, [&](int64_t i0, int64_t row0, int64_t count, int64_t blk) {
    if (blk + 1 <= last_blk) {
      prefetch_rows(block_rows(w.kp, blk + 1), s.bs, stride, row_len);
      prefetch_rows(block_rows(w.vp, blk + 1), s.bs, stride, row_len);
    }
    if (blk + 2 <= last_blk) prefetch_rows(block_rows(w.kp, blk + 2), s.bs, stride, row_len);
    for (int64_t j = 0; j < w.kv_heads; ++j) {
      const T* k = w.kp + row0 * stride + j * hd;
      const float* q = w.q + j * G * hd;
      float* sc = scores + j * G * n + i0;
      if (fns) {
        for (const auto& [h0, gt] : tiles) fns->scores[gt - 1](q + h0 * hd, k, count, stride, s.scale, sc + h0 * n, n);
      } else {
        for (int64_t r = 0; r < count; ++r)
          for (int64_t h = 0; h < G; ++h) sc[h * n + r] = dot(q + h * hd, k + r * stride, hd) * s.scale;
      }
    }
  });
  // 2. softmax numerators and their sums, per head
  for (int64_t h = 0; h < heads; ++h) sums[h] = softmax_numerators(scores + h * n, n);
  std::fill(acc, acc + heads * hd, 0.f);
  // 3. acc[h] = sum_i p[h][i] * v_i
  for_each_run(w.table, s.bs, w.start, w.end, [&](int64_t i0, int64_t row0, int64_t count, int64_t) {
    for (int64_t j = 0; j < w.kv_heads; ++j) {
      const T* v = w.vp + row0 * stride + j * hd;
      const float* p = scores + j * G * n + i0;
      float* a = acc + j * G * hd;
      if (fns) {
        for (const auto& [h0, gt] : tiles) fns->values[gt - 1](p + h0 * n, n, v, count, stride, a + h0 * hd);
      } else {
        for (int64_t r = 0; r < count; ++r)
          for (int64_t h = 0; h < G; ++h) axpy(a + h * hd, p[h * n + r], v + r * stride, hd);
      }
    }
  });
  // out_h = acc[h] / sum_h
  for (int64_t h = 0; h < heads; ++h) {
    const Vec inv(1.f / sums[h]);
    float* oh = w.out + h * hd;
    const float* ah = acc + h * hd;
    int64_t d = 0;
    for (; d + kW <= hd; d += kW) (Vec::loadu(ah + d) * inv).store(oh + d);
    if (d < hd) {
      const int count = static_cast<int>(hd - d);
      (Vec::loadu(ah + d, count) * inv).store(oh + d, count);
    }
  }
}

// The parallel loop of `decode` for pools of element type T, after every check.
//
// Work is split over the B * nkv (sequence, kv head) pairs, b-major, into one contiguous range per thread of about
// equal cost (a pair costs its window's length, + 1), not of equal pair counts: a prompt chunk's rows (one per
// query token, see rapidlm/runtime/paged_kv.py) attend to 1 .. n positions, and equal counts left the thread with
// the chunk's first half idle for most of the call (a 200-token chunk: 1.0 -> 0.7 ms per layer). A range is walked
// in pieces, one sequence's kv heads [g0, g1) each, and each piece runs as one Work. Which thread computes a row never
// changes its arithmetic.
template <typename T>
void run(const at::Tensor& q, const T* pk, const T* pv, const int32_t* pt, int64_t max_blocks,
         const std::vector<int64_t>& rows, const std::vector<int64_t>& starts, const std::vector<int64_t>& ends,
         int64_t nkv, const Shapes& s, at::Tensor& out) {
  const int64_t B = static_cast<int64_t>(rows.size()), nh = q.size(1), hd = q.size(2);
  if (B == 0) return;
  int64_t max_n = 0, total_n = 0;
  for (const int64_t b : rows) {
    max_n = std::max(max_n, ends[b] - starts[b]);
    total_n += ends[b] - starts[b];
  }
  const TileFns<T>* fns = tile_fns<T>(hd);
  const auto tiles = head_tiles(s.G, fns ? std::clamp<int64_t>(kAccRegs / (hd / kW), 1, kMaxTile) : s.G);
  const float* pq = q.data_ptr<float>();
  float* po = out.data_ptr<float>();

  // Cost-balanced cut points over the pairs: parts of at least kMinTaskWork multiply-adds, one per thread at most.
  const int64_t pairs = B * nkv;
  const int64_t pair_weight = 2 * s.G * hd;  // multiply-adds per position of a pair
  const int64_t total_cost = total_n + B;      // + 1 per row: a row of length 0 still costs its call
  const int64_t parts = std::clamp<int64_t>(total_n * nkv * pair_weight / kMinTaskWork, 1,
                                            std::min<int64_t>(at::get_num_threads(), pairs));
  std::vector<int64_t> cuts(parts + 1, pairs);
  cuts[0] = 0;
  {
    int64_t acc_cost = 0, part = 1;
    for (int64_t b = 0; b < B && part < parts; ++b) {
      const int64_t c = ends[rows[b]] - starts[rows[b]] + 1;
      for (int64_t g = 0; g < nkv && part < parts; ++g) {
        // after this pair the running cost (per kv head) has passed part / parts of the total: cut behind it
        acc_cost += c;
        while (part < parts && acc_cost * parts >= part * total_cost * nkv) cuts[part++] = b * nkv + g + 1;
      }
    }
  }

  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t part = p0; part < p1; ++part) {
      const int64_t i0 = cuts[part], i1 = cuts[part + 1];
      if (i0 >= i1) continue;
      const int64_t max_heads = std::min(i1 - i0, nkv) * s.G;
      std::vector<float> scratch(max_heads * (max_n + hd + 1));
      float* scores = scratch.data();
      float* acc = scores + max_heads * max_n;
      float* sums = acc + max_heads * hd;
      for (int64_t i = i0; i < i1;) {
        const int64_t b = rows[i / nkv], g0 = i % nkv;
        const int64_t g1 = std::min(nkv, g0 + (i1 - i));
        const int64_t head0 = b * nh + g0 * s.G;  // first query head of the piece, as a row of q / out
        const Work<T> w{pq + head0 * hd, pk + g0 * hd, pv + g0 * hd, pt + b * max_blocks, starts[b], ends[b], g1 - g0,
                        po + head0 * hd};
        attend(w, s, fns, tiles, scores, acc, sums);
        i += g1 - g0;
      }
    }
  });
}

at::Tensor decode(const at::Tensor& q_in, const at::Tensor& k_pool, const at::Tensor& v_pool,
                  const at::Tensor& block_tables_in, const at::Tensor& seq_lens_in, double scale, int64_t window) {
  constexpr const char* kName = "rapidlm_paged::decode: ";
  TORCH_CHECK(q_in.scalar_type() == at::kFloat, kName, "q must be float32, got ", q_in.scalar_type());
  TORCH_CHECK((k_pool.scalar_type() == at::kFloat || k_pool.scalar_type() == at::kBFloat16) &&
                  v_pool.scalar_type() == k_pool.scalar_type(),
              kName, "k_pool and v_pool must both be float32 or both bfloat16, got ", k_pool.scalar_type(), " and ",
              v_pool.scalar_type());
  TORCH_CHECK(q_in.device().is_cpu() && k_pool.device().is_cpu() && v_pool.device().is_cpu() &&
                  block_tables_in.device().is_cpu() && seq_lens_in.device().is_cpu(),
              kName, "all tensors must be on the CPU");
  TORCH_CHECK(q_in.dim() == 3, kName, "q must be (B, nh, hd), got shape ", q_in.sizes());
  TORCH_CHECK(k_pool.dim() == 4, kName, "k_pool must be (num_blocks, block_size, nkv, hd), got shape ",
              k_pool.sizes());
  TORCH_CHECK(v_pool.sizes() == k_pool.sizes(), kName, "v_pool shape ", v_pool.sizes(), " != k_pool shape ",
              k_pool.sizes());
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), kName, "k_pool and v_pool must be contiguous");
  const int64_t B = q_in.size(0), nh = q_in.size(1), hd = q_in.size(2);
  const int64_t num_blocks = k_pool.size(0), bs = k_pool.size(1), nkv = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) == hd, kName, "head dim of q (", hd, ") != head dim of k_pool (", k_pool.size(3), ")");
  TORCH_CHECK(hd > 0 && bs > 0 && nkv > 0, kName, "head dim, block size and nkv must be positive");
  TORCH_CHECK(nh % nkv == 0, kName, "nh (", nh, ") must be a multiple of nkv (", nkv, ")");
  TORCH_CHECK(block_tables_in.scalar_type() == at::kInt && block_tables_in.dim() == 2 &&
                  block_tables_in.size(0) == B,
              kName, "block_tables must be (B, max_blocks) = (", B, ", *) int32, got ", block_tables_in.scalar_type(),
              " of shape ", block_tables_in.sizes());
  TORCH_CHECK(seq_lens_in.scalar_type() == at::kInt && seq_lens_in.dim() == 1 && seq_lens_in.size(0) == B, kName,
              "seq_lens must be (B,) = (", B, ",) int32, got ", seq_lens_in.scalar_type(), " of shape ",
              seq_lens_in.sizes());
  TORCH_CHECK(window >= 0, kName, "window must be >= 0, got ", window);

  const at::Tensor q = q_in.contiguous();
  const at::Tensor tables = block_tables_in.contiguous();
  const at::Tensor lens = seq_lens_in.contiguous();
  const int64_t max_blocks = tables.size(1);
  const int32_t* pt = tables.data_ptr<int32_t>();
  const int32_t* pl = lens.data_ptr<int32_t>();

  // Each sequence's window, and the table entries it covers, checked before any pool row is read.
  std::vector<int64_t> starts(B), ends(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = pl[b];
    TORCH_CHECK(len >= 0 && len <= max_blocks * bs, kName, "seq_lens[", b, "] = ", len, " is outside [0, ",
                max_blocks * bs, "] (max_blocks ", max_blocks, " x block_size ", bs, ")");
    const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
    starts[b] = start;
    ends[b] = len;
    if (len > start) {
      for (int64_t j = start / bs; j <= (len - 1) / bs; ++j) {
        const int32_t blk = pt[b * max_blocks + j];
        TORCH_CHECK(blk >= 0 && blk < num_blocks, kName, "block_tables[", b, ", ", j, "] = ", blk,
                    " is not a block of the pool (num_blocks ", num_blocks, ")");
      }
    }
  }

  at::Tensor out = at::empty({B, nh, hd}, q.options());
  if (B == 0 || nh == 0) return out;
  const Shapes s{nh / nkv, hd, bs, nkv * hd, static_cast<float>(scale)};
  // Rows of prompt-chunk segments go to run_chunks, the others (decode rows, short chunks) to run.
  const std::vector<Segment> segs =
      chunk_path_supports(hd) ? find_segments(pt, max_blocks, bs, B, starts, ends) : std::vector<Segment>{};
  std::vector<int64_t> rows;
  for (int64_t b = 0, i = 0; b < B; ++b) {
    if (i < static_cast<int64_t>(segs.size()) && b == segs[i].b0) {
      b += segs[i++].rows - 1;  // the whole segment goes to run_chunks
      continue;
    }
    rows.push_back(b);
  }
  const auto run_all = [&](const auto* pk, const auto* pv) {
    run(q, pk, pv, pt, max_blocks, rows, starts, ends, nkv, s, out);
    run_chunks(q, pk, pv, pt, max_blocks, segs, ends, nkv, s, out);
  };
  if (k_pool.scalar_type() == at::kBFloat16) {
    run_all(k_pool.data_ptr<at::BFloat16>(), v_pool.data_ptr<at::BFloat16>());
  } else {
    run_all(k_pool.data_ptr<float>(), v_pool.data_ptr<float>());
  }
  return out;
}

std::string simd_name() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "default";
#endif
}

}  // namespace

TORCH_LIBRARY(rapidlm_paged, m) {
  m.def(
      "decode(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, Tensor seq_lens, float scale, "
      "int window=0) -> Tensor");
  m.def("simd() -> str", &simd_name);
}

TORCH_LIBRARY_IMPL(rapidlm_paged, CPU, m) { m.impl("decode", &decode); }

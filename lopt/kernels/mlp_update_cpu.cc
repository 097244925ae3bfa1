// The `mlp` learned optimizer's per-coordinate update on a CPU (Metz et al. 2019, App. D.1; see
// lopt/mlp.py), as one XLA FFI call per update for all leaves (lopt/mlp_cpu.py builds and
// registers it).
//
// Per coordinate of a leaf (a parameter tensor) of n coordinates:
//   m_d <- decay_d m_d + (1 - decay_d) g                       (stored: new momenta)
//   s_f  = 1 / sqrt(mean over the leaf of x_f^2 + 1e-8)        for x_f in g, p, m_1 .. m_D
//   x    = [g s_0, p s_1, m_1 s_2, ..., m_D s_{D+1}]
//   h    = relu(x W0 + b0), then relu(h W + b) for each middle layer
//   o    = h Wl + bl                                             (stored: 2 outputs)
// The step -o_1 exp(o_2 exp_mult) step_mult is left to XLA (one elementwise pass).
//
// Two passes over the leaf. The first sums the squares for the per-tensor scales s (the
// paper's "normalized by the second moment with regard to other elements in the 'batch'
// dimension"): each segment of kSegmentBlocks blocks sums its squares per lane in float32 (at
// most 16 terms a lane), the lanes and then the segments are added in double in a fixed order,
// so the scales do not depend on how the work was split over threads; they are rounded to
// float once. The second pass does everything else.
//
// Layout: 16 coordinates at a time, one 16-lane vector per feature or hidden unit ("row-block
// major"), so every layer is broadcast-weight multiply-adds on whole vectors and the hidden
// activations stay in registers and L1; nothing but the momenta and the 2 outputs is written.
// Leading (vmap) batch axes are flattened; each batch entry has its own weights. The (batch
// entry, block) pairs are split into chunks over XLA's intra-op thread pool (ParallelFor).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
constexpr int kMaxFeatures = 64;
constexpr int kMaxHidden = 256;
constexpr int64_t kSegmentBlocks = 16;  // the scale pass's unit of work (256 coordinates)

inline vec relu(vec x) { return x > 0 ? x : 0; }

typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));

// out[e] = x[idx[e]] (one vpermps with AVX-512; elsewhere, e.g. AVX2 or ARM, a loop).
inline vec Permute(vec x, ivec idx) {
#ifdef __AVX512F__
  return (vec)_mm512_permutexvar_ps((__m512i)idx, (__m512)x);
#else
  vec out;
  for (int e = 0; e < kLanes; ++e) out[e] = x[idx[e]];
  return out;
#endif
}

struct Weights {  // one batch entry's MLP; w are [in, out] row-major
  const float* w0; const float* b0;
  int num_mid; const float* const* wm; const float* const* bm;
  const float* wl; const float* bl;
  const uint32_t* const* wm_bf16;  // the middle layers as packed bfloat16 pairs, or null
};

// bfloat16 middle layers (the option bf16_hidden; lopt/mlp_cpu.py states its tolerance). A
// middle layer z_c = sum_i h_i W_ic becomes sum over pairs q of bf16(h_2q) bf16(W_2q,c) +
// bf16(h_2q+1) bf16(W_2q+1,c), products exact and sums in float32 (AVX512-BF16's vdpbf16ps:
// 32 multiply-adds per instruction against 16 for a float32 FMA); both operands rounded to
// nearest even. The weights come packed (lopt/mlp_cpu.py, by XLA once per step for every leaf)
// as 32-bit pairs [bf16(W_2q,c) | bf16(W_2q+1,c) << 16], [H / 2, H]; the activations are packed
// per block as 16-lane vectors of pairs [h_2q | h_2q+1 << 16].

#ifdef __AVX512BF16__
constexpr bool kHaveBf16 = true;

// h2 = relu(h W + b) with W packed as above.
void MiddleLayerBf16(const vec* h, const uint32_t* wp, const float* b, int64_t H, vec* h2) {
  // Lane r of pair q: h_2q's lane r in the low half, h_2q+1's in the high half (16-bit
  // element 2r from element r of the converted pair, 2r + 1 from element 16 + r).
  const __m512i interleave = _mm512_set_epi16(
      31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
      23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  __m512bh hp[kMaxHidden / 2];
  for (int64_t q = 0; q < H / 2; ++q) {
    const __m512bh halves = _mm512_cvtne2ps_pbh((__m512)h[2 * q + 1],
                                                (__m512)h[2 * q]);
    hp[q] = (__m512bh)_mm512_permutexvar_epi16(interleave, (__m512i)halves);
  }
  for (int64_t c = 0; c < H; c += 16) {
    __m512 acc[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t q = 0; q < H / 2; ++q) {
      const uint32_t* row = wp + q * H + c;
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j)
        acc[j] = _mm512_dpbf16_ps(acc[j], hp[q], (__m512bh)_mm512_set1_epi32(row[j]));
    }
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) h2[c + j] = relu((vec)acc[j] + b[c + j]);
  }
}
#else
constexpr bool kHaveBf16 = false;
void MiddleLayerBf16(const vec*, const uint32_t*, const float*, int64_t, vec*) {}
#endif

// The momenta are stored [coordinate, decay]: a block's 16 coordinates are D contiguous
// vectors, lane e of vector j holding coordinate (16 j + e) / D's momentum for decay
// (16 j + e) % D. The momentum update runs on those vectors as stored; these are its
// per-lane decays and the lane -> coordinate map that spreads g over them.
struct Problem {
  int64_t num_dec, hidden;
  ivec coord[kMaxFeatures - 2];
  vec decay[kMaxFeatures - 2], one_minus_decay[kMaxFeatures - 2];
  ivec stride;  // lane r: r * D, the offsets of a decay's momenta within a block

  Problem(int64_t num_dec_, int64_t hidden_, const float* decays)
      : num_dec(num_dec_), hidden(hidden_) {
    for (int r = 0; r < kLanes; ++r) stride[r] = static_cast<int32_t>(r * num_dec);
    for (int64_t j = 0; j < num_dec; ++j)
      for (int e = 0; e < kLanes; ++e) {
        const int64_t i = kLanes * j + e;
        coord[j][e] = static_cast<int32_t>(i / num_dec);
        decay[j][e] = decays[i % num_dec];
        one_minus_decay[j][e] = 1.0f - decays[i % num_dec];
      }
  }
};

// A block of up to 16 coordinates starting at r0 of a leaf of n (k of them; zeros past the
// leaf's end): g, p and the new momenta m_d <- decay_d m_d + (1 - decay_d) g, stored layout.
struct BlockInputs {
  int k;
  vec g, p;
  vec m[kMaxFeatures - 2];

  BlockInputs(const Problem& pr, int64_t n, const float* g_, const float* p_, const float* m_,
              int64_t r0)
      : k(static_cast<int>(std::min<int64_t>(kLanes, n - r0))) {
    const int64_t D = pr.num_dec;
    if (k == kLanes) {  // constant sizes: vector loads, no library calls
      std::memcpy(&g, g_ + r0, sizeof(vec));
      std::memcpy(&p, p_ + r0, sizeof(vec));
      for (int64_t j = 0; j < D; ++j) std::memcpy(&m[j], m_ + r0 * D + kLanes * j, sizeof(vec));
    } else {
      g = vec{};
      p = vec{};
      std::memset(m, 0, sizeof(vec) * D);
      std::memcpy(&g, g_ + r0, sizeof(float) * k);
      std::memcpy(&p, p_ + r0, sizeof(float) * k);
      std::memcpy(m, m_ + r0 * D, sizeof(float) * k * D);
    }
    for (int64_t j = 0; j < D; ++j)
      m[j] = pr.decay[j] * m[j] + pr.one_minus_decay[j] * Permute(g, pr.coord[j]);
  }

  // Momentum d of the block's 16 coordinates as one vector (a gather from the stored layout).
  vec Momentum(const Problem& pr, int64_t d) const {
    const float* flat = reinterpret_cast<const float*>(m) + d;
#ifdef __AVX512F__
    return (vec)_mm512_i32gather_ps((__m512i)pr.stride, flat, 4);
#else
    vec md;
    for (int r = 0; r < kLanes; ++r) md[r] = flat[pr.stride[r]];
    return md;
#endif
  }

  // The new momenta back in the stored layout.
  void StoreMomenta(const Problem& pr, float* m_out) const {
    if (k == kLanes)
      for (int64_t j = 0; j < pr.num_dec; ++j) std::memcpy(m_out + kLanes * j, &m[j], sizeof(vec));
    else
      std::memcpy(m_out, m, sizeof(float) * k * pr.num_dec);
  }
};

// Scale pass, one segment: sums[f] = sum of x_f^2 over blocks [b0, b1) of one batch entry
// (zero lanes past the leaf's end add nothing), f = g, p, m_1 .. m_D. Each lane sums its at
// most kSegmentBlocks squares in float32 (within kSegmentBlocks eps of exact), the lanes are
// added in double.
void SegmentSquares(const Problem& pr, int64_t n, const float* g, const float* p,
                    const float* m, int64_t b0, int64_t b1, double* sums) {
  const int64_t D = pr.num_dec;
  vec acc[kMaxFeatures] = {};  // g, p, then the stored momenta vectors
  for (int64_t b = b0; b < b1; ++b) {
    const BlockInputs in(pr, n, g, p, m, b * kLanes);
    acc[0] += in.g * in.g;
    acc[1] += in.p * in.p;
    for (int64_t j = 0; j < D; ++j) acc[2 + j] += in.m[j] * in.m[j];
  }
  for (int64_t f = 0; f < 2 + D; ++f) sums[f] = 0;
  for (int f = 0; f < 2; ++f)
    for (int e = 0; e < kLanes; ++e) sums[f] += acc[f][e];
  for (int64_t j = 0; j < D; ++j)
    for (int e = 0; e < kLanes; ++e) sums[2 + (kLanes * j + e) % D] += acc[2 + j][e];
}

// One block of up to 16 coordinates starting at r0 of one batch entry; s: its 2 + D scales.
void Block(const Problem& pr, int64_t n, const Weights& w, const float* g, const float* p,
           const float* m, const float* s, int64_t r0, float* out, float* m_out) {
  const int64_t D = pr.num_dec, H = pr.hidden, F = 2 + D;
  const BlockInputs in(pr, n, g, p, m, r0);
  const int k = in.k;
  vec x[kMaxFeatures];
  x[0] = in.g * s[0];
  x[1] = in.p * s[1];
  for (int64_t d = 0; d < D; ++d) x[2 + d] = in.Momentum(pr, d) * s[2 + d];
  in.StoreMomenta(pr, m_out + r0 * D);
  // Every layer 16 outputs at a time: 16 independent accumulators (a dependent chain of
  // multiply-adds would wait on each one's latency).
  vec h[kMaxHidden], h2[kMaxHidden];
  for (int64_t c = 0; c < H; c += 16) {
    vec acc[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) acc[j] = x[0] * w.w0[c + j];
    for (int64_t f = 1; f < F; ++f) {
      const float* row = w.w0 + f * H + c;
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) acc[j] += x[f] * row[j];
    }
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) h[c + j] = relu(acc[j] + w.b0[c + j]);
  }
  for (int l = 0; l < w.num_mid; ++l) {
    if (w.wm_bf16 != nullptr) {
      MiddleLayerBf16(h, w.wm_bf16[l], w.bm[l], H, h2);
      std::memcpy(h, h2, sizeof(vec) * H);
      continue;
    }
    const float* wm = w.wm[l];
    for (int64_t c = 0; c < H; c += 16) {
      vec acc[16];
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) acc[j] = h[0] * wm[c + j];
      for (int64_t i = 1; i < H; ++i) {
        const float* row = wm + i * H + c;
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) acc[j] += h[i] * row[j];
      }
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) h2[c + j] = relu(acc[j] + w.bm[l][c + j]);
    }
    std::memcpy(h, h2, sizeof(vec) * H);
  }
  // Output layer: 4 partial sums per output, over hidden units j = 4q + u.
  vec o[2][4];
  for (int u = 0; u < 4; ++u) { o[0][u] = h[u] * w.wl[2 * u]; o[1][u] = h[u] * w.wl[2 * u + 1]; }
  for (int64_t j = 4; j < H; j += 4) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      o[0][u] += h[j + u] * w.wl[2 * (j + u)];
      o[1][u] += h[j + u] * w.wl[2 * (j + u) + 1];
    }
  }
  const vec o0 = (o[0][0] + o[0][1]) + (o[0][2] + o[0][3]) + w.bl[0];
  const vec o1 = (o[1][0] + o[1][1]) + (o[1][2] + o[1][3]) + w.bl[1];
  for (int r = 0; r < k; ++r) { out[(r0 + r) * 2] = o0[r]; out[(r0 + r) * 2 + 1] = o1[r]; }
}

using lopt_kernels::ParallelFor;  // parallel_for.h

int64_t Product(ffi::Span<const int64_t> dims, size_t upto) {
  int64_t out = 1;
  for (size_t i = 0; i < upto; ++i) out *= dims[i];
  return out;
}

// One leaf's operands and results for one batch entry's slice (pointers at entry 0).
struct Leaf {
  int64_t n, blocks, segments;
  const float *g, *p, *m;
  float *out, *m_out;
};

// Operands, for K leaves (attribute num_leaves): g_1..g_K [..., n_k], p_1..p_K [..., n_k],
// m_1..m_K [..., n_k, D] (any shape of that size, D last: the leaf's), then the L layers'
// (w, b) pairs: w0 [..., 2 + D, H], b0 [..., H], middle [..., H, H], [..., H], last [..., H, 2],
// [..., 2]; with bf16_hidden, then the L - 2 middle layers' packed bf16 pairs [..., H / 2, H]
// (uint32). The leading (vmap) axes are the same for all.
// Results: out_1..out_K [..., n_k, 2], then the new momenta shaped as m_k. lopt/mlp_cpu.py
// aliases each m_k's buffer to its new momenta: the scale pass only reads m_k and ends (for
// that batch entry) before the second pass starts; there Block reads a block's momenta before
// it writes them, and blocks do not overlap.
ffi::Error Impl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets,
                ffi::Span<const float> decays, int32_t num_leaves, int32_t bf16_hidden) {
  const size_t K = num_leaves > 0 ? num_leaves : 0, num_args = args.size();
  auto bad = [](const char* what) {
    return ffi::Error::InvalidArgument(std::string("lopt mlp_update: ") + what);
  };
  if (K == 0 || num_args < 3 * K + 4 || rets.size() != 2 * K) return bad("operands");
  // 2 L weights, or 2 L + (L - 2) = 3 L - 2 with the packed middle layers.
  const size_t rest = num_args - 3 * K;
  const size_t num_layers = bf16_hidden ? (rest + 2) / 3 : rest / 2;
  if (num_layers < 2 || rest != (bf16_hidden ? 3 * num_layers - 2 : 2 * num_layers))
    return bad("operands");
  const size_t num_float = 3 * K + 2 * num_layers;
  std::vector<ffi::AnyBuffer> a;
  for (size_t i = 0; i < num_args; ++i) {
    auto b = args.get<ffi::AnyBuffer>(i);
    if (b.has_error()) return b.error();
    if (b->element_type() != (i < num_float ? ffi::DataType::F32 : ffi::DataType::U32))
      return bad("operand types");
    a.push_back(*b);
  }
  auto w0d = a[3 * K].dimensions();
  if (decays.size() + 2 > kMaxFeatures) return bad("unsupported shapes");
  const Problem pr(static_cast<int64_t>(decays.size()), w0d[w0d.size() - 1], decays.begin());
  const int num_mid = static_cast<int>(num_layers) - 2;
  if (pr.hidden % 16 || pr.hidden > kMaxHidden || w0d[w0d.size() - 2] != 2 + pr.num_dec ||
      num_mid > 16)
    return bad("unsupported shapes");
  const int64_t D = pr.num_dec, H = pr.hidden, F = 2 + D;
  auto f = [&](size_t i) { return static_cast<const float*>(a[i].untyped_data()); };
  auto W = [&](size_t i) { return f(3 * K + i); };  // the layers' (w, b), in order
  auto packed = [&](int l) {
    return static_cast<const uint32_t*>(a[num_float + l].untyped_data());
  };
  const auto gd0 = a[0].dimensions();
  const int64_t batch = Product(gd0, gd0.size() - 1);
  std::vector<Leaf> leaves(K);
  std::vector<int64_t> seg_start(K + 1, 0), block_start(K + 1, 0);  // prefix sums over leaves
  for (size_t k = 0; k < K; ++k) {
    auto gd = a[k].dimensions();
    if (Product(gd, gd.size() - 1) != batch) return bad("leaves with different batch axes");
    auto out = rets.get<ffi::AnyBuffer>(k);
    auto m_out = rets.get<ffi::AnyBuffer>(K + k);
    if (out.has_error()) return out.error();
    if (m_out.has_error()) return m_out.error();
    Leaf& leaf = leaves[k];
    leaf.n = gd[gd.size() - 1];
    leaf.blocks = (leaf.n + kLanes - 1) / kLanes;
    leaf.segments = (leaf.blocks + kSegmentBlocks - 1) / kSegmentBlocks;
    leaf.g = f(k);
    leaf.p = f(K + k);
    leaf.m = f(2 * K + k);
    leaf.out = static_cast<float*>((*out)->untyped_data());
    leaf.m_out = static_cast<float*>((*m_out)->untyped_data());
    seg_start[k + 1] = seg_start[k] + leaf.segments;
    block_start[k + 1] = block_start[k] + leaf.blocks;
  }
  const int64_t segments = seg_start[K], blocks = block_start[K];  // per batch entry
  auto leaf_of = [](const std::vector<int64_t>& start, int64_t i) {  // the leaf holding item i
    return static_cast<size_t>(std::upper_bound(start.begin(), start.end(), i) - start.begin()) - 1;
  };

  if (bf16_hidden && !kHaveBf16) return bad("bf16_hidden needs AVX512-BF16");
  std::vector<double> sums(batch * segments * F);  // per (batch entry, segment of any leaf)
  std::vector<float> scales(batch * K * F);         // per (batch entry, leaf)
  auto segment = [&](int64_t e, size_t k, int64_t c) {  // pass 1, one segment
    const Leaf& l = leaves[k];
    const int64_t b0 = c * kSegmentBlocks;
    SegmentSquares(pr, l.n, l.g + e * l.n, l.p + e * l.n, l.m + e * l.n * D, b0,
                   std::min(l.blocks, b0 + kSegmentBlocks),
                   &sums[(e * segments + seg_start[k] + c) * F]);
  };
  auto finish = [&](int64_t e, size_t k) {  // a leaf's scales, adding its segments in order
    for (int64_t i = 0; i < F; ++i) {
      double t = 0;
      for (int64_t c = seg_start[k]; c < seg_start[k + 1]; ++c)
        t += sums[(e * segments + c) * F + i];
      scales[(e * K + k) * F + i] = static_cast<float>(1.0 / std::sqrt(t / leaves[k].n + 1e-8));
    }
  };
  auto block = [&](int64_t e, size_t k, int64_t b) {  // pass 2, one block
    const float* wm[16];
    const float* bm[16];
    const uint32_t* wp[16];
    for (int l = 0; l < num_mid; ++l) {
      wm[l] = W(2 + 2 * l) + e * H * H;
      bm[l] = W(3 + 2 * l) + e * H;
      if (bf16_hidden) wp[l] = packed(l) + e * H * H / 2;
    }
    const size_t last = 2 * num_layers - 2;
    Weights w{W(0) + e * F * H, W(1) + e * H, num_mid, wm, bm,
              W(last) + e * H * 2, W(last + 1) + e * 2, bf16_hidden ? wp : nullptr};
    const Leaf& l = leaves[k];
    Block(pr, l.n, w, l.g + e * l.n, l.p + e * l.n, l.m + e * l.n * D, &scales[(e * K + k) * F],
          b * kLanes, l.out + e * l.n * 2, l.m_out + e * l.n * D);
  };
  constexpr int64_t kMinBlocks = 32;  // a chunk worth scheduling: ~10 us of pass 2
  if (batch >= 2 * pool.num_threads()) {
    // Many batch entries (vmapped particles): one parallel region, each task an entry's two
    // passes over every leaf (the pool is synchronised once per update).
    ParallelFor(pool, batch, (kMinBlocks + blocks - 1) / blocks, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e)
        for (size_t k = 0; k < K; ++k) {
          for (int64_t c = 0; c < leaves[k].segments; ++c) segment(e, k, c);
          finish(e, k);
          for (int64_t b = 0; b < leaves[k].blocks; ++b) block(e, k, b);
        }
    });
  } else {
    // Few entries (an exported optimizer's update): each pass split over the blocks.
    ParallelFor(pool, batch * segments, /*min_chunk=*/16, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t e = t / segments, c = t % segments;
        const size_t k = leaf_of(seg_start, c);
        segment(e, k, c - seg_start[k]);
      }
    });
    for (int64_t e = 0; e < batch; ++e)
      for (size_t k = 0; k < K; ++k) finish(e, k);
    ParallelFor(pool, batch * blocks, kMinBlocks, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t e = t / blocks, b = t % blocks;
        const size_t k = leaf_of(block_start, b);
        block(e, k, b - block_start[k]);
      }
    });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoptMlpUpdate, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const float>>("decays")
                                  .Attr<int32_t>("num_leaves")
                                  .Attr<int32_t>("bf16_hidden"));

// Building blocks of lopt/kernels/adafac_update_cpu.cc (the `adafac_mlp` learned optimizer's
// fused CPU update; that file says what it computes): 16-lane float vectors, accumulators
// stored [n, C] read and written a block at a time, the problem and leaf descriptions with the
// geometry of a factored leaf, the features of a block, the per-coordinate MLP on a block, and
// the thread-pool loop.
// Included by that file only (lopt/adafac_cpu.py hashes both for its build key).
#ifndef LOPT_KERNELS_ADAFAC_UPDATE_CPU_H_
#define LOPT_KERNELS_ADAFAC_UPDATE_CPU_H_

// The block's state is copied between memory and small arrays of vectors in loops of runtime
// length (the decay counts); GCC would turn each such loop into a library memcpy call.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-loop-distribute-patterns")
#endif
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
typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));
// An unaligned vector in memory: loads and stores through it are single instructions.
typedef float uvec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4), may_alias));
inline vec LoadU(const float* p) { return *reinterpret_cast<const uvec*>(p); }
inline void StoreU(float* p, vec v) { *reinterpret_cast<uvec*>(p) = v; }
constexpr int kMaxComp = 8;       // decays per accumulator kind
constexpr int kMaxFeatures = 64;
constexpr int kMaxHidden = 256;
constexpr int64_t kSegmentBlocks = 16;  // pass 2's unit of work (256 coordinates)
constexpr float kEpsRms = 1e-6f, kEpsFac = 1e-8f;  // lopt/adafac.py's _RSQRT_EPS_*

inline vec relu(vec x) { return x > 0 ? x : 0; }

inline vec Sqrt(vec x) {
#ifdef __AVX512F__
  return (vec)_mm512_sqrt_ps((__m512)x);
#else
  vec out;
  for (int e = 0; e < kLanes; ++e) out[e] = std::sqrt(x[e]);
  return out;
#endif
}
inline vec Rsqrt(vec x) { return 1.0f / Sqrt(x); }

inline vec Permute(vec x, ivec idx) {  // out[e] = x[idx[e]]
#ifdef __AVX512F__
  return (vec)_mm512_permutexvar_ps((__m512i)idx, (__m512)x);
#else
  vec out;
  for (int e = 0; e < kLanes; ++e) out[e] = x[idx[e]];
  return out;
#endif
}

inline vec Gather(const float* base, ivec idx) {  // out[e] = base[idx[e]]
#ifdef __AVX512F__
  return (vec)_mm512_i32gather_ps((__m512i)idx, base, 4);
#else
  vec out;
  for (int e = 0; e < kLanes; ++e) out[e] = base[idx[e]];
  return out;
#endif
}

// An accumulator stored [n, C]: a block's 16 coordinates are C contiguous vectors, lane e of
// vector j holding coordinate (16 j + e) / C's component (16 j + e) % C.
struct Comp {
  int C;
  ivec coord[kMaxComp];
  ivec stride;  // lane r: r * C
  ivec within[kMaxComp];  // component i of lane r: element (r C + i) % 16 of vector (r C + i) / 16
  uint16_t from[kMaxComp][kMaxComp];  // lanes of component i that vector j holds
  void Init(int c) {
    C = c;
    for (int r = 0; r < kLanes; ++r) stride[r] = r * C;
    for (int j = 0; j < C; ++j)
      for (int e = 0; e < kLanes; ++e) coord[j][e] = (kLanes * j + e) / C;
    for (int i = 0; i < C; ++i) {
      for (int j = 0; j < C; ++j) from[i][j] = 0;
      for (int r = 0; r < kLanes; ++r) {
        within[i][r] = (r * C + i) % kLanes;
        from[i][(r * C + i) / kLanes] |= static_cast<uint16_t>(1u << r);
      }
    }
  }
  // The methods take the component count C (= this->C) as an argument, so that a caller with a
  // compile-time count gets loops of constant trip count.
  void Load(const float* src, int64_t r0, int k, vec* raw, int C) const {
    if (k == kLanes) {  // constant sizes: vector loads, no library calls
      for (int j = 0; j < C; ++j) raw[j] = LoadU(src + r0 * C + kLanes * j);
    } else {
      std::memset(raw, 0, sizeof(vec) * C);
      std::memcpy(raw, src + r0 * C, sizeof(float) * k * C);
    }
  }
  void Store(const vec* raw, int64_t r0, int k, float* dst, int C) const {
    if (k == kLanes)
      for (int j = 0; j < C; ++j) StoreU(dst + r0 * C + kLanes * j, raw[j]);
    else
      std::memcpy(dst + r0 * C, raw, sizeof(float) * k * C);
  }
  // raw <- b raw + (1 - b) x, per stored lane (b: the lane's decay).
  void Update(vec* raw, const vec* b, const vec* om, vec x, int C) const {
    if (C == 1) { raw[0] = b[0] * raw[0] + om[0] * x; return; }
    for (int j = 0; j < C; ++j) raw[j] = b[j] * raw[j] + om[j] * Permute(x, coord[j]);
  }
  vec Get(const vec* raw, int i, int C) const {  // component i of the 16 coordinates
    if (C == 1) return raw[0];
#ifdef __AVX512F__
    // Masked permutes of the vectors in registers (a gather from a block just stored would
    // wait for the stores to reach the cache).
    __m512 out = _mm512_setzero_ps();
    for (int j = 0; j < C; ++j)
      if (from[i][j])
        out = _mm512_mask_permutexvar_ps(out, from[i][j], (__m512i)within[i], (__m512)raw[j]);
    return (vec)out;
#else
    return Gather(reinterpret_cast<const float*>(raw) + i, stride);
#endif
  }
};

struct LaneDecays {  // one accumulator kind's decays per stored lane, for one batch entry
  vec b[kMaxComp], om[kMaxComp];
  void Init(const Comp& c, const float* decays) {
    for (int j = 0; j < c.C; ++j)
      for (int e = 0; e < kLanes; ++e) {
        b[j][e] = decays[(kLanes * j + e) % c.C];
        om[j][e] = 1.0f - b[j][e];
      }
  }
};

struct Problem {
  int nm, nr, nf, F, H, num_mid;
  float norm_eps, grad_eps;
  Comp cm, cr, cf;
  int num_pointwise(bool factored) const {  // features computed per coordinate in pass 2
    return factored ? 2 + nm + 2 * nr + nm * nr + 2 * nf : F;
  }
};

struct Leaf {
  int64_t n, blocks, segments;
  bool factored, swap;
  int64_t A, X, B, Y, D, nX, nY, nM;
  int64_t g_off, st_off;  // offsets into the per-entry scratch (sums of pass 1, rmeps)
  // Whole blocks within one run of Y (D = 1, Y >= 16) take the fast path of pass 3: the row and
  // column features' part of the first layer precomputed per X-side entry ([nX, H], at
  // part_off) and per Y-side entry ([H, nY], after it), a bias per block.
  bool fast;
  int64_t part_off;
  const float *g, *p, *m, *rms, *f0, *f1;  // f0, f1: row, col (factored) or v, null
  float *out, *m_out, *rms_out, *f0_out, *f1_out;
  int64_t nrow() const { return swap ? nY : nX; }
  int64_t ncol() const { return swap ? nX : nY; }
};

// Whether the block at q0 is whole and within one run of Y with D = 1 (Leaf::fast).
inline bool FastBlock(const Leaf& l, int64_t q0) {
  return l.fast && q0 + kLanes <= l.n && q0 % l.Y + kLanes <= l.Y;
}

// Per lane of the block at q0: the row, column (times nf) and row-mean (times nf) indices.
void Indices(const Leaf& l, int nf, int64_t q0, ivec& ir, ivec& ic, ivec& im) {
  int64_t d = q0 % l.D, t = q0 / l.D;
  int64_t y = t % l.Y;
  t /= l.Y;
  int64_t b = t % l.B;
  t /= l.B;
  int64_t x = t % l.X, a = t / l.X;
  for (int r = 0; r < kLanes; ++r) {
    if (q0 + r < l.n) {
      const int64_t ix = ((a * l.X + x) * l.B + b) * l.D + d;
      const int64_t iy = ((a * l.B + b) * l.Y + y) * l.D + d;
      ir[r] = static_cast<int32_t>((l.swap ? iy : ix) * nf);
      ic[r] = static_cast<int32_t>((l.swap ? ix : iy) * nf);
      im[r] = static_cast<int32_t>(((a * l.B + b) * l.D + d) * nf);
    } else {
      ir[r] = ic[r] = im[r] = 0;
    }
    if (++d == l.D) {
      d = 0;
      if (++y == l.Y) {
        y = 0;
        if (++b == l.B) {
          b = 0;
          if (++x == l.X) { x = 0; ++a; }
        }
      }
    }
  }
}

// The block's features x[0 .. count) (count: all F, or pass 2's pointwise ones).
template <int NM, int NR, int NF>
void Features(const Problem& pr, vec g, vec p, const vec* m, const vec* rms, const vec* R,
              const vec* C, const vec* rmeps, bool factored, int count, vec* x) {
  const int nm_ = NM ? NM : pr.nm, nr_ = NR ? NR : pr.nr, nf_ = NF ? NF : pr.nf;
  int i = 0;
  x[i++] = g;
  x[i++] = p;
  for (int j = 0; j < nm_; ++j) x[i++] = m[j];
  vec rr[kMaxComp];
  for (int j = 0; j < nr_; ++j) { x[i++] = rms[j]; rr[j] = Rsqrt(rms[j] + kEpsRms); }
  for (int a = 0; a < nm_; ++a)
    for (int b = 0; b < nr_; ++b) x[i++] = m[a] * rr[b];
  for (int b = 0; b < nr_; ++b) x[i++] = rr[b];
  vec rv[kMaxComp];
  for (int f = 0; f < nf_; ++f)
    rv[f] = factored ? Rsqrt(R[f] * C[f] / rmeps[f] + kEpsFac) : Rsqrt(R[f] + kEpsFac);
  for (int f = 0; f < nf_; ++f) x[i++] = g * rv[f];
  for (int f = 0; f < nf_; ++f) x[i++] = m[f] * rv[f];
  if (i >= count) return;
  for (int f = 0; f < nf_; ++f) x[i++] = R[f];
  for (int f = 0; f < nf_; ++f) x[i++] = C[f];
  for (int f = 0; f < nf_; ++f) x[i++] = Rsqrt(R[f] + kEpsFac);
  for (int f = 0; f < nf_; ++f) x[i++] = Rsqrt(C[f] + kEpsFac);
}

struct Weights {  // one batch entry's MLP; w are [in, out] row-major; w0 scaled per leaf
  const float* b0;
  const float* const* wm;
  const float* const* bm;
  const float* wl;
  const float* bl;
};

// Pass 3's network on one block's features: 2 outputs per coordinate stored at out.
// The first layer takes features x[0 .. F) and adds b0, or bias[] (a vector per hidden unit)
// where given.
void Network(const Problem& pr, const Weights& w, const float* w0, const vec* x, int F,
             const vec* bias, int k, float* out) {
  const int H = pr.H;
  vec buf[2][kMaxHidden];
  vec *h = buf[0], *h2 = buf[1];
  for (int c = 0; c < H; c += 16) {
    vec acc[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) acc[j] = x[0] * w0[c + j];
    for (int f = 1; f < F; ++f) {
      const float* row = w0 + f * H + c;
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) acc[j] += x[f] * row[j];
    }
    if (bias != nullptr) {
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) h[c + j] = relu(acc[j] + bias[c + j]);
    } else {
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) h[c + j] = relu(acc[j] + w.b0[c + j]);
    }
  }
  for (int l = 0; l < pr.num_mid; ++l) {
    const float* wm = w.wm[l];
    for (int c = 0; c < H; c += 16) {
      vec acc[16];
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) acc[j] = h[0] * wm[c + j];
      for (int i = 1; i < H; ++i) {
        const float* row = wm + i * H + c;
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) acc[j] += h[i] * row[j];
      }
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) h2[c + j] = relu(acc[j] + w.bm[l][c + j]);
    }
    std::swap(h, h2);
  }
  vec o[2][4];
  for (int u = 0; u < 4; ++u) { o[0][u] = h[u] * w.wl[2 * u]; o[1][u] = h[u] * w.wl[2 * u + 1]; }
  for (int j = 4; j < H; j += 4) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      o[0][u] += h[j + u] * w.wl[2 * (j + u)];
      o[1][u] += h[j + u] * w.wl[2 * (j + u) + 1];
    }
  }
  const vec o0 = (o[0][0] + o[0][1]) + (o[0][2] + o[0][3]) + w.bl[0];
  const vec o1 = (o[1][0] + o[1][1]) + (o[1][2] + o[1][3]) + w.bl[1];
  for (int r = 0; r < k; ++r) { out[2 * r] = o0[r]; out[2 * r + 1] = o1[r]; }
}

using lopt_kernels::ParallelFor;  // parallel_for.h

}  // namespace

#endif  // LOPT_KERNELS_ADAFAC_UPDATE_CPU_H_

// The `mlp` learned optimizer's per-coordinate update on a CPU (Metz et al. 2019, App. D.1; see
// lopt/mlp.py), as one XLA FFI call per leaf (lopt/mlp_cpu.py builds and registers it).
//
// Per coordinate, with the leaf's per-tensor scales s computed outside (they are reductions
// over the whole leaf):
//   m_d <- decay_d m_d + (1 - decay_d) g                       (stored: new momenta)
//   x    = [g s_0, p s_1, m_1 s_2, ..., m_D s_{D+1}]
//   h    = relu(x W0 + b0), then relu(h W + b) for each middle layer
//   o    = h Wl + bl                                             (stored: 2 outputs)
// The step -o_1 exp(o_2 exp_mult) step_mult is left to XLA (one elementwise pass).
//
// Layout: 16 coordinates at a time, one 16-lane vector per feature or hidden unit ("row-block
// major"), so every layer is broadcast-weight multiply-adds on whole vectors and the hidden
// activations stay in registers and L1; nothing but the momenta and the 2 outputs is written.
// Leading (vmap) batch axes are flattened; each batch entry has its own weights. The (batch
// entry, block) pairs are split into chunks over XLA's intra-op thread pool (ParallelFor).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
constexpr int kMaxFeatures = 64;
constexpr int kMaxHidden = 256;

inline vec relu(vec x) { return x > 0 ? x : 0; }

struct Weights {  // one batch entry's MLP; w are [in, out] row-major
  const float* w0; const float* b0;
  int num_mid; const float* const* wm; const float* const* bm;
  const float* wl; const float* bl;
};

struct Problem {
  int64_t n, num_dec, hidden;
  const float* decays;
};

// One block of up to 16 coordinates starting at r0 of one batch entry.
void Block(const Problem& pr, const Weights& w, const float* g, const float* p, const float* m,
           const float* s, int64_t r0, float* out, float* m_out) {
  const int64_t D = pr.num_dec, H = pr.hidden, F = 2 + D;
  const int k = static_cast<int>(std::min<int64_t>(kLanes, pr.n - r0));
  // Gather the block: g, p and the momenta (stored [coordinate, decay]) as one vector each.
  float mbuf[kLanes * (kMaxFeatures - 2)];
  if (k < kLanes) std::memset(mbuf, 0, sizeof(float) * kLanes * D);
  std::memcpy(mbuf, m + r0 * D, sizeof(float) * k * D);
  vec gv = {}, pv = {};
  std::memcpy(&gv, g + r0, sizeof(float) * k);
  std::memcpy(&pv, p + r0, sizeof(float) * k);
  vec x[kMaxFeatures];
  x[0] = gv * s[0];
  x[1] = pv * s[1];
  for (int64_t d = 0; d < D; ++d) {
    vec md;
    for (int r = 0; r < kLanes; ++r) md[r] = mbuf[r * D + d];
    const float dec = pr.decays[d];
    md = dec * md + (1.0f - dec) * gv;
    for (int r = 0; r < kLanes; ++r) mbuf[r * D + d] = md[r];
    x[2 + d] = md * s[2 + d];
  }
  std::memcpy(m_out + r0 * D, mbuf, sizeof(float) * k * D);
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

// Runs fn(lo, hi) over [0, total) in chunks claimed from a shared counter by the calling thread
// and by helpers scheduled on XLA's intra-op pool. The caller never waits for a helper that has
// not started: the caller itself may be a pool thread (XLA:CPU runs several devices' programs
// on that pool), so waiting for queued tasks could wait for itself. It waits only for helpers
// still inside a chunk they claimed; a helper that starts after every chunk is claimed returns
// at once, touching only the shared state it co-owns.
struct ParallelState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> active{0};
  std::mutex mu;
  std::condition_variable cv;
};

template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t total, int64_t min_chunk, Fn fn) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = std::max<int64_t>(min_chunk, total / (4 * threads) + 1);
  const int64_t chunks = (total + chunk - 1) / chunk;
  if (threads <= 1 || chunks <= 1) { fn(0, total); return; }
  auto state = std::make_shared<ParallelState>();
  std::function<void(int64_t)> body = [&](int64_t c) {
    fn(c * chunk, std::min(total, (c + 1) * chunk));
  };
  auto* body_ptr = &body;  // valid while the caller waits; used only for a claimed chunk
  auto drain = [state, body_ptr, chunks] {
    state->active.fetch_add(1);
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) (*body_ptr)(c);
    if (state->active.fetch_sub(1) == 1) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->cv.notify_all();
    }
  };
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) pool.Schedule(decltype(drain)(drain));
  for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) body(c);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->active.load() == 0; });
}

int64_t Product(ffi::Span<const int64_t> dims, size_t upto) {
  int64_t out = 1;
  for (size_t i = 0; i < upto; ++i) out *= dims[i];
  return out;
}

// Operands: g [..., n], p [..., n], m [..., n, D] (any shape of that size, D last: the leaf's),
// scales [..., 2 + D], then the layers' (w, b) pairs: w0 [..., 2 + D, H], b0 [..., H], middle
// [..., H, H], [..., H], last [..., H, 2], [..., 2].
// Results: out [..., n, 2], new momenta shaped as m. lopt/mlp_cpu.py aliases the new momenta to
// m's buffer: Block reads a block's momenta before it writes them, and blocks do not overlap.
ffi::Error Impl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::Span<const float> decays,
                ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> m_out) {
  const size_t num_args = args.size();
  if (num_args < 8 || num_args % 2) return ffi::Error::InvalidArgument("lopt mlp_update: operands");
  std::vector<ffi::AnyBuffer> a;
  for (size_t i = 0; i < num_args; ++i) {
    auto b = args.get<ffi::AnyBuffer>(i);
    if (b.has_error()) return b.error();
    if (b->element_type() != ffi::DataType::F32)
      return ffi::Error::InvalidArgument("lopt mlp_update: float32 operands only");
    a.push_back(*b);
  }
  auto gd = a[0].dimensions();
  const size_t batch_rank = gd.size() - 1;
  Problem pr{gd[batch_rank], static_cast<int64_t>(decays.size()), 0, decays.begin()};
  auto w0d = a[4].dimensions();
  pr.hidden = w0d[w0d.size() - 1];
  const int num_mid = static_cast<int>((num_args - 8) / 2);
  if (pr.hidden % 16 || pr.hidden > kMaxHidden || 2 + pr.num_dec > kMaxFeatures ||
      w0d[w0d.size() - 2] != 2 + pr.num_dec || num_mid > 16)
    return ffi::Error::InvalidArgument("lopt mlp_update: unsupported shapes");
  const int64_t batch = Product(gd, batch_rank), n = pr.n, D = pr.num_dec, H = pr.hidden;
  const int64_t blocks = (n + kLanes - 1) / kLanes;
  auto f = [&](size_t i) { return static_cast<const float*>(a[i].untyped_data()); };
  float* o = static_cast<float*>(out->untyped_data());
  float* mo = static_cast<float*>(m_out->untyped_data());
  auto work = [&](int64_t lo, int64_t hi) {
    const float* wm[16];
    const float* bm[16];
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t e = t / blocks, r0 = (t % blocks) * kLanes;
      for (int l = 0; l < num_mid; ++l) {
        wm[l] = f(6 + 2 * l) + e * H * H;
        bm[l] = f(7 + 2 * l) + e * H;
      }
      Weights w{f(4) + e * (2 + D) * H, f(5) + e * H, num_mid, wm, bm,
                f(num_args - 2) + e * H * 2, f(num_args - 1) + e * 2};
      Block(pr, w, f(0) + e * n, f(1) + e * n, f(2) + e * n * D, f(3) + e * (2 + D), r0,
            o + e * n * 2, mo + e * n * D);
    }
  };
  ParallelFor(pool, batch * blocks, /*min_chunk=*/32, work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoptMlpUpdate, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .Attr<ffi::Span<const float>>("decays")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

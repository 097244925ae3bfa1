// The `adafac_mlp` learned optimizer's per-coordinate update on a CPU (small_fc_lopt: Metz et
// al. 2022, arXiv:2203.11860, with Adafactor's factored second moments, Shazeer & Stern 2018,
// Sec. 3; every equation is in lopt/adafac.py's docstring), as one XLA FFI call per update for
// all leaves (lopt/adafac_cpu.py builds and registers it).
//
// Per leaf (a parameter tensor of n coordinates, g its gradient, p its value), for one batch
// entry, three passes:
//   1. (tensors of rank >= 2) the factored accumulators: sums of g^2 (+ factored_grad_eps)
//      over the column axis and over the row axis (in double), then
//        row <- b_f row + (1 - b_f) mean_col(g^2),  col <- b_f col + (1 - b_f) mean_row(g^2)
//      (stored) and mean(row) over the row axis;
//   2. per block of 16 coordinates: m <- b_m m + (1 - b_m) g, rms <- b_r rms + (1 - b_r) g^2,
//      (rank < 2) v <- b_f v + (1 - b_f) g^2 (stored), the features, and the sums of their
//      squares over the tensor (float32 partial sums of at most 16 terms per lane, added in
//      double in a fixed order) behind the per-tensor normalisation s_f = 1 / sqrt(mean(x_f^2)
//      + norm_eps); the row/column features' sums come from the accumulators of pass 1;
//   3. per block: the features again (from the new state), the MLP with its first layer
//      scaled by s (s_f W0[f], the product lopt/adafac.py takes), ReLU hidden layers, and its 2
//      outputs (stored). The step -o_1 exp(o_2 exp_mult) step_mult is left to XLA.
// The 28 features (defaults; lopt/adafac.py's table, in its order): g, p, m_1..3, rms,
// m_i / sqrt(rms + 1e-6), 1 / sqrt(rms + 1e-6), g / sqrt(v_hat), m_i / sqrt(v_hat), row,
// col, 1 / sqrt(row + 1e-8), 1 / sqrt(col + 1e-8), with 1 / sqrt(v_hat) =
// 1 / sqrt(row col / (mean(row) + 1e-8) + 1e-8) (rank >= 2) or 1 / sqrt(v + 1e-8) (and
// row = col = v). The time features are in the first layer's bias (computed by XLA).
//
// Geometry: a factored leaf is viewed as (A, X, B, Y, D), X and Y its two factored axes in
// axis order; the accumulator that averaged over Y is indexed ((a X + x) B + b) D + d ("X
// side"), the one over X ((a B + b) Y + y) D + d ("Y side"). The row accumulator is the X side
// unless `swap` (factored_order="size" with the larger axis first), then the Y side.
// Layout of a block: one 16-lane vector per feature or hidden unit, as lopt/kernels/
// mlp_update_cpu.cc; leading (vmap) batch axes are flattened, each entry with its own decays
// and weights; work is split over XLA's intra-op thread pool.
//
// Fast path (most blocks of a dense kernel with a last axis >= 16): a whole block inside one
// run of the last factored axis (D = 1) has one X-side entry and 16 consecutive Y-side ones, so
// the first layer's part from the 12 row/column features (row, col and their reciprocal square
// roots, each times its scaled row of W0) is summed once per accumulator entry after pass 2
// and added as the block's bias: the first layer takes 16 features, not 28. Same function; the
// sums run in another order (float32 rounding).
//
// Cost, per coordinate (defaults): the MLP is 16 x 32 + 32 x 32 + 32 x 2 = 1600 multiply-adds
// on the fast path (1984 otherwise): 1600 16-lane FMAs per block of 16 coordinates, 100 cycles
// a coordinate at one 512-bit FMA per cycle (AMD Zen 4), against Adam's ~24 bytes of memory
// traffic; the features (two passes) and pass 1 add about a third.
#include "adafac_update_cpu.h"

namespace {

// A block's inputs and its features. With `update` (pass 2): the state read from the old
// accumulators, updated and stored; else (pass 3) read from the new ones.
template <int NM, int NR, int NF>
struct BlockFeatures {
  int k;
  vec mask;  // 1 on the block's coordinates, 0 past the leaf's end

  BlockFeatures(const Problem& pr, const Leaf& l, int64_t e, const LaneDecays* dec,
                const float* rmeps, int64_t r0, bool update, bool fast, int count, vec* x)
      : k(static_cast<int>(std::min<int64_t>(kLanes, l.n - r0))) {
    const int nm_ = NM ? NM : pr.nm, nr_ = NR ? NR : pr.nr, nf_ = NF ? NF : pr.nf;
    const float* g = l.g + e * l.n;
    const float* p = l.p + e * l.n;
    vec gv{}, pv{};
    if (k == kLanes) {  // constant sizes: vector loads, no library calls
      gv = LoadU(g + r0);
      pv = LoadU(p + r0);
    } else {
      std::memcpy(&gv, g + r0, sizeof(float) * k);
      std::memcpy(&pv, p + r0, sizeof(float) * k);
    }
    for (int r = 0; r < kLanes; ++r) mask[r] = r < k ? 1.0f : 0.0f;
    vec mraw[kMaxComp], rraw[kMaxComp], vraw[kMaxComp];
    float* m_out = l.m_out + e * l.n * nm_;
    float* rms_out = l.rms_out + e * l.n * nr_;
    const vec g2 = gv * gv;
    if (update) {
      pr.cm.Load(l.m + e * l.n * nm_, r0, k, mraw, nm_);
      pr.cr.Load(l.rms + e * l.n * nr_, r0, k, rraw, nr_);
      pr.cm.Update(mraw, dec[0].b, dec[0].om, gv, nm_);
      pr.cr.Update(rraw, dec[1].b, dec[1].om, g2, nr_);
      pr.cm.Store(mraw, r0, k, m_out, nm_);
      pr.cr.Store(rraw, r0, k, rms_out, nr_);
    } else {
      pr.cm.Load(m_out, r0, k, mraw, nm_);
      pr.cr.Load(rms_out, r0, k, rraw, nr_);
    }
    vec m[kMaxComp], rms[kMaxComp], R[kMaxComp], C[kMaxComp], rm[kMaxComp];
    for (int j = 0; j < nm_; ++j) m[j] = pr.cm.Get(mraw, j, nm_);
    for (int j = 0; j < nr_; ++j) rms[j] = pr.cr.Get(rraw, j, nr_);
    if (fast) {  // one X-side entry t, 16 consecutive Y-side entries from iy0 (FastBlock)
      const int64_t t = r0 / l.Y, iy0 = (t / l.B / l.X * l.B + t % l.B) * l.Y + r0 % l.Y;
      const float* xacc = (l.swap ? l.f1_out + e * l.ncol() * nf_
                                  : l.f0_out + e * l.nrow() * nf_) + t * nf_;
      const float* yacc = l.swap ? l.f0_out + e * l.nrow() * nf_
                                 : l.f1_out + e * l.ncol() * nf_;
      vec yraw[kMaxComp];
      pr.cf.Load(yacc, iy0, kLanes, yraw, nf_);
      const float* rmt = rmeps + (t / l.B / l.X * l.B + t % l.B) * nf_;
      for (int f = 0; f < nf_; ++f) {
        const vec xs = vec{} + xacc[f], ys = pr.cf.Get(yraw, f, nf_);
        R[f] = l.swap ? ys : xs;
        C[f] = l.swap ? xs : ys;
        rm[f] = vec{} + rmt[f];
      }
    } else if (l.factored) {
      ivec ir, ic, im;
      Indices(l, nf_, r0, ir, ic, im);
      const float* row = l.f0_out + e * l.nrow() * nf_;
      const float* col = l.f1_out + e * l.ncol() * nf_;
      for (int f = 0; f < nf_; ++f) {
        R[f] = Gather(row + f, ir);
        C[f] = Gather(col + f, ic);
        rm[f] = Gather(rmeps + f, im);
      }
    } else {
      float* v_out = l.f0_out + e * l.n * nf_;
      if (update) {
        pr.cf.Load(l.f0 + e * l.n * nf_, r0, k, vraw, nf_);
        pr.cf.Update(vraw, dec[2].b, dec[2].om, g2 + pr.grad_eps, nf_);
        pr.cf.Store(vraw, r0, k, v_out, nf_);
      } else {
        pr.cf.Load(v_out, r0, k, vraw, nf_);
      }
      for (int f = 0; f < nf_; ++f) R[f] = C[f] = pr.cf.Get(vraw, f, nf_);
    }
    Features<NM, NR, NF>(pr, gv, pv, m, rms, R, C, rm, l.factored, count, x);
  }
};

// BlockFeatures with the default small_fc_lopt's counts (3 momenta, 1 second moment, 3
// factored) as constants, other counts at run time: (the block's coordinates, its lane mask).
inline int BlockFeats(const Problem& pr, const Leaf& l, int64_t e, const LaneDecays* dec,
                      const float* rmeps, int64_t r0, bool update, bool fast, int count, vec* x,
                      vec* mask) {
  if (pr.nm == 3 && pr.nr == 1 && pr.nf == 3) {
    const BlockFeatures<3, 1, 3> bf(pr, l, e, dec, rmeps, r0, update, fast, count, x);
    *mask = bf.mask;
    return bf.k;
  }
  const BlockFeatures<0, 0, 0> bf(pr, l, e, dec, rmeps, r0, update, fast, count, x);
  *mask = bf.mask;
  return bf.k;
}

// Pass 1 for one factored leaf and batch entry: new row, col (stored) and mean(row) + 1e-8.
void Factored(const Problem& pr, const Leaf& l, int64_t e, const float* bf, double* sx,
              double* sy, float* rmeps) {
  const int nf = pr.nf;
  const float* g = l.g + e * l.n;
  std::fill(sx, sx + l.nX, 0.0);
  std::fill(sy, sy + l.nY, 0.0);
  const int64_t YD = l.Y * l.D;
  for (int64_t a = 0; a < l.A; ++a)
    for (int64_t x = 0; x < l.X; ++x)
      for (int64_t b = 0; b < l.B; ++b) {
        const int64_t ab = (a * l.X + x) * l.B + b;
        const float* gr = g + ab * YD;
        double* sxr = sx + ab * l.D;
        double* syr = sy + (a * l.B + b) * YD;
        int64_t y = 0;
        if (l.D == 1) {  // a contiguous run: the row's sum in 16 float lanes of <= 16 terms
          vec acc{};
          double run = 0;
          for (int64_t chunk = 1; y + kLanes <= l.Y; y += kLanes, ++chunk) {
            const vec v = LoadU(gr + y), g2 = v * v + pr.grad_eps;
            acc += g2;
            for (int r = 0; r < kLanes; ++r) syr[y + r] += static_cast<double>(g2[r]);
            if (chunk % kSegmentBlocks == 0 || y + 2 * kLanes > l.Y) {
              for (int r = 0; r < kLanes; ++r) run += acc[r];
              acc = vec{};
            }
          }
          sxr[0] += run;
        }
        for (; y < l.Y; ++y)
          for (int64_t d = 0; d < l.D; ++d) {
            const float v = gr[y * l.D + d];
            const double g2 = static_cast<double>(v * v + pr.grad_eps);
            sxr[d] += g2;
            syr[y * l.D + d] += g2;
          }
      }
  // X side: averaged over Y; Y side: averaged over X. Row = X side unless swapped.
  auto update = [&](const double* s, int64_t count, int64_t size, const float* old, float* out) {
    for (int64_t i = 0; i < size; ++i) {
      const float mean = static_cast<float>(s[i] / count);
      for (int f = 0; f < nf; ++f)
        out[i * nf + f] = bf[f] * old[i * nf + f] + (1.0f - bf[f]) * mean;
    }
  };
  float* row = l.f0_out + e * l.nrow() * nf;
  float* col = l.f1_out + e * l.ncol() * nf;
  const float* row_old = l.f0 + e * l.nrow() * nf;
  const float* col_old = l.f1 + e * l.ncol() * nf;
  update(l.swap ? sy : sx, l.swap ? l.X : l.Y, l.nrow(), row_old, row);
  update(l.swap ? sx : sy, l.swap ? l.Y : l.X, l.ncol(), col_old, col);
  // mean(row) over the row axis (X, or Y when swapped), indexed ((a B + b) D + d).
  std::vector<double> acc(l.nM * nf, 0.0);
  for (int64_t a = 0; a < l.A; ++a)
    for (int64_t b = 0; b < l.B; ++b)
      for (int64_t d = 0; d < l.D; ++d) {
        const int64_t im = (a * l.B + b) * l.D + d;
        const int64_t axis = l.swap ? l.Y : l.X;
        for (int64_t x = 0; x < axis; ++x) {
          const int64_t i = l.swap ? ((a * l.B + b) * l.Y + x) * l.D + d
                                   : ((a * l.X + x) * l.B + b) * l.D + d;
          for (int f = 0; f < nf; ++f) acc[im * nf + f] += row[i * nf + f];
        }
        for (int f = 0; f < nf; ++f)
          rmeps[im * nf + f] = static_cast<float>(acc[im * nf + f] / axis) + kEpsFac;
      }
}

// Operands, K leaves: g_1..g_K [..., n_k], p_1..p_K [..., n_k], then per leaf m [..., n_k, nm],
// rms [..., n_k, nr] and either row [..., nrow, nf], col [..., ncol, nf] (factored) or
// v [..., n_k, nf]; then decays [..., nm + nr + nf] (momentum, rms, factored); then the layers'
// (w, b): w0 [..., F, H] (unscaled), b0 [..., H] (time features folded in), middle [..., H, H],
// [..., H], last [..., H, 2], [..., 2]. Results: out_k [..., n_k, 2], then the new state in
// the operands' order and shapes (lopt/adafac_cpu.py aliases each to its operand: every pass
// reads an entry before it writes it, and reads new state only where it is already written).
// Attribute geometry: 7 per leaf (factored, swap, A, X, B, Y, D).
ffi::Error Impl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets,
                ffi::Span<const int64_t> geometry, int32_t nm, int32_t nr, int32_t nf,
                float norm_eps, float grad_eps) {
  auto bad = [](const char* what) {
    return ffi::Error::InvalidArgument(std::string("lopt adafac_update: ") + what);
  };
  const size_t K = geometry.size() / 7;
  if (K == 0 || geometry.size() != 7 * K) return bad("geometry");
  if (nm < 1 || nr < 1 || nf < 1 || nm > kMaxComp || nr > kMaxComp || nf > kMaxComp || nf != nm)
    return bad("decay counts");
  size_t num_state = 0;
  for (size_t k = 0; k < K; ++k) num_state += geometry[7 * k] ? 4 : 3;
  const size_t num_args = args.size(), first_w = 2 * K + num_state + 1;
  if (num_args < first_w + 4 || (num_args - first_w) % 2 || rets.size() != K + num_state)
    return bad("operands");
  std::vector<const float*> a(num_args);
  std::vector<int64_t> asize(num_args);
  for (size_t i = 0; i < num_args; ++i) {
    auto b = args.get<ffi::AnyBuffer>(i);
    if (b.has_error()) return b.error();
    if (b->element_type() != ffi::DataType::F32) return bad("operand types");
    a[i] = static_cast<const float*>(b->untyped_data());
    asize[i] = static_cast<int64_t>(b->element_count());
  }
  std::vector<float*> r(rets.size());
  for (size_t i = 0; i < rets.size(); ++i) {
    auto b = rets.get<ffi::AnyBuffer>(i);
    if (b.has_error()) return b.error();
    r[i] = static_cast<float*>((*b)->untyped_data());
  }
  auto w0d = args.get<ffi::AnyBuffer>(first_w)->dimensions();
  Problem pr;
  pr.nm = nm; pr.nr = nr; pr.nf = nf;
  pr.F = 2 + nm + 2 * nr + nm * nr + 6 * nf;
  pr.H = static_cast<int>(w0d[w0d.size() - 1]);
  pr.num_mid = static_cast<int>((num_args - first_w) / 2) - 2;
  pr.norm_eps = norm_eps;
  pr.grad_eps = grad_eps;
  if (pr.F > kMaxFeatures || w0d[w0d.size() - 2] != pr.F || pr.H % 16 || pr.H > kMaxHidden ||
      pr.num_mid > 16)
    return bad("unsupported shapes");
  pr.cm.Init(nm); pr.cr.Init(nr); pr.cf.Init(nf);
  const int F = pr.F, H = pr.H;
  const auto gd0 = args.get<ffi::AnyBuffer>(0)->dimensions();
  int64_t batch = 1;
  for (size_t i = 0; i + 1 < gd0.size(); ++i) batch *= gd0[i];
  if (asize[2 * K + num_state] != batch * (nm + nr + nf)) return bad("decays");

  std::vector<Leaf> leaves(K);
  std::vector<int64_t> seg_start(K + 1, 0), block_start(K + 1, 0);
  int64_t scratch_d = 0, scratch_f = 0, scratch_p = 0;
  for (size_t k = 0, s = 2 * K; k < K; ++k) {  // state operand s is result K + s - 2 K
    Leaf& l = leaves[k];
    const int64_t* geo = &geometry[7 * k];
    l.factored = geo[0] != 0; l.swap = geo[1] != 0;
    l.A = geo[2]; l.X = geo[3]; l.B = geo[4]; l.Y = geo[5]; l.D = geo[6];
    l.n = asize[k] / batch;
    if (l.A * l.X * l.B * l.Y * l.D != l.n || asize[K + k] != batch * l.n)
      return bad("leaf geometry");
    l.nX = l.A * l.X * l.B * l.D; l.nY = l.A * l.B * l.Y * l.D; l.nM = l.A * l.B * l.D;
    l.blocks = (l.n + kLanes - 1) / kLanes;
    l.segments = (l.blocks + kSegmentBlocks - 1) / kSegmentBlocks;
    l.g = a[k]; l.p = a[K + k];
    l.out = r[k];
    l.m = a[s]; l.m_out = r[s - K]; ++s;
    l.rms = a[s]; l.rms_out = r[s - K]; ++s;
    if (asize[s - 2] != batch * l.n * nm || asize[s - 1] != batch * l.n * nr)
      return bad("accumulator shapes");
    l.f0 = a[s]; l.f0_out = r[s - K]; ++s;
    if (l.factored) {
      l.f1 = a[s]; l.f1_out = r[s - K]; ++s;
      if (asize[s - 2] != batch * l.nrow() * nf || asize[s - 1] != batch * l.ncol() * nf)
        return bad("factored accumulator shapes");
      l.g_off = scratch_d; scratch_d += l.nX + l.nY;
      l.st_off = scratch_f; scratch_f += l.nM * nf;
      l.fast = l.D == 1 && l.Y >= kLanes;
      l.part_off = scratch_p;
      if (l.fast) scratch_p += (l.nX + l.nY) * H;
    } else {
      l.f1 = nullptr; l.f1_out = nullptr;
      if (asize[s - 1] != batch * l.n * nf) return bad("v shape");
      l.g_off = l.st_off = l.part_off = 0;
      l.fast = false;
    }
    seg_start[k + 1] = seg_start[k] + l.segments;
    block_start[k + 1] = block_start[k] + l.blocks;
  }
  const float* decays = a[2 * K + num_state];
  auto W = [&](size_t i) { return a[first_w + i]; };
  const int64_t segments = seg_start[K], blocks = block_start[K];
  auto leaf_of = [](const std::vector<int64_t>& start, int64_t i) {
    return static_cast<size_t>(std::upper_bound(start.begin(), start.end(), i) - start.begin()) - 1;
  };

  std::vector<LaneDecays> dec(batch * 3);
  for (int64_t e = 0; e < batch; ++e) {
    const float* de = decays + e * (nm + nr + nf);
    dec[3 * e].Init(pr.cm, de);
    dec[3 * e + 1].Init(pr.cr, de + nm);
    dec[3 * e + 2].Init(pr.cf, de + nm + nr);
  }
  std::vector<double> fsums(batch * scratch_d);
  std::vector<float> rmeps(batch * scratch_f);
  std::vector<double> sums(batch * segments * F);
  std::vector<float> w0s(batch * K * F * H);
  std::vector<float> parts(batch * scratch_p);

  auto factored = [&](int64_t e, size_t k) {  // pass 1
    const Leaf& l = leaves[k];
    if (!l.factored) return;
    double* s = &fsums[e * scratch_d + l.g_off];
    Factored(pr, l, e, decays + e * (nm + nr + nf) + nm + nr, s, s + l.nX,
             &rmeps[e * scratch_f + l.st_off]);
  };
  auto segment = [&](int64_t e, size_t k, int64_t c) {  // pass 2, one segment
    const Leaf& l = leaves[k];
    const int np = pr.num_pointwise(l.factored);
    vec acc[kMaxFeatures] = {}, x[kMaxFeatures];
    const int64_t b1 = std::min(l.blocks, (c + 1) * kSegmentBlocks);
    for (int64_t b = c * kSegmentBlocks; b < b1; ++b) {
      vec mask;
      BlockFeats(pr, l, e, &dec[3 * e], &rmeps[e * scratch_f + l.st_off], b * kLanes, true,
                 FastBlock(l, b * kLanes), np, x, &mask);
      for (int f = 0; f < np; ++f) acc[f] += mask * (x[f] * x[f]);
    }
    double* out = &sums[(e * segments + seg_start[k] + c) * F];
    for (int f = 0; f < np; ++f) {
      out[f] = 0;
      for (int r = 0; r < kLanes; ++r) out[f] += acc[f][r];
    }
  };
  auto finish = [&](int64_t e, size_t k) {  // the leaf's scales and scaled first layer
    const Leaf& l = leaves[k];
    const int np = pr.num_pointwise(l.factored);
    double t[kMaxFeatures] = {};
    for (int64_t c = seg_start[k]; c < seg_start[k + 1]; ++c)
      for (int f = 0; f < np; ++f) t[f] += sums[(e * segments + c) * F + f];
    if (l.factored) {  // row, col, their rsqrt: each entry stands for n / entries coordinates
      const float* row = l.f0_out + e * l.nrow() * nf;
      const float* col = l.f1_out + e * l.ncol() * nf;
      for (int side = 0; side < 2; ++side) {
        const float* acc = side ? col : row;
        const int64_t size = side ? l.ncol() : l.nrow();
        const double mult = static_cast<double>(l.n / size);
        for (int f = 0; f < nf; ++f) {
          double sq = 0, sr = 0;
          for (int64_t i = 0; i < size; ++i) {
            const float v = acc[i * nf + f];
            const float rs = 1.0f / std::sqrt(v + kEpsFac);
            sq += static_cast<double>(v) * v;
            sr += static_cast<double>(rs) * rs;
          }
          t[np + side * nf + f] = sq * mult;
          t[np + 2 * nf + side * nf + f] = sr * mult;
        }
      }
    }
    const float* w0 = W(0) + e * F * H;
    float* ws = &w0s[(e * K + k) * F * H];
    for (int f = 0; f < F; ++f) {
      const float s = static_cast<float>(1.0 / std::sqrt(t[f] / l.n + norm_eps));
      for (int h = 0; h < H; ++h) ws[f * H + h] = s * w0[f * H + h];
    }
    if (!l.fast) return;
    // Each side's features (its accumulator and 1 / sqrt(it + 1e-8)) times their scaled rows.
    float* xpart = &parts[e * scratch_p + l.part_off];
    float* ypart = xpart + l.nX * H;
    for (int side = 0; side < 2; ++side) {  // 0: X side, 1: Y side
      const bool is_row = (side == 0) != l.swap;
      const float* acc = is_row ? l.f0_out + e * l.nrow() * nf : l.f1_out + e * l.ncol() * nf;
      const int first = np + (is_row ? 0 : nf);  // the accumulator's features; rsqrt 2 nf on
      const int64_t size = side ? l.nY : l.nX;
      float z[kMaxHidden];
      for (int64_t i = 0; i < size; ++i) {
        std::fill(z, z + H, 0.0f);
        for (int f = 0; f < nf; ++f) {
          const float v = acc[i * nf + f], rs = 1.0f / std::sqrt(v + kEpsFac);
          const float* wa = ws + (first + f) * H;
          const float* wr = ws + (first + 2 * nf + f) * H;
          for (int h = 0; h < H; ++h) z[h] += v * wa[h] + rs * wr[h];
        }
        if (side == 0)
          std::memcpy(xpart + i * H, z, sizeof(float) * H);
        else
          for (int h = 0; h < H; ++h) ypart[h * l.nY + i] = z[h];
      }
    }
  };
  auto block = [&](int64_t e, size_t k, int64_t b) {  // pass 3, one block
    const float* wm[16];
    const float* bm[16];
    for (int i = 0; i < pr.num_mid; ++i) {
      wm[i] = W(2 + 2 * i) + e * H * H;
      bm[i] = W(3 + 2 * i) + e * H;
    }
    const size_t last = 2 * (pr.num_mid + 1);
    const Weights w{W(1) + e * H, wm, bm, W(last) + e * H * 2, W(last + 1) + e * 2};
    const Leaf& l = leaves[k];
    vec x[kMaxFeatures];
    const int64_t q0 = b * kLanes;
    const float* ws = &w0s[(e * K + k) * F * H];
    float* out = l.out + (e * l.n + q0) * 2;
    if (FastBlock(l, q0)) {
      // One X-side entry (q0 / Y) and 16 consecutive Y-side entries from iy0.
      const int np = pr.num_pointwise(true);
      vec mask;
      BlockFeats(pr, l, e, &dec[3 * e], &rmeps[e * scratch_f + l.st_off], q0, false, true, np, x,
                 &mask);
      const int64_t t = q0 / l.Y, iy0 = (t / l.B / l.X * l.B + t % l.B) * l.Y + q0 % l.Y;
      const float* xpart = &parts[e * scratch_p + l.part_off] + t * H;
      const float* ypart = &parts[e * scratch_p + l.part_off] + l.nX * H + iy0;
      vec bias[kMaxHidden];
      for (int h = 0; h < H; ++h) {
        const vec yv = LoadU(ypart + h * l.nY);
        bias[h] = yv + (xpart[h] + w.b0[h]);
      }
      Network(pr, w, ws, x, np, bias, kLanes, out);
      return;
    }
    vec mask;
    const int k_in = BlockFeats(pr, l, e, &dec[3 * e], &rmeps[e * scratch_f + l.st_off], q0,
                                false, false, F, x, &mask);
    Network(pr, w, ws, x, F, nullptr, k_in, out);
  };
  constexpr int64_t kMinBlocks = 16;
  if (batch >= 2 * pool.num_threads()) {  // many entries: each task an entry's three passes
    ParallelFor(pool, batch, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e)
        for (size_t k = 0; k < K; ++k) {
          factored(e, k);
          for (int64_t c = 0; c < leaves[k].segments; ++c) segment(e, k, c);
          finish(e, k);
          for (int64_t b = 0; b < leaves[k].blocks; ++b) block(e, k, b);
        }
    });
  } else {
    ParallelFor(pool, batch * K, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) factored(t / K, t % K);
    });
    ParallelFor(pool, batch * segments, 2, [&](int64_t lo, int64_t hi) {
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoptAdafacUpdate, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("geometry")
                                  .Attr<int32_t>("nm")
                                  .Attr<int32_t>("nr")
                                  .Attr<int32_t>("nf")
                                  .Attr<float>("norm_eps")
                                  .Attr<float>("grad_eps"));

// Joseph forward projector and its exact adjoint for CPUs, as XLA FFI handlers.
//
// Built by xct/_native/__init__.py (g++ -O3 -march=native -ffp-contract=off, no fast-math)
// and called through jax.ffi by xct.projector (kernel="native"). The discretisation is the
// one of projector._rays and projector._joseph_samples, operation for operation in float32
// (the rays of the detector pixels; per ray the dominant index axis, planes, validity tests,
// floor and bilinear taps, the final * |inv_a|), so the two agree to float rounding, and
// the adjoint applies the very same taps, so it is the exact transpose of the forward.
//
// Inputs: the volume [nz, ny, nx]; per view 12 floats (source, detector centre, column step
// u and row step v, world mm); the volume frame, 12 floats (world -> continuous index matrix
// M, row-major, and origin: (ix, iy, iz) = M (p - origin)); `parallel` for parallel beams.
// Leading batch dimensions (jax.vmap, "broadcast_all") are looped over.
//
// What makes it fast:
// * Tiles of 4 x 4 neighbouring detector pixels, one SIMD lane per ray (AVX-512: one
//   register; AVX2: two halves of 8; portable scalar code otherwise). A tile marches plane
//   by plane, so its 16 samples of a plane read one small patch of the volume (the XLA
//   version materialises per-sample index and weight arrays and gathers from all over).
// * Per ray, the planes passing the tests on k and t are found once (a conservative
//   interval, then the exact float test on its ends), in a lane loop the compiler
//   vectorises, rays included; per sample only the tests on the minor coordinates remain,
//   as unsigned compares on floor(pb) and floor(pc) that also tell which of the four taps
//   are real voxels. So the volume needs no zero-padded copy: taps in the padding are
//   masked out of the gathers.
// * The forward splits rows of tiles over threads (XLA's intra-op pool); the adjoint splits
//   the volume into slabs of planes across the rays' dominant axis (one axis after the
//   other): a ray adds only into the plane it samples, so no two threads ever add into the
//   same voxel: no atomics, no per-thread copies of the volume.
// * The adjoint's tiles take every other pixel (lanes about two voxels apart). Where a
//   tile's lanes provably never share a voxel (lanes_distinct) it adds with AVX-512
//   gather + scatter, else one scalar add per tap (measured: 43 against 58 ms, 128^3 to
//   8 x 128^2 on one core).
//
// Offsets are int32: volumes must hold fewer than 2^31 voxels (checked, and by Python).

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include "parallel.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace xct_joseph {

#if defined(__AVX512F__)
constexpr int kSimdWidth = 16;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kSimdWidth = 8;
#else
constexpr int kSimdWidth = 1;
#endif

// Rays are handled in tiles of kTileRows x kTileCols neighbouring detector pixels of one
// view, one lane per ray.
constexpr int kTileRows = 4, kTileCols = 4, kLanes = kTileRows * kTileCols;

struct Dims {
  int64_t nx, ny, nz;
  int64_t n(int axis) const { return axis == 0 ? nx : (axis == 1 ? ny : nz); }
  int64_t stride(int axis) const { return axis == 0 ? 1 : (axis == 1 ? nx : nx * ny); }
  int64_t size() const { return nx * ny * nz; }
};

struct Detector {
  int64_t views, rows, cols;
  int64_t rays() const { return views * rows * cols; }
};

// How rays are grouped into tiles: a tile's 4 x 4 lanes are the detector pixels
// (row0 + stride i, col0 + stride j). The forward uses neighbouring pixels (stride 1); the
// adjoint spreads them (stride 2) so that different lanes rarely share a voxel, which lets
// it add with vector scatters. Tiles go view by view, then by blocks of 4 stride x 4 stride
// pixels (block rows, then block columns), then by the stride^2 phases within a block; a
// block row of one view is one work item.
struct Tiling {
  Tiling(const Detector& d, int64_t s)
      : det(d),
        stride(s),
        block(kTileRows * s),
        block_rows((d.rows + block - 1) / block),
        block_cols((d.cols + block - 1) / block),
        per_block_row(block_cols * s * s),
        tiles(d.views * block_rows * per_block_row) {}
  Detector det;
  int64_t stride, block, block_rows, block_cols, per_block_row, tiles;
  // Calls fn(i, view, row0, col0) for the tiles of block row `item` (over all views):
  // tile i's lanes are the pixels (row0 + stride r, col0 + stride c), r, c < 4.
  template <typename Fn>
  void for_block_row(int64_t item, Fn&& fn) const {
    const int64_t view = item / block_rows, brow = item % block_rows;
    int64_t i = item * per_block_row;
    for (int64_t bcol = 0; bcol < block_cols; ++bcol) {
      for (int64_t phase = 0; phase < stride * stride; ++phase, ++i) {
        fn(i, view, brow * block + phase / stride, bcol * block + phase % stride);
      }
    }
  }
  // Flat indices of a tile's rays in the [V, rows, cols] projections (-1 off the detector).
  void rays(int64_t view, int64_t row0, int64_t col0, int64_t out[kLanes]) const {
    for (int l = 0; l < kLanes; ++l) {
      const int64_t r = row0 + stride * (l / kTileCols), c = col0 + stride * (l % kTileCols);
      out[l] = (r < det.rows && c < det.cols) ? (view * det.rows + r) * det.cols + c : -1;
    }
  }
};

// The geometry of one call: per view {source, detector centre, u, v} (12 floats, world mm)
// and the volume frame {M (row-major), origin} (12 floats).
struct Geometry {
  const float* views;
  const float* frame;
  bool parallel;
};

// Per-ray parameters of a tile, one array entry per lane. A ray's dominant index axis a
// and minor axes b = (a + 1) % 3, c = (a + 2) % 3 are those of projector._joseph_samples;
// at plane k its padded minor coordinates are pb0 + k sb and pc0 + k sc, and the planes
// [k0, k0 + len) pass the tests on k and t (0 <= k < n_a, 0 <= t <= t_max) and hold every
// sample that passes the tests on pb and pc (which are made per sample).
struct alignas(64) Tile {
  float pb0[kLanes], sb[kLanes], pc0[kLanes], sc[kLanes], scale[kLanes];
  int32_t sa[kLanes], sbs[kLanes], scs[kLanes];  // strides of a, b, c in the [z, y, x] volume
  int32_t nb[kLanes], nc[kLanes];                // sizes of the minor axes
  int32_t k0[kLanes], len[kLanes], axis[kLanes];
  int32_t lo[3], hi[3];  // per dominant axis, the planes some lane samples (lo >= hi: none)
  int32_t lo_all, hi_all;
  int32_t distinct;  // all lanes share one axis and never share a voxel (see lanes_distinct)
};

// Whether the tile's lanes all have one dominant axis and, in every plane they sample, are
// at least one voxel apart along b or along c, so that no two lanes ever share a tap (their
// floors differ): a sufficient test on the ends of the planes, as the separations are
// affine in k.
inline bool lanes_distinct(const Tile& t) {
  int axis = -1;
  for (int l = 0; l < kLanes; ++l) {
    if (t.len[l] == 0) continue;
    if (axis >= 0 && t.axis[l] != axis) return false;
    axis = t.axis[l];
  }
  if (axis < 0) return true;
  const float k_ends[2] = {static_cast<float>(t.lo[axis]), static_cast<float>(t.hi[axis] - 1)};
  for (int i = 0; i < kLanes; ++i) {
    if (t.len[i] == 0) continue;
    for (int j = i + 1; j < kLanes; ++j) {
      if (t.len[j] == 0) continue;
      bool apart = false;
      for (int q = 0; q < 2 && !apart; ++q) {  // q = 0: along b, 1: along c
        const float* p0 = q ? t.pc0 : t.pb0;
        const float* s = q ? t.sc : t.sb;
        const float d0 = (p0[i] - p0[j]) + k_ends[0] * (s[i] - s[j]);
        const float d1 = (p0[i] - p0[j]) + k_ends[1] * (s[i] - s[j]);
        apart = (d0 >= 1.01f && d1 >= 1.01f) || (d0 <= -1.01f && d1 <= -1.01f);
      }
      if (!apart) return false;
    }
  }
  return true;
}

inline bool t_ok(int32_t k, float oa, float inv_a, float t_max) {
  const float t = (static_cast<float>(k) - oa) * inv_a;  // as projector._joseph_samples
  return t >= 0.0f && t <= t_max;
}

// a == 0 ? x : a == 1 ? y : z, for the per-lane axis choices below.
template <typename T>
inline T by_axis(int32_t a, T x, T y, T z) {
  return a == 0 ? x : (a == 1 ? y : z);
}

// Sets up the tile of `tiling` at (view, row0, col0); lanes off the detector see nothing.
// The lane loop has no branches so that the compiler vectorises it (it is a fifth of the
// forward projection's work otherwise); kParallel makes the beam kind a constant for it.
template <bool kParallel>
inline void setup_lanes(const Geometry& g, const Tiling& tiling, int64_t view, int64_t row0,
                        int64_t col0, const Dims& dims, Tile& t) {
  const Detector& det = tiling.det;
  // Local copies: the compiler cannot tell that the stores into t leave these unchanged.
  float s[3], ctr[3], u[3], v[3], m[9], org[3];
  std::memcpy(s, g.views + 12 * view, sizeof(s));
  std::memcpy(ctr, g.views + 12 * view + 3, sizeof(ctr));
  std::memcpy(u, g.views + 12 * view + 6, sizeof(u));
  std::memcpy(v, g.views + 12 * view + 9, sizeof(v));
  std::memcpy(m, g.frame, sizeof(m));
  std::memcpy(org, g.frame + 9, sizeof(org));
  const float half_rows = static_cast<float>((det.rows - 1) / 2.0);
  const float half_cols = static_cast<float>((det.cols - 1) / 2.0);
  const int32_t n[3] = {static_cast<int32_t>(dims.nx), static_cast<int32_t>(dims.ny),
                        static_cast<int32_t>(dims.nz)};
  const int32_t st[3] = {1, n[0], n[0] * n[1]};
  // Pixel offsets from the detector centre, and whether the pixel is on the detector.
  alignas(64) float rr_[kLanes], cc_[kLanes];
  alignas(64) int32_t on_[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    const int64_t r = row0 + tiling.stride * (l / kTileCols);
    const int64_t c = col0 + tiling.stride * (l % kTileCols);
    rr_[l] = static_cast<float>(r) - half_rows;
    cc_[l] = static_cast<float>(c) - half_cols;
    on_[l] = r < det.rows && c < det.cols;
  }
  // Computed into local arrays, which the compiler vectorises freely, then copied into t.
  alignas(64) float oa_[kLanes], inva_[kLanes], tmax_[kLanes];
  alignas(64) float pb0_[kLanes], sb_[kLanes], pc0_[kLanes], sc_[kLanes], scale_[kLanes];
  alignas(64) int32_t sa_[kLanes], sbs_[kLanes], scs_[kLanes], nb_[kLanes], nc_[kLanes];
  alignas(64) int32_t axis_[kLanes], k0_[kLanes], len_[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    // The ray of the pixel, as projector._rays: o, d (per mm) in index space, t_max in mm.
    float src[3], vec[3];
    for (int q = 0; q < 3; ++q) {
      const float pix = ctr[q] + rr_[l] * v[q] + cc_[l] * u[q];
      src[q] = kParallel ? pix - (ctr[q] - s[q]) : s[q];
      vec[q] = pix - src[q];
    }
    const float t_max = std::sqrt(vec[0] * vec[0] + vec[1] * vec[1] + vec[2] * vec[2]);
    float o[3], d[3];
    const float unit[3] = {vec[0] / t_max, vec[1] / t_max, vec[2] / t_max};
    const float rel[3] = {src[0] - org[0], src[1] - org[1], src[2] - org[2]};
    for (int q = 0; q < 3; ++q) {
      o[q] = rel[0] * m[3 * q] + rel[1] * m[3 * q + 1] + rel[2] * m[3 * q + 2];
      d[q] = unit[0] * m[3 * q] + unit[1] * m[3 * q + 1] + unit[2] * m[3 * q + 2];
    }
    // Its dominant axis a (argmax |d|, first on ties, as jnp.argmax), b = a + 1, c = a + 2.
    const float ax = std::fabs(d[0]), ay = std::fabs(d[1]), az = std::fabs(d[2]);
    int32_t a = ay > ax ? 1 : 0;
    a = az > (a ? ay : ax) ? 2 : a;
    const float da = by_axis(a, d[0], d[1], d[2]), db = by_axis(a, d[1], d[2], d[0]);
    const float dc = by_axis(a, d[2], d[0], d[1]), oa = by_axis(a, o[0], o[1], o[2]);
    const float ob = by_axis(a, o[1], o[2], o[0]), oc = by_axis(a, o[2], o[0], o[1]);
    const float inv_a = 1.0f / da;
    const float sb = db * inv_a, sc = dc * inv_a;
    const float pb0 = ob - oa * sb + 1.0f, pc0 = oc - oa * sc + 1.0f;
    const int32_t na = by_axis(a, n[0], n[1], n[2]), nb = by_axis(a, n[1], n[2], n[0]);
    const int32_t nc = by_axis(a, n[2], n[0], n[1]);
    // Planes that may hold a valid sample: a conservative interval (the margins cover the
    // rounding of the per-sample coordinates), widened by whole planes below.
    float kmin = 0.0f, kmax = static_cast<float>(na - 1);
    const float p0s[2] = {pb0, pc0}, ss[2] = {sb, sc}, inv[2] = {da / db, da / dc};
    const float his[2] = {static_cast<float>(nb + 1), static_cast<float>(nc + 1)};
    for (int q = 0; q < 2; ++q) {
      const float margin = 1e-4f * (2.0f + std::fabs(p0s[q]) + his[q]);
      const float lo = -margin, hi = his[q] + margin;
      const bool flat = std::fabs(ss[q]) < 1e-12f;
      const bool inside = (p0s[q] >= lo) & (p0s[q] <= hi);
      const float k1 = (lo - p0s[q]) * inv[q], k2 = (hi - p0s[q]) * inv[q];
      kmin = flat ? kmin : std::max(kmin, std::min(k1, k2));
      kmax = flat ? (inside ? kmax : -1.0f) : std::min(kmax, std::max(k1, k2));
    }
    const float kt0 = oa, kt1 = oa + t_max * da;  // t = 0 and t = t_max
    kmin = std::max(kmin, std::min(kt0, kt1) - 2.0f);
    kmax = std::min(kmax, std::max(kt0, kt1) + 2.0f);
    // Finite parameters (NaN fails every comparison), a pixel on the detector, some planes.
    const float big = 3.0e38f;
    const bool ok = (std::fabs(inv_a) <= big) & (std::fabs(sb) <= big) &
                    (std::fabs(sc) <= big) & (std::fabs(pb0) <= big) & (std::fabs(pc0) <= big) &
                    (std::fabs(oa) <= big) & (t_max <= big) & (on_[l] != 0) & (kmin <= kmax);
    kmin = std::min(std::max(kmin, -2.0f), static_cast<float>(na));  // now safe to convert
    kmax = std::min(std::max(kmax, -2.0f), static_cast<float>(na));
    const int32_t k0 = std::max(0, static_cast<int32_t>(std::floor(kmin)) - 1);
    const int32_t k1 = std::min(na, static_cast<int32_t>(std::floor(kmax)) + 2);
    pb0_[l] = pb0;
    sb_[l] = sb;
    pc0_[l] = pc0;
    sc_[l] = sc;
    scale_[l] = std::fabs(inv_a);
    sa_[l] = by_axis(a, st[0], st[1], st[2]);
    sbs_[l] = by_axis(a, st[1], st[2], st[0]);
    scs_[l] = by_axis(a, st[2], st[0], st[1]);
    nb_[l] = nb;
    nc_[l] = nc;
    axis_[l] = a;
    k0_[l] = ok ? k0 : 0;
    len_[l] = ok ? std::max(0, k1 - k0) : 0;
    oa_[l] = oa;
    inva_[l] = inv_a;
    tmax_[l] = t_max;
  }
  std::memcpy(t.pb0, pb0_, sizeof(t.pb0));
  std::memcpy(t.sb, sb_, sizeof(t.sb));
  std::memcpy(t.pc0, pc0_, sizeof(t.pc0));
  std::memcpy(t.sc, sc_, sizeof(t.sc));
  std::memcpy(t.scale, scale_, sizeof(t.scale));
  std::memcpy(t.sa, sa_, sizeof(t.sa));
  std::memcpy(t.sbs, sbs_, sizeof(t.sbs));
  std::memcpy(t.scs, scs_, sizeof(t.scs));
  std::memcpy(t.nb, nb_, sizeof(t.nb));
  std::memcpy(t.nc, nc_, sizeof(t.nc));
  std::memcpy(t.axis, axis_, sizeof(t.axis));
  // Trim the ends to the exact float test on t (monotone in k; rarely moves them).
  for (int l = 0; l < kLanes; ++l) {
    int32_t k0 = k0_[l], k1 = k0 + len_[l];
    while (k0 < k1 && !t_ok(k0, oa_[l], inva_[l], tmax_[l])) ++k0;
    while (k1 > k0 && !t_ok(k1 - 1, oa_[l], inva_[l], tmax_[l])) --k1;
    t.k0[l] = k0;
    t.len[l] = k1 - k0;
  }
  for (int a = 0; a < 3; ++a) {
    t.lo[a] = INT32_MAX;
    t.hi[a] = 0;
  }
  for (int l = 0; l < kLanes; ++l) {
    if (t.len[l] > 0) {
      t.lo[t.axis[l]] = std::min(t.lo[t.axis[l]], t.k0[l]);
      t.hi[t.axis[l]] = std::max(t.hi[t.axis[l]], t.k0[l] + t.len[l]);
    }
  }
  t.lo_all = std::min({t.lo[0], t.lo[1], t.lo[2]});
  t.hi_all = std::max({t.hi[0], t.hi[1], t.hi[2]});
  t.distinct = tiling.stride > 1 && lanes_distinct(t);
}

inline void setup_tile(const Geometry& g, const Tiling& tiling, int64_t view, int64_t row0,
                       int64_t col0, const Dims& dims, Tile& t) {
  if (g.parallel) {
    setup_lanes<true>(g, tiling, view, row0, col0, dims, t);
  } else {
    setup_lanes<false>(g, tiling, view, row0, col0, dims, t);
  }
}

// ---------------------------------------------------------------------------------------
// One sample of one lane, portable code (the SIMD paths do the same lane by lane): the
// voxel index of the (b, c) tap (the others are + sbs, + scs, + both), the fractions wb,
// wc, and which taps are real voxels (bits: (b, c), (b+1, c), (b, c+1), (b+1, c+1)). Taps
// in the zero padding of the XLA version, and samples failing its tests, have no bits.
inline unsigned lane_sample(const Tile& t, int l, int32_t k, int64_t& idx, float& wb, float& wc) {
  if (static_cast<uint32_t>(k - t.k0[l]) >= static_cast<uint32_t>(t.len[l])) return 0;
  const float kf = static_cast<float>(k);
  const float pb = t.pb0[l] + kf * t.sb[l];
  const float pc = t.pc0[l] + kf * t.sc[l];
  const float fb = std::floor(pb), fc = std::floor(pc);
  wb = pb - fb;
  wc = pc - fc;
  if (!(fb >= 0.0f && fb <= static_cast<float>(t.nb[l]) && fc >= 0.0f &&
        fc <= static_cast<float>(t.nc[l]))) {
    return 0;
  }
  const int32_t ib = static_cast<int32_t>(fb), ic = static_cast<int32_t>(fc);  // padded
  const bool b0 = ib >= 1, b1 = ib < t.nb[l], c0 = ic >= 1, c1 = ic < t.nc[l];
  idx = static_cast<int64_t>(k) * t.sa[l] + static_cast<int64_t>(ib - 1) * t.sbs[l] +
        static_cast<int64_t>(ic - 1) * t.scs[l];
  return (b0 && c0) | (b1 && c0) << 1 | (b0 && c1) << 2 | (b1 && c1) << 3;
}

inline void forward_tile_scalar(const float* vol, const Tile& t, float* out) {
  for (int l = 0; l < kLanes; ++l) {
    float acc = 0.0f;
    for (int32_t k = t.k0[l]; k < t.k0[l] + t.len[l]; ++k) {
      int64_t i = 0;
      float wb, wc;
      const unsigned m = lane_sample(t, l, k, i, wb, wc);
      if (!m) continue;
      const float v00 = (m & 1) ? vol[i] : 0.0f;
      const float v10 = (m & 2) ? vol[i + t.sbs[l]] : 0.0f;
      const float v01 = (m & 4) ? vol[i + t.scs[l]] : 0.0f;
      const float v11 = (m & 8) ? vol[i + t.sbs[l] + t.scs[l]] : 0.0f;
      const float top = v00 + wb * (v10 - v00);
      const float bot = v01 + wb * (v11 - v01);
      acc += top + wc * (bot - top);
    }
    out[l] = acc * t.scale[l];
  }
}

inline void adjoint_tile_scalar(float* vol, const Tile& t, const float* g, int axis, int32_t lo,
                                int32_t hi) {
  for (int l = 0; l < kLanes; ++l) {
    if (t.axis[l] != axis || t.len[l] == 0) continue;
    const float gs = g[l] * t.scale[l];
    const int32_t k0 = std::max(lo, t.k0[l]), k1 = std::min(hi, t.k0[l] + t.len[l]);
    for (int32_t k = k0; k < k1; ++k) {
      int64_t i = 0;
      float wb, wc;
      const unsigned m = lane_sample(t, l, k, i, wb, wc);
      const float gb = gs * wb, gb0 = gs - gb;  // g (1 - wb), g wb
      if (m & 1) vol[i] += gb0 - gb0 * wc;
      if (m & 2) vol[i + t.sbs[l]] += gb - gb * wc;
      if (m & 4) vol[i + t.scs[l]] += gb0 * wc;
      if (m & 8) vol[i + t.sbs[l] + t.scs[l]] += gb * wc;
    }
  }
}

#if defined(__AVX512F__)
// ---------------------------------------------------------------------------------------
// AVX-512: the 16 lanes of a tile in one register.

struct Lanes16 {
  __m512 pb0, sb, pc0, sc;
  __m512i sa, sbs, scs, sbc, nb, nc, len;
  explicit Lanes16(const Tile& t)
      : pb0(_mm512_load_ps(t.pb0)),
        sb(_mm512_load_ps(t.sb)),
        pc0(_mm512_load_ps(t.pc0)),
        sc(_mm512_load_ps(t.sc)),
        sa(_mm512_load_si512(t.sa)),
        sbs(_mm512_load_si512(t.sbs)),
        scs(_mm512_load_si512(t.scs)),
        sbc(_mm512_add_epi32(sbs, scs)),
        nb(_mm512_load_si512(t.nb)),
        nc(_mm512_load_si512(t.nc)),
        len(_mm512_load_si512(t.len)) {}
};

// The samples of plane kf (all lanes): fractions, (b, c)-tap indices and tap masks.
struct Sample16 {
  __m512 wb, wc;
  __m512i idx;
  __mmask16 m00, m10, m01, m11;
};

inline Sample16 sample16(const Lanes16& L, __m512 kf, __m512i rel, __m512i ka, __mmask16 live) {
  const __m512i one = _mm512_set1_epi32(1);
  const __m512 pb = _mm512_add_ps(L.pb0, _mm512_mul_ps(kf, L.sb));
  const __m512 pc = _mm512_add_ps(L.pc0, _mm512_mul_ps(kf, L.sc));
  const __m512 fb = _mm512_roundscale_ps(pb, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 fc = _mm512_roundscale_ps(pc, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  // Out-of-range or NaN converts to INT32_MIN, which fails the unsigned tests below.
  const __m512i ib = _mm512_cvttps_epi32(fb), ic = _mm512_cvttps_epi32(fc);
  const __mmask16 mk = _mm512_mask_cmplt_epu32_mask(live, rel, L.len);
  // The (b, c) tap is a real voxel iff 1 <= ib <= nb, the (b + 1, c) tap iff 0 <= ib < nb.
  const __mmask16 b0 = _mm512_mask_cmplt_epu32_mask(mk, _mm512_sub_epi32(ib, one), L.nb);
  const __mmask16 b1 = _mm512_mask_cmplt_epu32_mask(mk, ib, L.nb);
  const __m512i ic1 = _mm512_sub_epi32(ic, one);
  Sample16 s;
  s.wb = _mm512_sub_ps(pb, fb);
  s.wc = _mm512_sub_ps(pc, fc);
  s.idx = _mm512_add_epi32(
      ka, _mm512_add_epi32(_mm512_mullo_epi32(ib, L.sbs), _mm512_mullo_epi32(ic, L.scs)));
  s.m00 = _mm512_mask_cmplt_epu32_mask(b0, ic1, L.nc);
  s.m10 = _mm512_mask_cmplt_epu32_mask(b1, ic1, L.nc);
  s.m01 = _mm512_mask_cmplt_epu32_mask(b0, ic, L.nc);
  s.m11 = _mm512_mask_cmplt_epu32_mask(b1, ic, L.nc);
  return s;
}

inline void forward_tile(const float* vol, const Tile& t, float* out) {
  const Lanes16 L(t);
  const int32_t lo = t.lo_all;
  __m512 kf = _mm512_set1_ps(static_cast<float>(lo));
  __m512i rel = _mm512_sub_epi32(_mm512_set1_epi32(lo), _mm512_load_si512(t.k0));
  // k sa - sbs - scs: the (b, c) tap of padded (ib, ic) is that + ib sbs + ic scs.
  __m512i ka = _mm512_sub_epi32(_mm512_mullo_epi32(_mm512_set1_epi32(lo), L.sa), L.sbc);
  const __m512 zero = _mm512_setzero_ps();
  __m512 acc = zero;
  for (int32_t k = lo; k < t.hi_all; ++k) {
    const Sample16 s = sample16(L, kf, rel, ka, 0xFFFF);
    const __m512 v00 = _mm512_mask_i32gather_ps(zero, s.m00, s.idx, vol, 4);
    const __m512 v10 =
        _mm512_mask_i32gather_ps(zero, s.m10, _mm512_add_epi32(s.idx, L.sbs), vol, 4);
    const __m512 v01 =
        _mm512_mask_i32gather_ps(zero, s.m01, _mm512_add_epi32(s.idx, L.scs), vol, 4);
    const __m512 v11 =
        _mm512_mask_i32gather_ps(zero, s.m11, _mm512_add_epi32(s.idx, L.sbc), vol, 4);
    const __m512 top = _mm512_fmadd_ps(s.wb, _mm512_sub_ps(v10, v00), v00);
    const __m512 bot = _mm512_fmadd_ps(s.wb, _mm512_sub_ps(v11, v01), v01);
    acc = _mm512_add_ps(acc, _mm512_fmadd_ps(s.wc, _mm512_sub_ps(bot, top), top));
    kf = _mm512_add_ps(kf, _mm512_set1_ps(1.0f));
    rel = _mm512_add_epi32(rel, _mm512_set1_epi32(1));
    ka = _mm512_add_epi32(ka, L.sa);
  }
  _mm512_storeu_ps(out, _mm512_mul_ps(acc, _mm512_load_ps(t.scale)));
}

// Adds g[kLanes] times the taps of the lanes whose dominant axis is `axis`, for planes
// [lo, hi); `safe` is a voxel of plane lo of that axis: it receives the zero contributions
// of masked-out taps, so the adds need no branches and stay inside the caller's slab.
inline void adjoint_tile(float* vol, const Tile& t, const float* g, int axis, int32_t lo,
                         int32_t hi, int64_t safe) {
  const Lanes16 L(t);
  const __mmask16 on_axis =
      _mm512_cmpeq_epi32_mask(_mm512_load_si512(t.axis), _mm512_set1_epi32(axis));
  const __m512 gs = _mm512_maskz_mul_ps(on_axis, _mm512_loadu_ps(g), _mm512_load_ps(t.scale));
  const __m512i safe_v = _mm512_set1_epi32(static_cast<int32_t>(safe));
  __m512 kf = _mm512_set1_ps(static_cast<float>(lo));
  __m512i rel = _mm512_sub_epi32(_mm512_set1_epi32(lo), _mm512_load_si512(t.k0));
  __m512i ka = _mm512_sub_epi32(_mm512_mullo_epi32(_mm512_set1_epi32(lo), L.sa), L.sbc);
  if (t.distinct) {  // no two lanes share a voxel: gather, add and scatter each tap
    for (int32_t k = lo; k < hi; ++k) {
      const Sample16 s = sample16(L, kf, rel, ka, on_axis);
      const __m512 gb = _mm512_mul_ps(gs, s.wb), gb0 = _mm512_sub_ps(gs, gb);
      const __m512 g01 = _mm512_mul_ps(gb0, s.wc), g11 = _mm512_mul_ps(gb, s.wc);
      const __m512i ix[4] = {s.idx, _mm512_add_epi32(s.idx, L.sbs),
                             _mm512_add_epi32(s.idx, L.scs), _mm512_add_epi32(s.idx, L.sbc)};
      const __mmask16 ms[4] = {s.m00, s.m10, s.m01, s.m11};
      const __m512 vs[4] = {_mm512_sub_ps(gb0, g01), _mm512_sub_ps(gb, g11), g01, g11};
      for (int q = 0; q < 4; ++q) {  // in order: a later tap may read an earlier one's voxel
        const __m512 old = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), ms[q], ix[q], vol, 4);
        _mm512_mask_i32scatter_ps(vol, ms[q], ix[q], _mm512_add_ps(old, vs[q]), 4);
      }
      kf = _mm512_add_ps(kf, _mm512_set1_ps(1.0f));
      rel = _mm512_add_epi32(rel, _mm512_set1_epi32(1));
      ka = _mm512_add_epi32(ka, L.sa);
    }
    return;
  }
  alignas(64) int32_t idx[4 * kLanes];
  alignas(64) float val[4 * kLanes];
  for (int32_t k = lo; k < hi; ++k) {
    const Sample16 s = sample16(L, kf, rel, ka, on_axis);
    // The transposed bilinear weights: g (1 - wb)(1 - wc), g wb (1 - wc), g (1 - wb) wc, g wb wc.
    const __m512 gb = _mm512_mul_ps(gs, s.wb), gb0 = _mm512_sub_ps(gs, gb);
    const __m512 g01 = _mm512_mul_ps(gb0, s.wc), g11 = _mm512_mul_ps(gb, s.wc);
    _mm512_store_si512(idx, _mm512_mask_mov_epi32(safe_v, s.m00, s.idx));
    _mm512_store_si512(idx + kLanes,
                       _mm512_mask_mov_epi32(safe_v, s.m10, _mm512_add_epi32(s.idx, L.sbs)));
    _mm512_store_si512(idx + 2 * kLanes,
                       _mm512_mask_mov_epi32(safe_v, s.m01, _mm512_add_epi32(s.idx, L.scs)));
    _mm512_store_si512(idx + 3 * kLanes,
                       _mm512_mask_mov_epi32(safe_v, s.m11, _mm512_add_epi32(s.idx, L.sbc)));
    _mm512_store_ps(val, _mm512_maskz_sub_ps(s.m00, gb0, g01));
    _mm512_store_ps(val + kLanes, _mm512_maskz_sub_ps(s.m10, gb, g11));
    _mm512_store_ps(val + 2 * kLanes, _mm512_maskz_mov_ps(s.m01, g01));
    _mm512_store_ps(val + 3 * kLanes, _mm512_maskz_mov_ps(s.m11, g11));
    if (s.m00 | s.m10 | s.m01 | s.m11) {
      for (int j = 0; j < 4 * kLanes; ++j) vol[idx[j]] += val[j];
    }
    kf = _mm512_add_ps(kf, _mm512_set1_ps(1.0f));
    rel = _mm512_add_epi32(rel, _mm512_set1_epi32(1));
    ka = _mm512_add_epi32(ka, L.sa);
  }
}

#elif defined(__AVX2__) && defined(__FMA__)
// ---------------------------------------------------------------------------------------
// AVX2: a tile as two halves of 8 lanes; masks are vectors (all ones = true).

struct Lanes8 {
  __m256 pb0, sb, pc0, sc;
  __m256i sa, sbs, scs, sbc, nb1, nc1, len1;  // nb - 1, nc - 1, len - 1 (for unsigned <)
  Lanes8(const Tile& t, int h)
      : pb0(_mm256_load_ps(t.pb0 + 8 * h)),
        sb(_mm256_load_ps(t.sb + 8 * h)),
        pc0(_mm256_load_ps(t.pc0 + 8 * h)),
        sc(_mm256_load_ps(t.sc + 8 * h)),
        sa(_mm256_load_si256(reinterpret_cast<const __m256i*>(t.sa + 8 * h))),
        sbs(_mm256_load_si256(reinterpret_cast<const __m256i*>(t.sbs + 8 * h))),
        scs(_mm256_load_si256(reinterpret_cast<const __m256i*>(t.scs + 8 * h))),
        sbc(_mm256_add_epi32(sbs, scs)) {
    const __m256i one = _mm256_set1_epi32(1);
    nb1 = _mm256_sub_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(t.nb + 8 * h)), one);
    nc1 = _mm256_sub_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(t.nc + 8 * h)), one);
    len1 =
        _mm256_sub_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(t.len + 8 * h)), one);
  }
};

// Unsigned x < n as x <= n - 1 (n - 1 wraps to UINT_MAX for n = 0: then use `len` > 0 lanes).
inline __m256i lt_u32(__m256i x, __m256i n_minus_1) {
  return _mm256_cmpeq_epi32(_mm256_min_epu32(x, n_minus_1), x);
}

struct Sample8 {
  __m256 wb, wc;
  __m256i idx, m00, m10, m01, m11;
};

inline Sample8 sample8(const Lanes8& L, __m256 kf, __m256i rel, __m256i ka, __m256i live) {
  const __m256i one = _mm256_set1_epi32(1);
  const __m256 pb = _mm256_add_ps(L.pb0, _mm256_mul_ps(kf, L.sb));
  const __m256 pc = _mm256_add_ps(L.pc0, _mm256_mul_ps(kf, L.sc));
  const __m256 fb = _mm256_floor_ps(pb), fc = _mm256_floor_ps(pc);
  const __m256i ib = _mm256_cvttps_epi32(fb), ic = _mm256_cvttps_epi32(fc);
  const __m256i mk = _mm256_and_si256(live, lt_u32(rel, L.len1));
  const __m256i b0 = _mm256_and_si256(mk, lt_u32(_mm256_sub_epi32(ib, one), L.nb1));
  const __m256i b1 = _mm256_and_si256(mk, lt_u32(ib, L.nb1));
  const __m256i c0 = lt_u32(_mm256_sub_epi32(ic, one), L.nc1);
  const __m256i c1 = lt_u32(ic, L.nc1);
  Sample8 s;
  s.wb = _mm256_sub_ps(pb, fb);
  s.wc = _mm256_sub_ps(pc, fc);
  s.idx = _mm256_add_epi32(
      ka, _mm256_add_epi32(_mm256_mullo_epi32(ib, L.sbs), _mm256_mullo_epi32(ic, L.scs)));
  s.m00 = _mm256_and_si256(b0, c0);
  s.m10 = _mm256_and_si256(b1, c0);
  s.m01 = _mm256_and_si256(b0, c1);
  s.m11 = _mm256_and_si256(b1, c1);
  return s;
}

inline __m256 gather8(const float* vol, __m256i idx, __m256i mask) {
  return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), vol, idx, _mm256_castsi256_ps(mask), 4);
}

// Planes sampled by lanes [8h, 8h + 8) whose axis is `axis` (or any axis for axis < 0).
inline void half_range(const Tile& t, int h, int axis, int32_t& lo, int32_t& hi) {
  lo = INT32_MAX;
  hi = 0;
  for (int l = 8 * h; l < 8 * h + 8; ++l) {
    if (t.len[l] > 0 && (axis < 0 || t.axis[l] == axis)) {
      lo = std::min(lo, t.k0[l]);
      hi = std::max(hi, t.k0[l] + t.len[l]);
    }
  }
}

inline void forward_tile(const float* vol, const Tile& t, float* out) {
  for (int h = 0; h < 2; ++h) {
    const Lanes8 L(t, h);
    int32_t lo, hi;
    half_range(t, h, -1, lo, hi);
    const __m256i nonempty = _mm256_cmpgt_epi32(
        _mm256_load_si256(reinterpret_cast<const __m256i*>(t.len + 8 * h)), _mm256_setzero_si256());
    __m256 kf = _mm256_set1_ps(static_cast<float>(lo));
    __m256i rel = _mm256_sub_epi32(_mm256_set1_epi32(lo),
                                   _mm256_load_si256(reinterpret_cast<const __m256i*>(t.k0 + 8 * h)));
    __m256i ka = _mm256_sub_epi32(_mm256_mullo_epi32(_mm256_set1_epi32(lo), L.sa), L.sbc);
    __m256 acc = _mm256_setzero_ps();
    for (int32_t k = lo; k < hi; ++k) {
      const Sample8 s = sample8(L, kf, rel, ka, nonempty);
      const __m256 v00 = gather8(vol, s.idx, s.m00);
      const __m256 v10 = gather8(vol, _mm256_add_epi32(s.idx, L.sbs), s.m10);
      const __m256 v01 = gather8(vol, _mm256_add_epi32(s.idx, L.scs), s.m01);
      const __m256 v11 = gather8(vol, _mm256_add_epi32(s.idx, L.sbc), s.m11);
      const __m256 top = _mm256_fmadd_ps(s.wb, _mm256_sub_ps(v10, v00), v00);
      const __m256 bot = _mm256_fmadd_ps(s.wb, _mm256_sub_ps(v11, v01), v01);
      acc = _mm256_add_ps(acc, _mm256_fmadd_ps(s.wc, _mm256_sub_ps(bot, top), top));
      kf = _mm256_add_ps(kf, _mm256_set1_ps(1.0f));
      rel = _mm256_add_epi32(rel, _mm256_set1_epi32(1));
      ka = _mm256_add_epi32(ka, L.sa);
    }
    _mm256_storeu_ps(out + 8 * h, _mm256_mul_ps(acc, _mm256_load_ps(t.scale + 8 * h)));
  }
}

inline void adjoint_tile(float* vol, const Tile& t, const float* g, int axis, int32_t lo_slab,
                         int32_t hi_slab, int64_t safe) {
  alignas(32) int32_t idx[32];
  alignas(32) float val[32];
  for (int h = 0; h < 2; ++h) {
    int32_t lo, hi;
    half_range(t, h, axis, lo, hi);
    lo = std::max(lo, lo_slab);
    hi = std::min(hi, hi_slab);
    if (lo >= hi) continue;
    const Lanes8 L(t, h);
    const __m256i on_axis = _mm256_and_si256(
        _mm256_cmpeq_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(t.axis + 8 * h)),
                           _mm256_set1_epi32(axis)),
        _mm256_cmpgt_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(t.len + 8 * h)),
                           _mm256_setzero_si256()));
    const __m256 gs = _mm256_and_ps(
        _mm256_castsi256_ps(on_axis),
        _mm256_mul_ps(_mm256_loadu_ps(g + 8 * h), _mm256_load_ps(t.scale + 8 * h)));
    const __m256i safe_v = _mm256_set1_epi32(static_cast<int32_t>(safe));
    __m256 kf = _mm256_set1_ps(static_cast<float>(lo));
    __m256i rel = _mm256_sub_epi32(_mm256_set1_epi32(lo),
                                   _mm256_load_si256(reinterpret_cast<const __m256i*>(t.k0 + 8 * h)));
    __m256i ka = _mm256_sub_epi32(_mm256_mullo_epi32(_mm256_set1_epi32(lo), L.sa), L.sbc);
    for (int32_t k = lo; k < hi; ++k) {
      const Sample8 s = sample8(L, kf, rel, ka, on_axis);
      const __m256 gb = _mm256_mul_ps(gs, s.wb), gb0 = _mm256_sub_ps(gs, gb);
      const __m256 g01 = _mm256_mul_ps(gb0, s.wc), g11 = _mm256_mul_ps(gb, s.wc);
      const __m256i ix[4] = {s.idx, _mm256_add_epi32(s.idx, L.sbs), _mm256_add_epi32(s.idx, L.scs),
                             _mm256_add_epi32(s.idx, L.sbc)};
      const __m256i ms[4] = {s.m00, s.m10, s.m01, s.m11};
      const __m256 vs[4] = {_mm256_sub_ps(gb0, g01), _mm256_sub_ps(gb, g11), g01, g11};
      for (int q = 0; q < 4; ++q) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(idx + 8 * q),
                           _mm256_blendv_epi8(safe_v, ix[q], ms[q]));
        _mm256_store_ps(val + 8 * q, _mm256_and_ps(_mm256_castsi256_ps(ms[q]), vs[q]));
      }
      for (int j = 0; j < 32; ++j) vol[idx[j]] += val[j];
      kf = _mm256_add_ps(kf, _mm256_set1_ps(1.0f));
      rel = _mm256_add_epi32(rel, _mm256_set1_epi32(1));
      ka = _mm256_add_epi32(ka, L.sa);
    }
  }
}

#else
inline void forward_tile(const float* vol, const Tile& t, float* out) {
  forward_tile_scalar(vol, t, out);
}

inline void adjoint_tile(float* vol, const Tile& t, const float* g, int axis, int32_t lo,
                         int32_t hi, int64_t /*safe*/) {
  adjoint_tile_scalar(vol, t, g, axis, lo, hi);
}
#endif

using xct_native::Scheduler;
using xct_native::parallel_for;

// Line integrals out[V, rows, cols] of vol[nz, ny, nx].
inline void forward(const float* vol, const Dims& dims, const Geometry& g, const Detector& det,
                    float* out, int num_threads, const Scheduler& schedule) {
  const Tiling tiling(det, 1);
  parallel_for(det.views * tiling.block_rows, num_threads, schedule, [&](int64_t item) {
    Tile t;
    alignas(64) float lanes[kLanes];
    int64_t ray[kLanes];
    tiling.for_block_row(item, [&](int64_t, int64_t view, int64_t row0, int64_t col0) {
      setup_tile(g, tiling, view, row0, col0, dims, t);
      forward_tile(vol, t, lanes);
      tiling.rays(view, row0, col0, ray);
      for (int l = 0; l < kLanes; ++l) {
        if (ray[l] >= 0) out[ray[l]] = lanes[l];
      }
    });
  });
}

// Tile parameters of the adjoint, kept between calls so that repeated calls do not
// page-fault fresh memory each time (at most one buffer is cached).
class TileBuffer {
 public:
  explicit TileBuffer(size_t n) {
    {
      std::lock_guard<std::mutex> lock(mu());
      if (cached().data && cached().size >= n) std::swap(block_, cached());
    }
    if (!block_.data) {
      block_.data = static_cast<Tile*>(::operator new[](n * sizeof(Tile), std::align_val_t(64)));
      block_.size = n;
    }
  }
  ~TileBuffer() {
    std::lock_guard<std::mutex> lock(mu());
    if (cached().size <= block_.size) std::swap(block_, cached());
    if (block_.data) ::operator delete[](block_.data, std::align_val_t(64));
  }
  TileBuffer(const TileBuffer&) = delete;
  TileBuffer& operator=(const TileBuffer&) = delete;
  Tile* data() { return block_.data; }

 private:
  struct Block {
    Tile* data = nullptr;
    size_t size = 0;
  };
  static std::mutex& mu() {
    static std::mutex m;
    return m;
  }
  static Block& cached() {
    static Block b;
    return b;
  }
  Block block_;
};

// vol[nz, ny, nx] = the transpose of forward applied to proj[V, rows, cols].
inline void adjoint(const float* proj, const Dims& dims, const Geometry& g, const Detector& det,
                    float* vol, int num_threads, const Scheduler& schedule) {
  const Tiling tiling(det, kSimdWidth == 16 ? 2 : 1);  // spread lanes where scatters exist
  const int64_t num_tiles = tiling.tiles;
  TileBuffer buffer(static_cast<size_t>(num_tiles));
  Tile* tiles = buffer.data();
  std::vector<float> gt(static_cast<size_t>(num_tiles) * kLanes);  // proj, tile by tile
  const int64_t setup_items = det.views * tiling.block_rows;
  const int64_t zero_chunk = int64_t{1} << 18;
  const int64_t zero_items = (dims.size() + zero_chunk - 1) / zero_chunk;
  parallel_for(setup_items + zero_items, num_threads, schedule, [&](int64_t item) {
    if (item >= setup_items) {
      const int64_t z0 = (item - setup_items) * zero_chunk;
      std::memset(vol + z0, 0, sizeof(float) * std::min(zero_chunk, dims.size() - z0));
      return;
    }
    int64_t ray[kLanes];
    tiling.for_block_row(item, [&](int64_t i, int64_t view, int64_t row0, int64_t col0) {
      setup_tile(g, tiling, view, row0, col0, dims, tiles[i]);
      tiling.rays(view, row0, col0, ray);
      for (int l = 0; l < kLanes; ++l) gt[i * kLanes + l] = ray[l] >= 0 ? proj[ray[l]] : 0.0f;
    });
  });
  // One dominant axis at a time, split into slabs of planes: a ray adds only into the plane
  // it samples, so slabs of one axis are disjoint sets of voxels and need no locks.
  for (int axis = 0; axis < 3; ++axis) {
    const int32_t n = static_cast<int32_t>(dims.n(axis));
    const int32_t thick = std::max<int32_t>(2, n / std::max(1, 4 * num_threads));
    const int64_t slabs = (n + thick - 1) / thick;
    parallel_for(slabs, num_threads, schedule, [&](int64_t slab) {
      const int32_t p0 = static_cast<int32_t>(slab) * thick;
      const int32_t p1 = std::min(n, p0 + thick);
      const int64_t safe = p0 * dims.stride(axis);
      for (int64_t i = 0; i < num_tiles; ++i) {
        const Tile& t = tiles[i];
        const int32_t lo = std::max(p0, t.lo[axis]), hi = std::min(p1, t.hi[axis]);
        if (lo < hi) adjoint_tile(vol, t, gt.data() + i * kLanes, axis, lo, hi, safe);
      }
    });
  }
}

}  // namespace xct_joseph

#ifndef XCT_JOSEPH_NO_FFI
// ---------------------------------------------------------------------------------------
// XLA FFI handlers.

#include "xla/ffi/api/ffi.h"
#define XCT_NATIVE_FFI_POOL
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

struct Shapes {
  xct_joseph::Dims dims;
  xct_joseph::Detector det;
  int64_t batch;
};

// volume [..., nz, ny, nx]; views [..., V, 12]; frame [..., 12]; projections
// [..., V, rows, cols], with the same leading (batch) dimensions.
ffi::Error check_shapes(ffi::AnyBuffer::Dimensions vol, ffi::AnyBuffer::Dimensions views,
                        ffi::AnyBuffer::Dimensions frame, ffi::AnyBuffer::Dimensions proj,
                        Shapes& out) {
  if (vol.size() < 3 || proj.size() != vol.size() || views.size() != vol.size() - 1 ||
      frame.size() != vol.size() - 2) {
    return ffi::Error::InvalidArgument(
        "xct_joseph: expected volume [..., nz, ny, nx], views [..., V, 12], frame [..., 12] "
        "and projections [..., V, rows, cols]");
  }
  const size_t nb = vol.size() - 3;
  int64_t batch = 1;
  for (size_t i = 0; i < nb; ++i) {
    if (views[i] != vol[i] || frame[i] != vol[i] || proj[i] != vol[i]) {
      return ffi::Error::InvalidArgument("xct_joseph: leading (batch) dimensions differ");
    }
    batch *= vol[i];
  }
  if (views[nb] != proj[nb] || views[nb + 1] != 12 || frame[nb] != 12) {
    return ffi::Error::InvalidArgument("xct_joseph: views must be [V, 12] and frame [12]");
  }
  out.dims = {vol[nb + 2], vol[nb + 1], vol[nb]};
  out.det = {proj[nb], proj[nb + 1], proj[nb + 2]};
  out.batch = batch;
  if (out.dims.size() >= (int64_t{1} << 31)) {
    return ffi::Error::InvalidArgument("xct_joseph: volumes must hold fewer than 2^31 voxels");
  }
  return ffi::Error::Success();
}

using xct_native::make_pool;
using xct_native::Pool;

// Runs `op(i, geometry, pool)` for each batch element of checked shapes.
template <typename Op>
ffi::Error for_each_batch(ffi::ThreadPool& pool, ffi::AnyBuffer::Dimensions vol,
                          ffi::Buffer<ffi::F32>& views, ffi::Buffer<ffi::F32>& frame,
                          ffi::AnyBuffer::Dimensions proj, int32_t parallel, Shapes& s, Op op) {
  ffi::Error err = check_shapes(vol, views.dimensions(), frame.dimensions(), proj, s);
  if (err.failure()) return err;
  Pool p = make_pool(pool);
  for (int64_t i = 0; i < s.batch; ++i) {
    const xct_joseph::Geometry g{views.typed_data() + i * 12 * s.det.views,
                                 frame.typed_data() + i * 12, parallel != 0};
    op(i, g, p);
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> vol,
                       ffi::Buffer<ffi::F32> views, ffi::Buffer<ffi::F32> frame,
                       int32_t parallel, ffi::ResultBuffer<ffi::F32> out) {
  Shapes s;
  return for_each_batch(
      pool, vol.dimensions(), views, frame, out->dimensions(), parallel, s,
      [&](int64_t i, const xct_joseph::Geometry& g, const Pool& p) {
        xct_joseph::forward(vol.typed_data() + i * s.dims.size(), s.dims, g, s.det,
                            out->typed_data() + i * s.det.rays(), p.num_threads, p.schedule);
      });
}

ffi::Error AdjointImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> proj,
                       ffi::Buffer<ffi::F32> views, ffi::Buffer<ffi::F32> frame,
                       int32_t parallel, ffi::ResultBuffer<ffi::F32> vol) {
  Shapes s;
  return for_each_batch(
      pool, vol->dimensions(), views, frame, proj.dimensions(), parallel, s,
      [&](int64_t i, const xct_joseph::Geometry& g, const Pool& p) {
        xct_joseph::adjoint(proj.typed_data() + i * s.det.rays(), s.dims, g, s.det,
                            vol->typed_data() + i * s.dims.size(), p.num_threads, p.schedule);
      });
}

}  // namespace

// Both handlers: the input buffer, views, frame, the `parallel` flag; one output buffer.
#define XCT_JOSEPH_BINDING                 \
  ffi::Ffi::Bind()                         \
      .Ctx<ffi::ThreadPool>()              \
      .Arg<ffi::Buffer<ffi::F32>>()        \
      .Arg<ffi::Buffer<ffi::F32>>()        \
      .Arg<ffi::Buffer<ffi::F32>>()        \
      .Attr<int32_t>("parallel")           \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(XctJosephForward, ForwardImpl, XCT_JOSEPH_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(XctJosephAdjoint, AdjointImpl, XCT_JOSEPH_BINDING);

// The SIMD width the kernels were compiled for (16: AVX-512, 8: AVX2, 1: portable code).
extern "C" int XctJosephSimdWidth() { return xct_joseph::kSimdWidth; }
#endif  // XCT_JOSEPH_NO_FFI

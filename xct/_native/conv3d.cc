// The kernel gradient of a channels-last 3D convolution, as an XLA FFI handler.
//
// Called by xct.models.conv (the custom VJP of its CPU convolution) through jax.ffi:
//
//   dw[a, b, c, i, o] = sum_{n, z, y, x} xpad[n, z*sd + a, y*sh + b, x*sw + c, i] * dy[n, z, y, x, o]
//
// with xpad [N, Dp, Hp, Wp, Ci] the input already padded, dy [N, D, H, W, Co] the gradient
// of the output and dw [KD, KH, KW, Ci, Co] (Flax's DHWIO kernel layout). XLA:CPU computes
// this reduction over N * D * H * W positions, with a tiny output, several times slower
// than the convolution itself (BENCHMARKS.md: 358 ms against 74 ms forward for 2 x 64^3 x
// 16 -> 16 channels); here it is ~45 ms on the same 2 cores.
//
// What makes it fast: per output row (n, z, y) the dy row [W, Co] and each input row
// [Wp, Ci] sit in L1, and each tap (a, b, c) adds a small GEMM [Ci, W] x [W, Co] into a
// register-blocked accumulator of 8 input channels x 16 output channels (SIMD over output
// channels, one broadcast per input channel). Rows are split into a fixed number of
// chunks, each with its own accumulator, summed at the end in a fixed order, so the result
// does not depend on the number of threads. Products are fused (FMA) where the CPU has it:
// float rounding differs from XLA's order of summation either way.

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
#elif defined(__clang__)
#pragma clang fp contract(fast)
#endif

#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"

namespace xct_conv {

typedef float v8 __attribute__((vector_size(32)));

struct Shape {
  int64_t n, d, h, w;        // dy's batch and spatial sizes
  int64_t dp, hp, wp;        // padded input's spatial sizes
  int64_t ci, co;            // channels
  int64_t kd, kh, kw;        // kernel
  int64_t sd, sh, sw;        // strides
};

template <typename V>
inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
inline void store(float* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// acc[ci0 + i, co0 + lane of j] += sum_x xs[x * sw * Ci + ci0 + i] * g[x * Co + co0 + lane of j]
// for i < CIB and COV vectors of type V (v8 or float).
template <int CIB, int COV, typename V>
inline void block(const float* xs, const float* g, const Shape& s, int64_t ci0, int64_t co0,
                  float* acc) {
  constexpr int L = sizeof(V) / sizeof(float);
  V a[CIB][COV];
  for (int i = 0; i < CIB; ++i)
    for (int j = 0; j < COV; ++j) a[i][j] = load<V>(acc + (ci0 + i) * s.co + co0 + L * j);
  const int64_t step = s.sw * s.ci;
  for (int64_t x = 0; x < s.w; ++x) {
    V gv[COV];
    for (int j = 0; j < COV; ++j) gv[j] = load<V>(g + x * s.co + co0 + L * j);
    const float* xv = xs + x * step + ci0;
    for (int i = 0; i < CIB; ++i) {
      const float v = xv[i];
      for (int j = 0; j < COV; ++j) a[i][j] += v * gv[j];
    }
  }
  for (int i = 0; i < CIB; ++i)
    for (int j = 0; j < COV; ++j) store<V>(acc + (ci0 + i) * s.co + co0 + L * j, a[i][j]);
}

template <int COV, typename V>
inline void channel_blocks(const float* xs, const float* g, const Shape& s, int64_t co0,
                           float* acc) {
  int64_t ci0 = 0;
  for (; ci0 + 8 <= s.ci; ci0 += 8) block<8, COV, V>(xs, g, s, ci0, co0, acc);
  for (; ci0 < s.ci; ++ci0) block<1, COV, V>(xs, g, s, ci0, co0, acc);
}

// Adds the contributions of output rows [r0, r1) (row = (n, z, y)) into acc [KD*KH*KW, Ci, Co].
inline void rows(const float* x, const float* dy, const Shape& s, int64_t r0, int64_t r1,
                 float* acc) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t y = r % s.h, z = (r / s.h) % s.d, n = r / (s.h * s.d);
    const float* g = dy + r * s.w * s.co;
    for (int64_t a = 0; a < s.kd; ++a) {
      for (int64_t b = 0; b < s.kh; ++b) {
        const float* xr = x + ((n * s.dp + z * s.sd + a) * s.hp + y * s.sh + b) * s.wp * s.ci;
        for (int64_t c = 0; c < s.kw; ++c) {
          float* t = acc + ((a * s.kh + b) * s.kw + c) * s.ci * s.co;
          const float* xs = xr + c * s.ci;
          int64_t co0 = 0;
          for (; co0 + 16 <= s.co; co0 += 16) channel_blocks<2, v8>(xs, g, s, co0, t);
          for (; co0 + 8 <= s.co; co0 += 8) channel_blocks<1, v8>(xs, g, s, co0, t);
          for (; co0 < s.co; ++co0) channel_blocks<1, float>(xs, g, s, co0, t);
        }
      }
    }
  }
}

// Chunks of rows, each summed into its own accumulator: fixed, so results do not depend on
// the thread count.
constexpr int64_t kChunks = 16;

inline void weight_grad(const float* x, const float* dy, const Shape& s, float* dw,
                        int num_threads, const xct_native::Scheduler& schedule) {
  const int64_t taps = s.kd * s.kh * s.kw * s.ci * s.co;
  const int64_t total = s.n * s.d * s.h;
  const int64_t chunks = std::max<int64_t>(1, std::min(kChunks, total));
  std::vector<float> acc(static_cast<size_t>(chunks * taps), 0.0f);
  xct_native::parallel_for(chunks, num_threads, schedule, [&](int64_t k) {
    rows(x, dy, s, total * k / chunks, total * (k + 1) / chunks, acc.data() + k * taps);
  });
  std::memcpy(dw, acc.data(), sizeof(float) * taps);
  for (int64_t k = 1; k < chunks; ++k) {
    const float* a = acc.data() + k * taps;
    for (int64_t i = 0; i < taps; ++i) dw[i] += a[i];
  }
}


// out[n, z, y, x, o] = sum_{a, b, c, i} xpad[n, z*sd + a, y*sh + b, x*sw + c, i] * w[a, b, c, i, o]
// for output row r = (n, z, y), positions [x0, x0 + XB) and output channels co0 + [0, 8 * COV):
// the accumulators stay in registers over all taps and input channels.
template <int XB, int COV>
inline void out_block(const float* x, const float* w, const Shape& s, int64_t n, int64_t z,
                      int64_t y, int64_t x0, int64_t co0, float* out) {
  v8 acc[XB][COV];
  for (int p = 0; p < XB; ++p)
    for (int j = 0; j < COV; ++j) acc[p][j] = v8{};
  const int64_t step = s.sw * s.ci;
  for (int64_t a = 0; a < s.kd; ++a) {
    for (int64_t b = 0; b < s.kh; ++b) {
      const float* xr = x + ((n * s.dp + z * s.sd + a) * s.hp + y * s.sh + b) * s.wp * s.ci;
      for (int64_t c = 0; c < s.kw; ++c) {
        const float* xs = xr + (x0 * s.sw + c) * s.ci;
        const float* wt = w + ((a * s.kh + b) * s.kw + c) * s.ci * s.co + co0;
        for (int64_t i = 0; i < s.ci; ++i) {
          v8 wv[COV];
          for (int j = 0; j < COV; ++j) wv[j] = load<v8>(wt + i * s.co + 8 * j);
          for (int p = 0; p < XB; ++p) {
            const float v = xs[p * step + i];
            for (int j = 0; j < COV; ++j) acc[p][j] += v * wv[j];
          }
        }
      }
    }
  }
  float* o = out + x0 * s.co + co0;
  for (int p = 0; p < XB; ++p)
    for (int j = 0; j < COV; ++j) store<v8>(o + p * s.co + 8 * j, acc[p][j]);
}

template <int XB, int COV>
inline void out_row(const float* x, const float* w, const Shape& s, int64_t n, int64_t z,
                    int64_t y, int64_t co0, float* out) {
  int64_t x0 = 0;
  for (; x0 + XB <= s.w; x0 += XB) out_block<XB, COV>(x, w, s, n, z, y, x0, co0, out);
  for (; x0 < s.w; ++x0) out_block<1, COV>(x, w, s, n, z, y, x0, co0, out);
}

// The convolution itself (Co a multiple of 8), rows (n, z, y) split over threads.
inline void forward(const float* x, const float* w, const Shape& s, float* out, int num_threads,
                    const xct_native::Scheduler& schedule) {
  const int64_t total = s.n * s.d * s.h;
  const int64_t grain = std::max<int64_t>(1, total / (16 * std::max(1, num_threads)));
  xct_native::parallel_for((total + grain - 1) / grain, num_threads, schedule, [&](int64_t k) {
    for (int64_t r = k * grain; r < std::min(total, (k + 1) * grain); ++r) {
      const int64_t y = r % s.h, z = (r / s.h) % s.d, n = r / (s.h * s.d);
      float* o = out + r * s.w * s.co;
      int64_t co0 = 0;
      for (; co0 + 32 <= s.co; co0 += 32) out_row<4, 4>(x, w, s, n, z, y, co0, o);
      for (; co0 + 16 <= s.co; co0 += 16) out_row<8, 2>(x, w, s, n, z, y, co0, o);
      for (; co0 + 8 <= s.co; co0 += 8) out_row<8, 1>(x, w, s, n, z, y, co0, o);
    }
  });
}

}  // namespace xct_conv

#include "xla/ffi/api/ffi.h"
#define XCT_NATIVE_FFI_POOL
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error WeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> dy, int32_t sd, int32_t sh, int32_t sw,
                          ffi::ResultBuffer<ffi::F32> dw) {
  const auto xd = x.dimensions(), gd = dy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 5 || gd.size() != 5 || wd.size() != 5) {
    return ffi::Error::InvalidArgument(
        "xct_conv3d_weight_grad: expected x [N, D, H, W, Ci], dy [N, D, H, W, Co] and "
        "dw [KD, KH, KW, Ci, Co]");
  }
  xct_conv::Shape s{gd[0], gd[1], gd[2], gd[3], xd[1], xd[2], xd[3], xd[4], gd[4],
                    wd[0], wd[1], wd[2], sd, sh, sw};
  if (xd[0] != gd[0] || wd[3] != s.ci || wd[4] != s.co || sd < 1 || sh < 1 || sw < 1 ||
      (s.d - 1) * sd + s.kd > s.dp || (s.h - 1) * sh + s.kh > s.hp ||
      (s.w - 1) * sw + s.kw > s.wp) {
    return ffi::Error::InvalidArgument(
        "xct_conv3d_weight_grad: shapes of x, dy, dw and the strides do not match");
  }
  xct_native::Pool p = xct_native::make_pool(pool);
  xct_conv::weight_grad(x.typed_data(), dy.typed_data(), s, dw->typed_data(), p.num_threads,
                        p.schedule);
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       int32_t sd, int32_t sh, int32_t sw, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 5 || wd.size() != 5 || od.size() != 5) {
    return ffi::Error::InvalidArgument(
        "xct_conv3d_forward: expected x [N, D, H, W, Ci], w [KD, KH, KW, Ci, Co] and "
        "out [N, D, H, W, Co]");
  }
  xct_conv::Shape s{od[0], od[1], od[2], od[3], xd[1], xd[2], xd[3], xd[4], od[4],
                    wd[0], wd[1], wd[2], sd, sh, sw};
  if (xd[0] != od[0] || wd[3] != s.ci || wd[4] != s.co || s.co % 8 != 0 || sd < 1 || sh < 1 ||
      sw < 1 || (s.d - 1) * sd + s.kd > s.dp || (s.h - 1) * sh + s.kh > s.hp ||
      (s.w - 1) * sw + s.kw > s.wp) {
    return ffi::Error::InvalidArgument(
        "xct_conv3d_forward: shapes of x, w, out and the strides do not match (or output "
        "channels not a multiple of 8)");
  }
  xct_native::Pool p = xct_native::make_pool(pool);
  xct_conv::forward(x.typed_data(), w.typed_data(), s, out->typed_data(), p.num_threads,
                    p.schedule);
  return ffi::Error::Success();
}

}  // namespace

// Both handlers take two float32 buffers and the three strides, and return one buffer.
#define XCT_CONV3D_BINDING                  \
  ffi::Ffi::Bind()                          \
      .Ctx<ffi::ThreadPool>()               \
      .Arg<ffi::Buffer<ffi::F32>>()         \
      .Arg<ffi::Buffer<ffi::F32>>()         \
      .Attr<int32_t>("stride_d")            \
      .Attr<int32_t>("stride_h")            \
      .Attr<int32_t>("stride_w")            \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(XctConv3dForward, ForwardImpl, XCT_CONV3D_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(XctConv3dWeightGrad, WeightGradImpl, XCT_CONV3D_BINDING);

// The kernel gradient of a depthwise convolution on CPU, as an XLA FFI custom call.
//
//   dkernel[a, b, 0, c] = sum over n, i, j of x_padded[n, s*i + a, s*j + b, c] * dy[n, i, j, c]
//
// for NHWC float32 x (N, H, W, C), dy (N, OH, OW, C), an odd kH x kW kernel, stride s and
// symmetric zero padding kH // 2, kW // 2 (PyTorch's Conv2d(padding=k // 2)).
//
// Why: XLA:CPU computes each tap as a window copy plus a library multiply-sum, four passes
// over a feature map per tap, 36 per 3x3 layer. Here one sweep reads every output row of
// dy once and the kH input rows it touches, accumulating all taps of all channels in a
// small buffer (kH * kW * C floats, in L1/L2), the channel loop vectorized.
//
// Rounding: each output row's products are summed in float32 (at most OW * kW terms per
// tap), rows into a double per chunk of rows, chunks in a fixed order: the result does not
// depend on how many threads ran or which ran what.

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "conv_shape.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* x;
  const float* dy;
  int64_t h, w, c, oh, ow, kh, kw, stride;
};

// Adds the kernel gradient of output rows [first, last) (row r = image * OH + i) to `out`.
void AccumulateRows(const Problem& p, int64_t first, int64_t last, double* out) {
  const int64_t taps = p.kh * p.kw;
  std::vector<float> acc(taps * p.c);
  for (int64_t r = first; r < last; ++r) {
    const int64_t image = r / p.oh, i = r % p.oh;
    std::fill(acc.begin(), acc.end(), 0.0f);
    const float* dy_row = p.dy + r * p.ow * p.c;
    for (int64_t a = 0; a < p.kh; ++a) {
      const int64_t row = p.stride * i + a - p.kh / 2;
      if (row < 0 || row >= p.h) continue;  // zero padding
      const float* x_row = p.x + (image * p.h + row) * p.w * p.c;
      for (int64_t j = 0; j < p.ow; ++j) {
        const float* g = dy_row + j * p.c;
        for (int64_t b = 0; b < p.kw; ++b) {
          const int64_t col = p.stride * j + b - p.kw / 2;
          if (col < 0 || col >= p.w) continue;
          const float* xv = x_row + col * p.c;
          float* tap = acc.data() + (a * p.kw + b) * p.c;
          for (int64_t k = 0; k < p.c; ++k) tap[k] += xv[k] * g[k];
        }
      }
    }
    for (int64_t t = 0; t < taps * p.c; ++t) out[t] += acc[t];
  }
}

constexpr int64_t kMaxChunks = 16;  // fixed, so the summation order is too

ffi::Error DepthwiseKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> out, int64_t stride) {
  auto xd = x.dimensions();
  auto gd = dy.dimensions();
  auto od = out->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || od.size() != 4) {
    return ffi::Error::InvalidArgument("depthwise kernel gradient: x, dy and the result must be rank 4");
  }
  const int64_t n = xd[0], h = xd[1], w = xd[2], c = xd[3];
  const int64_t oh = gd[1], ow = gd[2], kh = od[0], kw = od[1];
  if (gd[0] != n || gd[3] != c || od[2] != 1 || od[3] != c || !ca_flax::SymmetricConvShape(h, w, kh, kw, stride, oh, ow)) {
    return ffi::Error::InvalidArgument(
        "depthwise kernel gradient: shapes do not match an NHWC input, its output gradient for stride " +
        std::to_string(stride) + " and an odd (kH, kW, 1, C) kernel");
  }
  const Problem problem{x.typed_data(), dy.typed_data(), h, w, c, oh, ow, kh, kw, stride};
  const int64_t rows = n * oh, chunks = std::min<int64_t>(rows, kMaxChunks);
  std::vector<std::vector<double>> partial(chunks, std::vector<double>(kh * kw * c, 0.0));  // one per chunk
  ca_flax::RunChunks(pool, chunks, [&](int64_t k) {
    AccumulateRows(problem, rows * k / chunks, rows * (k + 1) / chunks, partial[k].data());
  });
  float* result = out->typed_data();
  for (int64_t t = 0; t < kh * kw * c; ++t) {
    double sum = 0.0;
    for (int64_t k = 0; k < chunks; ++k) sum += partial[k][t];
    result[t] = static_cast<float>(sum);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CaFlaxDepthwiseKernelGrad, DepthwiseKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride"));

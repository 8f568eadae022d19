// A dense convolution unit with few input channels (a network's stem) for inference on
// CPU, as one XLA FFI custom call:
//
//   y[n, i, j, o] = act((sum over a, b, ci of x_padded[n, s*i + a, s*j + b, ci] * kernel[a, b, ci, o]
//                        - mean[o]) * mul[o] + bias[o])
//
// for NHWC float32 x (N, H, W, Ci), an odd (kH, kW, Ci, Co) kernel, stride s, symmetric
// zero padding kH // 2, kW // 2 (PyTorch's Conv2d(padding=k // 2)), the unit's inference
// BatchNorm and ReLU6 or no activation.
//
// Why: with 3 input channels a library matmul needs the windows copied out first (27
// values per output pixel, more bytes than the image), and XLA:CPU then normalizes the
// output in another pass. Here each output pixel's Co channels are accumulated in
// registers, one broadcast input value times one kernel row per tap, and normalized
// before they are stored: one read of the image, one write of the output. Several pixels
// share each kernel row load, and give the core independent chains of multiply-adds.
//
// Rounding: taps are summed in (a, b, ci) order in float32; BatchNorm as
// x * mul + (bias - mean * mul), as PyTorch's CPU inference kernel folds it.

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "conv_shape.h"
#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using ca_flax::Act;
using ca_flax::Affine;
using ca_flax::kLanes;
using ca_flax::Load;
using ca_flax::Splat;
using ca_flax::Store;
using ca_flax::Vec;

struct Problem {
  const float* x;
  const float* kernel;  // (kH, kW, Ci, Co)
  const Affine& bn;
  float* y;
  int64_t h, w, ci, co, oh, ow, kh, kw, stride;
};

// A register tile: kPx pixels of a row times kCount vectors of output channels, each
// accumulator its own chain of multiply-adds (a stem has 32 outputs, two vectors: one
// pixel at a time left the core waiting on each chain's latency). kPx * kCount + kCount
// + 1 registers must fit: 32 AVX-512 registers hold a Vec each, AVX2 and NEON need two
// and four per Vec.
#if defined(__AVX512F__)
constexpr int64_t kTileVectors = 4, kTileUnits = 16;  // up to 4 x 4, 8 x 2 or 16 x 1
#else
constexpr int64_t kTileVectors = 2, kTileUnits = 4;  // up to 2 x 2 or 4 x 1
#endif

// Output channels [o0, o0 + kCount * kLanes) of pixels [j, j + kPx) of the output row whose
// input rows are `rows` (kH padded rows, nullptr where the row is padding).
template <bool kRelu6, int64_t kPx, int64_t kCount>
void Tile(const Problem& p, const float* const* rows, int64_t j, int64_t o0, float* out_row) {
  Vec acc[kPx][kCount];
  for (int64_t u = 0; u < kPx; ++u) {
    for (int64_t v = 0; v < kCount; ++v) acc[u][v] = Splat(0.0f);
  }
  for (int64_t a = 0; a < p.kh; ++a) {
    if (rows[a] == nullptr) continue;
    const float* in = rows[a] + p.stride * j * p.ci;
    const float* kern = p.kernel + a * p.kw * p.ci * p.co + o0;
    for (int64_t t = 0; t < p.kw * p.ci; ++t) {  // (b, ci) are contiguous in both
      Vec weights[kCount];
      for (int64_t v = 0; v < kCount; ++v) weights[v] = Load(kern + t * p.co + v * kLanes);
      for (int64_t u = 0; u < kPx; ++u) {
        const Vec value = Splat(in[u * p.stride * p.ci + t]);
        for (int64_t v = 0; v < kCount; ++v) acc[u][v] += value * weights[v];
      }
    }
  }
  for (int64_t u = 0; u < kPx; ++u) {
    float* out = out_row + (j + u) * p.co + o0;
    for (int64_t v = 0; v < kCount; ++v) Store(out + v * kLanes, Act<kRelu6>(p.bn(acc[u][v], o0 + v * kLanes)));
  }
}

// kCount vectors of channels from o0 for every pixel of the row: as many pixels per tile
// as the registers allow, the last ones one at a time.
template <bool kRelu6, int64_t kCount>
void Columns(const Problem& p, const float* const* rows, int64_t o0, float* out_row) {
  constexpr int64_t kPx = kTileUnits / kCount;
  int64_t j = 0;
  for (; j + kPx <= p.ow; j += kPx) Tile<kRelu6, kPx, kCount>(p, rows, j, o0, out_row);
  for (; j < p.ow; ++j) Tile<kRelu6, 1, kCount>(p, rows, j, o0, out_row);
}

template <bool kRelu6>
void Row(const Problem& p, const float* const* rows, float* out_row) {
  int64_t o0 = 0;
  for (; o0 + kTileVectors * kLanes <= p.co; o0 += kTileVectors * kLanes) {
    Columns<kRelu6, kTileVectors>(p, rows, o0, out_row);
  }
  if (kTileVectors > 2 && o0 + 2 * kLanes <= p.co) {
    Columns<kRelu6, 2>(p, rows, o0, out_row);
    o0 += 2 * kLanes;
  }
  for (; o0 + kLanes <= p.co; o0 += kLanes) Columns<kRelu6, 1>(p, rows, o0, out_row);
  for (; o0 < p.co; ++o0) {  // channels past the last multiple of kLanes
    for (int64_t j = 0; j < p.ow; ++j) {
      float acc = 0.0f;
      for (int64_t a = 0; a < p.kh; ++a) {
        if (rows[a] == nullptr) continue;
        const float* in = rows[a] + p.stride * j * p.ci;
        for (int64_t t = 0; t < p.kw * p.ci; ++t) acc += in[t] * p.kernel[(a * p.kw * p.ci + t) * p.co + o0];
      }
      out_row[j * p.co + o0] = Act<kRelu6>(p.bn(acc, o0));
    }
  }
}

// Output rows [first, last) of `image`.
void ComputeRows(const Problem& p, bool relu6, int64_t image, int64_t first, int64_t last) {
  const int64_t pad_w = p.kw / 2, padded = (p.w + 2 * pad_w) * p.ci;
  std::vector<float> buffer(p.kh * padded, 0.0f);  // zero columns at both ends stay zero
  std::vector<const float*> rows(p.kh);
  for (int64_t i = first; i < last; ++i) {
    for (int64_t a = 0; a < p.kh; ++a) {
      const int64_t row = p.stride * i + a - p.kh / 2;
      if (row < 0 || row >= p.h) {
        rows[a] = nullptr;
        continue;
      }
      float* dst = buffer.data() + a * padded;
      std::copy_n(p.x + (image * p.h + row) * p.w * p.ci, p.w * p.ci, dst + pad_w * p.ci);
      rows[a] = dst;
    }
    float* out_row = p.y + (image * p.oh + i) * p.ow * p.co;
    if (relu6) {
      Row<true>(p, rows.data(), out_row);
    } else {
      Row<false>(p, rows.data(), out_row);
    }
  }
}

ffi::Error DenseConvInference(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                              ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> mul, ffi::Buffer<ffi::F32> bias,
                              ffi::ResultBuffer<ffi::F32> y, int64_t stride, bool relu6) {
  auto xd = x.dimensions();
  auto kd = kernel.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4) {
    return ffi::Error::InvalidArgument("dense conv inference: x, kernel and y must be rank 4");
  }
  const int64_t n = xd[0], h = xd[1], w = xd[2], ci = xd[3];
  const int64_t kh = kd[0], kw = kd[1], co = kd[3], oh = yd[1], ow = yd[2];
  if (kd[2] != ci || yd[0] != n || yd[3] != co || !ca_flax::SymmetricConvShape(h, w, kh, kw, stride, oh, ow) ||
      !ca_flax::VectorsOfLength(co, {&mean, &mul, &bias})) {
    return ffi::Error::InvalidArgument(
        "dense conv inference: shapes do not match an NHWC input, an odd (kH, kW, Ci, Co) kernel, BatchNorm "
        "vectors of length Co and an output (N, OH, OW, Co) for stride " + std::to_string(stride));
  }
  if (n == 0 || oh == 0 || ow == 0 || co == 0) return ffi::Error::Success();
  const Affine bn(mean.typed_data(), mul.typed_data(), bias.typed_data(), co);
  const Problem p{x.typed_data(), kernel.typed_data(), bn, y->typed_data(), h, w, ci, co, oh, ow, kh, kw, stride};
  ca_flax::RunRowChunks(pool, n, oh, ca_flax::RowChunksPerImage(n, oh),
                        [&](int64_t, int64_t image, int64_t first, int64_t last) {
                          ComputeRows(p, relu6, image, first, last);
                        });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CaFlaxDenseConvInference, DenseConvInference,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mul
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<int64_t>("stride")
                                  .Attr<bool>("relu6"));

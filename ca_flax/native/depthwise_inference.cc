// A MobileNet block's depthwise unit for inference on CPU, as one XLA FFI custom call:
//
//   v        = act_in((x - in_mean) * in_mul + in_bias)     (the previous unit's BatchNorm
//                                                            and activation; or v = x)
//   z[n,i,j] = sum over a, b of v_padded[n, s*i + a, s*j + b] * kernel[a, b]   (per channel)
//   y        = act_out((z - out_mean) * out_mul + out_bias)  (this unit's BatchNorm, act.)
//   row_sum[n, i, c] = sum over j of y[n, i, j, c];  col_sum[n, j, c] = sum over i of y
//
// for NHWC float32 x (N, H, W, C), an odd (kH, kW, 1, C) kernel, stride s and symmetric
// zero padding kH // 2, kW // 2 of v (PyTorch's Conv2d(padding=k // 2)). act is ReLU6 or
// the identity. The sums are the pools Coordinate Attention (and SE) start from.
//
// CaFlaxExpandDepthwiseInference also computes the previous unit's 1x1 convolution: x is
// then the block's input (N, H, W, Ci) and v = act_in(in_affine(x @ expand)) for a
// (Ci, C) expand kernel (an inverted residual's expand unit, MobileNeXt's pw2).
//
// Why: XLA:CPU runs this as five passes over the block's widest feature map (the previous
// BatchNorm writes v, a padded copy, the taps with this BatchNorm, then two pooling
// reductions read y). Here each input row is normalized once into a small padded row
// buffer (kH rows, in L2), and every output row is computed, normalized, written and
// pooled while it is in registers: one read of x and one write of y. With the expand
// matmul, its output rows (the widest map of the block) are computed straight into that
// row buffer, a register tile at a time, and never written to memory at all.
//
// Rounding: BatchNorm as x * mul + (bias - mean * mul) in float32, as PyTorch's CPU
// inference kernel folds it (the XLA formulation rounds (x - mean) * mul + bias); the
// expand matmul sums over Ci in order, and the taps in (a, b) order, in float32 (fused
// multiply-adds where the CPU has them); col_sum adds per-chunk partial sums in chunk
// order. Chunks are fixed by the shape, so results do not depend on the thread count.

#include <algorithm>
#include <cstdint>
#include <cstring>
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
  const float* x;       // (N, H, W, Cx): Cx = C, or Ci with an expand matmul
  const float* expand;  // (Ci, C): the producer's 1x1 kernel, or nullptr
  const float* kernel;  // (kH, kW, C)
  const Affine& in;
  const Affine& out;
  bool in_affine, in_relu6, out_relu6;
  float* y;
  float* row_sum;
  int64_t h, w, c, oh, ow, kh, kw, stride;
  int64_t ci;  // channels of x (C without an expand matmul)
};

// Input row `row` of `image`, normalized and activated, into `dst` between kW // 2 zero
// columns on each side (width W + 2 * (kW // 2), C channels per column).
template <bool kRelu6>
void NormalizeRow(const Problem& p, const float* src, float* dst) {
  for (int64_t j = 0; j < p.w; ++j) {
    const float* s = src + j * p.c;
    float* d = dst + j * p.c;
    int64_t k = 0;
    for (; k + kLanes <= p.c; k += kLanes) {
      Store(d + k, Act<kRelu6>(p.in(Load(s + k), k)));
    }
    for (; k < p.c; ++k) d[k] = Act<kRelu6>(p.in(s[k], k));
  }
}

// The expand matmul's register tile: kTilePixels x kTileVectors accumulators, the
// kernel's kTileVectors and one broadcast input value must fit the vector registers (32
// AVX-512 registers hold a Vec each; AVX2 and NEON need two and four registers per Vec).
// 6 x 4 and 4 x 4 measured alike on AVX-512; 6 fills the row's 7-pixel tail better.
#if defined(__AVX512F__)
constexpr int kTilePixels = 6, kTileVectors = 4;
#else
constexpr int kTilePixels = 2, kTileVectors = 2;
#endif

// Pixels [j, j + kPx) of the expand matmul's output row, channels [c0, c0 + kV * kLanes),
// normalized and activated into `dst`: kPx x kV accumulators stay in registers while the
// Ci input values of each pixel are broadcast against kV vectors of the expand kernel.
template <bool kRelu6, int kPx, int kV>
inline void ExpandTile(const Problem& p, const float* src, int64_t j, int64_t c0, float* dst) {
  Vec acc[kPx][kV];
  for (int u = 0; u < kPx; ++u) {
    for (int v = 0; v < kV; ++v) acc[u][v] = Splat(0.0f);
  }
  const float* in = src + j * p.ci;
  const float* weights = p.expand + c0;
  for (int64_t k = 0; k < p.ci; ++k) {
    Vec wk[kV];
    for (int v = 0; v < kV; ++v) wk[v] = Load(weights + k * p.c + v * kLanes);
    for (int u = 0; u < kPx; ++u) {
      const Vec value = Splat(in[u * p.ci + k]);
      for (int v = 0; v < kV; ++v) acc[u][v] += value * wk[v];
    }
  }
  for (int u = 0; u < kPx; ++u) {
    for (int v = 0; v < kV; ++v) {
      Store(dst + (j + u) * p.c + c0 + v * kLanes, Act<kRelu6>(p.in(acc[u][v], c0 + v * kLanes)));
    }
  }
}

// The last `count` (< kPx) pixels of a row from j, as one tile.
template <bool kRelu6, int kV, int kPx>
void ExpandLastPixels(const Problem& p, const float* src, int64_t j, int64_t count, int64_t c0, float* dst) {
  if constexpr (kPx > 0) {
    if (count == kPx) {
      ExpandTile<kRelu6, kPx, kV>(p, src, j, c0, dst);
    } else {
      ExpandLastPixels<kRelu6, kV, kPx - 1>(p, src, j, count, c0, dst);
    }
  }
}

// kV vectors of channels from c0, for every pixel of the row, kTilePixels at a time.
template <bool kRelu6, int kV>
void ExpandColumns(const Problem& p, const float* src, int64_t c0, float* dst) {
  int64_t j = 0;
  for (; j + kTilePixels <= p.w; j += kTilePixels) ExpandTile<kRelu6, kTilePixels, kV>(p, src, j, c0, dst);
  ExpandLastPixels<kRelu6, kV, kTilePixels - 1>(p, src, j, p.w - j, c0, dst);
}

// The expand unit's output row: act_in(in(src @ expand)), W pixels of C channels. Channel
// blocks are the outer loop, so a block's Ci x 64 kernel values stay in L1 across the row.
template <bool kRelu6>
void ExpandRow(const Problem& p, const float* src, float* dst) {
  int64_t c0 = 0;
  for (; c0 + kTileVectors * kLanes <= p.c; c0 += kTileVectors * kLanes) {
    ExpandColumns<kRelu6, kTileVectors>(p, src, c0, dst);
  }
  if (kTileVectors > 2 && c0 + 2 * kLanes <= p.c) {
    ExpandColumns<kRelu6, 2>(p, src, c0, dst);
    c0 += 2 * kLanes;
  }
  for (; c0 + kLanes <= p.c; c0 += kLanes) ExpandColumns<kRelu6, 1>(p, src, c0, dst);
  for (; c0 < p.c; ++c0) {  // channels past the last multiple of kLanes
    for (int64_t j = 0; j < p.w; ++j) {
      float acc = 0.0f;
      for (int64_t k = 0; k < p.ci; ++k) acc += src[j * p.ci + k] * p.expand[k * p.c + c0];
      dst[j * p.c + c0] = Act<kRelu6>(p.in(acc, c0));
    }
  }
}

void LoadRow(const Problem& p, int64_t image, int64_t row, float* dst) {
  const int64_t pad = p.kw / 2;
  std::fill(dst, dst + pad * p.c, 0.0f);
  std::fill(dst + (pad + p.w) * p.c, dst + (2 * pad + p.w) * p.c, 0.0f);
  const float* src = p.x + (image * p.h + row) * p.w * p.ci;
  float* out = dst + pad * p.c;
  if (p.expand != nullptr) {
    if (p.in_relu6) {
      ExpandRow<true>(p, src, out);
    } else {
      ExpandRow<false>(p, src, out);
    }
  } else if (!p.in_affine) {
    std::memcpy(out, src, sizeof(float) * p.w * p.c);
  } else if (p.in_relu6) {
    NormalizeRow<true>(p, src, out);
  } else {
    NormalizeRow<false>(p, src, out);
  }
}

// One output row, kLanes channels [c0, c0 + kLanes) at a time: the block's kernel taps and
// BatchNorm vectors stay in registers across the row, each column's taps are summed in
// a register, normalized, stored and added to the row and column sums. kKh, kKw: the
// kernel size when known at compile time (3x3: fully unrolled), else 0 (read from p).
template <bool kRelu6, int kKh, int kKw>
void OutputRowBlock(const Problem& p, const float* const* taps, const int64_t* tap_row, int64_t valid, int64_t c0,
                    float* y_row, float* row_sum, float* col) {
  constexpr int kMaxTaps = (kKh > 0 ? kKh * kKw : 1);
  const int64_t kh = kKh > 0 ? kKh : p.kh, kw = kKw > 0 ? kKw : p.kw;
  Vec kernel[kMaxTaps];
  std::vector<Vec> kernel_heap(kKh > 0 ? 0 : kh * kw);
  Vec* k = kKh > 0 ? kernel : kernel_heap.data();
  for (int64_t t = 0; t < valid; ++t) {
    for (int64_t b = 0; b < kw; ++b) k[t * kw + b] = Load(p.kernel + (tap_row[t] * kw + b) * p.c + c0);
  }
  const Vec mul = Load(p.out.mul() + c0), shift = Load(p.out.shift() + c0);
  Vec sum = Splat(0.0f);
  // Columns four at a time: four independent multiply-add chains hide the latency one
  // chain of kH * kW dependent multiply-adds would expose.
  constexpr int64_t kColumns = 4;
  int64_t j = 0;
  for (; j + kColumns <= p.ow; j += kColumns) {
    Vec acc[kColumns];
    for (int64_t u = 0; u < kColumns; ++u) acc[u] = Splat(0.0f);
    for (int64_t t = 0; t < (kKh > 0 ? kKh : valid); ++t) {
      if (kKh > 0 && t >= valid) break;
      const float* in = taps[t] + p.stride * j * p.c + c0;
      for (int64_t b = 0; b < kw; ++b) {
        const Vec tap = k[t * kw + b];
        for (int64_t u = 0; u < kColumns; ++u) acc[u] += Load(in + (p.stride * u + b) * p.c) * tap;
      }
    }
    for (int64_t u = 0; u < kColumns; ++u) {
      const Vec value = Act<kRelu6>(acc[u] * mul + shift);
      float* cs = col + (j + u) * p.c + c0;
      Store(y_row + (j + u) * p.c + c0, value);
      sum += value;
      Store(cs, Load(cs) + value);
    }
  }
  for (; j < p.ow; ++j) {
    const int64_t offset = p.stride * j * p.c + c0;
    Vec acc = Splat(0.0f);
    for (int64_t t = 0; t < (kKh > 0 ? kKh : valid); ++t) {
      if (kKh > 0 && t >= valid) break;
      const float* in = taps[t] + offset;
      for (int64_t b = 0; b < kw; ++b) acc += Load(in + b * p.c) * k[t * kw + b];
    }
    const Vec value = Act<kRelu6>(acc * mul + shift);
    Store(y_row + j * p.c + c0, value);
    sum += value;
    Store(col + j * p.c + c0, Load(col + j * p.c + c0) + value);
  }
  Store(row_sum + c0, sum);
}

// The channels past the last multiple of kLanes, one at a time.
template <bool kRelu6>
void OutputRowTail(const Problem& p, const float* const* taps, const int64_t* tap_row, int64_t valid, int64_t c0,
                   float* y_row, float* row_sum, float* col) {
  for (int64_t c = c0; c < p.c; ++c) {
    float sum = 0.0f;
    for (int64_t j = 0; j < p.ow; ++j) {
      float acc = 0.0f;
      for (int64_t t = 0; t < valid; ++t) {
        for (int64_t b = 0; b < p.kw; ++b) {
          acc += taps[t][p.stride * j * p.c + b * p.c + c] * p.kernel[(tap_row[t] * p.kw + b) * p.c + c];
        }
      }
      const float value = Act<kRelu6>(p.out(acc, c));
      y_row[j * p.c + c] = value;
      sum += value;
      col[j * p.c + c] += value;
    }
    row_sum[c] = sum;
  }
}

template <bool kRelu6>
void OutputRow(const Problem& p, const float* const* taps, const int64_t* tap_row, int64_t valid, float* y_row,
               float* row_sum, float* col) {
  int64_t c0 = 0;
  for (; c0 + kLanes <= p.c; c0 += kLanes) {
    if (p.kh == 3 && p.kw == 3) {
      OutputRowBlock<kRelu6, 3, 3>(p, taps, tap_row, valid, c0, y_row, row_sum, col);
    } else {
      OutputRowBlock<kRelu6, 0, 0>(p, taps, tap_row, valid, c0, y_row, row_sum, col);
    }
  }
  OutputRowTail<kRelu6>(p, taps, tap_row, valid, c0, y_row, row_sum, col);
}

// Output rows i in [first, last) of `image`; adds this chunk's column sums to `col`.
void ComputeRows(const Problem& p, int64_t image, int64_t first, int64_t last, float* col) {
  const int64_t pad_h = p.kh / 2, padded_w = p.w + 2 * (p.kw / 2);
  std::vector<float> rows(p.kh * padded_w * p.c);
  std::vector<int64_t> held(p.kh, -1);  // which input row each slot of `rows` holds
  std::vector<const float*> taps(p.kh);
  std::vector<int64_t> tap_row(p.kh);
  for (int64_t i = first; i < last; ++i) {
    int64_t valid = 0;
    for (int64_t a = 0; a < p.kh; ++a) {
      const int64_t row = p.stride * i + a - pad_h;
      if (row < 0 || row >= p.h) continue;  // zero padding: the tap row adds nothing
      float* buffer = rows.data() + (row % p.kh) * padded_w * p.c;
      if (held[row % p.kh] != row) {  // the kH rows one output row reads are distinct mod kH
        LoadRow(p, image, row, buffer);
        held[row % p.kh] = row;
      }
      taps[valid] = buffer;
      tap_row[valid++] = a;
    }
    float* y_row = p.y + (image * p.oh + i) * p.ow * p.c;
    float* rs = p.row_sum + (image * p.oh + i) * p.c;
    if (p.out_relu6) {
      OutputRow<true>(p, taps.data(), tap_row.data(), valid, y_row, rs, col);
    } else {
      OutputRow<false>(p, taps.data(), tap_row.data(), valid, y_row, rs, col);
    }
  }
}

constexpr int64_t kMinExpandRows = 4;

// The shared body of both handlers; `expand` is nullptr without an expand matmul.
ffi::Error Run(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>* expand,
               const ffi::Buffer<ffi::F32>& kernel, const ffi::Buffer<ffi::F32>& in_mean,
               const ffi::Buffer<ffi::F32>& in_mul, const ffi::Buffer<ffi::F32>& in_bias,
               const ffi::Buffer<ffi::F32>& out_mean, const ffi::Buffer<ffi::F32>& out_mul,
               const ffi::Buffer<ffi::F32>& out_bias, ffi::Result<ffi::Buffer<ffi::F32>>& y,
               ffi::Result<ffi::Buffer<ffi::F32>>& row_sum, ffi::Result<ffi::Buffer<ffi::F32>>& col_sum, int64_t stride,
               bool in_affine, bool in_relu6, bool out_relu6) {
  auto xd = x.dimensions();
  auto kd = kernel.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4) {
    return ffi::Error::InvalidArgument("depthwise inference: x, kernel and y must be rank 4");
  }
  const int64_t n = xd[0], h = xd[1], w = xd[2], ci = xd[3];
  const int64_t kh = kd[0], kw = kd[1], c = kd[3], oh = yd[1], ow = yd[2];
  const bool expand_ok = expand == nullptr ? ci == c
                                           : expand->dimensions().size() == 2 && expand->dimensions()[0] == ci &&
                                                 expand->dimensions()[1] == c;
  if (!expand_ok || kd[2] != 1 || yd[0] != n || yd[3] != c ||
      !ca_flax::SymmetricConvShape(h, w, kh, kw, stride, oh, ow) ||
      !ca_flax::VectorsOfLength(c, {&in_mean, &in_mul, &in_bias, &out_mean, &out_mul, &out_bias}) ||
      row_sum->dimensions().size() != 3 || col_sum->dimensions().size() != 3 ||
      static_cast<int64_t>(row_sum->element_count()) != n * oh * c ||
      static_cast<int64_t>(col_sum->element_count()) != n * ow * c) {
    return ffi::Error::InvalidArgument(
        "depthwise inference: shapes do not match an NHWC input of C channels (Ci with a (Ci, C) expand kernel), "
        "an odd (kH, kW, 1, C) kernel, per-channel BatchNorm vectors of length C and outputs (N, OH, OW, C), "
        "(N, OH, C), (N, OW, C) for stride " + std::to_string(stride));
  }
  const Affine in(in_mean.typed_data(), in_mul.typed_data(), in_bias.typed_data(), c);
  const Affine out(out_mean.typed_data(), out_mul.typed_data(), out_bias.typed_data(), c);
  const Problem p{x.typed_data(),
                  expand == nullptr ? nullptr : expand->typed_data(),
                  kernel.typed_data(),
                  in,
                  out,
                  in_affine,
                  in_relu6,
                  out_relu6,
                  y->typed_data(),
                  row_sum->typed_data(),
                  h, w, c, oh, ow, kh, kw, stride, ci};
  if (n == 0 || oh == 0 || ow == 0 || c == 0) return ffi::Error::Success();
  // Chunks of output rows, each within one image, each with its own column sums. A chunk
  // recomputes the kH - 1 input rows it shares with its neighbour: with an expand matmul,
  // chunks of at least kMinExpandRows output rows keep that below half the work.
  int64_t per_image = ca_flax::RowChunksPerImage(n, oh);
  if (expand != nullptr) per_image = std::max<int64_t>(1, std::min(per_image, oh / kMinExpandRows));
  std::vector<std::vector<float>> col_partial(n * per_image, std::vector<float>(ow * c, 0.0f));
  ca_flax::RunRowChunks(pool, n, oh, per_image, [&](int64_t k, int64_t image, int64_t first, int64_t last) {
    ComputeRows(p, image, first, last, col_partial[k].data());
  });
  float* cols = col_sum->typed_data();
  for (int64_t image = 0; image < n; ++image) {
    float* dst = cols + image * ow * c;
    std::fill(dst, dst + ow * c, 0.0f);
    for (int64_t part = 0; part < per_image; ++part) {
      const float* src = col_partial[image * per_image + part].data();
      for (int64_t t = 0; t < ow * c; ++t) dst[t] += src[t];
    }
  }
  return ffi::Error::Success();
}

ffi::Error DepthwiseInference(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                              ffi::Buffer<ffi::F32> in_mean, ffi::Buffer<ffi::F32> in_mul,
                              ffi::Buffer<ffi::F32> in_bias, ffi::Buffer<ffi::F32> out_mean,
                              ffi::Buffer<ffi::F32> out_mul, ffi::Buffer<ffi::F32> out_bias,
                              ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> row_sum,
                              ffi::ResultBuffer<ffi::F32> col_sum, int64_t stride, bool in_affine, bool in_relu6,
                              bool out_relu6) {
  return Run(pool, x, nullptr, kernel, in_mean, in_mul, in_bias, out_mean, out_mul, out_bias, y, row_sum, col_sum,
             stride, in_affine, in_relu6, out_relu6);
}

ffi::Error ExpandDepthwiseInference(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> expand,
                                    ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> in_mean,
                                    ffi::Buffer<ffi::F32> in_mul, ffi::Buffer<ffi::F32> in_bias,
                                    ffi::Buffer<ffi::F32> out_mean, ffi::Buffer<ffi::F32> out_mul,
                                    ffi::Buffer<ffi::F32> out_bias, ffi::ResultBuffer<ffi::F32> y,
                                    ffi::ResultBuffer<ffi::F32> row_sum, ffi::ResultBuffer<ffi::F32> col_sum,
                                    int64_t stride, bool in_relu6, bool out_relu6) {
  return Run(pool, x, &expand, kernel, in_mean, in_mul, in_bias, out_mean, out_mul, out_bias, y, row_sum, col_sum,
             stride, true, in_relu6, out_relu6);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CaFlaxDepthwiseInference, DepthwiseInference,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_mul
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out_mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out_mul
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out_bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // row_sum
                                  .Ret<ffi::Buffer<ffi::F32>>()  // col_sum
                                  .Attr<int64_t>("stride")
                                  .Attr<bool>("in_affine")
                                  .Attr<bool>("in_relu6")
                                  .Attr<bool>("out_relu6"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CaFlaxExpandDepthwiseInference, ExpandDepthwiseInference,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (N, H, W, Ci)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // expand (Ci, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_mul
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out_mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out_mul
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out_bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // row_sum
                                  .Ret<ffi::Buffer<ffi::F32>>()  // col_sum
                                  .Attr<int64_t>("stride")
                                  .Attr<bool>("in_relu6")
                                  .Attr<bool>("out_relu6"));

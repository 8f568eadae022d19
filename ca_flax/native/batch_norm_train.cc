// BatchNorm with batch statistics on a channels-last float32 map (any rank, channels
// last), as XLA FFI custom calls: the statistics of the forward pass, and the whole
// backward pass, with ReLU6 or no activation.
//
//   statistics: mean, var = per-channel mean and biased variance (two passes, as PyTorch)
//   backward:   pre = (x - mean) * mul + bias, with rstd = 1 / sqrt(var + eps) and
//               mul = rstd * scale as the caller computed them for the forward pass,
//               g = dy where the activation passes the gradient (0 < pre < 6 for ReLU6),
//               dx = (g - sum(g) / M - (x - mean) * rstd^2 * sum(g (x - mean)) / M) * mul,
//               d_scale = sum(g (x - mean)) * rstd, d_bias = sum(g)
//
// with M the number of entries per channel. Why: XLA:CPU writes the broadcast mean out
// as a full map for the variance, and in the backward pass writes g as a full map, then
// reads it in three more passes. Here the statistics read x twice and write nothing but
// two vectors; the backward pass reads x and dy twice, recomputing g, and writes dx. The
// forward pass's normalization stays XLA's: an elementwise op XLA fuses into its readers
// and recomputes in the backward pass where they need it, where a custom call's output
// would be kept from the forward pass (0.7 GB more for a MobileNetV2 train step).
//
// Layout: the map is a flat array whose entry f belongs to channel f % C, processed in
// periods of L = lcm(C, 16) entries (whole vectors, with the per-channel vectors tiled to
// length L), so every channel count vectorizes; the last T % L entries go one at a time.
//
// Rounding: a chunk of periods sums in float32 vectors, kFlushPeriods periods at a time,
// into doubles; chunks are fixed by the shape and combined in order, so the result does
// not depend on the thread count.

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "conv_shape.h"
#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using ca_flax::kLanes;
using ca_flax::Load;
using ca_flax::Splat;
using ca_flax::Store;
using ca_flax::Vec;

constexpr int64_t kMaxChunks = 32;
constexpr int64_t kFlushPeriods = 16;

struct Layout {
  int64_t channels;  // C
  int64_t count;     // M = T / C
  int64_t total;     // T
  int64_t period;    // L = lcm(C, 16)
  int64_t periods;   // whole periods, T / L
  int64_t chunks;    // fixed by the shape

  Layout(int64_t total_entries, int64_t c)
      : channels(c), count(total_entries / c), total(total_entries), period(std::lcm(c, kLanes)),
        periods(total_entries / period), chunks(std::max<int64_t>(1, std::min(periods, kMaxChunks))) {}
  int64_t FirstPeriod(int64_t chunk) const { return periods * chunk / chunks; }
  int64_t TailStart() const { return periods * period; }
};

// A per-channel vector repeated to one period.
std::vector<float> Tile(const std::vector<float>& v, const Layout& l) {
  std::vector<float> tiled(l.period);
  for (int64_t j = 0; j < l.period; ++j) tiled[j] = v[j % l.channels];
  return tiled;
}

// Per-channel sums of kSums terms. vec_terms(f, j, out) writes the terms of the vector at
// flat index f (offset j in its period), scalar_terms(f, j, out) those of one entry.
template <int kSums, class VecTerms, class ScalarTerms>
std::vector<double> ChannelSums(ffi::ThreadPool& pool, const Layout& l, VecTerms vec_terms, ScalarTerms scalar_terms) {
  const int64_t L = l.period;
  std::vector<std::vector<double>> partial(l.chunks, std::vector<double>(kSums * L, 0.0));
  ca_flax::RunChunks(pool, l.chunks, [&](int64_t k) {
    std::vector<double>& part = partial[k];
    std::vector<float> acc(kSums * L, 0.0f);
    auto flush = [&] {
      for (int64_t t = 0; t < kSums * L; ++t) part[t] += acc[t];
      std::fill(acc.begin(), acc.end(), 0.0f);
    };
    int64_t pending = 0;
    for (int64_t p = l.FirstPeriod(k); p < l.FirstPeriod(k + 1); ++p) {
      for (int64_t j = 0; j < L; j += kLanes) {
        Vec terms[kSums];
        vec_terms(p * L + j, j, terms);
        for (int s = 0; s < kSums; ++s) Store(&acc[s * L + j], Load(&acc[s * L + j]) + terms[s]);
      }
      if (++pending == kFlushPeriods) {
        flush();
        pending = 0;
      }
    }
    flush();
    if (k == l.chunks - 1) {
      for (int64_t f = l.TailStart(); f < l.total; ++f) {
        float terms[kSums];
        scalar_terms(f, f - l.TailStart(), terms);
        for (int s = 0; s < kSums; ++s) part[s * L + f - l.TailStart()] += terms[s];
      }
    }
  });
  std::vector<double> sums(kSums * l.channels, 0.0);
  for (int64_t k = 0; k < l.chunks; ++k) {
    for (int s = 0; s < kSums; ++s) {
      for (int64_t j = 0; j < L; ++j) sums[s * l.channels + j % l.channels] += partial[k][s * L + j];
    }
  }
  return sums;
}

// Runs vec_op(f, j) over every vector and scalar_op(f, j) over the tail, in chunks.
template <class VecOp, class ScalarOp>
void ForEach(ffi::ThreadPool& pool, const Layout& l, VecOp vec_op, ScalarOp scalar_op) {
  ca_flax::RunChunks(pool, l.chunks, [&](int64_t k) {
    for (int64_t p = l.FirstPeriod(k); p < l.FirstPeriod(k + 1); ++p) {
      for (int64_t j = 0; j < l.period; j += kLanes) vec_op(p * l.period + j, j);
    }
    if (k == l.chunks - 1) {
      for (int64_t f = l.TailStart(); f < l.total; ++f) scalar_op(f, f - l.TailStart());
    }
  });
}

// The normalization both passes compute, so the mask below sees the forward pass's values.
template <class T>
inline T Pre(T x, T mean, T mul, T bias) {
  return (x - mean) * mul + bias;
}

// dy where the activation passes the gradient: strictly inside (0, 6) for ReLU6 (NaN: 0),
// as the gradient of lax.clamp and PyTorch's hardtanh backward.
template <bool kRelu6>
inline float Passed(float pre, float dy) {
  return !kRelu6 || (pre > 0.0f && pre < 6.0f) ? dy : 0.0f;
}
template <bool kRelu6>
inline Vec Passed(Vec pre, Vec dy) {
  if (!kRelu6) return dy;
  return (pre > Splat(0.0f)) & (pre < Splat(6.0f)) ? dy : Splat(0.0f);
}

struct Affine {  // the per-channel vectors, tiled to one period
  std::vector<float> mean, mul, bias;
};

template <bool kRelu6>
void Backward(ffi::ThreadPool& pool, const Layout& l, const float* x, const float* dy, const Affine& a,
              const std::vector<float>& rstd, float* dx, float* d_scale, float* d_bias) {
  // Pass 1: sum(g) and sum(g * (x - mean)).
  const std::vector<double> sums = ChannelSums<2>(
      pool, l,
      [&](int64_t f, int64_t j, Vec* out) {
        const Vec xv = Load(x + f), mean = Load(&a.mean[j]);
        const Vec g = Passed<kRelu6>(Pre(xv, mean, Load(&a.mul[j]), Load(&a.bias[j])), Load(dy + f));
        out[0] = g;
        out[1] = g * (xv - mean);
      },
      [&](int64_t f, int64_t j, float* out) {
        const float g = Passed<kRelu6>(Pre(x[f], a.mean[j], a.mul[j], a.bias[j]), dy[f]);
        out[0] = g;
        out[1] = g * (x[f] - a.mean[j]);
      });
  const int64_t c = l.channels;
  std::vector<float> mean_g(c), var_term(c);
  for (int64_t k = 0; k < c; ++k) {
    const double sum_g = sums[k], sum_gc = sums[c + k];
    mean_g[k] = static_cast<float>(sum_g / l.count);
    var_term[k] = static_cast<float>(static_cast<double>(rstd[k]) * rstd[k] * sum_gc / l.count);
    d_scale[k] = static_cast<float>(sum_gc * rstd[k]);
    d_bias[k] = static_cast<float>(sum_g);
  }
  const std::vector<float> mean_g_t = Tile(mean_g, l), var_term_t = Tile(var_term, l);
  // Pass 2: dx = (g - (mean(g) + (x - mean) * var_term)) * mul.
  ForEach(
      pool, l,
      [&](int64_t f, int64_t j) {
        const Vec xv = Load(x + f), mean = Load(&a.mean[j]), mul = Load(&a.mul[j]);
        const Vec g = Passed<kRelu6>(Pre(xv, mean, mul, Load(&a.bias[j])), Load(dy + f));
        Store(dx + f, (g - (Load(&mean_g_t[j]) + (xv - mean) * Load(&var_term_t[j]))) * mul);
      },
      [&](int64_t f, int64_t j) {
        const float g = Passed<kRelu6>(Pre(x[f], a.mean[j], a.mul[j], a.bias[j]), dy[f]);
        dx[f] = (g - (mean_g_t[j] + (x[f] - a.mean[j]) * var_term_t[j])) * a.mul[j];
      });
}

// The map's channel count (its last dimension), or -1 for a rank-0 map.
int64_t Channels(const ffi::Buffer<ffi::F32>& x) {
  auto d = x.dimensions();
  return d.size() == 0 ? -1 : d[d.size() - 1];
}

ffi::Error BatchNormTrainStatistics(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> mean,
                                    ffi::ResultBuffer<ffi::F32> var) {
  const int64_t c = Channels(x), total = x.element_count();
  if (c <= 0 || total == 0 || mean->dimensions().size() != 1 || mean->dimensions()[0] != c ||
      var->dimensions().size() != 1 || var->dimensions()[0] != c) {
    return ffi::Error::InvalidArgument(
        "batch norm statistics: needs a non-empty channels-last map and results of its channel count");
  }
  const Layout l(total, c);
  const float* xd = x.typed_data();
  const std::vector<double> sums = ChannelSums<1>(
      pool, l, [&](int64_t f, int64_t, Vec* out) { out[0] = Load(xd + f); },
      [&](int64_t f, int64_t, float* out) { out[0] = xd[f]; });
  std::vector<float> mean_c(c);
  for (int64_t k = 0; k < c; ++k) mean_c[k] = static_cast<float>(sums[k] / l.count);
  const std::vector<float> mean_t = Tile(mean_c, l);
  const std::vector<double> squares = ChannelSums<1>(
      pool, l,
      [&](int64_t f, int64_t j, Vec* out) {
        const Vec d = Load(xd + f) - Load(&mean_t[j]);
        out[0] = d * d;
      },
      [&](int64_t f, int64_t j, float* out) {
        const float d = xd[f] - mean_t[j];
        out[0] = d * d;
      });
  for (int64_t k = 0; k < c; ++k) {
    mean->typed_data()[k] = mean_c[k];
    var->typed_data()[k] = static_cast<float>(squares[k] / l.count);
  }
  return ffi::Error::Success();
}

ffi::Error BatchNormTrainBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                  ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> mul,
                                  ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> dx,
                                  ffi::ResultBuffer<ffi::F32> d_scale, ffi::ResultBuffer<ffi::F32> d_bias,
                                  bool relu6) {
  const int64_t c = Channels(x), total = x.element_count();
  if (c <= 0 || total == 0 || dy.element_count() != x.element_count() ||
      dx->element_count() != x.element_count() || !ca_flax::VectorsOfLength(c, {&mean, &rstd, &mul, &bias}) ||
      d_scale->dimensions().size() != 1 || d_scale->dimensions()[0] != c || d_bias->dimensions().size() != 1 ||
      d_bias->dimensions()[0] != c) {
    return ffi::Error::InvalidArgument(
        "batch norm backward: needs a non-empty channels-last map, its output gradient of the same shape, "
        "per-channel vectors of its channel count, and results of the same shapes");
  }
  const Layout l(total, c);
  const auto vector = [c](const ffi::Buffer<ffi::F32>& v) {
    return std::vector<float>(v.typed_data(), v.typed_data() + c);
  };
  const std::vector<float> rstd_c = vector(rstd);
  const Affine a{Tile(vector(mean), l), Tile(vector(mul), l), Tile(vector(bias), l)};
  if (relu6) {
    Backward<true>(pool, l, x.typed_data(), dy.typed_data(), a, rstd_c, dx->typed_data(), d_scale->typed_data(),
                   d_bias->typed_data());
  } else {
    Backward<false>(pool, l, x.typed_data(), dy.typed_data(), a, rstd_c, dx->typed_data(), d_scale->typed_data(),
                    d_bias->typed_data());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CaFlaxBatchNormTrainStatistics, BatchNormTrainStatistics,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean
                                  .Ret<ffi::Buffer<ffi::F32>>());  // var

XLA_FFI_DEFINE_HANDLER_SYMBOL(CaFlaxBatchNormTrainBackward, BatchNormTrainBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mul
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_scale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_bias
                                  .Attr<bool>("relu6"));

// Shape checks the convolution kernels share.

#ifndef CA_FLAX_NATIVE_CONV_SHAPE_H_
#define CA_FLAX_NATIVE_CONV_SHAPE_H_

#include <cstdint>
#include <initializer_list>

#include "xla/ffi/api/ffi.h"

namespace ca_flax {

// Whether an odd kh x kw kernel at `stride`, with kh // 2, kw // 2 zero padding on every
// side (PyTorch's Conv2d(padding=k // 2)), maps an h x w input to an oh x ow output.
inline bool SymmetricConvShape(int64_t h, int64_t w, int64_t kh, int64_t kw, int64_t stride, int64_t oh,
                               int64_t ow) {
  return kh % 2 == 1 && kw % 2 == 1 && stride >= 1 && oh == (h - 1) / stride + 1 && ow == (w - 1) / stride + 1;
}

// Whether every buffer is a vector of `length` entries (per-channel parameters).
inline bool VectorsOfLength(int64_t length, std::initializer_list<const xla::ffi::Buffer<xla::ffi::F32>*> buffers) {
  for (const auto* buffer : buffers) {
    if (buffer->dimensions().size() != 1 || buffer->dimensions()[0] != length) return false;
  }
  return true;
}

}  // namespace ca_flax

#endif  // CA_FLAX_NATIVE_CONV_SHAPE_H_

// Bit packing of per-task masks: bool [T, P] <-> int32 [T, ceil(P/32)].
// Bit j of word w holds element 32*w + j (little-endian bit order), the layout every op in harmodt_fast reads.
#include <torch/extension.h>

#include "harmodt.h"

namespace harmodt {

torch::Tensor pack_masks(const torch::Tensor& dense) {
  TORCH_CHECK(dense.dim() == 2, "pack_masks: expected a bool tensor [T, P], got ", dense.sizes());
  TORCH_CHECK(dense.scalar_type() == torch::kBool, "pack_masks: expected dtype bool, got ", dense.scalar_type());
  TORCH_CHECK(dense.device().is_cpu(), "pack_masks (cpp): expected a CPU tensor");
  auto src = dense.contiguous();
  const int64_t T = src.size(0), P = src.size(1), W = (P + 31) / 32;
  auto out = torch::empty({T, W}, torch::dtype(torch::kInt32));
  const bool* in = src.data_ptr<bool>();
  int32_t* words = out.data_ptr<int32_t>();
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t w = 0; w < W; ++w) {
      const bool* row = in + t * P + w * 32;
      const int64_t n = std::min<int64_t>(32, P - w * 32);
      uint32_t bits = 0;
      for (int64_t j = 0; j < n; ++j) bits |= static_cast<uint32_t>(row[j]) << j;
      words[t * W + w] = static_cast<int32_t>(bits);
    }
  }
  return out;
}

torch::Tensor unpack_masks(const torch::Tensor& packed, int64_t P) {
  TORCH_CHECK(packed.dim() == 2, "unpack_masks: expected an int32 tensor [T, W], got ", packed.sizes());
  TORCH_CHECK(packed.scalar_type() == torch::kInt32, "unpack_masks: expected dtype int32, got ", packed.scalar_type());
  TORCH_CHECK(packed.device().is_cpu(), "unpack_masks (cpp): expected a CPU tensor");
  const int64_t T = packed.size(0), W = packed.size(1);
  TORCH_CHECK(P >= 0 && (P + 31) / 32 == W, "unpack_masks: ", W, " words per task cannot hold exactly P=", P,
              " bits (need ", (P + 31) / 32, ")");
  auto src = packed.contiguous();
  auto out = torch::empty({T, P}, torch::dtype(torch::kBool));
  const uint32_t* words = reinterpret_cast<const uint32_t*>(src.data_ptr<int32_t>());
  bool* dst = out.data_ptr<bool>();
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t w = 0; w < W; ++w) {
      const uint32_t bits = words[t * W + w];
      const int64_t n = std::min<int64_t>(32, P - w * 32);
      bool* row = dst + t * P + w * 32;
      for (int64_t j = 0; j < n; ++j) row[j] = (bits >> j) & 1u;
    }
  }
  return out;
}

}  // namespace harmodt

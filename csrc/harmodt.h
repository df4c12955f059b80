// Declarations of the C++ ops bound in bindings.cpp. One op per source file.
#pragma once
#include <torch/extension.h>

namespace harmodt {

torch::Tensor pack_masks(const torch::Tensor& dense);
torch::Tensor unpack_masks(const torch::Tensor& packed, int64_t P);

}  // namespace harmodt

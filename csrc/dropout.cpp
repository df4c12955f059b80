// CPU dropout for the "cpp" backend of harmodt_fast.ops.dropout: entry i is kept when a counter-based hash of
// (seed, i) clears p, so the mask is the same whatever the thread count, and the entries are drawn in parallel
// (torch's CPU bernoulli_ draws them from one sequential generator). Registered as torch.ops.harmodt_fast.dropout.
#include <ATen/OpMathType.h>
#include <torch/extension.h>

namespace {

// splitmix64's finaliser: a bijection of 64-bit words whose output bits pass as uniform for consecutive inputs
inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <typename scalar_t>
void dropout_kernel(const scalar_t* x, scalar_t* y, bool* keep, int64_t n, uint64_t seed, double p) {
  // keep when the hash's top 32 bits, as u in [0, 1), are >= p
  const uint64_t threshold = static_cast<uint64_t>(p * 4294967296.0);
  using acc_t = at::opmath_type<scalar_t>;  // float for the 16-bit types, else the type itself
  const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const bool k = (mix(seed + static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull) >> 32) >= threshold;
    keep[i] = k;
    y[i] = k ? static_cast<scalar_t>(static_cast<acc_t>(x[i]) * scale) : scalar_t(0);
  }
}

std::tuple<torch::Tensor, torch::Tensor> dropout(const torch::Tensor& x, const torch::Tensor& seed, double p) {
  TORCH_CHECK(x.device().is_cpu() && seed.device().is_cpu(), "dropout: expected CPU tensors");
  TORCH_CHECK(seed.scalar_type() == torch::kInt64 && seed.numel() == 1, "dropout: seed must be one int64");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout: p must be in [0, 1), got ", p);
  auto xc = x.contiguous();
  auto y = torch::empty_like(xc);
  auto keep = torch::empty(xc.sizes(), xc.options().dtype(torch::kBool));
  const uint64_t s = mix(static_cast<uint64_t>(seed.data_ptr<int64_t>()[0]));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "dropout", [&] {
    dropout_kernel<scalar_t>(xc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), keep.data_ptr<bool>(), xc.numel(), s, p);
  });
  return {y, keep};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(harmodt_fast, m) {
  m.def("dropout(Tensor x, Tensor seed, float p) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(harmodt_fast, CPU, m) {
  m.impl("dropout", &dropout);
}

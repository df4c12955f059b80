// CPU helpers of the "cpp" masked_linear backend (harmodt_fast/ops/masked_linear.py): expand packed masks into
// W ⊙ M_t (one task's, or T tasks' stacked [T, out, in] for a batched GEMM), and accumulate Σ_t M_t ⊙ G_t into
// dW, each in one pass over the weight (the bits are expanded in registers; no dense mask exists).
// Registered with TORCH_LIBRARY_FRAGMENT, so they are torch.ops.harmodt_fast.* once the extension is loaded.
#include <torch/extension.h>

namespace {

// The loops live in templates: OpenMP pragmas cannot sit inside the AT_DISPATCH macro's argument.
// Expansion selects on the raw bits (an integer AND with 0 or ~0), which vectorises for every float width.
template <typename scalar_t>
void expand(const scalar_t* src, scalar_t* dst, const uint32_t* mask, int64_t n, int64_t words) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 2, uint16_t,
                                    std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>>;
  static_assert(sizeof(bits_t) == sizeof(scalar_t), "unexpected scalar size");
  const bits_t* in = reinterpret_cast<const bits_t*>(src);
  bits_t* out = reinterpret_cast<bits_t*>(dst);
#pragma omp parallel for schedule(static) if (words > 4096)
  for (int64_t i = 0; i < words; ++i) {
    const uint32_t m = mask[i];
    const int64_t base = i * 32, len = std::min<int64_t>(32, n - base);
    for (int64_t j = 0; j < len; ++j) out[base + j] = in[base + j] & (bits_t(0) - bits_t((m >> j) & 1u));
  }
}

// dst += Σ_t M_t ⊙ src_t over `tasks` stacked grads (src [tasks, n], masks [tasks, words]); the tasks are added
// in order t = 0, 1, ... for every entry, as a per-task loop would.
template <typename scalar_t>
void accumulate(const scalar_t* src, scalar_t* dst, const uint32_t* mask, int64_t n, int64_t words, int64_t tasks) {
#pragma omp parallel for schedule(static) if (words * tasks > 4096)
  for (int64_t i = 0; i < words; ++i) {
    const int64_t base = i * 32, len = std::min<int64_t>(32, n - base);
    for (int64_t t = 0; t < tasks; ++t) {
      const uint32_t m = mask[t * words + i];
      const scalar_t* s = src + t * n + base;
      for (int64_t j = 0; j < len; ++j)
        if ((m >> j) & 1u) dst[base + j] += s[j];
    }
  }
}

// bits: one task's packed mask [W], or T tasks' [T, W] (then the op works on T stacked weights / grads)
int64_t check_args(const torch::Tensor& w, const torch::Tensor& bits, const char* op) {
  TORCH_CHECK(w.device().is_cpu() && bits.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(bits.scalar_type() == torch::kInt32 && (bits.dim() == 1 || bits.dim() == 2), op,
              ": packed masks must be int32 [W] or [T, W], got ", bits.sizes(), " ", bits.scalar_type());
  TORCH_CHECK(bits.size(-1) == (w.numel() + 31) / 32, op, ": packed mask has ", bits.size(-1), " words, weight ",
              w.sizes(), " needs ", (w.numel() + 31) / 32);
  return bits.dim() == 2 ? bits.size(0) : 0;  // 0: one mask, no task dimension
}

torch::Tensor masked_weight(const torch::Tensor& weight, const torch::Tensor& bits) {
  const int64_t tasks = check_args(weight, bits, "masked_weight");
  auto w = weight.contiguous();
  auto b = bits.contiguous();
  std::vector<int64_t> shape(w.sizes().begin(), w.sizes().end());
  if (tasks) shape.insert(shape.begin(), tasks);
  auto out = torch::empty(shape, w.options());
  const int64_t n = w.numel(), words = b.size(-1);
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(b.data_ptr<int32_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "masked_weight", [&] {
    for (int64_t t = 0; t < std::max<int64_t>(1, tasks); ++t)
      expand<scalar_t>(w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>() + t * n, mask + t * words, n, words);
  });
  return out;
}

void masked_accumulate_(torch::Tensor& dw, const torch::Tensor& grad, const torch::Tensor& bits) {
  const int64_t tasks = check_args(dw, bits, "masked_accumulate_");
  TORCH_CHECK(dw.is_contiguous(), "masked_accumulate_: dW must be contiguous");
  std::vector<int64_t> shape(dw.sizes().begin(), dw.sizes().end());
  if (tasks) shape.insert(shape.begin(), tasks);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(shape), "masked_accumulate_: grad ", grad.sizes(), " vs expected ",
              at::IntArrayRef(shape), " (dW ", dw.sizes(), ", masks ", bits.sizes(), ")");
  auto g = grad.to(dw.scalar_type()).contiguous();
  auto b = bits.contiguous();
  const int64_t n = dw.numel(), words = b.size(-1);
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(b.data_ptr<int32_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dw.scalar_type(), "masked_accumulate_", [&] {
    accumulate<scalar_t>(g.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), mask, n, words, std::max<int64_t>(1, tasks));
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(harmodt_fast, m) {
  m.def("masked_weight(Tensor weight, Tensor bits) -> Tensor");
  m.def("masked_accumulate_(Tensor(a!) dw, Tensor grad, Tensor bits) -> ()");
}

TORCH_LIBRARY_IMPL(harmodt_fast, CPU, m) {
  m.impl("masked_weight", &masked_weight);
  m.impl("masked_accumulate_", [](torch::Tensor dw, const torch::Tensor& grad, const torch::Tensor& bits) {
    masked_accumulate_(dw, grad, bits);
  });
}

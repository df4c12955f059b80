// Declarations of the C++ ops bound in bindings.cpp. One op per source file.
#pragma once
#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace harmodt {

torch::Tensor pack_masks(const torch::Tensor& dense);
torch::Tensor unpack_masks(const torch::Tensor& packed, int64_t P);

// harmony.cpp: the harmony mask update (semantics: harmodt_fast/ops/harmony.py), fed the per-task gradients in
// consecutive chunks of entries (one chunk = the whole-vector call). Keeps each task's best k prune and regrow
// candidates and running statistics; finish() applies the flips.
struct HarmonyCandidates;  // the per-task heaps, defined in harmony.cpp

class HarmonyState {
 public:
  // masks_packed int32 [T, ceil(P/32)] (read during feeds, never written); ks: requested flips per task, clamped
  // here to the task's active and inactive counts; score 0 fisher, 1 magnitude, 2 harmony.
  HarmonyState(int64_t P, torch::Tensor masks_packed, std::vector<int64_t> ks, double gamma, int64_t score);
  ~HarmonyState();
  HarmonyState(const HarmonyState&) = delete;
  HarmonyState& operator=(const HarmonyState&) = delete;

  // weight [p] (any float dtype; read only for the magnitude score), grads [T, p] (fp32, bf16, fp16, fp64; rows
  // may be strided, entries must be contiguous or are copied): the next p entries.
  void feed(const torch::Tensor& weight, const torch::Tensor& grads);
  // (new packed masks int32 [T, W], stats float64 [4, T]: pruned, regrown, mean agreement, conflict fraction)
  std::vector<torch::Tensor> finish();
  // Row mode (the streamed mask update): grads [G, p] of tasks first_task.. over entries offset..offset+p, with
  // the harmony gradient ḡ given (float64 [p], already divided by T). A task's feeds come in increasing offsets.
  void feed_rows(const torch::Tensor& weight, const torch::Tensor& grads, const torch::Tensor& gbar,
                 int64_t first_task, int64_t offset);
  // Ends a row-mode stream without applying flips: every task's kept candidates, best first, keys "lower is
  // better" (prune: score; regrow: -a), padded with NaN / -1 to K = max k: {prune_v, prune_i, grow_v, grow_i}
  // [T, K], and the statistics' sums {sum of a_t [T] float64, count of a_t < 0 [T] int64}.
  std::vector<torch::Tensor> candidates();

  int64_t offset() const { return off_; }
  int64_t total() const { return P_; }
  std::vector<int64_t> k() const { return k_; }

 private:
  int64_t T_, P_, W_, off_ = 0;
  torch::Tensor masks_;
  std::vector<int64_t> k_;
  double gamma_;
  int64_t score_;
  HarmonyCandidates* cands_;
  std::vector<double> sum_a_;
  std::vector<int64_t> neg_;
  std::vector<int64_t> next_;  // row mode: the next entry each task expects (-1: not fed yet)
  bool failed_ = false, finished_ = false, rows_mode_ = false;
};

// Cosine similarity of the per-task gradients [T, P] -> float64 [T, T] (0 where a task's gradient is zero).
torch::Tensor task_agreement(const torch::Tensor& grads);

}  // namespace harmodt

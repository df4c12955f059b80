// Declarations of the C++ ops bound in bindings.cpp. One op per source file.
#pragma once
#include <torch/extension.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace harmodt {

torch::Tensor pack_masks(const torch::Tensor& dense);
torch::Tensor unpack_masks(const torch::Tensor& packed, int64_t P);

// harmony.cpp: the harmony mask update's selection (semantics: harmodt_fast/ops/harmony.py), fed task rows over
// consecutive entries. Keeps each task's best k prune and regrow candidates and the statistics' sums; the caller
// applies the flips (harmodt_fast/ops/harmony_rows.py: apply_candidates).
struct HarmonyCandidates;  // the per-task heaps, defined in harmony.cpp

// The scores the op implements, name -> id (the `score` argument of HarmonyState).
std::map<std::string, int64_t> score_ids();

class HarmonyState {
 public:
  // masks_packed int32 [T, ceil(P/32)] (read during feeds, never written); ks: requested flips per task, clamped
  // here to the task's active and inactive counts; score: an id of score_ids().
  HarmonyState(int64_t P, torch::Tensor masks_packed, std::vector<int64_t> ks, double gamma, int64_t score);
  ~HarmonyState();
  HarmonyState(const HarmonyState&) = delete;
  HarmonyState& operator=(const HarmonyState&) = delete;

  // grads [G, p] (fp32, bf16, fp16, fp64; rows may be strided) of tasks first_task.. over entries
  // offset..offset+p; weight [p] (read only for the magnitude score); gbar: the harmony gradient ḡ there (float64
  // [p], already divided by T), or none when the rows are all T tasks: then ḡ is summed from them, in cache. A
  // task's feeds come in increasing offsets.
  void feed_rows(const torch::Tensor& weight, const torch::Tensor& grads, const std::optional<torch::Tensor>& gbar,
                 int64_t first_task, int64_t offset);
  // Ends the feeds: every task's kept candidates, best first, keys "lower is better" (prune: score; regrow: -a),
  // padded with NaN / -1 to K = max k: {prune_v, prune_i, grow_v, grow_i} [T, K], and the statistics' sums
  // {sum of a_t [T] float64, count of a_t < 0 [T] int64}.
  std::vector<torch::Tensor> candidates();

  std::vector<int64_t> k() const { return k_; }

 private:
  int64_t T_, P_, W_;
  torch::Tensor masks_;
  std::vector<int64_t> k_;
  double gamma_;
  int64_t score_;
  std::unique_ptr<HarmonyCandidates> cands_;  // released by candidates()
  std::vector<double> sum_a_;
  std::vector<int64_t> neg_;
  std::vector<int64_t> next_;  // the next entry each task expects (-1: not fed yet)
  bool failed_ = false, finished_ = false;
};

// Cosine similarity of the per-task gradients [T, P] -> float64 [T, T] (0 where a task's gradient is zero).
torch::Tensor task_agreement(const torch::Tensor& grads);

}  // namespace harmodt

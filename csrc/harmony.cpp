// The harmony mask update's selection over the per-task gradients, and the T x T task-gradient cosine similarity.
//
// Semantics: harmodt_fast/ops/harmony.py (the reference harmony_update_torch); the masks must match it bit for bit.
// That fixes the arithmetic: float64 throughout, ḡ summed over tasks in order t = 0..T-1 and then divided by T,
// a_t = ḡ·g_t, prune score (γ·a_t) + s_t rounded as two operations, ties to the lower index (with -0.0 == +0.0,
// as the reference's stable sort compares values with < and >).
//
// One state, fed task rows (harmodt_fast/ops/harmony_rows.py): grads [G, p] of tasks first.. over entries
// offset.., with ḡ given, or, when the rows are all T tasks, summed from them here. Entries are processed in
// sub-chunks of SUB entries, OpenMP-parallel over sub-chunks. Per sub-chunk, ḡ is built in a thread-local buffer
// when not given (the T gradient rows of the sub-chunk stay in cache for the second sweep), then every row is swept
// once: agreement, statistics, and a bounded heap of its task's best k prune and regrow candidates. Each thread
// keeps its own heaps for the current feed, filtered by the worst key the state's heaps already keep; they are
// merged into the state's heaps at the end of the feed. So the extra memory is O(threads x T x k) plus
// O(threads x SUB), never T x P, and feeds in consecutive chunks give exactly the candidates of one feed: every
// candidate order is total, (value, index).
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <vector>

#include "harmodt.h"

namespace harmodt {
namespace {

constexpr int64_t SUB = 1024;  // entries per sub-chunk: T rows x SUB x 4 bytes stay in L2 for MT50 (200 KB)

// The reference rounds γ·a before adding s. Where the compiler may emit fused multiply-adds (GCC contracts by
// default once the target has FMA: -march=native, -mfma, aarch64), pin the product in a register so the sum
// cannot be fused; on a plain x86-64 target there is no FMA and this is a no-op.
inline double rounded_product(double x) {
#if defined(__FP_FAST_FMA) || defined(__FMA__) || defined(__aarch64__)
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(x));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(x));
#else
  volatile double v = x;
  x = v;
#endif
#endif
  return x;
}

// One candidate entry: its key and its global index. The orders are total (finite keys, distinct indices).
struct Cand {
  double v;
  int64_t i;
};
// prune keeps the LOWEST scores, regrow the HIGHEST agreements; both prefer the lower index on equal keys.
struct PruneBetter {
  bool operator()(const Cand& a, const Cand& b) const { return a.v < b.v || (a.v == b.v && a.i < b.i); }
};
struct GrowBetter {
  bool operator()(const Cand& a, const Cand& b) const { return a.v > b.v || (a.v == b.v && a.i < b.i); }
};

// The `cap` best candidates offered so far: a heap whose front is the worst one kept. `bound`, when set, is the
// worst key kept by earlier feeds (lower indices): a key that does not beat it cannot enter the final selection.
template <class Better>
struct Bounded {
  std::vector<Cand> h;
  int64_t cap = 0;
  bool bounded = false;
  double bound = 0.0;
  bool full() const { return static_cast<int64_t>(h.size()) >= cap; }
  void offer(Cand c) {
    Better better;
    if (static_cast<int64_t>(h.size()) < cap) {
      h.push_back(c);
      std::push_heap(h.begin(), h.end(), better);
    } else if (cap > 0 && better(c, h.front())) {
      std::pop_heap(h.begin(), h.end(), better);
      h.back() = c;
      std::push_heap(h.begin(), h.end(), better);
    }
  }
};

// The scores this op implements; their ids must equal the C++ ids of the score table in ops/harmony.py, which
// harmodt_fast/_ext.py checks once, through score_ids(), when the extension loads.
enum Score : int64_t { FISHER = 0, MAGNITUDE = 1, HARMONY = 2 };

// Per-thread scratch for one feed.
struct Local {
  std::vector<Bounded<PruneBetter>> prune;
  std::vector<Bounded<GrowBetter>> grow;
  std::vector<double> sum_a;
  std::vector<int64_t> neg;
  std::vector<double> gbar, mag;
  bool bad_grad = false, bad_weight = false;
};

// |θ| for entries [start, start + n) of the weight chunk, in float64; false when one is not finite.
bool load_magnitude(const torch::Tensor& w, int64_t start, int64_t n, double* out) {
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "harmony_magnitude", [&] {
    const scalar_t* src = w.data_ptr<scalar_t>() + start;
    for (int64_t j = 0; j < n; ++j) {
      out[j] = std::abs(static_cast<double>(src[j]));
      ok &= std::isfinite(out[j]);
    }
  });
  return ok;
}

// One task's row over one sub-chunk: statistics and the candidates of its two heaps. This thread filled the heaps
// from lower indices only (earlier in this feed), and the bound comes from lower indices still (earlier feeds), so
// an entry whose key merely equals the threshold can never win: the strict comparisons of the filter are exact,
// and the rare hits take the full comparison. The bound spares each feed of a stream the refilling of the heaps
// from scratch.
template <int64_t S, typename scalar_t>
inline void sweep_task(const scalar_t* g_row, const double* gb, const double* mag, int64_t m, int64_t base,
                       const uint32_t* words, double gamma, Bounded<PruneBetter>& ph, Bounded<GrowBetter>& gh,
                       double& sum_out, int64_t& neg_out) {
  const double inf = std::numeric_limits<double>::infinity();
  // filter on: the heap is full (its worst key) or bounded by the earlier feeds; capacity 0: nothing passes
  bool pfilter = ph.full() || ph.bounded, gfilter = gh.full() || gh.bounded;
  double pthr = ph.cap == 0 ? -inf : (ph.full() ? ph.h.front().v : (ph.bounded ? ph.bound : 0.0));
  double gthr = gh.cap == 0 ? inf : (gh.full() ? gh.h.front().v : (gh.bounded ? gh.bound : 0.0));
  // four partial sums: one running sum would chain every entry on the latency of an add
  double sum[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t neg = 0;
  auto entry = [&](int64_t j, double& acc) __attribute__((always_inline)) {
    const double g = static_cast<double>(g_row[j]);
    const double a = gb[j] * g;
    acc += a;
    neg += (a < 0.0);
    const int64_t i = base + j;
    const bool act = (words[i >> 5] >> (i & 31)) & 1u;
    double sc;
    if constexpr (S == FISHER) {
      sc = rounded_product(gamma * a) + g * g;
    } else if constexpr (S == MAGNITUDE) {
      sc = rounded_product(gamma * a) + mag[j];
    } else {
      sc = rounded_product(gamma * a) + 0.0;
    }
    const bool hp = act & ((!pfilter) | (sc < pthr));
    const bool hg = (!act) & ((!gfilter) | (a > gthr));
    if (__builtin_expect(hp | hg, 0)) {
      if (hp) {
        ph.offer({sc, i});
        if (ph.full()) pfilter = true, pthr = ph.h.front().v;
      } else {
        gh.offer({a, i});
        if (gh.full()) gfilter = true, gthr = gh.h.front().v;
      }
    }
  };
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) {
    entry(j, sum[0]);
    entry(j + 1, sum[1]);
    entry(j + 2, sum[2]);
    entry(j + 3, sum[3]);
  }
  for (; j < m; ++j) entry(j, sum[0]);
  sum_out += (sum[0] + sum[1]) + (sum[2] + sum[3]);
  neg_out += neg;
}

// |θ| of the sub-chunk into L.mag for the magnitude score (nullptr otherwise); marks L bad when one is not finite.
inline bool magnitude_for(int64_t score, const torch::Tensor& weight, int64_t j0, int64_t m, Local& L,
                          const double** mag) {
  *mag = nullptr;
  if (score != MAGNITUDE) return true;
  if (!load_magnitude(weight, j0, m, L.mag.data())) {
    L.bad_weight = true;
    return false;
  }
  *mag = L.mag.data();
  return true;
}

// Rows 0..rows-1 of the chunk (tasks first..first+rows-1, heaps 0..rows-1 of L) over entries [j0, j0 + m), ḡ at
// gb: one sweep per task.
template <typename scalar_t>
void sweep_rows(const scalar_t* G, int64_t row_stride, int64_t rows, int64_t first, int64_t j0, int64_t m,
                int64_t base, const double* gb, const double* mag, const uint32_t* words, int64_t W, double gamma,
                int64_t score, Local& L) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* gt = G + r * row_stride + j0;
    const uint32_t* wt = words + (first + r) * W;
    if (score == FISHER) {
      sweep_task<FISHER>(gt, gb, mag, m, base + j0, wt, gamma, L.prune[r], L.grow[r], L.sum_a[r], L.neg[r]);
    } else if (score == MAGNITUDE) {
      sweep_task<MAGNITUDE>(gt, gb, mag, m, base + j0, wt, gamma, L.prune[r], L.grow[r], L.sum_a[r], L.neg[r]);
    } else {
      sweep_task<HARMONY>(gt, gb, mag, m, base + j0, wt, gamma, L.prune[r], L.grow[r], L.sum_a[r], L.neg[r]);
    }
  }
}

// Rows 0..rows-1 of the chunk (tasks first..) over entries [j0, j0 + m), global index base + j. ḡ is `gbar`
// (already / T) or, when null, summed here from the rows, which are then all T tasks. Marks L bad on NaN or inf.
template <typename scalar_t>
void sweep_subchunk(const scalar_t* G, int64_t row_stride, int64_t rows, int64_t first, int64_t j0, int64_t m,
                    int64_t base, const double* gbar, const torch::Tensor& weight, const uint32_t* words, int64_t W,
                    double gamma, int64_t score, Local& L) {
  const double* gb;
  int64_t nonfinite = 0;
  if (gbar == nullptr) {
    double* sum = L.gbar.data();
    {  // ḡ in the reference's order: t = 0, 1, ..., T-1, then / T
      const scalar_t* g0 = G + j0;
      for (int64_t j = 0; j < m; ++j) sum[j] = static_cast<double>(g0[j]);
    }
    for (int64_t t = 1; t < rows; ++t) {
      const scalar_t* gt = G + t * row_stride + j0;
      for (int64_t j = 0; j < m; ++j) sum[j] += static_cast<double>(gt[j]);
    }
    // The float64 sum of fp32/bf16/fp16 values cannot overflow, so it is finite exactly when every task's entry
    // is: one check per entry covers all T rows. (x - x is NaN for inf and NaN, 0 otherwise.)
    for (int64_t j = 0; j < m; ++j) nonfinite += !(sum[j] - sum[j] == 0.0);
    const double Td = static_cast<double>(rows);
    for (int64_t j = 0; j < m; ++j) sum[j] = sum[j] / Td;
    gb = sum;
  } else {  // ḡ given: every gradient is checked here
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* g = G + r * row_stride + j0;
      for (int64_t j = 0; j < m; ++j) {
        const double x = static_cast<double>(g[j]);
        nonfinite += !(x - x == 0.0);
      }
    }
    gb = gbar + j0;
  }
  if (nonfinite) {
    L.bad_grad = true;
    return;
  }
  const double* mag;
  if (!magnitude_for(score, weight, j0, m, L, &mag)) return;
  sweep_rows<scalar_t>(G, row_stride, rows, first, j0, m, base, gb, mag, words, W, gamma, score, L);
}

// body(L, j0, m) over every sub-chunk of n entries, in parallel, each thread with its Local. Dynamic, so that a
// thread that loses its core (shared machines) does not hold the others up; monotonic, so that each thread takes
// its sub-chunks in increasing order, which sweep_task relies on. A thread whose feed went bad skips the rest.
template <typename Body>
void for_each_subchunk(int64_t n, std::vector<Local>& locals, Body body) {
  const int64_t nsub = (n + SUB - 1) / SUB;
#pragma omp parallel num_threads(static_cast<int>(locals.size()))
  {
    Local& L = locals[omp_get_thread_num()];
#pragma omp for schedule(monotonic : dynamic, 4)
    for (int64_t c = 0; c < nsub; ++c) {
      if (L.bad_grad || L.bad_weight) continue;
      const int64_t j0 = c * SUB;
      body(L, j0, std::min(SUB, n - j0));
    }
  }
}

// Set bits among the first P bits of a packed row.
int64_t popcount_row(const uint32_t* row, int64_t P) {
  int64_t n = 0;
  const int64_t full = P / 32;
  for (int64_t w = 0; w < full; ++w) n += __builtin_popcount(row[w]);
  if (P % 32) n += __builtin_popcount(row[full] & ((1u << (P % 32)) - 1u));
  return n;
}

std::string task_list(const std::vector<int64_t>& tasks) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < tasks.size() && i < 10; ++i) s << (i ? ", " : "") << tasks[i];
  s << "]";
  return s.str();
}

}  // namespace

struct HarmonyCandidates {
  std::vector<Bounded<PruneBetter>> prune;
  std::vector<Bounded<GrowBetter>> grow;
};

namespace {

// Per-thread scratch for a feed over `n` entries of tasks first..first+rows-1 (`sum_here`: with a ḡ buffer), each
// heap bounded by the worst key the state already keeps for its task (those came from lower indices). Small chunks
// run on fewer threads (a parallel region costs a wake-up and a barrier, milliseconds on oversubscribed cores): at
// least 8 sub-chunks each.
std::vector<Local> make_locals(int64_t n, int64_t first, int64_t rows, const std::vector<int64_t>& k,
                               const HarmonyCandidates& cands, bool sum_here, bool magnitude) {
  const int64_t nsub = (n + SUB - 1) / SUB;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), nsub / 8)));
  std::vector<Local> locals(nthreads);
  for (auto& L : locals) {
    L.prune.resize(rows);
    L.grow.resize(rows);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = first + r;
      L.prune[r].cap = L.grow[r].cap = k[t];
      const auto& gp = cands.prune[t];
      const auto& gg = cands.grow[t];
      if (gp.cap > 0 && gp.full()) L.prune[r].bounded = true, L.prune[r].bound = gp.h.front().v;
      if (gg.cap > 0 && gg.full()) L.grow[r].bounded = true, L.grow[r].bound = gg.h.front().v;
    }
    L.sum_a.assign(rows, 0.0);
    L.neg.assign(rows, 0);
    if (sum_here) L.gbar.resize(SUB);
    if (magnitude) L.mag.resize(SUB);
  }
  return locals;
}

// The threads' candidates and statistics into the state's, threads in order (the statistics do not depend on
// timing); serial: O(threads x rows x k log k), no second parallel region per feed.
void merge_locals(std::vector<Local>& locals, int64_t first, int64_t rows, HarmonyCandidates& cands,
                  std::vector<double>& sum_a, std::vector<int64_t>& neg) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = first + r;
    for (auto& L : locals) {
      for (const Cand& c : L.prune[r].h) cands.prune[t].offer(c);
      for (const Cand& c : L.grow[r].h) cands.grow[t].offer(c);
      sum_a[t] += L.sum_a[r];
      neg[t] += L.neg[r];
    }
  }
}

}  // namespace

std::map<std::string, int64_t> score_ids() {
  return {{"fisher", FISHER}, {"magnitude", MAGNITUDE}, {"harmony", HARMONY}};
}

HarmonyState::HarmonyState(int64_t P, torch::Tensor masks_packed, std::vector<int64_t> ks, double gamma,
                           int64_t score)
    : P_(P), gamma_(gamma), score_(score), cands_(std::make_unique<HarmonyCandidates>()) {
  TORCH_CHECK_VALUE(P >= 0, "harmony_update: P must be >= 0, got ", P);
  TORCH_CHECK_VALUE(masks_packed.dim() == 2 && masks_packed.scalar_type() == torch::kInt32,
                    "harmony_update: masks_packed must be an int32 tensor [T, W], got ", masks_packed.sizes(), " ",
                    masks_packed.scalar_type());
  TORCH_CHECK_VALUE(masks_packed.device().is_cpu(), "harmony_update (cpp): masks_packed must be a CPU tensor");
  T_ = masks_packed.size(0);
  W_ = (P + 31) / 32;
  TORCH_CHECK_VALUE(masks_packed.size(1) == W_, "harmony_update: masks_packed must be int32 [", T_, ", ", W_,
                    "] for P=", P, ", got ", masks_packed.sizes());
  TORCH_CHECK_VALUE(static_cast<int64_t>(ks.size()) == T_, "harmony_update: k must give ", T_, " values, got ",
                    ks.size());
  TORCH_CHECK_VALUE(score == FISHER || score == MAGNITUDE || score == HARMONY,
                    "harmony_update: score must be one of the ids of score_ids(), got ", score);
  TORCH_CHECK_VALUE(std::isfinite(gamma), "harmony_update: gamma must be finite, got ", gamma);
  masks_ = masks_packed.contiguous();
  const uint32_t* words = reinterpret_cast<const uint32_t*>(masks_.data_ptr<int32_t>());
  k_.resize(T_);
  cands_->prune.resize(T_);
  cands_->grow.resize(T_);
  for (int64_t t = 0; t < T_; ++t) {
    TORCH_CHECK_VALUE(ks[t] >= 0, "harmony_update: k must be non-negative, got ", ks[t], " for task ", t);
    const int64_t active = popcount_row(words + t * W_, P);
    k_[t] = std::min({ks[t], active, P - active});  // the documented clamp: density is kept
    cands_->prune[t].cap = cands_->grow[t].cap = k_[t];
  }
  sum_a_.assign(T_, 0.0);
  neg_.assign(T_, 0);
  next_.assign(T_, -1);
}

HarmonyState::~HarmonyState() = default;

void HarmonyState::feed_rows(const torch::Tensor& weight, const torch::Tensor& grads_in,
                             const std::optional<torch::Tensor>& gbar_in, int64_t first_task, int64_t offset) {
  TORCH_CHECK(!finished_, "HarmonyRows: feed_rows() after candidates()");
  TORCH_CHECK(!failed_, "HarmonyRows: an earlier feed failed; start a new one");
  TORCH_CHECK_VALUE(grads_in.dim() == 2 && grads_in.is_floating_point(),
                    "harmony_update: grads must be a floating tensor [G, p], got ", grads_in.sizes());
  const int64_t rows = grads_in.size(0), n = grads_in.size(1);
  TORCH_CHECK_VALUE(first_task >= 0 && first_task + rows <= T_, "HarmonyRows.feed_rows: tasks ", first_task, "..",
                    first_task + rows, " are outside 0..", T_);
  TORCH_CHECK_VALUE(offset >= 0 && offset + n <= P_, "HarmonyRows.feed_rows: entries ", offset, "..", offset + n,
                    " are outside 0..", P_);
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == n && weight.is_floating_point(),
                    "harmony_update: weight must be a floating tensor [", n, "], got ", weight.sizes());
  const bool sum_here = !gbar_in.has_value();
  TORCH_CHECK_VALUE(!sum_here || (first_task == 0 && rows == T_), "HarmonyRows.feed_rows: without gbar the rows "
                    "must be all ", T_, " tasks, got tasks ", first_task, "..", first_task + rows);
  TORCH_CHECK_VALUE(sum_here || (gbar_in->dim() == 1 && gbar_in->size(0) == n &&
                                 gbar_in->scalar_type() == torch::kFloat64),
                    "HarmonyRows.feed_rows: gbar must be float64 [", n, "], got ",
                    sum_here ? torch::IntArrayRef{} : gbar_in->sizes());
  TORCH_CHECK_VALUE(grads_in.device().is_cpu() && weight.device().is_cpu() && (sum_here || gbar_in->device().is_cpu()),
                    "harmony_update (cpp): weight, grads and gbar must be CPU tensors");
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = first_task + r;
    // a task's entries arrive in increasing order: the heaps' bounds (from earlier feeds) assume lower indices
    TORCH_CHECK_VALUE(next_[t] < 0 || next_[t] == offset, "HarmonyRows.feed_rows: task ", t, " expects entries from ",
                      next_[t], ", got ", offset);
  }
  if (n == 0 || rows == 0) return;
  // rows may be strided (a slice of a [T, P] buffer); only the entries of a row must be contiguous
  const torch::Tensor grads = grads_in.stride(1) == 1 ? grads_in : grads_in.contiguous();
  const torch::Tensor gbar = sum_here ? torch::Tensor() : gbar_in->contiguous();
  const torch::Tensor w = score_ == MAGNITUDE ? weight.contiguous() : weight;
  const uint32_t* words = reinterpret_cast<const uint32_t*>(masks_.data_ptr<int32_t>());
  std::vector<Local> locals = make_locals(n, first_task, rows, k_, *cands_, sum_here, score_ == MAGNITUDE);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grads.scalar_type(), "harmony_feed_rows", [&] {
    const scalar_t* G = grads.data_ptr<scalar_t>();
    const double* gb = sum_here ? nullptr : gbar.data_ptr<double>();
    for_each_subchunk(n, locals, [&](Local& L, int64_t j0, int64_t m) {
      sweep_subchunk<scalar_t>(G, grads.stride(0), rows, first_task, j0, m, offset, gb, w, words, W_, gamma_, score_,
                               L);
    });
  });
  bool bad_grad = false, bad_weight = false;
  for (auto& L : locals) bad_grad |= L.bad_grad, bad_weight |= L.bad_weight;
  if (bad_grad || bad_weight) {
    failed_ = true;
    std::vector<int64_t> bad;
    for (int64_t r = 0; r < rows && bad_grad; ++r) {
      if (!torch::isfinite(grads[r]).all().item<bool>()) bad.push_back(first_task + r);
    }
    // only a sum taken here from float64 gradients can overflow with every gradient finite
    TORCH_CHECK_VALUE(!bad_grad || !bad.empty(), "harmony_update: the sum of the task gradients overflows (entries ",
                      offset, "..", offset + n, ")");
    TORCH_CHECK_VALUE(!bad_grad, "harmony_update: grads contain NaN or inf for task(s) ", task_list(bad),
                      " (entries ", offset, "..", offset + n, ")");
    TORCH_CHECK_VALUE(false, "harmony_update: weight_flat contains NaN or inf (entries ", offset, "..", offset + n,
                      ")");
  }
  merge_locals(locals, first_task, rows, *cands_, sum_a_, neg_);
  for (int64_t r = 0; r < rows; ++r) next_[first_task + r] = offset + n;
}

std::vector<torch::Tensor> HarmonyState::candidates() {
  TORCH_CHECK(!finished_, "HarmonyRows: candidates() called twice");
  TORCH_CHECK(!failed_, "HarmonyRows: an earlier feed failed; start a new one");
  finished_ = true;
  int64_t K = 0;
  for (int64_t t = 0; t < T_; ++t) K = std::max(K, k_[t]);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  auto prune_v = torch::full({T_, K}, nan, torch::dtype(torch::kFloat64));
  auto grow_v = torch::full({T_, K}, nan, torch::dtype(torch::kFloat64));
  auto prune_i = torch::full({T_, K}, -1, torch::dtype(torch::kInt64));
  auto grow_i = torch::full({T_, K}, -1, torch::dtype(torch::kInt64));
  auto sum_a = torch::empty({T_}, torch::dtype(torch::kFloat64));
  auto neg = torch::empty({T_}, torch::dtype(torch::kInt64));
  double *pv = prune_v.data_ptr<double>(), *gv = grow_v.data_ptr<double>();
  int64_t *pi = prune_i.data_ptr<int64_t>(), *gi = grow_i.data_ptr<int64_t>();
  for (int64_t t = 0; t < T_; ++t) {
    auto& ph = cands_->prune[t].h;
    auto& gh = cands_->grow[t].h;
    std::sort(ph.begin(), ph.end(), PruneBetter());
    std::sort(gh.begin(), gh.end(), GrowBetter());
    // one ordering for both lists, lower first: prune by score, regrow by -a ("+ 0.0": -0.0 becomes +0.0)
    for (size_t j = 0; j < ph.size(); ++j) pv[t * K + j] = ph[j].v, pi[t * K + j] = ph[j].i;
    for (size_t j = 0; j < gh.size(); ++j) gv[t * K + j] = -gh[j].v + 0.0, gi[t * K + j] = gh[j].i;
    sum_a.data_ptr<double>()[t] = sum_a_[t];
    neg.data_ptr<int64_t>()[t] = neg_[t];
  }
  cands_.reset();  // the candidates are spent; free O(T x k) now rather than with the Python object
  return {prune_v, prune_i, grow_v, grow_i, sum_a, neg};
}

torch::Tensor task_agreement(const torch::Tensor& grads) {
  TORCH_CHECK_VALUE(grads.dim() == 2 && grads.is_floating_point(),
                    "task_agreement: grads must be a floating tensor [T, P], got ", grads.sizes(), " ",
                    grads.scalar_type());
  TORCH_CHECK_VALUE(grads.device().is_cpu(), "task_agreement (cpp): grads must be a CPU tensor");
  const int64_t T = grads.size(0), P = grads.size(1);
  auto gram = torch::zeros({T, T}, torch::dtype(torch::kFloat64));
  if (T == 0) return gram;
  // P in chunks through one float64 buffer of ~16 MB (no [T, P] float64 copy), the products by BLAS
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(P, (int64_t{1} << 21) / T));
  auto buf = torch::empty({T, chunk}, torch::dtype(torch::kFloat64));
  for (int64_t c0 = 0; c0 < P; c0 += chunk) {
    const int64_t n = std::min(chunk, P - c0);
    auto b = buf.narrow(1, 0, n);
    b.copy_(grads.narrow(1, c0, n));
    gram.addmm_(b, b.t());
  }
  gram = (gram + gram.t()) * 0.5;  // BLAS leaves the two triangles a rounding apart; the result is symmetric
  auto diag = gram.diagonal();
  auto finite = torch::isfinite(diag);
  if (!finite.all().item<bool>()) {
    std::vector<int64_t> bad;
    auto f = finite.accessor<bool, 1>();
    for (int64_t t = 0; t < T; ++t) {
      if (!f[t]) bad.push_back(t);
    }
    TORCH_CHECK_VALUE(false, "task_agreement: grads contain NaN or inf (or overflow float64) for task(s) ",
                      task_list(bad));
  }
  // cos = G_ij / (|g_i| |g_j|); a task with a zero gradient has no direction: 0 with every task, itself included
  auto norms = diag.sqrt();
  auto denom = torch::outer(norms, norms);
  auto cos = torch::where(denom > 0, gram / denom, torch::zeros_like(gram)).clamp_(-1.0, 1.0);
  cos.diagonal().copy_((norms > 0).to(torch::kFloat64));
  return cos;
}

}  // namespace harmodt

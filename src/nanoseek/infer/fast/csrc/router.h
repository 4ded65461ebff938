// The MoE router of a decode step (nanoseek.model.moe.Router.forward after its linear layer) as plain loops:
// scores, the group-limited choice and the top-k gates of a few tokens. As ~20 ATen ops it costs more than
// the arithmetic, and it runs between two weight streams, its caches cold.
#pragma once
#include <ATen/ATen.h>
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

struct RouterSpec {
  int64_t top_k = 1, n_group = 1, topk_group = 1;
  bool softmax = false;        // scoring_func "softmax", else "sigmoid"
  bool noaux_tc = false;       // the correction bias is added for the choice (never for the gates), and a
                               // group scores as its two best experts (else as its best one)
  bool grouped = false;        // n_group > 1 and a group-limited method: only the topk_group best groups
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.f;
};

namespace router_detail {

using Ranked = std::pair<float, int64_t>;

// torch.topk's order on the CPU (ATen's TopKImpl.h): NaN before any number, then larger before smaller.
inline bool before(const Ranked& a, const Ranked& b) {
  return (std::isnan(a.first) && !std::isnan(b.first)) || a.first > b.first;
}

// The k first of v[0 .. n) in torch.topk's order, by torch's own selection (a partial sort when k * 64 <= n,
// else nth_element and a sort of the first k - 1) on the same (value, index) sequence, so that equal
// values come out in the order torch gives them.
inline void topk(const float* v, int64_t n, int64_t k, std::vector<Ranked>& q) {
  q.resize(n);
  for (int64_t j = 0; j < n; ++j) q[j] = {v[j], j};
  if (k * 64 <= n) {
    std::partial_sort(q.begin(), q.begin() + k, q.end(), before);
  } else {
    std::nth_element(q.begin(), q.begin() + k - 1, q.end(), before);
    std::sort(q.begin(), q.begin() + k - 1, before);
  }
}

}  // namespace router_detail

// logits [N, E] fp32 contiguous, bias [E] (read when spec.noaux_tc) -> idx [N, K] expert ids and gates [N, K].
inline void route(const at::Tensor& logits, const float* bias, const RouterSpec& s, int64_t* idx, float* gates) {
  using router_detail::Ranked;
  const int64_t N = logits.size(0), E = logits.size(1), K = s.top_k, G = s.n_group, per = E / G;
  TORCH_CHECK(logits.is_contiguous() && logits.scalar_type() == at::kFloat, "route: fp32 contiguous logits");
  TORCH_CHECK(K >= 1 && K <= E && (!s.grouped || (E % G == 0 && s.topk_group >= 1 && s.topk_group <= G)),
              "route: bad top-k / group sizes");
  TORCH_CHECK(!(s.grouped && s.noaux_tc) || per >= 2, "route: a group of ", per,
              " expert(s) has no two best (noaux_tc with n_group = n_routed_experts)");
  const float* lp = logits.data_ptr<float>();
  std::vector<float> scores(E), choice(E), group(G);
  std::vector<char> keep(G);
  std::vector<Ranked> q;
  for (int64_t n = 0; n < N; ++n) {
    const float* l = lp + n * E;
    if (s.softmax) {
      float mx = -INFINITY;
      for (int64_t e = 0; e < E; ++e) mx = std::max(mx, l[e]);
      float total = 0.f;
      for (int64_t e = 0; e < E; ++e) total += (scores[e] = std::exp(l[e] - mx));
      for (int64_t e = 0; e < E; ++e) scores[e] /= total;
    } else {
      for (int64_t e = 0; e < E; ++e) scores[e] = 1.f / (1.f + std::exp(-l[e]));
    }
    for (int64_t e = 0; e < E; ++e) choice[e] = s.noaux_tc ? scores[e] + bias[e] : scores[e];
    if (s.grouped) {
      for (int64_t g = 0; g < G; ++g) {
        const float* c = choice.data() + g * per;
        if (s.noaux_tc) {
          router_detail::topk(c, per, 2, q);
          group[g] = q[0].first + q[1].first;
        } else {  // amax: NaN if any is
          float m = -INFINITY;
          for (int64_t e = 0; e < per; ++e) m = std::isnan(c[e]) || std::isnan(m) ? NAN : std::max(m, c[e]);
          group[g] = m;
        }
      }
      router_detail::topk(group.data(), G, s.topk_group, q);
      std::fill(keep.begin(), keep.end(), 0);
      for (int64_t j = 0; j < s.topk_group; ++j) keep[q[j].second] = 1;
      for (int64_t g = 0; g < G; ++g)
        if (!keep[g]) std::fill(choice.begin() + g * per, choice.begin() + (g + 1) * per, -INFINITY);
    }
    router_detail::topk(choice.data(), E, K, q);
    int64_t* id = idx + n * K;
    float* gt = gates + n * K;
    float sum = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      id[k] = q[k].second;
      sum += (gt[k] = scores[id[k]]);
    }
    const float denom = s.norm_topk_prob ? sum + 1e-20f : 1.f;
    for (int64_t k = 0; k < K; ++k) gt[k] = (s.norm_topk_prob ? gt[k] / denom : gt[k]) * s.routed_scaling_factor;
  }
}

// CPU kernels for decoding: a few activation rows times large fp32 weights.
//
// A decode step multiplies 1-16 rows by every weight it touches, so its time is that of streaming the
// weights from memory. torch's CPU GEMM is built for large M: with one row it runs a single-threaded GEMV
// (~12 GB/s on a 2-core EPYC that streams ~35 GB/s), with a few rows it re-packs the weight first. These
// kernels read each weight row once, keep the few activation rows in L1, and split the output features
// (or the experts) over the intra-op threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Tree sum of the 8 lanes (a serial lane-by-lane sum costs as much as the dot product for short rows).
inline float hsum(v8 v) {
  typedef float v4 __attribute__((vector_size(16)));
  v4 lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  const v4 s = lo + hi;
  return (s[0] + s[2]) + (s[1] + s[3]);
}

// y[r, n] = sum_k x[r, k] * w[n, k] for R <= 8 activation rows and n in [n0, n1). Each weight row is read
// once, in order (one sequential stream for the prefetcher), and each loaded vector of it serves all R rows.
template <int R>
void rows_block(const float* x, int64_t K, const float* w, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    v8 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = v8{};
    for (int64_t k = 0; k < K8; k += 8) {
      const v8 wv = load8(wr + k);
      for (int r = 0; r < R; ++r) acc[r] += wv * load8(x + r * K + k);
    }
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[r]);
      for (int64_t k = K8; k < K; ++k) s += x[r * K + k] * wr[k];
      y[r * ldy + n] = s;
    }
  }
}

void rows_block_any(const float* x, int64_t R, const float* w, float* y, int64_t ldy, int64_t K, int64_t n0,
                    int64_t n1) {
  switch (R) {
    case 1: rows_block<1>(x, K, w, y, ldy, n0, n1); break;
    case 2: rows_block<2>(x, K, w, y, ldy, n0, n1); break;
    case 3: rows_block<3>(x, K, w, y, ldy, n0, n1); break;
    case 4: rows_block<4>(x, K, w, y, ldy, n0, n1); break;
    case 5: rows_block<5>(x, K, w, y, ldy, n0, n1); break;
    case 6: rows_block<6>(x, K, w, y, ldy, n0, n1); break;
    case 7: rows_block<7>(x, K, w, y, ldy, n0, n1); break;
    default: rows_block<8>(x, K, w, y, ldy, n0, n1); break;
  }
}

// All M rows of x against weight rows [n0, n1); y has row stride ldy. With more than 8 rows the weight
// rows go in L2-sized chunks that every block of 8 rows uses before the next chunk is read, so the
// weight is streamed from memory once, not once per block.
void rows_range(const float* x, int64_t M, const float* w, float* y, int64_t ldy, int64_t K, int64_t n0,
                int64_t n1) {
  if (M <= 8) {
    rows_block_any(x, M, w, y, ldy, K, n0, n1);
    return;
  }
  const int64_t chunk = std::max<int64_t>(4, (int64_t(64) << 10) / (4 * K));  // ~64 KB of weight rows
  for (int64_t c0 = n0; c0 < n1; c0 += chunk) {
    const int64_t c1 = std::min(n1, c0 + chunk);
    for (int64_t m = 0; m < M; m += 8)
      rows_block_any(x + m * K, std::min<int64_t>(8, M - m), w, y + m * ldy, ldy, K, c0, c1);
  }
}

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name,
              " must be a contiguous fp32 CPU tensor");
}

}  // namespace

// x [M, K] @ w[N, K]^T -> [M, N]
torch::Tensor rows_matmul(const torch::Tensor& x, const torch::Tensor& w) {
  check_f32(x, "x");
  check_f32(w, "w");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shape mismatch");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Small weights stay on one thread: a parallel region costs more than reading them.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, K));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { rows_range(xp, M, wp, yp, N, K, n0, n1); });
  return y;
}

// Routed experts for a few tokens. x [N, D]; w1 [E, 2F, D] (gate rows then up rows); w2 [E, D, F];
// idx [N, K] int64 expert ids; gate [N, K] fp32. Returns sum_k gate[n, k] * expert_{idx[n, k]}(x[n]), [N, D].
// The work is split by expert (each thread reads whole experts, once, for all their tokens); every
// (token, slot) output lands in its own row, and the weighted sum runs afterwards in slot order.
torch::Tensor experts_rows(const torch::Tensor& x, const torch::Tensor& w1, const torch::Tensor& w2,
                           const torch::Tensor& idx, const torch::Tensor& gate) {
  check_f32(x, "x");
  check_f32(w1, "w1");
  check_f32(w2, "w2");
  check_f32(gate, "gate");
  TORCH_CHECK(idx.scalar_type() == torch::kInt64 && idx.is_contiguous(), "idx must be contiguous int64");
  const int64_t N = x.size(0), D = x.size(1), E = w1.size(0), F2 = w1.size(1), F = F2 / 2, K = idx.size(1);
  TORCH_CHECK(w1.size(2) == D && w2.size(0) == E && w2.size(1) == D && w2.size(2) == F, "expert shapes");
  const int64_t* ip = idx.data_ptr<int64_t>();
  // Assignments grouped by expert, in (token, slot) order within each expert.
  std::vector<std::vector<int64_t>> rows(E);
  for (int64_t a = 0; a < N * K; ++a) {
    TORCH_CHECK(ip[a] >= 0 && ip[a] < E, "expert id out of range");
    rows[ip[a]].push_back(a);
  }
  std::vector<int64_t> used;
  for (int64_t e = 0; e < E; ++e)
    if (!rows[e].empty()) used.push_back(e);
  auto out = torch::empty({N * K, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* w1p = w1.data_ptr<float>();
  const float* w2p = w2.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(used.size()), 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> xin, h, act, y;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t e = used[u];
      const auto& as = rows[e];
      const int64_t M = static_cast<int64_t>(as.size());
      xin.resize(M * D);
      h.resize(M * F2);
      act.resize(M * F);
      y.resize(M * D);
      for (int64_t i = 0; i < M; ++i) std::memcpy(&xin[i * D], xp + (as[i] / K) * D, D * sizeof(float));
      rows_range(xin.data(), M, w1p + e * F2 * D, h.data(), F2, D, 0, F2);
      for (int64_t i = 0; i < M; ++i)
        for (int64_t f = 0; f < F; ++f) {
          const float g = h[i * F2 + f], up = h[i * F2 + F + f];
          act[i * F + f] = g / (1.f + std::exp(-g)) * up;
        }
      rows_range(act.data(), M, w2p + e * D * F, y.data(), D, F, 0, D);
      for (int64_t i = 0; i < M; ++i) std::memcpy(op + as[i] * D, &y[i * D], D * sizeof(float));
    }
  });
  // Weighted sum over slots, as a [N, 1, K] x [N, K, D] batched product (the same order as the torch path).
  return torch::bmm(gate.unsqueeze(1), out.view({N, K, D})).squeeze(1);
}

// ----------------------------------------------------------------------------------------------------------
// One decoder block of a decode step (a few new tokens against the latent cache), computed in C++.
//
// The same computation, in the same order, as Block.forward -> MLA.forward/_absorbed -> MoE.forward/Router
// in the Python model (read those for the why of each line): RMSNorm, rope and the absorbed attention as
// plain loops, the router as the same ATen ops (so top-k ties break the same way), the matmuls through
// rows_matmul / experts_rows. At one token a step is ~300 small ops, and issuing them from Python cost
// more than the arithmetic.

namespace {

constexpr int64_t kKernelRows = 32;

// F.linear for [..., K] inputs, through rows_matmul when the rows are few (as layers.linear).
torch::Tensor lin(const torch::Tensor& x, const torch::Tensor& w) {
  const int64_t K = x.size(-1), rows = x.numel() / K;
  if (rows <= kKernelRows && w.is_contiguous()) {
    auto out_shape = x.sizes().vec();
    out_shape.back() = w.size(0);
    return rows_matmul(x.reshape({rows, K}).contiguous(), w).view(out_shape);
  }
  if (rows <= 64 && w.numel() >= (int64_t(1) << 16)) {  // as layers.linear: W @ x^T streams W once
    auto out_shape = x.sizes().vec();
    out_shape.back() = w.size(0);
    return at::mm(w, x.reshape({rows, K}).t()).t().contiguous().view(out_shape);
  }
  return at::linear(x, w);
}

// RMSNorm over the last dim, fp32 (at::rms_norm is a chain of ~8 ops on CPU: most of a small block's time).
torch::Tensor rms(const torch::Tensor& x_in, const torch::Tensor& w, double eps) {
  const auto x = x_in.contiguous();
  const int64_t D = x.size(-1), rows = x.numel() / D;
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * D;
    double ss = 0.0;  // double: a serial fp32 sum over thousands of dims would drift from torch's tree sum
    for (int64_t d = 0; d < D; ++d) ss += static_cast<double>(xr[d]) * xr[d];
    const float inv = 1.f / std::sqrt(static_cast<float>(ss / static_cast<double>(D)) + static_cast<float>(eps));
    for (int64_t d = 0; d < D; ++d) yp[r * D + d] = wp[d] * (xr[d] * inv);
  }
  return y;
}

// apply_rope: x [B, T, H, R] (any strides), cos/sin [B, T, R/2] -> contiguous [B, T, H, R] holding the rotated
// pairs as [first halves | second halves]; pairs are (0,1),(2,3).. when interleaved, else (i, i + R/2).
torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos_in, const torch::Tensor& sin_in,
                   bool interleave) {
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), R = x.size(3), P = R / 2;
  const auto cos = cos_in.contiguous(), sin = sin_in.contiguous();
  auto y = torch::empty({B, T, H, R}, x.options());
  const auto xa = x.accessor<float, 4>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        float* yr = yp + ((b * T + t) * H + h) * R;
        const float* c = cp + (b * T + t) * P;
        const float* s = sp + (b * T + t) * P;
        for (int64_t i = 0; i < P; ++i) {
          const float x1 = interleave ? xa[b][t][h][2 * i] : xa[b][t][h][i];
          const float x2 = interleave ? xa[b][t][h][2 * i + 1] : xa[b][t][h][i + P];
          yr[i] = x1 * c[i] - x2 * s[i];
          yr[i + P] = x2 * c[i] + x1 * s[i];
        }
      }
  return y;
}

inline float dot(const float* a, const float* b, int64_t n) {
  const int64_t n8 = n & ~int64_t(7);
  v8 acc = v8{};
  for (int64_t i = 0; i < n8; i += 8) acc += load8(a + i) * load8(b + i);
  float s = hsum(acc);
  for (int64_t i = n8; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float a, const float* x, float* y, int64_t n) {  // y += a * x
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// MLA._absorbed for a few new tokens, one (row, token, head) per task: the query is taken into the latent
// space through kv_b's key half, scored against the cached [latent | rope key] rows, and the softmax-
// weighted latent is taken out through kv_b's value half. The ~15 small ATen ops of that path cost more
// than its arithmetic at decode sizes. q [B, T, H, N + R] (the rope half unused), q_rope [B, T, H, R],
// kv [B, L, C + R] (rows contiguous), w = kv_b [H * (N + V), C]; bias [B, T * H, L] or undefined.
torch::Tensor absorbed_attention(const torch::Tensor& q, const torch::Tensor& q_rope, const torch::Tensor& kv,
                                 const torch::Tensor& w, const c10::optional<torch::Tensor>& bias, int64_t N,
                                 int64_t V, double scale) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), R = q_rope.size(3), L = kv.size(1);
  const int64_t C = kv.size(2) - R, W = C + R;
  TORCH_CHECK(q.is_contiguous() && q_rope.is_contiguous() && w.is_contiguous() && kv.stride(2) == 1 &&
              kv.stride(1) == W, "absorbed_attention: unexpected layout");
  auto out = torch::empty({B, T, H * V}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* rp = q_rope.data_ptr<float>();
  const float* kp = kv.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const auto bias_c = bias.has_value() ? bias->contiguous() : torch::Tensor();  // may be an expanded view
  const float* bp = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t kv_b = kv.stride(0);
  at::parallel_for(0, B * T * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf(W), s(L), ol(C);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (T * H), t = (i / H) % T, h = i % H;
      const float* qn = qp + ((b * T + t) * H + h) * (N + R);
      const float* wk = wp + h * (N + V) * C;  // [N, C], then the value half [V, C]
      std::fill(qf.begin(), qf.begin() + C, 0.f);
      for (int64_t n = 0; n < N; ++n) axpy(qn[n], wk + n * C, qf.data(), C);
      std::memcpy(qf.data() + C, rp + ((b * T + t) * H + h) * R, R * sizeof(float));
      const float* kb = kp + b * kv_b;
      const float* brow = bp ? bp + (b * T * H + t * H + h) * L : nullptr;
      float mx = -INFINITY;
      for (int64_t l = 0; l < L; ++l) {
        s[l] = dot(qf.data(), kb + l * W, W) * static_cast<float>(scale) + (brow ? brow[l] : 0.f);
        mx = std::max(mx, s[l]);
      }
      float sum = 0.f;
      for (int64_t l = 0; l < L; ++l) sum += (s[l] = std::exp(s[l] - mx));
      std::fill(ol.begin(), ol.end(), 0.f);
      for (int64_t l = 0; l < L; ++l) axpy(s[l] / sum, kb + l * W, ol.data(), C);
      float* o = op + (b * T + t) * H * V + h * V;
      for (int64_t v = 0; v < V; ++v) o[v] = dot(ol.data(), wk + (N + v) * C, C);
    }
  });
  return out;
}

torch::Tensor swiglu(const torch::Tensor& x, const torch::Tensor& gate, const torch::Tensor& up,
                     const torch::Tensor& down) {
  return lin(at::silu(lin(x, gate)) * lin(x, up), down);
}

}  // namespace

// attn: [q_a, q_a_norm, q_b] (or [q]) + [kv_a, kv_a_norm, kv_b, o]; norms: [input, post_attention];
// mlp: dense [gate, up, down] or MoE [router_w, router_bias, w1, w2] + shared [gate, up, down];
// icfg: H, N, R, V, C, interleave, is_moe, K, n_group, topk_group, softmax, method (0 noaux_tc, 1 greedy,
// 2 group_limited_greedy), norm_topk_prob, has_shared; fcfg: eps, softmax_scale, routed_scaling_factor.
// cache: kv_layer [slots, max_len, C + R]; rows/positions [B, T]; first_slot >= 0 when the B slots are the
// contiguous range first_slot.. (read as a view); bias: additive mask [B, T*H, L] or undefined.
torch::Tensor block_decode(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                           torch::Tensor kv_layer, const torch::Tensor& slots, const torch::Tensor& rows,
                           const torch::Tensor& positions, int64_t first_slot, int64_t kv_len,
                           const c10::optional<torch::Tensor>& bias, const std::vector<torch::Tensor>& attn,
                           const std::vector<torch::Tensor>& norms, const std::vector<torch::Tensor>& mlp,
                           const std::vector<int64_t>& icfg, const std::vector<double>& fcfg) {
  const int64_t H = icfg[0], N = icfg[1], R = icfg[2], V = icfg[3], C = icfg[4];
  const bool interleave = icfg[5], is_moe = icfg[6];
  const double eps = fcfg[0], scale = fcfg[1];
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  TORCH_CHECK(attn.size() == 5 || attn.size() == 7, "attention weights: 5 or 7 tensors");
  const bool q_lora = attn.size() == 7;
  const auto& kv_a = attn[q_lora ? 3 : 1];
  const auto& kv_a_norm = attn[q_lora ? 4 : 2];
  const auto& kv_b = attn[q_lora ? 5 : 3];
  const auto& o_proj = attn[q_lora ? 6 : 4];

  // --- MLA (MLA._project, cache write/read, MLA._absorbed)
  const auto h = rms(x, norms[0], eps);
  auto q = q_lora ? lin(rms(lin(h, attn[0]), attn[1], eps), attn[2]) : lin(h, attn[0]);
  q = q.view({B, T, H, N + R});
  const auto q_rope = rope(q.narrow(-1, N, R), cos, sin, interleave);
  const auto kv = lin(h, kv_a);
  const auto latent = rms(kv.narrow(-1, 0, C), kv_a_norm, eps);
  const auto k_rope = rope(kv.narrow(-1, C, R).unsqueeze(2), cos, sin, interleave).squeeze(2);
  kv_layer.index_put_({rows, positions}, at::cat({latent, k_rope}, -1));
  const auto cached = first_slot >= 0 ? kv_layer.narrow(0, first_slot, B).narrow(1, 0, kv_len)
                                      : kv_layer.narrow(1, 0, kv_len).index_select(0, slots);
  const auto attn_out = absorbed_attention(q.contiguous(), q_rope, cached, kv_b, bias, N, V, scale);
  auto out = x + lin(attn_out, o_proj);

  // --- feed-forward (MLP, or MoE: Router.forward + routed experts + shared experts)
  const auto h2 = rms(out, norms[1], eps);
  if (!is_moe) return out + swiglu(h2, mlp[0], mlp[1], mlp[2]);
  const int64_t K = icfg[7], G = icfg[8], topk_group = icfg[9], method = icfg[11];
  const bool use_softmax = icfg[10], norm_topk = icfg[12], has_shared = icfg[13];
  const auto x_nd = h2.reshape({B * T, D});
  const auto logits = at::linear(x_nd, mlp[0]);
  const auto sc = use_softmax ? at::softmax(logits, -1) : at::sigmoid(logits);
  auto choice = method == 0 ? sc + mlp[1] : sc;
  const int64_t E = sc.size(1);
  if (G > 1 && method != 1) {
    const auto grouped = choice.view({B * T, G, E / G});
    const auto gs = method == 0 ? std::get<0>(grouped.topk(2, -1)).sum(-1) : std::get<0>(grouped.max(-1));
    auto keep = at::zeros_like(gs, gs.options().dtype(torch::kBool));
    keep.scatter_(1, std::get<1>(gs.topk(topk_group, -1)), true);
    choice = grouped.masked_fill(keep.logical_not().unsqueeze(-1), -INFINITY).view({B * T, E});
  }
  const auto idx = std::get<1>(choice.topk(K, -1));
  auto gates = sc.gather(1, idx);
  if (norm_topk) gates = gates / (gates.sum(-1, true) + 1e-20);
  gates = gates * fcfg[2];
  auto y = experts_rows(x_nd.contiguous(), mlp[2], mlp[3], idx, gates.contiguous());
  if (has_shared) y = y + swiglu(x_nd, mlp[4], mlp[5], mlp[6]);
  return out + y.view({B, T, D});
}

// The GIL is released for the duration of each call (they touch no Python object), so the server's HTTP
// thread runs while the engine computes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("block_decode", &block_decode, "one decoder block of a cached decode step (fp32, CPU)", nogil);
  m.def("rms_norm", &rms, "RMSNorm over the last dim (fp32, CPU)", nogil);
  m.def("rows_matmul", &rows_matmul, "x @ w.T for a few rows (fp32, CPU)", nogil);
  m.def("experts_rows", &experts_rows, "weighted routed-expert outputs for a few tokens (fp32, CPU)", nogil);
}

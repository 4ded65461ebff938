// CPU kernels for decoding: a few activation rows times large weights (fp32, bf16, int8 or int4).
//
// A decode step multiplies 1-16 rows by every weight it touches, so its time is that of streaming the
// weights from memory. torch's CPU GEMM is built for large M: with one row it runs a single-threaded GEMV,
// with a few rows it re-packs the weight first. These kernels read each weight row once, keep the few
// activation rows in L1, and split the output features (or the experts) over the intra-op threads.
// Those few-row matmuls (fp32, bf16, int8 and int4 weights) live in gemv.h / gemv.cpp; this file holds RMSNorm,
// the absorbed attention and the whole-block decode step built on them.
//
// Every entry point checks the shapes, sizes, dtypes and layouts its loops rely on (TORCH_CHECK raises a
// RuntimeError that names the argument) before touching a pointer.
#include "gemv.h"
#include "router.h"
#include <torch/python.h>  // pybind11 and its tensor casters (the kernels need only ATen)
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
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

}  // namespace

// RMSNorm over the last dim, fp32 (torch's CPU rms_norm is a chain of ~8 ops: most of a small block's time).
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w, double eps) {
  TORCH_CHECK(x_in.defined() && x_in.dim() >= 1, "rms_norm: x must have at least one dimension");
  const auto x = x_in.contiguous();
  check_f32(x, "rms_norm: x", -1);
  check_f32(w, "rms_norm: weight", 1);
  const int64_t D = x.size(-1), rows = D > 0 ? x.numel() / D : 0;
  TORCH_CHECK(D > 0, "rms_norm: the normalised dimension is empty");
  TORCH_CHECK(w.size(0) == D, "rms_norm: x has ", D, " features but the weight ", w.size(0));
  auto y = at::empty_like(x);
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

// ----------------------------------------------------------------------------------------------------------
// One decoder block of a decode step (a few new tokens against the latent cache), computed in C++.
//
// The same computation, in the same order, as Block.forward -> MLA.forward/_absorbed -> MoE.forward/Router
// in the Python model (read those for the why of each line): RMSNorm, rope, the absorbed attention, SwiGLU
// and the residual adds as plain loops, the router as loops that select as torch.topk does (router.h: ties
// break the same way), the matmuls through rows_matmul / experts_rows. At one token a step is ~300 small ops, and issuing them from Python costs
// more than the arithmetic.
//
// The projections and experts may be stored narrow, as nanoseek.infer.quant's QuantLinear / QuantExperts
// hold them: bf16, or int8 / packed int4 (uint8, half the last dimension) with their fp32 scales
// [..., rows, groups] in the `<name>_scale` fields; each tensor in its own format, so a block may mix them.
// The norms, the router, kv_b_proj (the absorbed attention reads it as a matrix) and the activations stay
// fp32, as they do in a quantized model.

// The block's hyper-parameters (ModelConfig's names), set once per block by nanoseek.infer.fast.
struct BlockConfig {
  int64_t hidden_size = 0, num_attention_heads = 0, qk_nope_head_dim = 0, qk_rope_head_dim = 0, v_head_dim = 0;
  int64_t kv_lora_rank = 0, q_lora_rank = 0;  // q_lora_rank 0: a plain q_proj
  bool rope_interleave = true;
  double rms_norm_eps = 1e-6, softmax_scale = 1.0;
  bool moe = false;  // the feed-forward is an MoE (router, routed and shared experts), else a dense MLP
  int64_t num_experts_per_tok = 0, n_group = 1, topk_group = 1;
  std::string scoring_func = "sigmoid";  // or "softmax"
  std::string topk_method = "noaux_tc";  // or "greedy", "group_limited_greedy"
  bool norm_topk_prob = true;
  double routed_scaling_factor = 1.0;

  void check() const {
    TORCH_CHECK(hidden_size > 0 && num_attention_heads > 0 && qk_nope_head_dim > 0 && v_head_dim > 0 &&
                kv_lora_rank > 0 && q_lora_rank >= 0, "BlockConfig: sizes must be positive");
    TORCH_CHECK(qk_rope_head_dim > 0 && qk_rope_head_dim % 2 == 0, "BlockConfig: qk_rope_head_dim must be even");
    TORCH_CHECK(scoring_func == "sigmoid" || scoring_func == "softmax",
                "BlockConfig: scoring_func must be sigmoid or softmax, got ", scoring_func);
    TORCH_CHECK(topk_method == "noaux_tc" || topk_method == "greedy" || topk_method == "group_limited_greedy",
                "BlockConfig: unknown topk_method ", topk_method);
    TORCH_CHECK(!moe || (num_experts_per_tok > 0 && n_group >= 1 && topk_group >= 1 && topk_group <= n_group),
                "BlockConfig: num_experts_per_tok, n_group and topk_group must be positive, topk_group <= n_group");
  }
};

// The block's tensors under their module names; set the attention's q_a_proj, q_a_layernorm and q_b_proj,
// or q_proj; the dense MLP's gate/up/down_proj, or the MoE's router tensors, experts and shared experts.
// A projection or expert stack stored as int8 / int4 also needs its `<name>_scale`; fp32 and bf16 take none.
struct BlockWeights {
  std::optional<at::Tensor> input_layernorm, post_attention_layernorm;
  std::optional<at::Tensor> q_proj, q_a_proj, q_a_layernorm, q_b_proj;
  std::optional<at::Tensor> kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj;
  std::optional<at::Tensor> gate_proj, up_proj, down_proj;                   // dense MLP
  std::optional<at::Tensor> router_weight, e_score_correction_bias;          // MoE router (fp32)
  std::optional<at::Tensor> experts_gate_up_proj, experts_down_proj;         // [E, 2F, D], [E, D, F]
  std::optional<at::Tensor> shared_gate_proj, shared_up_proj, shared_down_proj;  // absent without shared experts
  // the scales of int8 / int4 weights: [rows, groups] ([E, rows, groups] for the experts)
  std::optional<at::Tensor> q_proj_scale, q_a_proj_scale, q_b_proj_scale, kv_a_proj_with_mqa_scale, o_proj_scale;
  std::optional<at::Tensor> gate_proj_scale, up_proj_scale, down_proj_scale;
  std::optional<at::Tensor> experts_gate_up_proj_scale, experts_down_proj_scale;
  std::optional<at::Tensor> shared_gate_proj_scale, shared_up_proj_scale, shared_down_proj_scale;
};

// Where this batch's rows live in the paged cache, the same for every layer of one forward (see
// nanoseek.infer.cache.PagedView): each row's block table, the flat cache row of each new token, the mask.
struct CacheIndex {
  at::Tensor block_table;  // [B, nb] int64: position p of row b lives in block block_table[b, p / block_size]
  at::Tensor write_rows;   // [B, T] int64: where each new token's row goes in the [blocks * block_size, W] view
  int64_t block_size = 0;
  int64_t kv_len = 0;      // positions [0, kv_len) are attended to; nb * block_size >= kv_len
  std::optional<at::Tensor> bias;  // additive mask [B, T * H, kv_len] fp32; absent when nothing is masked
};

namespace {

constexpr int64_t kKernelRows = 32;

const at::Tensor& need(const std::optional<at::Tensor>& t, const char* name) {
  TORCH_CHECK(t.has_value() && t->defined(), "BlockWeights.", name, " is not set");
  return *t;
}

const at::Tensor& weight(const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape) {
  const auto& w = need(t, name);
  check_f32(w, name, static_cast<int64_t>(shape.size()));
  check_shape(w, name, shape);
  return w;
}

// A projection (fp32, bf16, or int8 / int4 with its scales) of dense shape `shape` ([rows, inputs], or
// [experts, rows, inputs]): its dtype, layout, stored shape (int4: inputs / 2 bytes) and scales.
void proj(const std::optional<at::Tensor>& t, const std::optional<at::Tensor>& scale, const char* name,
          at::IntArrayRef shape) {
  const auto& w = need(t, name);
  const std::string what = std::string("BlockWeights.") + name;
  weight_arg(w, scale, what.c_str(), static_cast<int64_t>(shape.size()), shape.back());
  auto stored = shape.vec();
  stored.back() = stored_columns(w.scalar_type(), shape.back());
  check_shape(w, what.c_str(), stored);
}

// The inputs of a weight's rows (two per byte of packed int4).
int64_t inputs_of(const at::Tensor& w) { return w.scalar_type() == at::kByte ? 2 * w.size(-1) : w.size(-1); }

// nanoseek.infer.quant.dequantize: the fp32 weight [N, K] a bf16, int8 or packed int4 one stands for.
at::Tensor dequantize(const at::Tensor& w, const std::optional<at::Tensor>& s) {
  if (!s.has_value() || !s->defined()) return w.to(at::kFloat);
  auto q = w;
  if (w.scalar_type() == at::kByte)  // unpack_int4: the low nibble first, each a two's complement number
    q = at::stack({w.bitwise_and(0xF), at::bitwise_right_shift(w, 4)}, -1).flatten(-2).to(at::kChar)
            .bitwise_xor(8).sub(8);
  const int64_t N = q.size(0), K = q.size(1), G = s->size(-1);
  return (q.reshape({N, G, K / G}).to(at::kFloat) * s->unsqueeze(-1)).reshape({N, K});
}

// F.linear for [..., K] inputs, through rows_matmul when the rows are few (as nanoseek.infer.fast and
// QuantLinear do); more rows take torch's path for the weight's format (a narrow one dequantized first).
at::Tensor lin(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& s = std::nullopt) {
  const int64_t K = x.size(-1), rows = x.numel() / K;
  auto out_shape = x.sizes().vec();
  out_shape.back() = w.size(0);
  if (rows <= kKernelRows) return rows_matmul(x.reshape({rows, K}).contiguous(), w, s).view(out_shape);
  if (w.scalar_type() != at::kFloat) return at::linear(x, dequantize(w, s));
  if (rows <= 64 && w.numel() >= (int64_t(1) << 16))  // W @ x^T streams W once
    return at::mm(w, x.reshape({rows, K}).t()).t().contiguous().view(out_shape);
  return at::linear(x, w);
}

// apply_rope: x [B, T, H, R] (any strides), cos/sin [B, T, R/2] contiguous -> contiguous [B, T, H, R] holding
// the rotated pairs as [first halves | second halves]; pairs are (0,1),(2,3).. when interleaved, else
// (i, i + R/2).
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleave) {
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), R = x.size(3), P = R / 2;
  auto y = at::empty({B, T, H, R}, x.options());
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

// Calls f(l, row pointer) for the cached rows l = 0 .. L-1 of one sequence: rows of a block are contiguous,
// blocks are wherever the block table says (walking block by block spares a division per row).
template <class F>
inline void for_rows(const float* kv, const int64_t* table, int64_t bs, int64_t W, int64_t L, F&& f) {
  for (int64_t l0 = 0, j = 0; l0 < L; l0 += bs, ++j) {
    const float* base = kv + table[j] * bs * W;
    const int64_t n = std::min(bs, L - l0);
    for (int64_t i = 0; i < n; ++i) f(l0 + i, base + i * W);
  }
}

// MLA._absorbed for a few new tokens, one (row, token, head) per task: the query is taken into the latent
// space through kv_b's key half, scored against the cached [latent | rope key] rows, and the softmax-
// weighted latent is taken out through kv_b's value half. The ~15 small ATen ops of that path cost more
// than its arithmetic at decode sizes. q [B, T, H, N + R] (the rope half unused), q_rope [B, T, H, R],
// kv [blocks, block_size, C + R] read in place through table [B, nb], w = kv_b [H * (N + V), C];
// bias [B, T * H, L] or undefined.
at::Tensor absorbed_attention(const at::Tensor& q, const at::Tensor& q_rope, const at::Tensor& kv,
                                 const at::Tensor& table, int64_t L, const at::Tensor& w,
                                 const at::Tensor& bias, int64_t N, int64_t V, double scale) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), R = q_rope.size(3), bs = kv.size(1);
  const int64_t C = kv.size(2) - R, W = C + R, nb = table.size(1);
  TORCH_CHECK(q.is_contiguous() && q_rope.is_contiguous() && w.is_contiguous() && kv.is_contiguous() &&
              table.is_contiguous(), "absorbed_attention: unexpected layout");
  TORCH_CHECK(!bias.defined() || bias.sizes() == at::IntArrayRef({B, T * H, L}),
              "absorbed_attention: the bias must be [B, T*H, L]");
  auto out = at::empty({B, T, H * V}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* rp = q_rope.data_ptr<float>();
  const float* kp = kv.data_ptr<float>();
  const int64_t* tp = table.data_ptr<int64_t>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  // A task is a group of G queries (token, head) of one row: each cached row is loaded once for all G of
  // them (one query per task would stream the whole cache once per head and token). G is as large as
  // keeps every thread busy, at most 16; each query's sums run in the same order whatever G is.
  const int64_t TH = T * H, threads = at::get_num_threads();
  const int64_t G = std::max<int64_t>(1, std::min<int64_t>({16, TH, (B * TH) / std::max<int64_t>(1, 2 * threads)}));
  const int64_t groups = (TH + G - 1) / G;
  at::parallel_for(0, B * groups, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf(G * W), s(G * L), ol(G * C), mx(G), sum(G);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / groups, g0 = (i % groups) * G, n_g = std::min(G, TH - g0);
      for (int64_t g = 0; g < n_g; ++g) {  // queries g0 + g = t * H + h, taken into the latent space
        const int64_t h = (g0 + g) % H;
        const float* qn = qp + (b * TH + g0 + g) * (N + R);
        const float* wk = wp + h * (N + V) * C;  // [N, C], then the value half [V, C]
        float* q_g = qf.data() + g * W;
        std::fill(q_g, q_g + C, 0.f);
        for (int64_t n = 0; n < N; ++n) axpy(qn[n], wk + n * C, q_g, C);
        std::memcpy(q_g + C, rp + (b * TH + g0 + g) * R, R * sizeof(float));
        mx[g] = -INFINITY;
      }
      const int64_t* tb = tp + b * nb;
      const float* bb = bp ? bp + (b * TH + g0) * L : nullptr;
      for_rows(kp, tb, bs, W, L, [&](int64_t l, const float* row) {
        for (int64_t g = 0; g < n_g; ++g) {
          const float v = dot(qf.data() + g * W, row, W) * static_cast<float>(scale) + (bb ? bb[g * L + l] : 0.f);
          s[g * L + l] = v;
          mx[g] = std::max(mx[g], v);
        }
      });
      for (int64_t g = 0; g < n_g; ++g) {
        float* sg = s.data() + g * L;
        float total = 0.f;
        for (int64_t l = 0; l < L; ++l) total += (sg[l] = std::exp(sg[l] - mx[g]));
        sum[g] = total;
      }
      std::fill(ol.begin(), ol.end(), 0.f);
      for_rows(kp, tb, bs, W, L, [&](int64_t l, const float* row) {
        for (int64_t g = 0; g < n_g; ++g) axpy(s[g * L + l] / sum[g], row, ol.data() + g * C, C);
      });
      for (int64_t g = 0; g < n_g; ++g) {
        const int64_t t = (g0 + g) / H, h = (g0 + g) % H;
        const float* wk = wp + h * (N + V) * C;
        float* o = op + (b * T + t) * H * V + h * V;
        for (int64_t v = 0; v < V; ++v) o[v] = dot(ol.data() + g * C, wk + (N + v) * C, C);
      }
    }
  });
  return out;
}

// a += b, elementwise, for a fresh contiguous fp32 result `a` of the kernels and b of its shape: the residual
// adds without an op dispatch each (x + y and y + x are the same floats).
at::Tensor add_into(at::Tensor a, const at::Tensor& b_in) {
  const auto b = b_in.contiguous();
  TORCH_CHECK(a.is_contiguous() && a.sizes() == b.sizes(), "add_into: shapes ", a.sizes(), " and ", b.sizes());
  float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  for (int64_t i = 0, n = a.numel(); i < n; ++i) ap[i] += bp[i];
  return a;
}

// MLP.forward: down(silu(gate(x)) * up(x)), each projection with its scales (if any).
at::Tensor swiglu(const at::Tensor& x, const std::optional<at::Tensor>& gate,
                     const std::optional<at::Tensor>& gate_s, const std::optional<at::Tensor>& up,
                     const std::optional<at::Tensor>& up_s, const std::optional<at::Tensor>& down,
                     const std::optional<at::Tensor>& down_s) {
  auto g = lin(x, *gate, gate_s).contiguous();
  const auto u = lin(x, *up, up_s).contiguous();
  float* gp = g.data_ptr<float>();
  const float* upp = u.data_ptr<float>();
  for (int64_t i = 0, n = g.numel(); i < n; ++i) gp[i] = gp[i] / (1.f + std::exp(-gp[i])) * upp[i];  // silu(g) * u
  return lin(g, *down, down_s);
}

// The checks block_decode relies on: every tensor's dtype, layout and shape against the config, and the
// cache index against the cache.
void check_block(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& kv,
                 const CacheIndex& ix, const BlockWeights& w, const BlockConfig& c) {
  c.check();
  check_f32(x, "block_decode: x", 3);
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  TORCH_CHECK(B > 0 && T > 0, "block_decode: empty batch (x has shape ", x.sizes(), ")");
  TORCH_CHECK(D == c.hidden_size, "block_decode: x has ", D, " features, the config hidden_size ", c.hidden_size);
  const int64_t H = c.num_attention_heads, N = c.qk_nope_head_dim, R = c.qk_rope_head_dim, V = c.v_head_dim;
  const int64_t C = c.kv_lora_rank, Q = c.q_lora_rank;
  check_f32(cos, "block_decode: cos", 3);
  check_f32(sin, "block_decode: sin", 3);
  check_shape(cos, "block_decode: cos", {B, T, R / 2});
  check_shape(sin, "block_decode: sin", {B, T, R / 2});
  check_f32(kv, "block_decode: the cache layer", 3);
  TORCH_CHECK(kv.size(2) == C + R, "block_decode: cache rows hold ", kv.size(2), " values, the config ", C + R);
  const int64_t NB = kv.size(0), bs = kv.size(1);
  TORCH_CHECK(ix.block_size == bs, "CacheIndex.block_size ", ix.block_size, " but the cache layer has blocks of ", bs);
  check_i64(ix.block_table, "CacheIndex.block_table", 2);
  check_i64(ix.write_rows, "CacheIndex.write_rows", 2);
  TORCH_CHECK(ix.block_table.size(0) == B, "CacheIndex.block_table must have ", B, " rows, got ",
              ix.block_table.sizes());
  check_shape(ix.write_rows, "CacheIndex.write_rows", {B, T});
  const int64_t nb = ix.block_table.size(1);
  TORCH_CHECK(ix.kv_len > 0 && ix.kv_len <= nb * bs, "CacheIndex.kv_len ", ix.kv_len, " outside [1, ", nb * bs,
              "] (the block table covers ", nb, " blocks of ", bs, ")");
  const int64_t* tp = ix.block_table.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * nb; ++i)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < NB, "CacheIndex.block_table: block ", tp[i], " out of range [0, ", NB, ")");
  const int64_t* wp = ix.write_rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i)
    TORCH_CHECK(wp[i] >= 0 && wp[i] < NB * bs, "CacheIndex.write_rows: row ", wp[i], " outside [0, ", NB * bs, ")");
  if (ix.bias.has_value() && ix.bias->defined()) {
    TORCH_CHECK(ix.bias->device().is_cpu() && ix.bias->scalar_type() == at::kFloat, "CacheIndex.bias must be fp32");
    TORCH_CHECK(ix.bias->sizes() == at::IntArrayRef({B, T * H, ix.kv_len}), "CacheIndex.bias must be [",
                B, ", ", T * H, ", ", ix.kv_len, "], got ", ix.bias->sizes());
  }
  weight(w.input_layernorm, "input_layernorm", {D});
  weight(w.post_attention_layernorm, "post_attention_layernorm", {D});
  if (Q > 0) {
    proj(w.q_a_proj, w.q_a_proj_scale, "q_a_proj", {Q, D});
    weight(w.q_a_layernorm, "q_a_layernorm", {Q});
    proj(w.q_b_proj, w.q_b_proj_scale, "q_b_proj", {H * (N + R), Q});
  } else {
    proj(w.q_proj, w.q_proj_scale, "q_proj", {H * (N + R), D});
  }
  proj(w.kv_a_proj_with_mqa, w.kv_a_proj_with_mqa_scale, "kv_a_proj_with_mqa", {C + R, D});
  weight(w.kv_a_layernorm, "kv_a_layernorm", {C});
  weight(w.kv_b_proj, "kv_b_proj", {H * (N + V), C});
  proj(w.o_proj, w.o_proj_scale, "o_proj", {D, H * V});
  if (!c.moe) {
    const int64_t I = need(w.gate_proj, "gate_proj").size(0);
    proj(w.gate_proj, w.gate_proj_scale, "gate_proj", {I, D});
    proj(w.up_proj, w.up_proj_scale, "up_proj", {I, D});
    proj(w.down_proj, w.down_proj_scale, "down_proj", {D, I});
    return;
  }
  const int64_t E = need(w.router_weight, "router_weight").size(0);
  weight(w.router_weight, "router_weight", {E, D});
  weight(w.e_score_correction_bias, "e_score_correction_bias", {E});
  TORCH_CHECK(E % c.n_group == 0, "block_decode: ", E, " experts do not split into ", c.n_group, " groups");
  TORCH_CHECK(c.num_experts_per_tok <= E, "block_decode: num_experts_per_tok > the number of experts");
  const int64_t F = inputs_of(need(w.experts_down_proj, "experts_down_proj"));
  proj(w.experts_gate_up_proj, w.experts_gate_up_proj_scale, "experts_gate_up_proj", {E, 2 * F, D});
  proj(w.experts_down_proj, w.experts_down_proj_scale, "experts_down_proj", {E, D, F});
  if (w.shared_gate_proj.has_value()) {
    const int64_t Fs = w.shared_gate_proj->size(0);
    proj(w.shared_gate_proj, w.shared_gate_proj_scale, "shared_gate_proj", {Fs, D});
    proj(w.shared_up_proj, w.shared_up_proj_scale, "shared_up_proj", {Fs, D});
    proj(w.shared_down_proj, w.shared_down_proj_scale, "shared_down_proj", {D, Fs});
  }
}

}  // namespace

// x [B, T, D]: the block input of the new tokens; cos/sin [B, T, R/2]: their rope angles; kv_layer
// [blocks, block_size, C + R]: this layer's paged cache; returns the block output [B, T, D] and writes the new
// tokens' [latent | rope key] rows into the cache.
at::Tensor block_decode(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                           at::Tensor kv_layer, const CacheIndex& ix, const BlockWeights& w,
                           const BlockConfig& c) {
  check_block(x, cos, sin, kv_layer, ix, w, c);
  const int64_t H = c.num_attention_heads, N = c.qk_nope_head_dim, R = c.qk_rope_head_dim, V = c.v_head_dim;
  const int64_t C = c.kv_lora_rank;
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);

  // --- MLA (MLA._project, cache write/read, MLA._absorbed)
  const auto h = rms_norm(x, *w.input_layernorm, c.rms_norm_eps);
  auto q = c.q_lora_rank > 0 ? lin(rms_norm(lin(h, *w.q_a_proj, w.q_a_proj_scale), *w.q_a_layernorm, c.rms_norm_eps),
                                   *w.q_b_proj, w.q_b_proj_scale)
                             : lin(h, *w.q_proj, w.q_proj_scale);
  q = q.view({B, T, H, N + R});
  const auto q_rope = rope(q.narrow(-1, N, R), cos, sin, c.rope_interleave);
  const auto kv = lin(h, *w.kv_a_proj_with_mqa, w.kv_a_proj_with_mqa_scale);
  const auto latent = rms_norm(kv.narrow(-1, 0, C), *w.kv_a_layernorm, c.rms_norm_eps);
  const auto k_rope = rope(kv.narrow(-1, C, R).unsqueeze(2), cos, sin, c.rope_interleave).squeeze(2);
  // The new rows first (a token attends to itself), each [latent | rope key] to its flat row of the paged layer.
  const float* lat = latent.data_ptr<float>();  // both contiguous: rms_norm's and rope's own outputs
  const float* kr = k_rope.data_ptr<float>();
  float* kvp = kv_layer.data_ptr<float>();
  const int64_t* wr = ix.write_rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i) {
    std::memcpy(kvp + wr[i] * (C + R), lat + i * C, C * sizeof(float));
    std::memcpy(kvp + wr[i] * (C + R) + C, kr + i * R, R * sizeof(float));
  }
  const auto bias = ix.bias.has_value() ? ix.bias->contiguous() : at::Tensor();  // may be an expanded view
  const auto attn_out = absorbed_attention(q.contiguous(), q_rope, kv_layer, ix.block_table, ix.kv_len,
                                           *w.kv_b_proj, bias, N, V, c.softmax_scale);
  const auto out = add_into(lin(attn_out, *w.o_proj, w.o_proj_scale), x);

  // --- feed-forward (MLP, or MoE: Router.forward + routed experts + shared experts)
  const auto h2 = rms_norm(out, *w.post_attention_layernorm, c.rms_norm_eps);
  if (!c.moe)
    return add_into(
        swiglu(h2, w.gate_proj, w.gate_proj_scale, w.up_proj, w.up_proj_scale, w.down_proj, w.down_proj_scale), out);
  const auto x_nd = h2.reshape({B * T, D});
  RouterSpec spec;
  spec.top_k = c.num_experts_per_tok, spec.n_group = c.n_group, spec.topk_group = c.topk_group;
  spec.softmax = c.scoring_func == "softmax", spec.noaux_tc = c.topk_method == "noaux_tc";
  spec.grouped = c.n_group > 1 && c.topk_method != "greedy";
  spec.norm_topk_prob = c.norm_topk_prob, spec.routed_scaling_factor = static_cast<float>(c.routed_scaling_factor);
  const auto logits = lin(x_nd, *w.router_weight).contiguous();  // [B * T, E]
  auto idx = at::empty({B * T, spec.top_k}, x.options().dtype(at::kLong));
  auto gates = at::empty({B * T, spec.top_k}, x.options());
  route(logits, w.e_score_correction_bias->data_ptr<float>(), spec, idx.data_ptr<int64_t>(), gates.data_ptr<float>());
  auto y = experts_rows(x_nd.contiguous(), *w.experts_gate_up_proj, *w.experts_down_proj, idx, gates,
                        w.experts_gate_up_proj_scale, w.experts_down_proj_scale);
  if (w.shared_gate_proj.has_value())
    add_into(y, swiglu(x_nd, w.shared_gate_proj, w.shared_gate_proj_scale, w.shared_up_proj, w.shared_up_proj_scale,
                       w.shared_down_proj, w.shared_down_proj_scale));
  return add_into(y.view({B, T, D}), out);
}

// The GIL is released for the duration of each call (they touch no Python object), so the server's HTTP
// thread runs while the engine computes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  py::class_<BlockConfig>(m, "BlockConfig", py::module_local(), "a decoder block's hyper-parameters (ModelConfig's names)")
      .def(py::init<>())
      .def_readwrite("hidden_size", &BlockConfig::hidden_size)
      .def_readwrite("num_attention_heads", &BlockConfig::num_attention_heads)
      .def_readwrite("qk_nope_head_dim", &BlockConfig::qk_nope_head_dim)
      .def_readwrite("qk_rope_head_dim", &BlockConfig::qk_rope_head_dim)
      .def_readwrite("v_head_dim", &BlockConfig::v_head_dim)
      .def_readwrite("kv_lora_rank", &BlockConfig::kv_lora_rank)
      .def_readwrite("q_lora_rank", &BlockConfig::q_lora_rank)
      .def_readwrite("rope_interleave", &BlockConfig::rope_interleave)
      .def_readwrite("rms_norm_eps", &BlockConfig::rms_norm_eps)
      .def_readwrite("softmax_scale", &BlockConfig::softmax_scale)
      .def_readwrite("moe", &BlockConfig::moe)
      .def_readwrite("num_experts_per_tok", &BlockConfig::num_experts_per_tok)
      .def_readwrite("n_group", &BlockConfig::n_group)
      .def_readwrite("topk_group", &BlockConfig::topk_group)
      .def_readwrite("scoring_func", &BlockConfig::scoring_func)
      .def_readwrite("topk_method", &BlockConfig::topk_method)
      .def_readwrite("norm_topk_prob", &BlockConfig::norm_topk_prob)
      .def_readwrite("routed_scaling_factor", &BlockConfig::routed_scaling_factor)
      .def("check", &BlockConfig::check);
  py::class_<BlockWeights>(m, "BlockWeights", py::module_local(), "a decoder block's tensors under their module names")
      .def(py::init<>())
      .def_readwrite("input_layernorm", &BlockWeights::input_layernorm)
      .def_readwrite("post_attention_layernorm", &BlockWeights::post_attention_layernorm)
      .def_readwrite("q_proj", &BlockWeights::q_proj)
      .def_readwrite("q_a_proj", &BlockWeights::q_a_proj)
      .def_readwrite("q_a_layernorm", &BlockWeights::q_a_layernorm)
      .def_readwrite("q_b_proj", &BlockWeights::q_b_proj)
      .def_readwrite("kv_a_proj_with_mqa", &BlockWeights::kv_a_proj_with_mqa)
      .def_readwrite("kv_a_layernorm", &BlockWeights::kv_a_layernorm)
      .def_readwrite("kv_b_proj", &BlockWeights::kv_b_proj)
      .def_readwrite("o_proj", &BlockWeights::o_proj)
      .def_readwrite("gate_proj", &BlockWeights::gate_proj)
      .def_readwrite("up_proj", &BlockWeights::up_proj)
      .def_readwrite("down_proj", &BlockWeights::down_proj)
      .def_readwrite("router_weight", &BlockWeights::router_weight)
      .def_readwrite("e_score_correction_bias", &BlockWeights::e_score_correction_bias)
      .def_readwrite("experts_gate_up_proj", &BlockWeights::experts_gate_up_proj)
      .def_readwrite("experts_down_proj", &BlockWeights::experts_down_proj)
      .def_readwrite("shared_gate_proj", &BlockWeights::shared_gate_proj)
      .def_readwrite("shared_up_proj", &BlockWeights::shared_up_proj)
      .def_readwrite("shared_down_proj", &BlockWeights::shared_down_proj)
      .def_readwrite("q_proj_scale", &BlockWeights::q_proj_scale)
      .def_readwrite("q_a_proj_scale", &BlockWeights::q_a_proj_scale)
      .def_readwrite("q_b_proj_scale", &BlockWeights::q_b_proj_scale)
      .def_readwrite("kv_a_proj_with_mqa_scale", &BlockWeights::kv_a_proj_with_mqa_scale)
      .def_readwrite("o_proj_scale", &BlockWeights::o_proj_scale)
      .def_readwrite("gate_proj_scale", &BlockWeights::gate_proj_scale)
      .def_readwrite("up_proj_scale", &BlockWeights::up_proj_scale)
      .def_readwrite("down_proj_scale", &BlockWeights::down_proj_scale)
      .def_readwrite("experts_gate_up_proj_scale", &BlockWeights::experts_gate_up_proj_scale)
      .def_readwrite("experts_down_proj_scale", &BlockWeights::experts_down_proj_scale)
      .def_readwrite("shared_gate_proj_scale", &BlockWeights::shared_gate_proj_scale)
      .def_readwrite("shared_up_proj_scale", &BlockWeights::shared_up_proj_scale)
      .def_readwrite("shared_down_proj_scale", &BlockWeights::shared_down_proj_scale);
  py::class_<CacheIndex>(m, "CacheIndex", py::module_local(), "where a batch's rows live in the paged cache (one forward, every layer)")
      .def(py::init<at::Tensor, at::Tensor, int64_t, int64_t, std::optional<at::Tensor>>(), py::arg("block_table"),
           py::arg("write_rows"), py::arg("block_size"), py::arg("kv_len"), py::arg("bias"))
      .def_readonly("block_table", &CacheIndex::block_table)
      .def_readonly("write_rows", &CacheIndex::write_rows)
      .def_readonly("block_size", &CacheIndex::block_size)
      .def_readonly("kv_len", &CacheIndex::kv_len)
      .def_readonly("bias", &CacheIndex::bias);
  m.def("block_decode", &block_decode, "one decoder block of a cached decode step (fp32 activations; fp32, bf16, int8 or int4 weights; CPU)", py::arg("x"),
        py::arg("cos"), py::arg("sin"), py::arg("kv_layer"), py::arg("index"), py::arg("weights"),
        py::arg("config"), nogil);
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim (fp32, CPU)", nogil);
  m.def("rows_matmul", &rows_matmul, "x @ w.T for a few rows (fp32 x; fp32, bf16, or scaled int8 / packed int4 w; CPU)",
        py::arg("x"), py::arg("w"), py::arg("scale") = py::none(), nogil);
  m.def("experts_rows", &experts_rows, "weighted routed-expert outputs for a few tokens (CPU)", py::arg("x"),
        py::arg("w1"), py::arg("w2"), py::arg("idx"), py::arg("gate"), py::arg("s1") = py::none(),
        py::arg("s2") = py::none(), nogil);
  m.def("read_streams", &read_streams, "sum of a 1-D fp32 tensor, each thread's share read as 1, 2, 4 or 8 "
        "streams at once (the memory-read probe of the benchmarks)", py::arg("x"), py::arg("streams"), nogil);
  m.def("kernel_isa", &kernel_isa, "the instruction set this build was compiled for");
  m.def("narrow_prefetch", &narrow_prefetch, "bytes the 1-2 row matmuls prefetch bf16 / int8 weights ahead");
  m.def("set_narrow_prefetch", &set_narrow_prefetch, "set those bytes (0, 512, 1024 or 2048)",
        py::arg("bytes"));
  m.def("int8_activations", &int8_activations, "whether int8 weights take int8 activations (integer dot products)");
  m.def("set_int8_activations", &set_int8_activations, "switch int8 activations for int8 weights on or off",
        py::arg("on"));
  m.def("int8_activation_kernel", &int8_activation_kernel,
        "the int8-activation loop this CPU runs (avx512-vnni, avx2 or portable)");
}

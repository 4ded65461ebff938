// The few-row matmul and routed-expert entry points (declared in gemv.h), for fp32, bf16, int8 and int4
// weights.
//
// torch's CPU GEMM is built for large M: with one row it runs a single-threaded GEMV, with a few rows it
// re-packs the weight first, and it has no int8- or int4-weight path at all. These read each weight row once,
// keep the few activation rows in L1, and split the output features (or the experts) over the intra-op
// threads.
#include "gemv.h"
#include "gemv_int8act.h"

#include <atomic>
#include <cmath>
#include <string>
#include <vector>

const char* kernel_isa() {
#if defined(NANOSEEK_ISA_AVX512)
  return "avx512";
#elif defined(NANOSEEK_ISA_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

namespace {
std::atomic<int64_t> g_narrow_prefetch{512};
std::atomic<bool> g_int8_activations{false};
}

bool int8_activations() { return g_int8_activations.load(std::memory_order_relaxed); }

void set_int8_activations(bool on) { g_int8_activations.store(on, std::memory_order_relaxed); }

const char* int8_activation_kernel() {
#if defined(NANOSEEK_ISA_AVX512)
  return gemv::a8::has_vnni() ? "avx512-vnni" : "avx2";
#elif defined(NANOSEEK_ISA_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

int64_t narrow_prefetch() { return g_narrow_prefetch.load(std::memory_order_relaxed); }

void set_narrow_prefetch(int64_t bytes) {
  TORCH_CHECK(bytes == 0 || bytes == 512 || bytes == 1024 || bytes == 2048, "set_narrow_prefetch: ", bytes,
              " bytes (0, 512, 1024 or 2048 expected)");
  g_narrow_prefetch.store(bytes, std::memory_order_relaxed);
}

int64_t stored_columns(at::ScalarType type, int64_t K) { return type == at::kByte ? K / 2 : K; }

WeightArg weight_arg(const at::Tensor& w, const std::optional<at::Tensor>& scale, const char* what, int64_t dim,
                     int64_t K) {
  TORCH_CHECK(w.defined() && w.device().is_cpu(), what, " must be a CPU tensor");
  const auto type = w.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kChar || type == at::kByte, what,
              " must be float32, bfloat16, int8 or uint8 (packed int4), got ", type);
  TORCH_CHECK(w.is_contiguous() && w.dim() == dim, what, " must be contiguous with ", dim, " dimensions, got ",
              w.sizes());
  const bool int4 = type == at::kByte, narrow = int4 || type == at::kChar;
  TORCH_CHECK(!int4 || K % 2 == 0, what, ": int4 weights pack two inputs per byte, and ", K, " inputs is odd");
  TORCH_CHECK(w.size(-1) == stored_columns(type, K), what, " rows hold ", w.size(-1), int4 ?
              " bytes (two int4 inputs each)" : " inputs", " but the input has ", K, " columns");
  const bool scaled = scale.has_value() && scale->defined();
  TORCH_CHECK(scaled == narrow, what, narrow ? (int4 ? ": int4 weights need their scales" : ": int8 weights need "
              "their scales") : ": only int8 and int4 weights take scales");
  if (!scaled) return {type, w.data_ptr(), nullptr, 1};
  const std::string of_scale = std::string(what) + "'s scale";
  check_f32(*scale, of_scale.c_str(), dim);
  const int64_t groups = scale->size(-1);
  auto expect = w.sizes().vec();
  expect.back() = groups;
  TORCH_CHECK(groups > 0 && K % groups == 0, what, ": ", groups, " scale groups do not divide ", K, " inputs");
  TORCH_CHECK(!int4 || (K / groups) % 2 == 0, what, ": int4 groups must be an even number of inputs, got ",
              K / groups);
  check_shape(*scale, of_scale.c_str(), expect);
  return {type, w.data_ptr(), scale->data_ptr<float>(), groups};
}

namespace {

// Whether these int8 or int4 weights (rows of K inputs) take int8 activations now.
bool takes_int8_activations(const WeightArg& wa, int64_t K) {
  if (!int8_activations()) return false;
  const int64_t G = K / wa.groups;
  if (wa.type == at::kChar) return gemv::a8::block_size(G) > 0;
  return wa.type == at::kByte && gemv::a8::int4_takes(K, G);
}

// x quantized for int8 activations in this thread's buffer (reused: a decode step quantizes a few rows per
// matmul).
const gemv::a8::Act* quantized_here(const float* x, int64_t M, at::ScalarType type, int64_t K, int64_t G) {
  thread_local gemv::a8::Act own;
  gemv::a8::quantize_for(own, type, x, M, K, G);
  return &own;
}

// rows_range on the weight rows [n0, n1) of matrix `m` (an offset in matrices of N x K elements). Int8 / int4
// weights taking int8 activations read them from `act` where the caller quantized x once for all its
// threads (rows_matmul), else x is quantized here.
void rows_any(const float* x, int64_t M, const WeightArg& wa, int64_t m, int64_t N, int64_t K, float* y,
              int64_t ldy, int64_t n0, int64_t n1, const gemv::a8::Act* act = nullptr) {
  const float* scale = wa.scale ? wa.scale + m * N * wa.groups : nullptr;
  const int64_t G = K / wa.groups, off = m * N * K;  // in inputs (an int4 matrix starts at byte off / 2)
  if (act != nullptr || takes_int8_activations(wa, K)) {
    if (act == nullptr) act = quantized_here(x, M, wa.type, K, G);
    if (wa.type == at::kChar)
      gemv::a8::rows_range(*act, M, static_cast<const int8_t*>(wa.data) + off, scale, G, y, ldy, n0, n1);
    else
      gemv::a8::rows_range(*act, M, static_cast<const uint8_t*>(wa.data) + off / 2, scale, G, y, ldy, n0, n1);
    return;
  }
  switch (wa.type) {
    case at::kFloat:
      gemv::rows_range(x, M, gemv::Rows<float>{static_cast<const float*>(wa.data) + off, nullptr, K}, y, ldy,
                       K, n0, n1);
      break;
    case at::kBFloat16:
      gemv::rows_range(x, M, gemv::Rows<at::BFloat16>{static_cast<const at::BFloat16*>(wa.data) + off, nullptr,
                                                      K}, y, ldy, K, n0, n1);
      break;
    case at::kByte:
      gemv::rows_range(x, M, gemv::Rows<gemv::int4x2>{static_cast<const gemv::int4x2*>(wa.data) + off / 2, scale,
                                                      G}, y, ldy, K, n0, n1);
      break;
    default:
      gemv::rows_range(x, M, gemv::Rows<int8_t>{static_cast<const int8_t*>(wa.data) + off, scale, G}, y, ldy,
                       K, n0, n1);
  }
}

}  // namespace

at::Tensor rows_matmul(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale) {
  check_f32(x, "rows_matmul: x", 2);
  const int64_t M = x.size(0), K = x.size(1);
  const auto wa = weight_arg(w, scale, "rows_matmul: w", 2, K);
  const int64_t N = w.size(0);
  TORCH_CHECK(M > 0, "rows_matmul: x has no rows (an empty batch)");
  TORCH_CHECK(K > 0 && N > 0, "rows_matmul: empty weight ", w.sizes());
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Small weights stay on one thread: a parallel region costs more than reading them.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / K);
  gemv::a8::Act act;  // int8 activations: quantized once, read by every thread
  const bool a8 = takes_int8_activations(wa, K);
  if (a8) gemv::a8::quantize_for(act, wa.type, xp, M, K, K / wa.groups);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    rows_any(xp, M, wa, 0, N, K, yp, N, n0, n1, a8 ? &act : nullptr);
  });
  return y;
}

namespace {

template <int S>
double sum_streams(const float* p, int64_t n) {
  const int64_t part = n / S / gemv::kLanes * gemv::kLanes;  // whole vectors per stream
  gemv::vf acc[S] = {};
  for (int64_t i = 0; i < part; i += gemv::kLanes)
    for (int j = 0; j < S; ++j) acc[j] += gemv::load(p + j * part + i);
  double total = 0;
  for (int j = 0; j < S; ++j) total += gemv::hsum(acc[j]);
  for (int64_t i = S * part; i < n; ++i) total += p[i];
  return total;
}

}  // namespace

double read_streams(const at::Tensor& x, int64_t streams) {
  check_f32(x, "read_streams: x", 1);
  TORCH_CHECK(streams == 1 || streams == 2 || streams == 4 || streams == 8, "read_streams: streams must be 1, 2, 4 "
              "or 8, got ", streams);
  const float* p = x.data_ptr<float>();
  const int64_t n = x.numel(), threads = at::get_num_threads(), per = (n + threads - 1) / threads;
  std::vector<double> part(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t a = std::min(n, t * per), len = std::min(n, a + per) - a;
      part[t] = streams == 1 ? sum_streams<1>(p + a, len) : streams == 2 ? sum_streams<2>(p + a, len)
              : streams == 4 ? sum_streams<4>(p + a, len) : sum_streams<8>(p + a, len);
    }
  });
  double total = 0;
  for (double v : part) total += v;
  return total;
}

// The work is split by expert (each thread reads whole experts, once, for all their tokens); every
// (token, slot) output lands in its own row, and the weighted sum runs afterwards in slot order.
at::Tensor experts_rows(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                           const at::Tensor& idx, const at::Tensor& gate, const std::optional<at::Tensor>& s1,
                           const std::optional<at::Tensor>& s2) {
  check_f32(x, "experts_rows: x", 2);
  check_f32(gate, "experts_rows: gate", 2);
  check_i64(idx, "experts_rows: idx", 2);
  TORCH_CHECK(w1.dim() == 3 && w2.dim() == 3, "experts_rows: w1 and w2 must be [E, 2F, D] and [E, D, F], got ",
              w1.sizes(), " and ", w2.sizes());
  const int64_t N = x.size(0), D = x.size(1), E = w1.size(0), F2 = w1.size(1), F = F2 / 2, K = idx.size(1);
  TORCH_CHECK(N > 0 && K > 0, "experts_rows: no assignments (idx has shape ", idx.sizes(), ")");
  TORCH_CHECK(D > 0 && E > 0 && F > 0 && F2 % 2 == 0, "experts_rows: w1 must be [E, 2F, D], got ", w1.sizes());
  check_shape(w1, "experts_rows: w1", {E, F2, stored_columns(w1.scalar_type(), D)});
  check_shape(w2, "experts_rows: w2", {E, D, stored_columns(w2.scalar_type(), F)});
  check_shape(idx, "experts_rows: idx", {N, K});
  check_shape(gate, "experts_rows: gate", {N, K});
  const auto wa1 = weight_arg(w1, s1, "experts_rows: w1", 3, D);
  const auto wa2 = weight_arg(w2, s2, "experts_rows: w2", 3, F);
  const int64_t* ip = idx.data_ptr<int64_t>();
  // Assignments grouped by expert, in (token, slot) order within each expert.
  std::vector<std::vector<int64_t>> rows(E);
  for (int64_t a = 0; a < N * K; ++a) {
    TORCH_CHECK(ip[a] >= 0 && ip[a] < E, "experts_rows: expert id out of range: ", ip[a], " with ", E, " experts");
    rows[ip[a]].push_back(a);
  }
  std::vector<int64_t> used;
  for (int64_t e = 0; e < E; ++e)
    if (!rows[e].empty()) used.push_back(e);
  auto out = at::empty({N * K, D}, x.options());
  const float* xp = x.data_ptr<float>();
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
      rows_any(xin.data(), M, wa1, e, F2, D, h.data(), F2, 0, F2);
      for (int64_t i = 0; i < M; ++i)
        for (int64_t f = 0; f < F; ++f) {
          const float g = h[i * F2 + f], up = h[i * F2 + F + f];
          act[i * F + f] = g / (1.f + std::exp(-g)) * up;
        }
      rows_any(act.data(), M, wa2, e, D, F, y.data(), D, 0, D);
      for (int64_t i = 0; i < M; ++i) std::memcpy(op + as[i] * D, &y[i * D], D * sizeof(float));
    }
  });
  // Weighted sum over the slots, slot by slot (a loop: at one token a batched product's dispatch costs more).
  auto sum = at::zeros({N, D}, x.options());
  const float* gp = gate.data_ptr<float>();
  float* sp = sum.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const float g = gp[n * K + k], *o = op + (n * K + k) * D;
      float* s = sp + n * D;
      for (int64_t d = 0; d < D; ++d) s[d] += g * o[d];
    }
  return sum;
}

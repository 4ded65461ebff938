// Few-row matmuls against fp32, bf16, int8 or int4 weights: the GEMV-shaped work of decoding.
//
// A decode step multiplies 1-32 activation rows by every weight it touches, so its time is that of
// streaming the weights from memory, and narrower weights are read faster: bf16 halves the bytes, int8
// (symmetric, one fp32 scale per output row and group of `G` inputs) quarters them, and int4 (the same
// scales, two signed 4-bit weights per byte, a uint8 tensor [N, K / 2]) takes an eighth plus the scales.
// The weights are widened to fp32 in registers and every product is accumulated in fp32, per group, then
// scaled.
//
// The vector width comes from the build (NANOSEEK_VEC_BYTES: 32 for AVX2 and the portable build, 64 for
// AVX-512; nanoseek.infer.fast.build compiles one extension per instruction set). The code is written
// with GCC/clang vector extensions, so the portable build (no -m flags) compiles the same loops to SSE2
// on x86 and NEON on ARM.
#pragma once

// ATen only, not torch/extension.h (the whole C++ frontend): it halves the build. decode_kernels.cpp adds
// torch/python.h for the Python binding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#if defined(NANOSEEK_ISA_AVX2) || defined(NANOSEEK_ISA_AVX512)
#include <immintrin.h>
#endif

#ifndef NANOSEEK_VEC_BYTES
#define NANOSEEK_VEC_BYTES 32
#endif

// --- argument checks shared by every entry point (TORCH_CHECK raises a RuntimeError naming the argument)
inline void check_f32(const at::Tensor& t, const char* what, int64_t dim) {
  TORCH_CHECK(t.defined(), what, " is missing");
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, what, " must be an fp32 CPU tensor, got ",
              t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
  TORCH_CHECK(dim < 0 || t.dim() == dim, what, " must have ", dim, " dimensions, got shape ", t.sizes());
}

inline void check_shape(const at::Tensor& t, const char* what, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, what, " must have shape ", shape, ", got ", t.sizes());
}

inline void check_i64(const at::Tensor& t, const char* what, int64_t dim) {
  TORCH_CHECK(t.defined(), what, " is missing");
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.is_contiguous() && t.dim() == dim, what,
              " must be a contiguous int64 CPU tensor with ", dim, " dimensions, got ", t.scalar_type(), " ",
              t.sizes());
}

// A weight (or stacked weights) as the kernels read it: its element type, data, and for int8 / int4 the
// per-(row, group) scales.
struct WeightArg {
  at::ScalarType type;
  const void* data;
  const float* scale;
  int64_t groups;  // scale columns per weight row (1 when unscaled)
};

// The last dimension of a weight with rows of K inputs: K, or K / 2 bytes of packed int4 (uint8).
int64_t stored_columns(at::ScalarType type, int64_t K);

// Checks w (fp32, bf16, int8, or uint8 holding packed int4; contiguous, `dim` dims, rows of K inputs: K / 2
// bytes for int4) and its scale (required for int8 and int4 and only there: [..., rows, groups] fp32 with
// K % groups == 0, and for int4 even groups, so that each starts on a byte). `what` names w in the errors.
WeightArg weight_arg(const at::Tensor& w, const std::optional<at::Tensor>& scale, const char* what, int64_t dim,
                     int64_t K);

// x [M, K] fp32 @ w[N, K]^T -> [M, N] fp32; w fp32, bf16, or int8 [N, K] / packed int4 (uint8 [N, K / 2])
// with scale [N, K / G] fp32.
at::Tensor rows_matmul(const at::Tensor& x, const at::Tensor& w,
                          const std::optional<at::Tensor>& scale = std::nullopt);

// sum_k gate[n, k] * expert_{idx[n, k]}(x[n]) for stacked SwiGLU experts w1 [E, 2F, D], w2 [E, D, F]
// (fp32, bf16, or int8 / packed int4 with scales s1 [E, 2F, D / G1], s2 [E, D, F / G2]).
at::Tensor experts_rows(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                           const at::Tensor& idx, const at::Tensor& gate,
                           const std::optional<at::Tensor>& s1 = std::nullopt,
                           const std::optional<at::Tensor>& s2 = std::nullopt);

// The sum of x (fp32, contiguous), each thread's share read as `streams` equal parts at once: the read pattern
// of rows_matmul at one row. benchmarks/common.py times it over a buffer far above the caches as the memory
// read bandwidth a decode step can reach (a copy or torch's one-stream sum reaches less on some machines).
double read_streams(const at::Tensor& x, int64_t streams);

// The instruction set this extension was compiled for ("avx512", "avx2" or "portable").
const char* kernel_isa();

// How far ahead (bytes) the one- and two-row matmuls prefetch bf16 and int8 weights: 0 (no hints), 512,
// 1024 or 2048; 512 until set. The best distance depends on the machine's memory, not on the instruction
// set, so it is measured once per build and machine and set from Python (nanoseek.infer.fast.prefetch).
int64_t narrow_prefetch();
void set_narrow_prefetch(int64_t bytes);

// Whether int8 weights take int8 activations, quantized per block (gemv_int8act.h); off until set, from Python
// (nanoseek.infer.fast.kernels.int8_activations).
bool int8_activations();
void set_int8_activations(bool on);

// The loop that runs them on this CPU: "avx512-vnni", "avx2" (vpmaddubsw; also an AVX-512 CPU without VNNI)
// or "portable".
const char* int8_activation_kernel();

namespace gemv {

constexpr int kLanes = NANOSEEK_VEC_BYTES / 4;
typedef float vf __attribute__((vector_size(NANOSEEK_VEC_BYTES)));
typedef uint32_t vu32 __attribute__((vector_size(NANOSEEK_VEC_BYTES)));
typedef uint16_t vu16 __attribute__((vector_size(NANOSEEK_VEC_BYTES / 2)));
typedef int8_t vi8 __attribute__((vector_size(NANOSEEK_VEC_BYTES / 4)));

// Two signed 4-bit weights in one byte (two's complement nibbles): input 2j in the low nibble of byte j,
// input 2j + 1 in the high one. kLanes of them are kLanes / 8 little-endian 32-bit words, and lane i is
// nibble i % 8 of word i / 8: shifted to the top of its lane and shifted back arithmetically, it comes out
// sign-extended, in input order, with no shuffle of the activations.
struct int4x2 {
  uint8_t bits;
};
static_assert(sizeof(int4x2) == 1, "int4x2 is one byte");
static_assert(kLanes % 8 == 0, "a vector of int4 weights is whole 32-bit words");

// kLanes weights widened to fp32 (bf16 is the top half of an fp32: shift it up; int8 converts exactly).
inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
#if defined(NANOSEEK_ISA_AVX512)
// GCC lowers the generic int8 / uint16 widening below to one scalar convert per lane: spell it out.
inline vf load(const at::BFloat16* p) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (vf)_mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
inline vf load(const int8_t* p) {
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vf load(const int4x2* p) {  // 16 nibbles: two words, each broadcast to 8 lanes
  const __m512i word = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i up = _mm512_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
  const __m512i w = _mm512_permutexvar_epi32(word, _mm512_castsi128_si512(_mm_loadl_epi64(
                                                       reinterpret_cast<const __m128i*>(p))));
  return (vf)_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_sllv_epi32(w, up), 28));
}
#elif defined(NANOSEEK_ISA_AVX2)
inline vf load(const at::BFloat16* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (vf)_mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
inline vf load(const int8_t* p) {
  return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vf load(const int4x2* p) {  // 8 nibbles: one word broadcast to every lane
  int32_t word;
  std::memcpy(&word, p, sizeof(word));
  const __m256i up = _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0);
  return (vf)_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_sllv_epi32(_mm256_set1_epi32(word), up), 28));
}
#else
typedef int32_t vi32 __attribute__((vector_size(NANOSEEK_VEC_BYTES)));
inline vf load(const at::BFloat16* p) {
  vu16 h;
  std::memcpy(&h, p, sizeof(h));
  const vu32 u = __builtin_convertvector(h, vu32) << 16;
  vf v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}
inline vf load(const int8_t* p) {  // widened to int32 first: the int32 -> float convert is one vector op
  vi8 b;
  std::memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(__builtin_convertvector(b, vi32), vf);
}
inline vf load(const int4x2* p) {
  uint32_t words[kLanes / 8];
  std::memcpy(words, p, sizeof(words));
  vu32 w, up;
  for (int i = 0; i < kLanes; ++i) w[i] = words[i / 8], up[i] = 28 - 4 * (i % 8);
  return __builtin_convertvector((vi32)(w << up) >> 28, vf);
}
#endif
inline float scalar(float v) { return v; }
inline float scalar(int8_t v) { return static_cast<float>(v); }
inline float scalar(at::BFloat16 v) { return static_cast<float>(v); }

// Row n of a weight with K inputs, the vector at input k (k a multiple of kLanes from an even group
// start), the single input k: one element each, except int4, two to a byte.
template <typename W>
inline const W* row_of(const W* w, int64_t n, int64_t K) { return w + n * K; }
template <typename W>
inline vf load_at(const W* row, int64_t k) { return load(row + k); }
template <typename W>
inline float scalar_at(const W* row, int64_t k) { return scalar(row[k]); }
template <typename W>
inline int64_t row_bytes(int64_t K) { return int64_t(sizeof(W)) * K; }
inline const int4x2* row_of(const int4x2* w, int64_t n, int64_t K) { return w + n * (K / 2); }
inline vf load_at(const int4x2* row, int64_t k) { return load(row + k / 2); }
inline float scalar_at(const int4x2* row, int64_t k) {
  const int nibble = (row[k / 2].bits >> (4 * (k % 2))) & 0xF;
  return static_cast<float>((nibble ^ 8) - 8);
}
template <>
inline int64_t row_bytes<int4x2>(int64_t K) { return K / 2; }

// Tree sum of the lanes, lane i + lane i + kLanes / 2 first, halving in vector registers (a serial
// lane-by-lane sum costs as much as the dot product for short rows, and a sum through memory costs a
// 16-lane vector a store and 15 scalar adds, which short rows feel).
inline float hsum(vf v) {
  typedef float f4 __attribute__((vector_size(16)));
  typedef float f8 __attribute__((vector_size(32)));
  static_assert(sizeof(vf) == 32 || sizeof(vf) == 64, "vectors of 8 or 16 lanes");
  f8 h;
  std::memcpy(&h, &v, sizeof(h));
  if constexpr (sizeof(vf) == 64) {
    f8 hi;
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(h), sizeof(hi));
    h += hi;
  }
  f4 lo, hi;
  std::memcpy(&lo, &h, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&h) + sizeof(lo), sizeof(hi));
  const f4 s = lo + hi;
  return (s[0] + s[2]) + (s[1] + s[3]);
}

// y[r, n_j] = sum_g scale[n_j, g] * sum_{k in group g} x[r, k] * w[n_j, k] for R <= 8 activation rows and
// S weight rows n_0 .. n_{S-1} at once. Each weight row is read once, in order, and each widened vector of it
// serves all R activation rows; U independent accumulators per (weight row, activation row) hide the FMA
// latency when R * S is small. With Prefetch > 0 every stream is also prefetched that many bytes ahead (a hint
// per cache line).
template <typename W, bool Scaled, int R, int S, int U, int64_t Prefetch>
void rows_streams(const float* x, int64_t K, const W* w, const float* scale, int64_t G, float* y, int64_t ldy,
                  const int64_t* n) {
  const int64_t NG = K / G;
  const W* wr[S];
  vf total[S][R];
  float tail[S][R];
  for (int j = 0; j < S; ++j) {
    wr[j] = row_of(w, n[j], K);
    for (int r = 0; r < R; ++r) total[j][r] = vf{}, tail[j][r] = 0.f;
  }
  for (int64_t g = 0; g < NG; ++g) {
    const int64_t k1 = (g + 1) * G;
    int64_t k = g * G;
    vf acc[S][R][U];
    float rest[S][R];
    for (int j = 0; j < S; ++j)
      for (int r = 0; r < R; ++r) {
        rest[j][r] = 0.f;
        for (int u = 0; u < U; ++u) acc[j][r][u] = vf{};
      }
    for (; k + U * kLanes <= k1; k += U * kLanes) {
      if (Prefetch > 0)
        for (int j = 0; j < S; ++j) {
          const char* c = reinterpret_cast<const char*>(wr[j]) + row_bytes<W>(k) + Prefetch;
          for (int64_t b = 0; b < row_bytes<W>(U * kLanes); b += 64) __builtin_prefetch(c + b, 0, 0);
        }
      for (int u = 0; u < U; ++u) {
        if (S == 1) {  // each activation vector used once: straight from L1 into the FMA
          const vf wv = load_at(wr[0], k + u * kLanes);
          for (int r = 0; r < R; ++r) acc[0][r][u] += wv * load(x + r * K + k + u * kLanes);
          continue;
        }
        vf xv[R];  // loaded once for the S weight rows
        for (int r = 0; r < R; ++r) xv[r] = load(x + r * K + k + u * kLanes);
        for (int j = 0; j < S; ++j) {
          const vf wv = load_at(wr[j], k + u * kLanes);
          for (int r = 0; r < R; ++r) acc[j][r][u] += wv * xv[r];
        }
      }
    }
    for (; k + kLanes <= k1; k += kLanes)
      for (int j = 0; j < S; ++j) {
        const vf wv = load_at(wr[j], k);
        for (int r = 0; r < R; ++r) acc[j][r][0] += wv * load(x + r * K + k);
      }
    for (; k < k1; ++k)
      for (int j = 0; j < S; ++j)
        for (int r = 0; r < R; ++r) rest[j][r] += x[r * K + k] * scalar_at(wr[j], k);
    for (int j = 0; j < S; ++j) {
      const float s = Scaled ? scale[n[j] * NG + g] : 1.f;
      for (int r = 0; r < R; ++r) {
        vf sum = acc[j][r][0];
        for (int u = 1; u < U; ++u) sum += acc[j][r][u];
        if (Scaled) {
          total[j][r] += sum * s;
          tail[j][r] += rest[j][r] * s;
        } else {
          total[j][r] += sum;
          tail[j][r] += rest[j][r];
        }
      }
    }
  }
  for (int j = 0; j < S; ++j)
    for (int r = 0; r < R; ++r) y[r * ldy + n[j]] = hsum(total[j][r]) + tail[j][r];
}

// How a pass over the weight rows [n0, n1) is split, for these loops and gemv_int8act.h's. One core reading
// one weight row after another reaches about half the memory bandwidth it reaches reading several rows at
// once from different pages (its hardware prefetchers run only so far ahead of each stream): so at one or two
// activation rows the range is cut into S = 4 equal parts, and row i of every part is read together (n0 + i,
// n0 + i + q, ...; the < S rows left over one at a time). bf16 and int8 streams, which a core consumes in
// fewer bytes per vector, are also prefetched narrow_prefetch() bytes ahead (int4, bound by its unpacking,
// is not: the hints only cost it). More activation rows need more accumulators (S * R * U of the 16 vector
// registers of AVX2) and consume each weight vector more slowly: there fewer streams and a software prefetch
// further ahead do better (each choice measured on a 2-core EPYC, 1 and 2 threads, a [2048, 1536] weight per
// format).
template <int V>
using Int = std::integral_constant<int, V>;
template <int64_t V>
using I64 = std::integral_constant<int64_t, V>;
template <int R>
constexpr int kStreams = R <= 2 ? 4 : R <= 4 ? 2 : 1;

// pass(Int<S>{}, n) for each S rows n[0..S) read together, then pass(Int<1>{}, &m) for each row left over.
template <int S, typename Pass>
inline void in_streams(int64_t n0, int64_t n1, Pass&& pass) {
  const int64_t q = (n1 - n0) / S;
  int64_t n[S];
  for (int64_t i = 0; i < q; ++i) {
    for (int j = 0; j < S; ++j) n[j] = n0 + i + j * q;
    pass(Int<S>{}, n);
  }
  for (int64_t m = n0 + S * q; m < n1; ++m) pass(Int<1>{}, &m);
}

// f(I64<P>{}) with the prefetch distance P of a pass at R activation rows. The distance is a template
// argument (a run-time distance in the loop slowed even the fp32 rows, which take no hints): a narrow
// format's run-time setting at one or two rows picks one of four instantiations.
template <int R, bool Narrow, typename F>
inline void with_prefetch(F&& f) {
  if constexpr (R > 2) {
    f(I64<R <= 4 ? 1024 : 2048>{});
  } else if constexpr (!Narrow) {
    f(I64<0>{});
  } else {
    switch (narrow_prefetch()) {
      case 0: f(I64<0>{}); break;
      case 1024: f(I64<1024>{}); break;
      case 2048: f(I64<2048>{}); break;
      default: f(I64<512>{});
    }
  }
}

// f(Int<R>{}) for 1 <= R <= 8 activation rows.
template <typename F>
inline void with_rows(int64_t R, F&& f) {
  switch (R) {
    case 1: f(Int<1>{}); break;
    case 2: f(Int<2>{}); break;
    case 3: f(Int<3>{}); break;
    case 4: f(Int<4>{}); break;
    case 5: f(Int<5>{}); break;
    case 6: f(Int<6>{}); break;
    case 7: f(Int<7>{}); break;
    case 8: f(Int<8>{}); break;
    default: TORCH_CHECK(false, "rows_block: ", R, " rows (1 to 8 expected)");
  }
}

// block(m, R, c0, c1) for the M activation rows, at most 8 at once (rows m .. m + R), against the weight rows
// [n0, n1) of `row_bytes` each: with more than 8 rows the weight rows go in L2-sized chunks that every block
// of 8 rows uses before the next chunk is read, so the weight is streamed from memory once, not once per block.
template <typename Block>
inline void in_row_blocks(int64_t M, int64_t row_bytes, int64_t n0, int64_t n1, Block&& block) {
  if (M <= 8) {
    block(0, M, n0, n1);
    return;
  }
  const int64_t chunk = std::max<int64_t>(4, (int64_t(64) << 10) / row_bytes);  // ~64 KB
  for (int64_t c0 = n0; c0 < n1; c0 += chunk) {
    const int64_t c1 = std::min(n1, c0 + chunk);
    for (int64_t m = 0; m < M; m += 8) block(m, std::min<int64_t>(8, M - m), c0, c1);
  }
}

// R <= 8 rows of x against the weight rows [n0, n1), through rows_streams.
template <typename W, bool Scaled>
void rows_block_any(const float* x, int64_t R, const W* w, const float* scale, int64_t G, float* y, int64_t ldy,
                    int64_t K, int64_t n0, int64_t n1) {
  constexpr bool narrow = std::is_same_v<W, at::BFloat16> || std::is_same_v<W, int8_t>;
  with_rows(R, [&](auto rows) {
    constexpr int Rc = decltype(rows)::value;
    with_prefetch<Rc, narrow>([&](auto prefetch) {
      in_streams<kStreams<Rc>>(n0, n1, [&](auto streams, const int64_t* n) {
        rows_streams<W, Scaled, Rc, decltype(streams)::value, Rc == 1 ? 2 : 1, decltype(prefetch)::value>(
            x, K, w, scale, G, y, ldy, n);
      });
    });
  });
}

// A weight matrix [N, K] as the loops read it: its elements, and for int8 / int4 the per-(row, group) scales.
template <typename W>
struct Rows {
  const W* w;
  const float* scale;  // [N, K / G] or nullptr
  int64_t G;           // group size (K when unscaled)
};

// All M rows of x against weight rows [n0, n1); y has row stride ldy (in blocks of 8 rows: in_row_blocks).
template <typename W>
void rows_range(const float* x, int64_t M, const Rows<W>& wt, float* y, int64_t ldy, int64_t K, int64_t n0,
                int64_t n1) {
  in_row_blocks(M, row_bytes<W>(K), n0, n1, [&](int64_t m, int64_t R, int64_t c0, int64_t c1) {
    if (wt.scale != nullptr)
      rows_block_any<W, true>(x + m * K, R, wt.w, wt.scale, wt.G, y + m * ldy, ldy, K, c0, c1);
    else
      rows_block_any<W, false>(x + m * K, R, wt.w, nullptr, K, y + m * ldy, ldy, K, c0, c1);
  });
}

}  // namespace gemv

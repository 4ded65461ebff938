// Opt-in int8 activations for int8 and int4 weights: the few activation rows are quantized too, and each
// block of inputs becomes an exact integer dot product (the W8A8 scheme of llama.cpp's Q8_0 matmuls; int4
// weights meet int8 activations as its Q4_0 ones do).
//
// Why: the weight-only loops of gemv.h widen every weight to fp32 before its FMA (three vector instructions
// per 16 int8 weights, five per 16 int4 ones), and at one activation row a core does that more slowly than
// its memory delivers the bytes (bench_kernels' `_cached` rows measure each format's compute rate).
// Integer multiply-adds take 64 weights per instruction (AVX-512 VNNI's vpdpbusd) or 32 in a few (AVX2's
// vpmaddubsw + vpmaddwd).
//
// What changes: each activation row is quantized per block of B inputs (B divides the weight's scale group
// and is a multiple of 32), symmetrically, s = max|x| / 127 and q = round(x * 127 / max|x|) in [-127, 127], and
// y[r, n] = sum_b s_x[r, b] * s_w[n, group(b)] * sum_{k in b} q[r, k] * w[n, k], the inner sum exact in int32.
// The result differs from the weight-only one by the activations' rounding (bench_quant prints the logit
// error and greedy agreement of both against fp32). Every instruction set computes the same integers; only
// the fp32 sum of the blocks runs in a different lane order.
#pragma once

#include "gemv.h"

#include <cmath>
#include <type_traits>
#include <vector>

namespace gemv::a8 {

// The activation block for weights with scale groups of G inputs: 128, 64 or 32 inputs, the largest that
// divides G, or 0 (no block fits: the weight-only path runs).
inline int64_t block_size(int64_t G) {
  for (int64_t b : {128, 64, 32})
    if (G % b == 0) return b;
  return 0;
}

// M activation rows quantized per block: q (int8) and one scale per (row, block). (The loops derive what
// their instructions take from q as they load it: q + 128 for vpdpbusd, |q| for vpmaddubsw.)
struct Act {
  std::vector<int8_t> q;
  std::vector<float> scale;
  int64_t K = 0, B = 0;
  // For packed int4 weights (prepare_int4): per chunk of C inputs, q of its even inputs then of its odd ones
  // (the order the low and high nibbles of C / 2 weight bytes come out in), and per 32-bit lane of the
  // integer sums (inputs 8i .. 8i + 7 of the chunk) 8 * their sum of q and their block's scale.
  std::vector<int8_t> split;
  std::vector<int32_t> lane_offset;
  std::vector<float> lane_scale;
  int64_t C = 0;

  struct View {  // rows from m0 on
    const int8_t* q;
    const float* scale;
    int64_t K, B;
    const int8_t* split;
    const int32_t* lane_offset;
    const float* lane_scale;
    int64_t C;
  };
  View rows_from(int64_t m0) const {
    const int64_t lanes = C ? K / 8 : 0;
    return {q.data() + m0 * K, scale.data() + m0 * (K / B), K, B,
            C ? split.data() + m0 * K : nullptr, C ? lane_offset.data() + m0 * lanes : nullptr,
            C ? lane_scale.data() + m0 * lanes : nullptr, C};
  }

  // The int4 layout for chunks of C inputs (a multiple of 64 dividing K), after quantize.
  void prepare_int4(int64_t M, int64_t C_) {
    C = C_;
    split.resize(M * K), lane_offset.resize(M * K / 8), lane_scale.resize(M * K / 8);
    for (int64_t r = 0; r < M; ++r) {
      const int8_t* qr = q.data() + r * K;
      for (int64_t c = 0; c < K; c += C) {
        int8_t* out = split.data() + r * K + c;
        for (int64_t i = 0; i < C / 2; ++i) out[i] = qr[c + 2 * i], out[C / 2 + i] = qr[c + 2 * i + 1];
      }
      for (int64_t l = 0; l < K / 8; ++l) {
        int32_t sum = 0;
        for (int64_t i = 0; i < 8; ++i) sum += qr[8 * l + i];
        lane_offset[r * (K / 8) + l] = 8 * sum;
        lane_scale[r * (K / 8) + l] = scale[r * (K / B) + 8 * l / B];
      }
    }
  }

  void quantize(const float* x, int64_t M, int64_t K_, int64_t B_) {
    K = K_, B = B_;
    const int64_t NB = K / B;
    q.resize(M * K), scale.resize(M * NB);
    for (int64_t r = 0; r < M; ++r)
      for (int64_t b = 0; b < NB; ++b) scale[r * NB + b] = quantize_block(x + r * K + b * B, B, q.data() + r * K + b * B);
  }

  // One block of B (a multiple of 32) inputs: writes q, returns the scale max|x| / 127.
  static float quantize_block(const float* x, int64_t B, int8_t* q) {
    float amax = 0.f;
#if defined(NANOSEEK_ISA_AVX512)
    __m512 m = _mm512_setzero_ps();
    for (int64_t i = 0; i < B; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    amax = _mm512_reduce_max_ps(m);
#elif defined(NANOSEEK_ISA_AVX2)
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 m = _mm256_setzero_ps();
    for (int64_t i = 0; i < B; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#else
    for (int64_t i = 0; i < B; ++i) amax = std::max(amax, std::fabs(x[i]));
#endif
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    // Rounded to nearest, ties to even (the current rounding mode, as the vector converts), in [-127, 127].
#if defined(NANOSEEK_ISA_AVX512)
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (int64_t i = 0; i < B; i += 16) {
      const __m512i v = _mm512_min_epi32(hi, _mm512_max_epi32(lo, _mm512_cvtps_epi32(
                                                                      _mm512_mul_ps(_mm512_loadu_ps(x + i), vinv))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(v));
    }
#elif defined(NANOSEEK_ISA_AVX2)
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' per-lane interleave
    for (int64_t i = 0; i < B; i += 32) {
      __m256i v[4];
      for (int j = 0; j < 4; ++j)
        v[j] = _mm256_min_epi32(hi, _mm256_max_epi32(lo, _mm256_cvtps_epi32(
                                                             _mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), vinv))));
      const __m256i b8 = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3])), order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), b8);
    }
#else
    for (int64_t i = 0; i < B; ++i) {
      const int v = static_cast<int>(std::max(-127.f, std::min(127.f, std::nearbyint(x[i] * inv))));
      q[i] = static_cast<int8_t>(v);
    }
#endif
    return amax / 127.f;
  }
};

// The S weight rows' starts (rows of `stride` elements) and their zeroed accumulators, for one pass.
template <typename T, typename V, int S, int R>
inline void start_streams(const T* (&wr)[S], V (&total)[S][R], const T* w, const int64_t* n, int64_t stride) {
  for (int j = 0; j < S; ++j) {
    wr[j] = w + n[j] * stride;
    for (int r = 0; r < R; ++r) total[j][r] = V{};
  }
}

// y[r, n[j]] = the lane sum of total[j][r], for the S x R outputs of one pass.
#if defined(NANOSEEK_ISA_AVX512)
template <int S, int R>
inline void store_sums(const __m512 (&total)[S][R], float* y, int64_t ldy, const int64_t* n) {
  for (int j = 0; j < S; ++j)
    for (int r = 0; r < R; ++r) y[r * ldy + n[j]] = _mm512_reduce_add_ps(total[j][r]);
}
#endif
#if defined(NANOSEEK_ISA_AVX512) || defined(NANOSEEK_ISA_AVX2)
template <int S, int R>
inline void store_sums(const __m256 (&total)[S][R], float* y, int64_t ldy, const int64_t* n) {
  for (int j = 0; j < S; ++j)
    for (int r = 0; r < R; ++r) {
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(total[j][r]), _mm256_extractf128_ps(total[j][r], 1));
      const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
      y[r * ldy + n[j]] = _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
    }
}
#endif

// The three loops below share one shape, that of gemv::rows_streams: R <= 8 activation rows against S weight
// rows n[0..S) read together (S streams keep a core's prefetchers busy), each block's integer sums scaled
// into fp32 accumulators, one horizontal sum per output at the end.

#if defined(NANOSEEK_ISA_AVX512)
// 64 weights per vpdpbusd: sum (q + 128) * w, less 128 * sum w (itself one vpdpbusd of ones, shared by the R
// rows), is sum q * w.
template <int R, int S, int64_t Prefetch>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void streams_vnni(const Act::View& a, const int8_t* w,
                                                                             const float* scale, int64_t G, float* y,
                                                                             int64_t ldy, const int64_t* n) {
  const int64_t K = a.K, B = a.B, NB = K / B, NG = K / G;
  const int8_t* wr[S];
  __m512 total[S][R];
  start_streams(wr, total, w, n, K);
  const __m512i ones = _mm512_set1_epi8(1), bias = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t b = 0; b < NB; ++b) {
    __m512i acc[S][R], wsum[S];
    for (int j = 0; j < S; ++j) {
      wsum[j] = _mm512_setzero_si512();
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_si512();
    }
    for (int64_t k = b * B; k < (b + 1) * B; k += 64) {
      if (Prefetch > 0)
        for (int j = 0; j < S; ++j) __builtin_prefetch(wr[j] + k + Prefetch, 0, 0);
      __m512i xv[R];
      for (int r = 0; r < R; ++r) xv[r] = _mm512_xor_si512(_mm512_loadu_si512(a.q + r * K + k), bias);  // q + 128
      for (int j = 0; j < S; ++j) {
        const __m512i wv = _mm512_loadu_si512(wr[j] + k);
        wsum[j] = _mm512_dpbusd_epi32(wsum[j], ones, wv);
        for (int r = 0; r < R; ++r) acc[j][r] = _mm512_dpbusd_epi32(acc[j][r], xv[r], wv);
      }
    }
    for (int j = 0; j < S; ++j) {
      const __m512i offset = _mm512_slli_epi32(wsum[j], 7);
      const float sw = scale[n[j] * NG + b * B / G];
      for (int r = 0; r < R; ++r) {
        const __m512 s = _mm512_set1_ps(a.scale[r * NB + b] * sw);
        total[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[j][r], offset)), s, total[j][r]);
      }
    }
  }
  store_sums<S, R>(total, y, ldy, n);
}
#endif

#if defined(NANOSEEK_ISA_AVX512) || defined(NANOSEEK_ISA_AVX2)
// 32 weights per step: w with the sign of q (vpsignb), times |q| in signed 16-bit pairs (vpmaddubsw: at most
// 2 * 127 * 127, no saturation), summed to int32 (vpmaddwd with ones).
template <int R, int S, int64_t Prefetch>
void streams_avx2(const Act::View& a, const int8_t* w, const float* scale, int64_t G, float* y, int64_t ldy,
                  const int64_t* n) {
  const int64_t K = a.K, B = a.B, NB = K / B, NG = K / G;
  const int8_t* wr[S];
  __m256 total[S][R];
  start_streams(wr, total, w, n, K);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < NB; ++b) {
    __m256i acc[S][R];
    for (int j = 0; j < S; ++j)
      for (int r = 0; r < R; ++r) acc[j][r] = _mm256_setzero_si256();
    for (int64_t k = b * B; k < (b + 1) * B; k += 32) {
      if (Prefetch > 0 && k % 64 == 0)
        for (int j = 0; j < S; ++j) __builtin_prefetch(wr[j] + k + Prefetch, 0, 0);
      __m256i qv[R], mv[R];
      for (int r = 0; r < R; ++r) {
        qv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + r * K + k));
        mv[r] = _mm256_abs_epi8(qv[r]);
      }
      for (int j = 0; j < S; ++j) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[j] + k));
        for (int r = 0; r < R; ++r) {
          const __m256i pairs = _mm256_maddubs_epi16(mv[r], _mm256_sign_epi8(wv, qv[r]));
          acc[j][r] = _mm256_add_epi32(acc[j][r], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    for (int j = 0; j < S; ++j) {
      const float sw = scale[n[j] * NG + b * B / G];
      for (int r = 0; r < R; ++r) {
        const __m256 s = _mm256_set1_ps(a.scale[r * NB + b] * sw);
        total[j][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[j][r]), s, total[j][r]);
      }
    }
  }
  store_sums<S, R>(total, y, ldy, n);
}
#endif

// Plain C++ (the portable build: ARM, or x86 without AVX2): the same integers, a loop the compiler vectorizes.
template <int R, int S, int64_t Prefetch>
void streams_portable(const Act::View& a, const int8_t* w, const float* scale, int64_t G, float* y, int64_t ldy,
                      const int64_t* n) {
  const int64_t K = a.K, B = a.B, NB = K / B, NG = K / G;
  for (int j = 0; j < S; ++j) {
    const int8_t* row = w + n[j] * K;
    float total[R] = {};
    for (int64_t b = 0; b < NB; ++b) {
      const float sw = scale[n[j] * NG + b * B / G];
      for (int r = 0; r < R; ++r) {
        const int8_t* qb = a.q + r * K + b * B;
        int32_t dot = 0;
        for (int64_t i = 0; i < B; ++i) dot += int32_t(qb[i]) * int32_t(row[b * B + i]);
        total[r] += float(dot) * (a.scale[r * NB + b] * sw);
      }
    }
    for (int r = 0; r < R; ++r) y[r * ldy + n[j]] = total[r];
  }
}

// --- packed int4 weights. Each byte holds inputs 2j (low nibble) and 2j + 1 (high nibble), two's complement;
// xor 0x88 makes both nibbles w + 8 in [1, 15], unsigned: sum (w + 8) q = sum w q + 8 sum q, the last term
// precomputed per lane (Act::prepare_int4). The low nibbles of a chunk's bytes meet its even inputs, the
// high ones its odd inputs, so nothing is shuffled in the loop; each 32-bit lane of the sums covers 8
// consecutive inputs, and is scaled by its own weight group and activation block (groups of 8 inputs or more).

// Whether int4 weights with groups of G inputs and rows of K inputs can take chunks of C inputs.
inline bool int4_fits(int64_t K, int64_t G, int64_t C) {
  return K % C == 0 && G % 8 == 0 && (C % G == 0 || G % C == 0) && block_size(G) > 0;
}

#if defined(NANOSEEK_ISA_AVX512)
// Chunks of 128 inputs (64 bytes): two vpdpbusd per activation row.
template <int R, int S, int64_t Prefetch>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void streams_int4_vnni(const Act::View& a,
                                                                                  const uint8_t* w,
                                                                                  const float* scale, int64_t G,
                                                                                  float* y, int64_t ldy,
                                                                                  const int64_t* n) {
  constexpr int64_t C = 128;
  const int64_t K = a.K, NG = K / G;
  const uint8_t* wr[S];
  __m512 total[S][R];
  start_streams(wr, total, w, n, K / 2);
  const __m512i low = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x88));
  // lane i's weight group, counted from the chunk's first: 8 i / G (0 for groups of a chunk or more)
  alignas(64) int32_t group_of_lane[16];
  for (int i = 0; i < 16; ++i) group_of_lane[i] = G >= C ? 0 : static_cast<int32_t>(8 * i / G);
  const __m512i lane_group = _mm512_load_si512(group_of_lane);
  const __mmask16 scales = static_cast<__mmask16>((1u << (G >= C ? 1 : C / G)) - 1);
  for (int64_t c = 0; c < K; c += C) {
    if (Prefetch > 0)
      for (int j = 0; j < S; ++j) __builtin_prefetch(wr[j] + c / 2 + Prefetch, 0, 0);
    __m512 lane_sx[R];
    __m512i xe[R], xo[R], off[R];
    for (int r = 0; r < R; ++r) {
      xe[r] = _mm512_loadu_si512(a.split + r * K + c);
      xo[r] = _mm512_loadu_si512(a.split + r * K + c + C / 2);
      off[r] = _mm512_loadu_si512(a.lane_offset + (r * K + c) / 8);
      lane_sx[r] = _mm512_loadu_ps(a.lane_scale + (r * K + c) / 8);
    }
    for (int j = 0; j < S; ++j) {
      const __m512i p = _mm512_xor_si512(_mm512_loadu_si512(wr[j] + c / 2), flip);
      const __m512i lo = _mm512_and_si512(p, low), hi = _mm512_and_si512(_mm512_srli_epi16(p, 4), low);
      const float* sj = scale + n[j] * NG + c / G;
      const __m512 sw = G >= C ? _mm512_set1_ps(*sj) : _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(scales, sj));
      for (int r = 0; r < R; ++r) {
        __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xe[r]);
        acc = _mm512_sub_epi32(_mm512_dpbusd_epi32(acc, hi, xo[r]), off[r]);
        total[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(sw, lane_sx[r]), total[j][r]);
      }
    }
  }
  store_sums<S, R>(total, y, ldy, n);
}
#endif

#if defined(NANOSEEK_ISA_AVX512) || defined(NANOSEEK_ISA_AVX2)
// Chunks of 64 inputs (32 bytes): vpmaddubsw (at most 2 * 15 * 127 per 16-bit pair) and vpmaddwd per row.
template <int R, int S, int64_t Prefetch>
void streams_int4_avx2(const Act::View& a, const uint8_t* w, const float* scale, int64_t G, float* y, int64_t ldy,
                       const int64_t* n) {
  constexpr int64_t C = 64;
  const int64_t K = a.K, NG = K / G;
  const uint8_t* wr[S];
  __m256 total[S][R];
  start_streams(wr, total, w, n, K / 2);
  const __m256i low = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8(static_cast<char>(0x88));
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) int32_t group_of_lane[8], load_lane[8];
  const int64_t per_chunk = G >= C ? 1 : C / G;
  for (int i = 0; i < 8; ++i) {
    group_of_lane[i] = G >= C ? 0 : static_cast<int32_t>(8 * i / G);
    load_lane[i] = i < per_chunk ? -1 : 0;
  }
  const __m256i lane_group = _mm256_load_si256(reinterpret_cast<const __m256i*>(group_of_lane));
  const __m256i scales = _mm256_load_si256(reinterpret_cast<const __m256i*>(load_lane));
  for (int64_t c = 0; c < K; c += C) {
    if (Prefetch > 0 && c % 128 == 0)
      for (int j = 0; j < S; ++j) __builtin_prefetch(wr[j] + c / 2 + Prefetch, 0, 0);
    for (int j = 0; j < S; ++j) {
      const __m256i p = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[j] + c / 2)), flip);
      const __m256i lo = _mm256_and_si256(p, low), hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
      const float* sj = scale + n[j] * NG + c / G;
      const __m256 sw = G >= C ? _mm256_set1_ps(*sj) : _mm256_permutevar8x32_ps(_mm256_maskload_ps(sj, scales), lane_group);
      for (int r = 0; r < R; ++r) {
        const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.split + r * K + c));
        const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.split + r * K + c + C / 2));
        const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo));
        const __m256i off = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.lane_offset + (r * K + c) / 8));
        const __m256i acc = _mm256_sub_epi32(_mm256_madd_epi16(pairs, ones), off);
        const __m256 sx = _mm256_loadu_ps(a.lane_scale + (r * K + c) / 8);
        total[j][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_mul_ps(sw, sx), total[j][r]);
      }
    }
  }
  store_sums<S, R>(total, y, ldy, n);
}
#endif

// Plain C++: each block's integer sum of q times the sign-extended nibbles.
template <int R, int S, int64_t Prefetch>
void streams_int4_portable(const Act::View& a, const uint8_t* w, const float* scale, int64_t G, float* y,
                           int64_t ldy, const int64_t* n) {
  const int64_t K = a.K, B = a.B, NB = K / B, NG = K / G;
  for (int j = 0; j < S; ++j) {
    const uint8_t* row = w + n[j] * (K / 2);
    float total[R] = {};
    for (int64_t b = 0; b < NB; ++b) {
      const float sw = scale[n[j] * NG + b * B / G];
      for (int r = 0; r < R; ++r) {
        const int8_t* qb = a.q + r * K + b * B;
        int32_t dot = 0;
        for (int64_t i = 0; i < B; i += 2) {
          const uint8_t byte = row[(b * B + i) / 2];
          dot += int32_t(qb[i]) * (((byte & 0xF) ^ 8) - 8) + int32_t(qb[i + 1]) * ((((byte >> 4) & 0xF) ^ 8) - 8);
        }
        total[r] += float(dot) * (a.scale[r * NB + b] * sw);
      }
    }
    for (int r = 0; r < R; ++r) y[r * ldy + n[j]] = total[r];
  }
}

inline bool has_vnni() {
#if defined(NANOSEEK_ISA_AVX512)
  static const bool vnni = __builtin_cpu_supports("avx512vnni");
  return vnni;
#else
  return false;
#endif
}

// S weight rows n[0..S) through the loop this CPU and layout take: int8_t weights by the activation block
// (VNNI takes whole 64-byte vectors), packed int4 (uint8_t) by the chunk Act::prepare_int4 laid out.
template <typename W, int R, int S, int64_t Prefetch>
inline void streams(const Act::View& a, const W* w, const float* scale, int64_t G, float* y, int64_t ldy,
                    const int64_t* n) {
  if constexpr (std::is_same_v<W, int8_t>) {
#if defined(NANOSEEK_ISA_AVX512)
    if (has_vnni() && a.B % 64 == 0) return streams_vnni<R, S, Prefetch>(a, w, scale, G, y, ldy, n);
#endif
#if defined(NANOSEEK_ISA_AVX512) || defined(NANOSEEK_ISA_AVX2)
    streams_avx2<R, S, Prefetch>(a, w, scale, G, y, ldy, n);
#else
    streams_portable<R, S, Prefetch>(a, w, scale, G, y, ldy, n);
#endif
  } else {
#if defined(NANOSEEK_ISA_AVX512)
    if (a.C == 128) return streams_int4_vnni<R, S, Prefetch>(a, w, scale, G, y, ldy, n);
#endif
#if defined(NANOSEEK_ISA_AVX512) || defined(NANOSEEK_ISA_AVX2)
    if (a.C == 64) return streams_int4_avx2<R, S, Prefetch>(a, w, scale, G, y, ldy, n);
#endif
    streams_int4_portable<R, S, Prefetch>(a, w, scale, G, y, ldy, n);
  }
}

// The chunk the int4 loop of this CPU takes for rows of K inputs in groups of G: 128 (AVX-512 VNNI), 64
// (AVX2, or AVX-512 without VNNI), or 0 (the portable loop, in input order; also where no chunk fits).
inline int64_t int4_chunk(int64_t K, int64_t G) {
#if defined(NANOSEEK_ISA_AVX512)
  if (has_vnni() && int4_fits(K, G, 128)) return 128;
#endif
#if defined(NANOSEEK_ISA_AVX512) || defined(NANOSEEK_ISA_AVX2)
  if (int4_fits(K, G, 64)) return 64;
#endif
  (void)K, (void)G;
  return 0;
}

// Whether int4 weights of rows of K inputs in groups of G take int8 activations on this build.
inline bool int4_takes(int64_t K, int64_t G) {
#if defined(NANOSEEK_ISA_AVX512) || defined(NANOSEEK_ISA_AVX2)
  return int4_chunk(K, G) > 0;
#else
  return block_size(G) > 0;
#endif
}

// x's M rows quantized for weights of `type` (int8, or packed int4 as uint8) with groups of G inputs.
inline void quantize_for(Act& act, at::ScalarType type, const float* x, int64_t M, int64_t K, int64_t G) {
  act.quantize(x, M, K, block_size(G));
  act.C = 0;
  if (type == at::kByte) {
    const int64_t C = int4_chunk(K, G);
    if (C > 0) act.prepare_int4(M, C);
  }
}

// All M rows of `a` (quantize_for the same weights) against weight rows [n0, n1) of int8 or packed int4
// (uint8_t) weights with scales [N, K / G], split as gemv.h's loops split theirs (in_row_blocks, in_streams;
// int4 prefetched too: with integer sums it is no longer bound by unpacking).
template <typename W>
void rows_range(const Act& act, int64_t M, const W* w, const float* scale, int64_t G, float* y, int64_t ldy,
                int64_t n0, int64_t n1) {
  const int64_t row_bytes = std::is_same_v<W, int8_t> ? act.K : act.K / 2;
  in_row_blocks(M, row_bytes, n0, n1, [&](int64_t m, int64_t R, int64_t c0, int64_t c1) {
    const Act::View a = act.rows_from(m);
    float* yr = y + m * ldy;
    with_rows(R, [&](auto rows) {
      constexpr int Rc = decltype(rows)::value;
      with_prefetch<Rc, true>([&](auto prefetch) {
        in_streams<kStreams<Rc>>(c0, c1, [&](auto streams_, const int64_t* n) {
          streams<W, Rc, decltype(streams_)::value, decltype(prefetch)::value>(a, w, scale, G, yr, ldy, n);
        });
      });
    });
  });
}

}  // namespace gemv::a8

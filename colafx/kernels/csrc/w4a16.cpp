// W4A16 linear for few tokens (decode, short prompts) on the CPU (colafx/kernels/qmatmul.py):
// y[m, n] = sum_k x[m, k] · (nibble[n, k] - c) · scale[n, k / group_len] (+ bias[n]), accumulated in
// fp32, for x in fp32 / bf16 / fp16 and a packed int4 weight (byte i of a row holds columns 2i, low
// nibble, and 2i + 1); a group's centre c is 8 + its zero point (8 for symmetric weights, a
// compile-time constant on their path). The weight is read once, as int4, and dequantized in
// registers. bf16 x on AVX512-BF16 CPUs goes straight into bf16 dot products (namespace bf16dot);
// otherwise x (few rows) is widened to fp32 once, its columns reordered so that the low and high
// nibbles of a run of bytes meet contiguous x, for fp32 FMAs.
#include "nibbles.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
// The bf16 dot-product kernel needs a compiler that knows AVX512-BF16 (GCC 10, clang 9); older ones
// build the rest.
#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10)
#define COLAFX_BF16_DOT 1
#else
#define COLAFX_BF16_DOT 0
#endif

namespace {

// V: W fp32 lanes. unpack(): W weight bytes -> the dequantized low and high nibbles.
#if defined(__AVX512F__)
constexpr int W = 16, MB = 8;  // MB: tokens per register block (MB accumulators + 4 working registers)
// rows of the weight per pass over a block of T tokens (R·T accumulators, 2R unpacked weights, 2 x)
template <int T>
constexpr int rows_per_pass() { return T >= MB ? 2 : 4; }
using V = __m512;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vset(float s) { return _mm512_set1_ps(s); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(V a) { return _mm512_reduce_add_ps(a); }
// the 16 dequantized values (i - c)·s, looked up by vpermps (it reads the low 4 bits of each index);
// c = 8 without zero points (Z false), else the group's centre
using Tab = __m512;
template <bool Z>
inline Tab table(float s, float c) {
  if constexpr (Z) {
    const __m512 i = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_mul_ps(_mm512_sub_ps(i, _mm512_set1_ps(c)), _mm512_set1_ps(s));
  }
  return _mm512_mul_ps(_mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_ps(s));
}
template <bool Z>
inline void unpack(const uint8_t* p, Tab tab, V& lo, V& hi) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_permutexvar_ps(b, tab);
  hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tab);
}
#elif defined(__AVX2__)
constexpr int W = 8, MB = 8;
// rows per pass over T tokens: R·T accumulators + 2R unpacked + 2 x within 16 registers. One row
// and 8 tokens: each unpacked weight (2 FP ops per 8) serves 8 tokens, where 2 rows x 4 tokens gave 4
template <int T>
constexpr int rows_per_pass() { return T >= 5 ? 1 : T >= 3 ? 2 : T == 2 ? 3 : 4; }
using V = __m256;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vset(float s) { return _mm256_set1_ps(s); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(V a) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
}
struct Tab {
  __m256 s;
  __m256i c;  // scale, centre (8 without zero points)
};
template <bool Z>
inline Tab table(float s, float c) { return {_mm256_set1_ps(s), _mm256_set1_epi32(Z ? static_cast<int32_t>(c) : 8)}; }
template <bool Z>
inline void unpack(const uint8_t* p, const Tab& t, V& lo, V& hi) { colafx::nibbles8(p, t.c, t.s, lo, hi); }
// one token: nibble - centre without the scale, which multiplies the group's partial sum once (two
// fewer multiplies per 16 weights, on the FP ports that bound this loop; the AVX-512 table lookup
// applies the scale for free)
#define COLAFX_W4A16_FOLD 1
template <bool Z>
inline void unpack_codes(const uint8_t* p, const Tab& t, V& lo, V& hi) { colafx::codes8(p, t.c, lo, hi); }
#else
constexpr int W = 1, MB = 4;
template <int T>
constexpr int rows_per_pass() { return T >= MB ? 2 : 4; }
using V = float;
inline V vzero() { return 0.f; }
inline V vset(float s) { return s; }
inline V vload(const float* p) { return *p; }
inline V vfma(V a, V b, V c) { return a * b + c; }
inline float vsum(V a) { return a; }
struct Tab {
  float s;
  int32_t c;
};
template <bool Z>
inline Tab table(float s, float c) { return {s, Z ? static_cast<int32_t>(c) : 8}; }
template <bool Z>
inline void unpack(const uint8_t* p, const Tab& t, V& lo, V& hi) { colafx::nibbles1(*p, t.c, t.s, lo, hi); }
#endif
constexpr int64_t CHUNK = 2 * W;  // columns per unpack: W bytes

constexpr int64_t KB = 512;   // columns per block: a token block of x (MB·KB fp32) stays in L1
constexpr int64_t ROWS = 32;  // weight rows per tile: read from memory once for all token blocks

// acc[t, n] += the partial sums over columns [k0, k1) for rows [n, n + R) and T tokens of xr (fp32
// [T, K], reordered: in every CHUNK of columns the even ones first, then the odd ones). R rows at
// once: R·T independent accumulators hide the FMA latency and share the loads of x.
template <int T, int R, bool Z>
void rows(const float* xr, const uint8_t* w, const float* scales, const float* centres, float* acc, int64_t n, int64_t k0, int64_t k1,
          int64_t k, int64_t groups, int64_t n_total) {
  const int64_t group_len = k / groups;
  V a[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) a[r][t] = vzero();
  for (int64_t col = k0, g = k0 / group_len; col < k1; ++g) {
    const int64_t end = std::min(k1, (g + 1) * group_len);
#ifdef COLAFX_W4A16_FOLD
    if constexpr (T == 1) {  // sum x · (nibble - c) over the group, then one multiply by its scale
      Tab tab[R];
      V part[R];
      for (int r = 0; r < R; ++r) {
        tab[r] = table<Z>(1.f, Z ? centres[(n + r) * groups + g] : 0.f);
        part[r] = vzero();
      }
      for (; col < end; col += CHUNK) {
        const V xe = vload(xr + col), xo = vload(xr + col + W);
        for (int r = 0; r < R; ++r) {
          V lo, hi;
          unpack_codes<Z>(w + (n + r) * (k / 2) + col / 2, tab[r], lo, hi);
          part[r] = vfma(xo, hi, vfma(xe, lo, part[r]));
        }
      }
      for (int r = 0; r < R; ++r) a[r][0] = vfma(part[r], vset(scales[(n + r) * groups + g]), a[r][0]);
      continue;
    }
#endif
    Tab tab[R];
    for (int r = 0; r < R; ++r) tab[r] = table<Z>(scales[(n + r) * groups + g], Z ? centres[(n + r) * groups + g] : 0.f);
    for (; col < end; col += CHUNK) {
      V lo[R], hi[R];
      for (int r = 0; r < R; ++r) unpack<Z>(w + (n + r) * (k / 2) + col / 2, tab[r], lo[r], hi[r]);
      for (int t = 0; t < T; ++t) {
        const V xe = vload(xr + t * k + col), xo = vload(xr + t * k + col + W);
        for (int r = 0; r < R; ++r) a[r][t] = vfma(xo, hi[r], vfma(xe, lo[r], a[r][t]));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[t * n_total + n + r] += vsum(a[r][t]);
}

template <int T, bool Z>
void block(const float* xr, const uint8_t* w, const float* scales, const float* centres, float* acc, int64_t n0, int64_t n1, int64_t k0,
           int64_t k1, int64_t k, int64_t groups, int64_t n_total) {
  constexpr int R = rows_per_pass<T>();
  int64_t n = n0;
  for (; n + R <= n1; n += R) rows<T, R, Z>(xr, w, scales, centres, acc, n, k0, k1, k, groups, n_total);
  for (; n < n1; ++n) rows<T, 1, Z>(xr, w, scales, centres, acc, n, k0, k1, k, groups, n_total);
}

template <int T, bool Z>
void tokens(const float* xr, const uint8_t* w, const float* scales, const float* centres, float* acc, int64_t n0, int64_t n1, int64_t k0,
            int64_t k1, int64_t k, int64_t groups, int64_t n_total, int64_t t) {
  if constexpr (T > 1) {
    if (t < T) return tokens<T - 1, Z>(xr, w, scales, centres, acc, n0, n1, k0, k1, k, groups, n_total, t);
  }
  block<T, Z>(xr, w, scales, centres, acc, n0, n1, k0, k1, k, groups, n_total);
}

// The loops both kernels share: tiles of ROWS weight rows over the threads; in each tile, blocks of
// kb columns and of tb tokens, each handed to sums(t0, tokens, n0, n1, k0, k1, centres), which adds
// into the fp32 acc [M, N]; then out = acc (+ bias) in out's dtype, rounded once. With zero points
// (int8 [N, G]), centres holds the tile's 8 + zero as floats ([n1 - n0, G], converted once per
// tile, not per group and row in the inner loop); else it is null, and the kernels take their
// symmetric (compile-time centre 8) form: sums dispatch on it once per call of theirs.
template <typename O, typename Sums>
void tiled(const float* bias, const int8_t* zeros, int64_t groups, float* acc, O* out, int64_t m, int64_t n, int64_t k,
           int64_t kb, int64_t tb, const Sums& sums) {
  at::parallel_for(0, n, ROWS, [&](int64_t begin, int64_t end) {
    std::vector<float> tile_centres(zeros ? ROWS * groups : 0);
    for (int64_t n0 = begin; n0 < end; n0 += ROWS) {
      const int64_t n1 = std::min(end, n0 + ROWS);
      const float* centres = nullptr;
      if (zeros) {
        for (int64_t i = 0; i < (n1 - n0) * groups; ++i) tile_centres[i] = 8.f + static_cast<float>(zeros[n0 * groups + i]);
        centres = tile_centres.data();
      }
      for (int64_t t = 0; t < m; ++t) std::fill(acc + t * n + n0, acc + t * n + n1, 0.f);
      for (int64_t k0 = 0; k0 < k; k0 += kb)
        for (int64_t t0 = 0; t0 < m; t0 += tb)
          sums(t0, std::min(tb, m - t0), n0, n1, k0, std::min(k, k0 + kb), centres);
      for (int64_t t = 0; t < m; ++t)
        for (int64_t j = n0; j < n1; ++j) out[t * n + j] = static_cast<O>(bias ? acc[t * n + j] + bias[j] : acc[t * n + j]);
    }
  });
}

// out [M, N] (x's dtype) for xr (fp32 [M, K], reordered), fp32 FMAs.
template <typename O>
void linear(const float* xr, const uint8_t* w, const float* scales, const int8_t* zeros, const float* bias, float* acc, O* out, int64_t m,
            int64_t n, int64_t k, int64_t groups) {
  tiled(bias, zeros, groups, acc, out, m, n, k, KB, MB,
        [&](int64_t t0, int64_t t, int64_t n0, int64_t n1, int64_t k0, int64_t k1, const float* centres) {
          // rows counted from the tile's first, as its centres are
          auto run = centres ? tokens<MB, true> : tokens<MB, false>;
          run(xr + t0 * k, w + n0 * (k / 2), scales + n0 * groups, centres, acc + t0 * n + n0, 0, n1 - n0, k0, k1, k, groups,
              n, t);
        });
}

#if COLAFX_BF16_DOT
// bf16 x on CPUs with AVX512-BF16, whatever the build's vector width (a function-level target, used
// after a run-time check): each 32-bit lane pairs columns 2c and 2c + 1, as x's bf16 pairs and the
// weight's bytes do, so vdpbf16ps takes x as stored and the weight as bf16((nibble - c)·s) pairs
// (the values the many-token path's dequantized bf16 weight holds); 2 MACs per lane and instruction.
#define COLAFX_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))
namespace bf16dot {

template <bool Z>
COLAFX_BF16 inline __m512i table(float s, float c) {  // bf16 (i - c)·s in the low 16 of the 32 words (c = 8: !Z)
  const __m512 i = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 v = Z ? _mm512_mul_ps(_mm512_sub_ps(i, _mm512_set1_ps(c)), _mm512_set1_ps(s))
                     : _mm512_mul_ps(_mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_ps(s));
  return _mm512_castsi256_si512(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

COLAFX_BF16 inline __m512bh pairs(const uint8_t* p, __m512i tab) {  // 16 bytes -> 32 bf16, lo then hi nibble
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i idx = _mm512_and_si512(_mm512_or_si512(b, _mm512_slli_epi32(b, 12)), _mm512_set1_epi32(0x000F000F));
  return reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(idx, tab));
}

template <int T, int R, bool Z>
COLAFX_BF16 void rows(const uint16_t* x, const uint8_t* w, const float* scales, const float* centres, float* acc, int64_t n, int64_t k0,
                      int64_t k1, int64_t k, int64_t groups, int64_t n_total) {
  const int64_t group_len = k / groups;
  __m512 a[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) a[r][t] = _mm512_setzero_ps();
  for (int64_t col = k0, g = k0 / group_len; col < k1; ++g) {
    const int64_t end = std::min(k1, (g + 1) * group_len);
    __m512i tab[R];
    for (int r = 0; r < R; ++r) tab[r] = table<Z>(scales[(n + r) * groups + g], Z ? centres[(n + r) * groups + g] : 0.f);
    for (; col < end; col += 32) {
      __m512bh wv[R];
      for (int r = 0; r < R; ++r) wv[r] = pairs(w + (n + r) * (k / 2) + col / 2, tab[r]);
      for (int t = 0; t < T; ++t) {
        const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + t * k + col));
        for (int r = 0; r < R; ++r) a[r][t] = _mm512_dpbf16_ps(a[r][t], xv, wv[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[t * n_total + n + r] += _mm512_reduce_add_ps(a[r][t]);
}

template <int T, bool Z>
COLAFX_BF16 void block(const uint16_t* x, const uint8_t* w, const float* scales, const float* centres, float* acc, int64_t n0, int64_t n1,
                       int64_t k0, int64_t k1, int64_t k, int64_t groups, int64_t n_total) {
  constexpr int R = T >= 8 ? 2 : 4;
  int64_t n = n0;
  for (; n + R <= n1; n += R) rows<T, R, Z>(x, w, scales, centres, acc, n, k0, k1, k, groups, n_total);
  for (; n < n1; ++n) rows<T, 1, Z>(x, w, scales, centres, acc, n, k0, k1, k, groups, n_total);
}

template <int T, bool Z>
COLAFX_BF16 void tokens(const uint16_t* x, const uint8_t* w, const float* scales, const float* centres, float* acc, int64_t n0, int64_t n1,
                        int64_t k0, int64_t k1, int64_t k, int64_t groups, int64_t n_total, int64_t t) {
  if constexpr (T > 1) {
    if (t < T) return tokens<T - 1, Z>(x, w, scales, centres, acc, n0, n1, k0, k1, k, groups, n_total, t);
  }
  block<T, Z>(x, w, scales, centres, acc, n0, n1, k0, k1, k, groups, n_total);
}

void linear(const uint16_t* x, const uint8_t* w, const float* scales, const int8_t* zeros, const float* bias, float* acc,
            at::BFloat16* out, int64_t m, int64_t n, int64_t k, int64_t groups) {
  constexpr int TB = 8;
  // bf16 x: twice the columns of the fp32 kernel in the same bytes of L1
  tiled(bias, zeros, groups, acc, out, m, n, k, 2 * KB, TB,
        [&](int64_t t0, int64_t t, int64_t n0, int64_t n1, int64_t k0, int64_t k1, const float* centres) {
          auto run = centres ? tokens<TB, true> : tokens<TB, false>;
          run(x + t0 * k, w + n0 * (k / 2), scales + n0 * groups, centres, acc + t0 * n + n0, 0, n1 - n0, k0, k1, k, groups,
              n, t);
        });
}

}  // namespace bf16dot

bool has_bf16_dot() {
  static const bool has = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return has;
}
#else
bool has_bf16_dot() { return false; }
#endif

template <typename S>
void reorder_x(const at::Tensor& x, float* xr) {
  const int64_t k = x.size(-1), m = x.numel() / k;
  const S* src = x.data_ptr<S>();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t col = 0; col < k; col += CHUNK)
      for (int64_t j = 0; j < W; ++j) {
        xr[i * k + col + j] = static_cast<float>(src[i * k + col + 2 * j]);
        xr[i * k + col + W + j] = static_cast<float>(src[i * k + col + 2 * j + 1]);
      }
}

}  // namespace

at::Tensor w4a16_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, bool bf16_dot) {
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous(), "x must be [..., K] contiguous");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be uint8 [N, K / 2] contiguous");
  const int64_t n = packed.size(0), k = packed.size(1) * 2;
  TORCH_CHECK(x.size(-1) == k, "x has ", x.size(-1), " features, the weight ", k);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.scalar_type() == at::kFloat && scales.is_contiguous(),
              "scales must be fp32 [N, G] contiguous");
  const int64_t groups = scales.size(1);
  TORCH_CHECK(k > 0 && groups > 0 && k % groups == 0 && (k / groups) % 32 == 0, "groups must split K into multiples of 32");
  TORCH_CHECK(!zeros || (zeros->scalar_type() == at::kChar && zeros->is_contiguous() && zeros->sizes() == scales.sizes()),
              "zeros must be int8 [N, G] contiguous, as scales");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n),
              "bias must be fp32 [", n, "] contiguous");
  const int64_t m = x.numel() / k;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  auto out = at::empty(shape, x.options());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const int8_t* zp = zeros ? zeros->data_ptr<int8_t>() : nullptr;
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
#if COLAFX_BF16_DOT
  if (x.scalar_type() == at::kBFloat16 && bf16_dot && has_bf16_dot()) {
    auto acc = at::empty({m, n}, x.options().dtype(at::kFloat));
    bf16dot::linear(static_cast<const uint16_t*>(x.data_ptr()), wp, sp, zp, bp, acc.data_ptr<float>(),
                    out.data_ptr<at::BFloat16>(), m, n, k, groups);
    return out;
  }
#endif
  auto xr = at::empty({m, k}, x.options().dtype(at::kFloat));  // x widened to fp32 and reordered
  float* xrp = xr.data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kFloat: reorder_x<float>(x, xrp); break;
    case at::kBFloat16: reorder_x<at::BFloat16>(x, xrp); break;
    case at::kHalf: reorder_x<at::Half>(x, xrp); break;
    default: TORCH_CHECK(false, "x must be fp32, bf16 or fp16, got ", x.scalar_type());
  }
  auto acc = x.scalar_type() == at::kFloat ? out : at::empty({m, n}, x.options().dtype(at::kFloat));
  float* ap = acc.data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kFloat: linear(xrp, wp, sp, zp, bp, ap, out.data_ptr<float>(), m, n, k, groups); break;
    case at::kBFloat16: linear(xrp, wp, sp, zp, bp, ap, out.data_ptr<at::BFloat16>(), m, n, k, groups); break;
    default: linear(xrp, wp, sp, zp, bp, ap, out.data_ptr<at::Half>(), m, n, k, groups); break;
  }
  return out;
}

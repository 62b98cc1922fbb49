// QuZO's in-place integer perturbation and update on the CPU, one pass over the weight
// (colafx/kernels/zo.py: _perturb_rows / _update_rows do the same in ATen calls, bit for bit).
//
// Element e of the rows: u = table[normal_bits[e]] (N(0, 1)'s 2^16 quantiles), U = uniform_bits[e]
// * 2^-16, s = the element's scale (per row and group), q its integer value, all in fp32:
//   perturb: v = u·a / s;  d = clamp(floor(v + U), ±head) · sign;  q' = clamp(d + q, low, high)
//   update:  v = u·a / s (+ q·wd);  q' = clamp(-floor(v·lr + U) + q, low, high)
// with the operations and roundings of the ATen path (no FMA: built with -ffp-contract=off).
#include "ops.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

struct Step {
  const float* table;
  float a, lr, wd, sign, head, low, high;
  bool update;

  float operator()(float q, uint16_t nb, uint16_t ub, float s) const {
    const float noise = static_cast<float>(ub) * 0x1p-16f;
    float v = (table[nb] * a) / s;
    if (update) {
      if (wd != 0.f) v = v + q * wd;
      const float delta = std::floor(v * lr + noise);
      return std::min(std::max(-delta + q, low), high);
    }
    const float d = std::min(std::max(std::floor(v + noise), -head), head) * sign;
    return std::min(std::max(d + q, low), high);
  }
};

// Columns [0, n) of one row group in place: int8 values q, 16-bit noise, one scale.
void step_span(const Step& st, int8_t* q, const uint16_t* nb, const uint16_t* ub, float s, int64_t n) {
  int64_t c = 0;
#if defined(__AVX512F__)
  const __m512 va = _mm512_set1_ps(st.a), vs = _mm512_set1_ps(s), vlr = _mm512_set1_ps(st.lr),
               vwd = _mm512_set1_ps(st.wd), vsign = _mm512_set1_ps(st.sign), vhead = _mm512_set1_ps(st.head),
               vneg_head = _mm512_set1_ps(-st.head), vlow = _mm512_set1_ps(st.low), vhigh = _mm512_set1_ps(st.high),
               unit = _mm512_set1_ps(0x1p-16f);
  const __m512i sign_bit = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
  for (; c + 16 <= n; c += 16) {
    const __m512i ni = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(nb + c)));
    const __m512 noise = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ub + c)))), unit);
    const __m512 qf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c))));
    __m512 v = _mm512_div_ps(_mm512_mul_ps(_mm512_i32gather_ps(ni, st.table, 4), va), vs);
    __m512 out;
    if (st.update) {
      if (st.wd != 0.f) v = _mm512_add_ps(v, _mm512_mul_ps(qf, vwd));
      const __m512 delta = _mm512_roundscale_ps(_mm512_add_ps(_mm512_mul_ps(v, vlr), noise),
                                                _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      out = _mm512_add_ps(_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(delta), sign_bit)), qf);
    } else {
      __m512 d = _mm512_roundscale_ps(_mm512_add_ps(v, noise), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      d = _mm512_mul_ps(_mm512_min_ps(_mm512_max_ps(d, vneg_head), vhead), vsign);
      out = _mm512_add_ps(d, qf);
    }
    out = _mm512_min_ps(_mm512_max_ps(out, vlow), vhigh);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + c), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(out)));
  }
#elif defined(__AVX2__)
  const __m256 va = _mm256_set1_ps(st.a), vs = _mm256_set1_ps(s), vlr = _mm256_set1_ps(st.lr),
               vwd = _mm256_set1_ps(st.wd), vsign = _mm256_set1_ps(st.sign), vhead = _mm256_set1_ps(st.head),
               vneg_head = _mm256_set1_ps(-st.head), vlow = _mm256_set1_ps(st.low), vhigh = _mm256_set1_ps(st.high),
               unit = _mm256_set1_ps(0x1p-16f), sign_bit = _mm256_set1_ps(-0.0f);
  for (; c + 8 <= n; c += 8) {
    const __m256i ni = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(nb + c)));
    const __m256 noise = _mm256_mul_ps(
        _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ub + c)))), unit);
    const __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + c))));
    __m256 v = _mm256_div_ps(_mm256_mul_ps(_mm256_i32gather_ps(st.table, ni, 4), va), vs);
    __m256 out;
    if (st.update) {
      if (st.wd != 0.f) v = _mm256_add_ps(v, _mm256_mul_ps(qf, vwd));
      const __m256 delta = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(v, vlr), noise));
      out = _mm256_add_ps(_mm256_xor_ps(delta, sign_bit), qf);
    } else {
      __m256 d = _mm256_floor_ps(_mm256_add_ps(v, noise));
      d = _mm256_mul_ps(_mm256_min_ps(_mm256_max_ps(d, vneg_head), vhead), vsign);
      out = _mm256_add_ps(d, qf);
    }
    out = _mm256_min_ps(_mm256_max_ps(out, vlow), vhigh);
    const __m256i oi = _mm256_cvttps_epi32(out);
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(oi), _mm256_extracti128_si256(oi, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + c), _mm_packs_epi16(w, w));
  }
#endif
  for (; c < n; ++c) q[c] = static_cast<int8_t>(st(static_cast<float>(q[c]), nb[c], ub[c], s));
}

}  // namespace

void zo_int_rows(at::Tensor q, const at::Tensor& scales, const at::Tensor& normal_bits,
                 const at::Tensor& uniform_bits, const at::Tensor& table, int64_t bits, bool update, double a,
                 double lr, double weight_decay, int64_t sign, int64_t head, int64_t low, int64_t high) {
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == (bits == 8 ? at::kChar : at::kByte),
              "q must be contiguous ", bits == 8 ? "int8 [r, K]" : "uint8 [r, K / 2]");
  const int64_t r = q.size(0), k = q.size(1) * (bits == 4 ? 2 : 1);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == r && scales.scalar_type() == at::kFloat && scales.is_contiguous(),
              "scales must be fp32 [r, G] contiguous");
  const int64_t groups = scales.size(1);
  TORCH_CHECK(groups > 0 && k % groups == 0, "the group count must divide K");
  TORCH_CHECK(normal_bits.numel() == r * k && uniform_bits.numel() == r * k && normal_bits.is_contiguous() &&
                  uniform_bits.is_contiguous() && normal_bits.element_size() == 2 && uniform_bits.element_size() == 2,
              "noise bits must be 16-bit [r * K] contiguous");
  TORCH_CHECK(table.numel() == 65536 && table.scalar_type() == at::kFloat && table.is_contiguous(),
              "table must be fp32 [65536]");
  const Step step{table.data_ptr<float>(), static_cast<float>(a), static_cast<float>(lr),
                  static_cast<float>(weight_decay), static_cast<float>(sign), static_cast<float>(head),
                  static_cast<float>(low), static_cast<float>(high), update};
  const auto* nb = static_cast<const uint16_t*>(normal_bits.data_ptr());
  const auto* ub = static_cast<const uint16_t*>(uniform_bits.data_ptr());
  const float* sp = scales.data_ptr<float>();
  const int64_t group_len = k / groups;
  at::parallel_for(0, r, std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
    std::vector<int8_t> unpacked(bits == 4 ? k : 0);
    for (int64_t i = begin; i < end; ++i) {
      const float* s = sp + i * groups;
      const uint16_t* n_row = nb + i * k;
      const uint16_t* u_row = ub + i * k;
      int8_t* values = bits == 8 ? static_cast<int8_t*>(q.data_ptr()) + i * k : unpacked.data();
      uint8_t* packed = bits == 4 ? static_cast<uint8_t*>(q.data_ptr()) + i * (k / 2) : nullptr;
      if (packed)  // low nibble = even column, stored as value + 8
        for (int64_t c = 0; c < k / 2; ++c) {
          values[2 * c] = static_cast<int8_t>((packed[c] & 0xF) - 8);
          values[2 * c + 1] = static_cast<int8_t>((packed[c] >> 4) - 8);
        }
      for (int64_t g = 0; g < groups; ++g)
        step_span(step, values + g * group_len, n_row + g * group_len, u_row + g * group_len, s[g], group_len);
      if (packed)
        for (int64_t c = 0; c < k / 2; ++c)
          packed[c] = static_cast<uint8_t>(((values[2 * c] + 8) & 0xF) | ((values[2 * c + 1] + 8) << 4));
    }
  });
}

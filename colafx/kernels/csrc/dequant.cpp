// int4 weight -> bf16 or fp32 weight on the CPU, for W4A16 GEMMs with many tokens
// (colafx/kernels/qmatmul.py): w[n, k] = (nibble - c) · scale[n, k / group_len] in fp32, with the
// group's centre c = 8 + its zero point (8 without zero points), as dequantize_ref(q, scale, zero),
// or that product rounded to bf16 (nearest even), as dequantize_ref(q, scale, zero).to(torch.bfloat16).
// One pass from the packed nibbles.
#include "nibbles.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// bf16 bits of fp32 values, rounded to nearest even (finite inputs), as torch's conversion
inline uint16_t bf16_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}
#if defined(__AVX512F__)
inline __m512i bf16_bits(__m512 v) {  // in the low 16 bits of each 32-bit lane
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), odd), 16);
}
#elif defined(__AVX2__)
inline __m256i bf16_bits(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), odd), 16);
}
#endif

// Columns 2c and 2c + 1 of one group of a row, from W bytes: the fp32 products (nibble - centre) · s
// of the low nibbles (lo) and of the high ones (hi), stored as bf16 pairs or interleaved fp32.
template <bool BF16>
void dequant_group(const uint8_t* in, float s, int32_t centre, int64_t bytes, void* out) {
  int64_t c = 0;  // byte c holds columns 2c (low nibble) and 2c + 1
  auto* o16 = static_cast<uint16_t*>(out);
  auto* o32 = static_cast<float*>(out);
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(s);
  const __m512i vc = _mm512_set1_epi32(centre);
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  for (; c + 16 <= bytes; c += 16) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + c)));
    const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0xF)), vc)), vs);
    const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), vc)), vs);
    if constexpr (BF16) {  // little endian: column 2c in the low half of each 32-bit word
      _mm512_storeu_si512(o16 + 2 * c, _mm512_or_si512(bf16_bits(lo), _mm512_slli_epi32(bf16_bits(hi), 16)));
    } else {
      _mm512_storeu_ps(o32 + 2 * c, _mm512_permutex2var_ps(lo, first, hi));
      _mm512_storeu_ps(o32 + 2 * c + 16, _mm512_permutex2var_ps(lo, second, hi));
    }
  }
#elif defined(__AVX2__)
  const __m256 vs = _mm256_set1_ps(s);
  const __m256i vc = _mm256_set1_epi32(centre);
  for (; c + 8 <= bytes; c += 8) {
    __m256 lo, hi;
    colafx::nibbles8(in + c, vc, vs, lo, hi);
    if constexpr (BF16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o16 + 2 * c), _mm256_or_si256(bf16_bits(lo), _mm256_slli_epi32(bf16_bits(hi), 16)));
    } else {  // unpack pairs within 128-bit halves, then put the halves in order
      const __m256 a = _mm256_unpacklo_ps(lo, hi), d = _mm256_unpackhi_ps(lo, hi);
      _mm256_storeu_ps(o32 + 2 * c, _mm256_permute2f128_ps(a, d, 0x20));
      _mm256_storeu_ps(o32 + 2 * c + 8, _mm256_permute2f128_ps(a, d, 0x31));
    }
  }
#endif
  for (; c < bytes; ++c) {
    float lo, hi;
    colafx::nibbles1(in[c], centre, s, lo, hi);
    if constexpr (BF16) {
      o16[2 * c] = bf16_bits(lo);
      o16[2 * c + 1] = bf16_bits(hi);
    } else {
      o32[2 * c] = lo;
      o32[2 * c + 1] = hi;
    }
  }
}

}  // namespace

at::Tensor dequant_int4(const at::Tensor& packed, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                        bool to_bf16) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be uint8 [N, K / 2] contiguous");
  const int64_t n = packed.size(0), k = packed.size(1) * 2;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.scalar_type() == at::kFloat && scales.is_contiguous(),
              "scales must be fp32 [N, G] contiguous");
  const int64_t groups = scales.size(1);
  TORCH_CHECK(groups > 0 && k % groups == 0 && (k / groups) % 2 == 0, "groups must split K into even lengths");
  TORCH_CHECK(!zeros || (zeros->scalar_type() == at::kChar && zeros->is_contiguous() && zeros->sizes() == scales.sizes()),
              "zeros must be int8 [N, G] contiguous, as scales");
  const int64_t group_len = k / groups;
  const int8_t* zp = zeros ? zeros->data_ptr<int8_t>() : nullptr;
  auto out = at::empty({n, k}, packed.options().dtype(to_bf16 ? at::kBFloat16 : at::kFloat));
  const uint8_t* src = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t item = to_bf16 ? 2 : 4;
  at::parallel_for(0, n, std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* in = src + i * (k / 2) + g * (group_len / 2);
        void* o = dst + (i * k + g * group_len) * item;
        const int32_t centre = zp ? 8 + zp[i * groups + g] : 8;
        if (to_bf16)
          dequant_group<true>(in, sp[i * groups + g], centre, group_len / 2, o);
        else
          dequant_group<false>(in, sp[i * groups + g], centre, group_len / 2, o);
      }
  });
  return out;
}

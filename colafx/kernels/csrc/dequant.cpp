// int4 weight -> bf16 weight on the CPU, for W4A16 GEMMs with many tokens (colafx/kernels/qmatmul.py):
// w[n, k] = bf16((nibble - 8) · scale[n, k / group_len]), the fp32 product rounded to nearest even,
// as dequantize_ref(q, scale).to(torch.bfloat16). One pass, no fp32 temporary of [N, K].
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

}  // namespace

at::Tensor dequant_int4_bf16(const at::Tensor& packed, const at::Tensor& scales) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be uint8 [N, K / 2] contiguous");
  const int64_t n = packed.size(0), k = packed.size(1) * 2;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.scalar_type() == at::kFloat && scales.is_contiguous(),
              "scales must be fp32 [N, G] contiguous");
  const int64_t groups = scales.size(1);
  TORCH_CHECK(groups > 0 && k % groups == 0 && (k / groups) % 2 == 0, "groups must split K into even lengths");
  const int64_t group_len = k / groups;
  auto out = at::empty({n, k}, packed.options().dtype(at::kBFloat16));
  const uint8_t* src = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  auto* dst = static_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, n, std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t g = 0; g < groups; ++g) {
        const float s = sp[i * groups + g];
        const uint8_t* in = src + i * (k / 2) + g * (group_len / 2);
        uint16_t* o = dst + i * k + g * group_len;
        int64_t c = 0;  // byte c holds columns 2c (low nibble) and 2c + 1, each stored as value + 8
#if defined(__AVX512F__)
        const __m512 vs = _mm512_set1_ps(s);
        for (; c + 16 <= group_len / 2; c += 16) {
          const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + c)));
          const __m512i lo = bf16_bits(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0xF)), _mm512_set1_epi32(8))), vs));
          const __m512i hi = bf16_bits(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), _mm512_set1_epi32(8))), vs));
          _mm512_storeu_si512(o + 2 * c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));  // little endian: 2c first
        }
#elif defined(__AVX2__)
        const __m256 vs = _mm256_set1_ps(s);
        for (; c + 8 <= group_len / 2; c += 8) {
          const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(in + c)));
          const __m256i lo = bf16_bits(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0xF)), _mm256_set1_epi32(8))), vs));
          const __m256i hi = bf16_bits(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 4), _mm256_set1_epi32(8))), vs));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 2 * c), _mm256_or_si256(lo, _mm256_slli_epi32(hi, 16)));
        }
#endif
        for (; c < group_len / 2; ++c) {
          o[2 * c] = bf16_bits(static_cast<float>(static_cast<int32_t>(in[c] & 0xF) - 8) * s);
          o[2 * c + 1] = bf16_bits(static_cast<float>(static_cast<int32_t>(in[c] >> 4) - 8) * s);
        }
      }
  });
  return out;
}

// Packed int4 bytes (byte i of a row: column 2i in the low nibble, 2i + 1 in the high one) to fp32
// (nibble - centre) · scale, shared by w4a16.cpp (AVX2 and scalar builds) and dequant.cpp. The
// integer subtraction is exact, so both give the bits of dequantize_ref.
#pragma once
#include <cstdint>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace colafx {

#if defined(__AVX2__) || defined(__AVX512F__)
// 8 bytes -> nibble - centre as fp32: the 8 low-nibble values (lo) and the 8 high-nibble values (hi)
inline void codes8(const uint8_t* p, __m256i centre, __m256& lo, __m256& hi) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0xF)), centre));
  hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 4), centre));
}
// the same, times scale
inline void nibbles8(const uint8_t* p, __m256i centre, __m256 scale, __m256& lo, __m256& hi) {
  codes8(p, centre, lo, hi);
  lo = _mm256_mul_ps(lo, scale);
  hi = _mm256_mul_ps(hi, scale);
}
#endif

// one byte
inline void nibbles1(uint8_t b, int32_t centre, float scale, float& lo, float& hi) {
  lo = static_cast<float>(static_cast<int32_t>(b & 0xF) - centre) * scale;
  hi = static_cast<float>(static_cast<int32_t>(b >> 4) - centre) * scale;
}

}  // namespace colafx

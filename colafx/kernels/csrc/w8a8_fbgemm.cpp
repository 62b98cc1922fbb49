// Fused per-token W8A8 linear on FBGEMM's packed int8 weight (CPU).
//
// y[m, n] = s[m] * w_scale[n] * sum_k q[m, k] * W[n, k] + bias[n], with the per-token codes
// q = floor(x / s + 0.5), s = max(max_k |x[m, k]|, floor) / qmax: bit-identical to colafx's
// quantize_tokens + FBGEMM path in Python, in one call. The codes go to FBGEMM as u8 = q + qmax + 1
// (FBGEMM's u8 x s8 GEMM; its ReQuantizeForFloat subtracts the zero point), so nothing quantizes x
// twice, and the per-token scale and bias are applied in one pass over the output.
#define USE_FBGEMM 1
#include <torch/extension.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <ATen/Parallel.h>
#include <ATen/native/quantized/cpu/fbgemm_utils.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <atomic>
#include <cmath>
#include <vector>

namespace {

// Codes of rows [begin, end) of x [*, k]; false if a row holds inf or NaN.
bool token_codes_u8(const float* x, uint8_t* codes, float* scale, int64_t begin, int64_t end, int64_t k,
                    float qmax, float scale_floor) {
  const int32_t zp = static_cast<int32_t>(qmax) + 1;
  for (int64_t i = begin; i < end; ++i) {
    const float* row = x + i * k;
    float amax = 0.f, probe = 0.f;
#pragma omp simd reduction(max : amax) reduction(+ : probe)
    for (int64_t j = 0; j < k; ++j) {
      const float v = row[j];
      amax = std::max(amax, std::fabs(v));
      probe += v - v;  // 0 for finite v, NaN for inf / NaN
    }
    if (probe != 0.f) return false;
    const float s = std::max(amax, scale_floor) / qmax;  // true division, as the Python reference
    scale[i] = s;
    uint8_t* out = codes + i * k;
    int64_t j = 0;
#if defined(__AVX512F__)
    const __m512 vs = _mm512_set1_ps(s), half = _mm512_set1_ps(0.5f);
    const __m512i vzp = _mm512_set1_epi32(zp);
    for (; j + 16 <= k; j += 16) {
      __m512 q = _mm512_add_ps(_mm512_div_ps(_mm512_loadu_ps(row + j), vs), half);
      q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j),
                       _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvttps_epi32(q), vzp)));
    }
#elif defined(__AVX2__)
    const __m256 vs = _mm256_set1_ps(s), half = _mm256_set1_ps(0.5f);
    const __m256i vzp = _mm256_set1_epi32(zp);
    for (; j + 8 <= k; j += 8) {
      __m256 q = _mm256_floor_ps(_mm256_add_ps(_mm256_div_ps(_mm256_loadu_ps(row + j), vs), half));
      __m256i qi = _mm256_add_epi32(_mm256_cvttps_epi32(q), vzp);
      __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + j), _mm_packus_epi16(w, w));
    }
#endif
    for (; j < k; ++j) out[j] = static_cast<uint8_t>(static_cast<int32_t>(std::floor(row[j] / s + 0.5f)) + zp);
  }
  return true;
}

}  // namespace

// x: fp32 [M, K] contiguous; packed: quantized::linear_prepack's object (FBGEMM, per-channel int8);
// bias: fp32 [N] contiguous or None. Returns fp32 [M, N], or None where the fused path does not
// apply (a row of x with inf / NaN, or a weight packed by another engine): the caller falls back.
py::object w8a8_linear(const at::Tensor& x, py::object packed_obj, int64_t qmax, double scale_floor,
                       const std::optional<at::Tensor>& bias) {
  static const auto type = c10::getCustomClassType<c10::intrusive_ptr<LinearPackedParamsBase>>();
  auto packed = torch::jit::toIValue(packed_obj, type).toCustomClass<LinearPackedParamsBase>();
  auto* pw = dynamic_cast<PackedLinearWeight*>(packed.get());
  if (pw == nullptr) return py::none();
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be fp32 [M, K] contiguous");
  const int64_t m = x.size(0), k = x.size(1), n = pw->w->numCols();
  TORCH_CHECK(pw->w->numRows() == k, "x has ", k, " features, the packed weight ", pw->w->numRows());
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n),
              "bias must be fp32 [", n, "] contiguous");
  auto codes = at::empty({m, k}, x.options().dtype(at::kByte));
  auto scale = at::empty({m}, x.options());
  const float* xp = x.data_ptr<float>();
  uint8_t* a = codes.data_ptr<uint8_t>();
  float* s = scale.data_ptr<float>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
    if (!token_codes_u8(xp, a, s, begin, end, k, static_cast<float>(qmax), static_cast<float>(scale_floor)))
      finite = false;
  });
  if (!finite) return py::none();

  auto out = at::empty({m, n}, x.options());
  auto acc = at::empty({m, n}, x.options().dtype(at::kInt));
  float* o = out.data_ptr<float>();
  int32_t* accp = acc.data_ptr<int32_t>();
  const int32_t zp = static_cast<int32_t>(qmax) + 1;
  const int num_tasks = at::get_num_threads();
  at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> row_offsets(fbgemm::PackAWithRowOffset<uint8_t>::rowOffsetBufferSize());
    for (int64_t task = begin; task < end; ++task) {
      fbgemm::PackAWithRowOffset<uint8_t> packA(fbgemm::matrix_op_t::NoTranspose, m, k, a, k, nullptr, 1,
                                                row_offsets.data());
      fbgemm::DoNothing<float, float> done{};
      fbgemm::ReQuantizeForFloat<false, fbgemm::QuantizationGranularity::OUT_CHANNEL> requant(
          done, 1.0f, pw->w_scale.data(), zp, pw->w_zp.data(), packA.getRowOffsetBuffer(), pw->col_offsets.data(),
          nullptr, n);
      fbgemm::fbgemmPacked(packA, *pw->w, o, accp, n, requant, task, num_tasks);
    }
  });

  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float si = s[i];
      float* row = o + i * n;
      if (b) {  // (acc * s) + bias, two roundings as the Python epilogue (no FMA: -ffp-contract=off)
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) row[j] = row[j] * si + b[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) row[j] *= si;
      }
    }
  });
  return py::cast(out);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("w8a8_linear", &w8a8_linear, "fused per-token W8A8 linear on an FBGEMM-packed weight");
}

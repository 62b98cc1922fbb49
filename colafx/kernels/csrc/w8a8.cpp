// Fused per-token W8A8 linears on the CPU (colafx/kernels/cpu_ext.py); this file also binds zo.cpp,
// dequant.cpp and w4a16.cpp.
//
// y[m, n] = s[m] * w_scale[n] * sum_k q[m, k] * W[n, k] + bias[n], with the per-token codes
// q = floor(x / s + 0.5), s = max(max_k |x[m, k]|, floor) / qmax: bit-identical to colafx's
// quantize_tokens + GEMM + rescale in Python, in one call.
// w8a8_linear: on FBGEMM's packed weight. The codes go to FBGEMM as u8 = q + qmax + 1 (its u8 x s8
//   GEMM, int32 sums in place in the output); one pass subtracts the zero point's share (zp times
//   the weight's column sums) and applies both scales and bias, so nothing quantizes x twice and
//   no pass of FBGEMM's own rescales its output.
// w8a8_int_mm: on a plain int8 weight (not packed: first use, or changed in place), through
//   torch._int_mm, rescaled in place over its int32 result.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#ifndef COLAFX_NO_FBGEMM  // torch builds without FBGEMM (e.g. aarch64): w8a8_int_mm and zo only
#define USE_FBGEMM 1
#include <torch/csrc/jit/python/pybind_utils.h>
#include <ATen/native/quantized/cpu/fbgemm_utils.h>
#endif

#include "ops.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <atomic>
#include <cmath>
#include <memory>
#include <type_traits>

namespace {

constexpr int64_t SLICE = 128;  // rows per FBGEMM call in w8a8_linear beyond one slice (its MCB on AVX-512)

// Codes of rows [begin, end) of x [*, k] plus zp (u8 with zp = qmax + 1 for FBGEMM, s8 with zp = 0
// for torch._int_mm); false if a row holds inf or NaN.
template <typename T>
bool token_codes(const float* x, T* codes, float* scale, int64_t begin, int64_t end, int64_t k, float qmax,
                 float scale_floor, int32_t zp) {
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
    T* out = codes + i * k;
    int64_t j = 0;
#if defined(__AVX512F__)
    const __m512 vs = _mm512_set1_ps(s), half = _mm512_set1_ps(0.5f);
    const __m512i vzp = _mm512_set1_epi32(zp);
    for (; j + 16 <= k; j += 16) {
      __m512 q = _mm512_add_ps(_mm512_div_ps(_mm512_loadu_ps(row + j), vs), half);
      q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      // the low byte of each int32: the code for s8, code + zp in [1, 255] for u8
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j),
                       _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvttps_epi32(q), vzp)));
    }
#elif defined(__AVX2__)
    const __m256 vs = _mm256_set1_ps(s), half = _mm256_set1_ps(0.5f);
    const __m256i vzp = _mm256_set1_epi32(zp);
    for (; j + 8 <= k; j += 8) {
      __m256 q = _mm256_floor_ps(_mm256_add_ps(_mm256_div_ps(_mm256_loadu_ps(row + j), vs), half));
      __m256i qi = _mm256_add_epi32(_mm256_cvttps_epi32(q), vzp);
      __m128i lo = _mm256_castsi256_si128(qi), hi = _mm256_extracti128_si256(qi, 1);
      __m128i packed = std::is_signed_v<T> ? _mm_packs_epi16(_mm_packs_epi32(lo, hi), _mm_setzero_si128())
                                           : _mm_packus_epi16(_mm_packus_epi32(lo, hi), _mm_setzero_si128());
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + j), packed);
    }
#endif
    for (; j < k; ++j) out[j] = static_cast<T>(static_cast<int32_t>(std::floor(row[j] / s + 0.5f)) + zp);
  }
  return true;
}

// Per-token codes of x [m, k] (fp32, contiguous) into codes, scales into scale; false on inf / NaN.
template <typename T>
bool all_token_codes(const at::Tensor& x, at::Tensor& codes, at::Tensor& scale, int64_t qmax, double scale_floor,
                     int32_t zp) {
  const int64_t m = x.size(0), k = x.size(1);
  const float* xp = x.data_ptr<float>();
  T* a = static_cast<T*>(codes.data_ptr());
  float* s = scale.data_ptr<float>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
    if (!token_codes<T>(xp, a, s, begin, end, k, static_cast<float>(qmax), static_cast<float>(scale_floor), zp))
      finite = false;
  });
  return finite;
}

// out[i, j] = float(acc[i, j] - zp · col_offsets[j]) · col_scale[j] · s[i] (+ bias[j]): the roundings
// of the Python epilogue, one per product (no FMA: -ffp-contract=off). col_offsets (the weight's column
// sums, for codes shifted by zp) may be null. acc and out may be the same memory.
template <bool kOffsets, bool kBias>
void rescale_row(const int32_t* a, float* o, float si, const float* col_scale, const int32_t* col_offsets,
                 int32_t zp, const float* bias, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    int32_t v = a[j];
    if constexpr (kOffsets) v -= zp * col_offsets[j];
    float r = static_cast<float>(v) * col_scale[j] * si;
    if constexpr (kBias) r += bias[j];
    o[j] = r;
  }
}

void rescale_rows(const int32_t* acc, float* out, const float* s, const float* col_scale, const int32_t* col_offsets,
                  int32_t zp, const float* bias, int64_t m, int64_t n) {
  auto row = col_offsets ? (bias ? rescale_row<true, true> : rescale_row<true, false>)
                         : (bias ? rescale_row<false, true> : rescale_row<false, false>);
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) row(acc + i * n, out + i * n, s[i], col_scale, col_offsets, zp, bias, n);
  });
}

void check_x_bias(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t k, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be fp32 [M, K] contiguous");
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " features, the weight ", k);
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n),
              "bias must be fp32 [", n, "] contiguous");
}

#ifndef COLAFX_NO_FBGEMM
// FBGEMM's u8·s8 GEMM of `rows` rows of codes a [rows, k] (u8 = code + zp) with the packed weight:
// the raw int32 sums into acc [rows, n] (memCopy in place: no copy, no float pass of FBGEMM's own).
// task / num_tasks: this thread's share of the call.
void fbgemm_rows(const PackedLinearWeight& pw, const uint8_t* a, int64_t rows, int64_t k, int64_t n, int32_t* acc,
                 int task, int num_tasks) {
  fbgemm::PackAMatrix<uint8_t> packA(fbgemm::matrix_op_t::NoTranspose, rows, k, a, k, nullptr, 1);
  fbgemm::DoNothing<int32_t, int32_t> done{};
  fbgemm::memCopy<> in_place(done);
  fbgemm::fbgemmPacked(packA, *pw.w, acc, acc, n, in_place, task, num_tasks);
}
#endif

}  // namespace

// x: fp32 [M, K] contiguous; packed: quantized::linear_prepack's object (FBGEMM, symmetric per-channel
// int8); bias: fp32 [N] contiguous or None. Returns fp32 [M, N], or None where the fused path does
// not apply (a row of x with inf / NaN, or a weight packed by another engine or with zero points):
// the caller falls back.
#ifndef COLAFX_NO_FBGEMM
py::object w8a8_linear(const at::Tensor& x, py::object packed_obj, int64_t qmax, double scale_floor,
                       const std::optional<at::Tensor>& bias) {
  static const auto type = c10::getCustomClassType<c10::intrusive_ptr<LinearPackedParamsBase>>();
  auto packed = torch::jit::toIValue(packed_obj, type).toCustomClass<LinearPackedParamsBase>();
  auto* pw = dynamic_cast<PackedLinearWeight*>(packed.get());
  if (pw == nullptr) return py::none();
  const int64_t k = pw->w->numRows(), n = pw->w->numCols();
  if (static_cast<int64_t>(pw->w_scale.size()) != n || static_cast<int64_t>(pw->col_offsets.size()) != n)
    return py::none();
  int32_t any_zp = 0;  // checked on every call: an OR over all vectorizes, an early exit per element does not
  for (int32_t z : pw->w_zp) any_zp |= z;
  if (any_zp != 0) return py::none();
  check_x_bias(x, bias, k, n);
  const int64_t m = x.size(0);
  const int32_t zp = static_cast<int32_t>(qmax) + 1;
  const float qm = static_cast<float>(qmax), floor = static_cast<float>(scale_floor);
  const float* xp = x.data_ptr<float>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  const float* ws = pw->w_scale.data();
  const int32_t* co = pw->col_offsets.data();
  // FBGEMM writes the int32 sums into out's memory; the epilogue turns them into fp32 in place
  auto out = at::empty({m, n}, x.options());
  int32_t* acc = reinterpret_cast<int32_t*>(out.data_ptr<float>());
  if (m <= SLICE) {  // the codes, FBGEMM splitting the one call among the threads, one epilogue pass
    auto codes = at::empty({m, k}, x.options().dtype(at::kByte));
    auto scale = at::empty({m}, x.options());
    if (!all_token_codes<uint8_t>(x, codes, scale, qmax, scale_floor, zp)) return py::none();
    const uint8_t* a = codes.data_ptr<uint8_t>();
    const int num_tasks = at::get_num_threads();
    at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) fbgemm_rows(*pw, a, m, k, n, acc, task, num_tasks);
    });
    rescale_rows(acc, reinterpret_cast<float*>(acc), scale.data_ptr<float>(), ws, co, zp, b, m, n);
    return py::cast(out);
  }
  // Each task takes its own rows in slices of SLICE: the slice's codes into a buffer of one slice,
  // FBGEMM single-threaded on them, the epilogue; codes and sums are still in cache when used, and
  // no [M, K] buffer of codes is allocated per call.
  const int64_t num_tasks = std::min<int64_t>(at::get_num_threads(), (m + SLICE - 1) / SLICE);
  std::atomic<bool> finite{true};
  at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<uint8_t[]> codes(new uint8_t[SLICE * k]);
    float scale[SLICE];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r_begin = m * task / num_tasks, r_end = m * (task + 1) / num_tasks;
      for (int64_t r0 = r_begin; r0 < r_end && finite; r0 += SLICE) {
        const int64_t rows = std::min<int64_t>(SLICE, r_end - r0);
        if (!token_codes<uint8_t>(xp + r0 * k, codes.get(), scale, 0, rows, k, qm, floor, zp)) {
          finite = false;
          break;
        }
        fbgemm_rows(*pw, codes.get(), rows, k, n, acc + r0 * n, 0, 1);
        rescale_rows(acc + r0 * n, reinterpret_cast<float*>(acc + r0 * n), scale, ws, co, zp, b, rows, n);
      }
    }
  });
  return finite ? py::cast(out) : py::none();
}

#endif

// The same for a weight that is not FBGEMM-packed (first use, or changed in place as QuZO's):
// s8 codes, torch._int_mm (exact int32), then w_scale, the per-token scale and bias in place over
// the int32 result (no fp32 temporary of [M, N]). weight: int8 [N, K] contiguous; w_scale: fp32 [N].
py::object w8a8_int_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& w_scale, int64_t qmax,
                       double scale_floor, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight must be int8 [N, K] contiguous");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.numel() == n,
              "w_scale must be fp32 [", n, "] contiguous");
  check_x_bias(x, bias, k, n);
  const int64_t m = x.size(0);
  auto codes = at::empty({m, k}, x.options().dtype(at::kChar));
  auto scale = at::empty({m}, x.options());
  if (!all_token_codes<int8_t>(x, codes, scale, qmax, scale_floor, 0)) return py::none();
  at::Tensor acc = at::_int_mm(codes, weight.t()).contiguous();
  int32_t* accp = acc.data_ptr<int32_t>();
  rescale_rows(accp, reinterpret_cast<float*>(accp), scale.data_ptr<float>(), w_scale.data_ptr<float>(), nullptr, 0,
               bias ? bias->data_ptr<float>() : nullptr, m, n);
  return py::cast(acc.view(at::kFloat));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
#ifndef COLAFX_NO_FBGEMM
  module.def("w8a8_linear", &w8a8_linear, "fused per-token W8A8 linear on an FBGEMM-packed weight");
#endif
  module.def("w8a8_int_mm", &w8a8_int_mm, "fused per-token W8A8 linear through torch._int_mm");
  module.def("zo_int_rows", &zo_int_rows, "QuZO's integer perturbation / update on weight rows, in place");
  module.def("dequant_int4", &dequant_int4, "bf16 or fp32 weight from a packed int4 one");
  module.def("w4a16_linear", &w4a16_linear, "W4A16 linear for few tokens, int4 weight dequantized in registers");
}

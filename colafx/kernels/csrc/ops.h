// Declarations shared by the CPU ops' sources (one extension module, bound in w8a8.cpp).
#pragma once
#include <ATen/ATen.h>

// In place on rows of an int8 [r, K] (bits 8) or packed uint8 [r, K / 2] (bits 4) weight: QuZO's
// integer perturbation (update false) or update (true). See zo.cpp.
void zo_int_rows(at::Tensor q, const at::Tensor& scales, const at::Tensor& normal_bits,
                 const at::Tensor& uniform_bits, const at::Tensor& table, int64_t bits, bool update, double a,
                 double lr, double weight_decay, int64_t sign, int64_t head, int64_t low, int64_t high);

// bf16 (to_bf16) or fp32 [N, K] weight from a packed int4 one (uint8 [N, K / 2], fp32 scales [N, G],
// int8 zero points [N, G] or none). See dequant.cpp.
at::Tensor dequant_int4(const at::Tensor& packed, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                        bool to_bf16);

// W4A16 linear for few tokens: x fp32 / bf16 / fp16 [..., K], packed int4 [N, K / 2], fp32 scales
// [N, G] (groups of a multiple of 32 columns), int8 zero points [N, G] or none, fp32 bias [N] or
// none; out in x's dtype. bf16_dot: bf16 x through vdpbf16ps where the CPU has it (else fp32 FMAs).
// See w4a16.cpp.
at::Tensor w4a16_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, bool bf16_dot);

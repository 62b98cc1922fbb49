#pragma once
// Type-only stand-in for asmjit. torch's wheel ships FBGEMM's headers, whose SimdUtils.h names
// asmjit's register types, but not asmjit's own headers. w8a8.cpp calls nothing of asmjit:
// these empty types only let FBGEMM's headers parse.
#define ASMJIT_LIBRARY_MAKE_VERSION(major, minor, patch) (((major) << 16) | ((minor) << 8) | (patch))
#define ASMJIT_LIBRARY_VERSION ASMJIT_LIBRARY_MAKE_VERSION(1, 0, 0)
namespace asmjit {
namespace x86 {
struct Xmm {};
struct Ymm {};
struct Zmm {};
}  // namespace x86
}  // namespace asmjit

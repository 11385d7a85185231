// The direct NHWC conv's AVX-512 tiles (conv_nhwc_tile.h with 16-float
// vectors: 6 pixels x 64 output channels, or 12 x 32, in 24 of the 32 zmm
// registers).
// The rest of the library is built for AVX2; this file compiles its functions
// for AVX-512F under a target pragma, and conv_nhwc_cpu.cpp calls them only
// where the CPU has AVX-512F (oneDNN uses it there, and the AVX2 tiles ran at
// 0.5-0.7x its speed). Headers come first, outside the pragma, so that no
// inline function of theirs (which another file may also emit, and the linker
// may pick) is compiled for AVX-512.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "activation.h"

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
// GCC 12 flags the _mm512_undefined_ps() inside its own _mm512_max_ps.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "cpu/conv_nhwc_tile.h"

namespace convkernels {
namespace cpu {
namespace {

struct Avx512 {
  using Reg = __m512;
  // Tiles of 6 pixels x 64 channels (4 vectors) where the channels fill
  // them, else 8 x 48, 12 x 32 or 12 x 16: 24 accumulators (12 for 16
  // channels), and registers left for the weights and the broadcast input.
  // (6 x 64 loads 10 values per 24 FMAs, 12 x 32 loads 14: on ResNet-50's
  // 1x1 convs it ran 1.05-1.15x faster.)
  static constexpr int kWidth = 16, kVecs = 4;
  static constexpr int rows(int h) { return h == 4 ? 6 : h == 3 ? 8 : 12; }
  static Reg set1(float f) { return _mm512_set1_ps(f); }
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static Reg broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm512_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  static Reg div(Reg a, Reg b) { return _mm512_div_ps(a, b); }
  static Reg max(Reg a, Reg b) { return _mm512_max_ps(a, b); }
  static Reg min(Reg a, Reg b) { return _mm512_min_ps(a, b); }
  static Reg round(Reg a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // scalef gives inf on overflow and (denormal or) 0 on underflow, so the
  // clamp only has to keep r small: past +-104, e^x is inf or 0 in float.
  static constexpr float kExpLo = -104.f, kExpHi = 104.f;
  static Reg ldexp(Reg e, Reg n, Reg) { return _mm512_scalef_ps(e, n); }
  // Lane masks for the first n channels of each vector (n may be <= 0 or >= 32).
  struct Cols {
    __mmask16 m[kVecs];
    explicit Cols(int64_t n) {
      for (int h = 0; h < kVecs; ++h) {
        const int64_t k = n - h * kWidth;
        m[h] = k >= kWidth ? __mmask16(0xFFFF) : k <= 0 ? __mmask16(0) : __mmask16((1u << k) - 1);
      }
    }
    Reg load(const float* p, int h) const { return _mm512_maskz_loadu_ps(m[h], p + h * kWidth); }
    void store(float* p, int h, Reg v) const { _mm512_mask_storeu_ps(p + h * kWidth, m[h], v); }
  };
};

}  // namespace

void conv_nhwc_avx512(const Geometry& g, const Reduction& red, int64_t pixels) {
  conv_nhwc<Avx512>(g, red, pixels);
}

void dwconv_nhwc_avx512(const Geometry& g, int64_t rows) { dwconv_nhwc<Avx512>(g, rows); }

}  // namespace cpu
}  // namespace convkernels

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

#endif  // CPU_CAPABILITY_AVX2

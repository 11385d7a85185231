// SIMD helpers shared by the CPU kernels: typed loads/stores that convert to
// the math type, double accumulators, and vectorized activations.
//
// Math type (`opmath_t`): double for double tensors, float otherwise.
// One vector of math type covers V::size() elements of the tensor's dtype
// (8 floats / 8 halfs / 8 bfloat16 / 4 doubles with AVX2).
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "activation.h"

namespace convkernels {
namespace cpu {

using at::vec::Vectorized;

template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Tag for a full vector; a tail is passed as an int64_t count (< size()).
struct Full {};
// A full vector whose store may bypass the caches (non-temporal) when the
// address is aligned; loads treat it as Full.
struct FullNT : Full {};

// ---------------------------------------------------------------------------
// Loads and stores: T in memory <-> Vectorized<opmath_t<T>> in registers.
// A tail load reads `n` elements and zero-fills the other lanes; a tail store
// writes `n` elements.
// ---------------------------------------------------------------------------
template <typename T>
struct IO {
  using M = opmath_t<T>;
  using V = Vectorized<M>;
  static constexpr int64_t W = V::size();
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);

  static inline V load(const T* p, Full) { return V::loadu(p); }
  static inline V load(const T* p, int64_t n) { return V::loadu(p, n); }
  static inline void store(T* p, const V& v, Full) { v.store(p); }
  static inline void store(T* p, const V& v, FullNT) {
#if defined(CPU_CAPABILITY_AVX2)
    if (reinterpret_cast<uintptr_t>(p) % 32 == 0) {
      if constexpr (std::is_same_v<T, float>) {
        _mm256_stream_ps(p, __m256(v));
      } else {
        _mm256_stream_pd(p, __m256d(v));
      }
      return;
    }
#endif
    v.store(p);
  }
  static inline void store(T* p, const V& v, int64_t n) { v.store(p, static_cast<int>(n)); }
};

// Half / BFloat16: 8 elements <-> one Vectorized<float>.
template <typename T>
struct IO16 {
  using M = float;
  using V = Vectorized<float>;
  static constexpr int64_t W = V::size();

  static inline V load(const T* p, Full) {
#if defined(CPU_CAPABILITY_AVX2)
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same_v<T, c10::Half>) {
      return V(_mm256_cvtph_ps(raw));
    } else {
      return V(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)));
    }
#else
    float tmp[W];
    for (int64_t i = 0; i < W; ++i) tmp[i] = static_cast<float>(p[i]);
    return V::loadu(tmp);
#endif
  }
  static inline V load(const T* p, int64_t n) {
    T tmp[W];
    std::memset(static_cast<void*>(tmp), 0, sizeof(tmp));
    std::memcpy(static_cast<void*>(tmp), p, n * sizeof(T));
    return load(tmp, Full{});
  }
#if defined(CPU_CAPABILITY_AVX2)
  static inline __m128i pack(const V& v) {
    if constexpr (std::is_same_v<T, c10::Half>) {
      return _mm256_cvtps_ph(__m256(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      return at::vec::cvtfp32_bf16(__m256(v));
    }
  }
#endif
  static inline void store(T* p, const V& v, FullNT) {
#if defined(CPU_CAPABILITY_AVX2)
    if (reinterpret_cast<uintptr_t>(p) % 16 == 0) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(p), pack(v));
      return;
    }
#endif
    store(p, v, Full{});
  }
  static inline void store(T* p, const V& v, Full) {
#if defined(CPU_CAPABILITY_AVX2)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), pack(v));
#else
    float tmp[W];
    v.store(tmp);
    for (int64_t i = 0; i < W; ++i) p[i] = static_cast<T>(tmp[i]);
#endif
  }
  static inline void store(T* p, const V& v, int64_t n) {
    T tmp[W];
    store(tmp, v, Full{});
    std::memcpy(static_cast<void*>(p), tmp, n * sizeof(T));
  }
};
template <>
struct IO<c10::Half> : IO16<c10::Half> {};
template <>
struct IO<c10::BFloat16> : IO16<c10::BFloat16> {};

// Zero the lanes >= n (tails of reductions must not contribute).
template <typename V>
inline V mask_tail(const V& v, Full) { return v; }
template <typename V>
inline V mask_tail(const V& v, int64_t n) { return V::set(V(0), v, n); }

// ---------------------------------------------------------------------------
// Double accumulation of a vector of math type M.
// ---------------------------------------------------------------------------
template <typename M>
struct DAcc;

template <>
struct DAcc<double> {
  using VD = Vectorized<double>;
  VD a{0.0};
  inline void add(const VD& v) { a = a + v; }
  inline double sum() const {
    double t[VD::size()];
    a.store(t);
    double s = 0;
    for (int64_t i = 0; i < VD::size(); ++i) s += t[i];
    return s;
  }
  // p[0 .. size) += v
  static inline void rmw(double* p, const VD& v) { (VD::loadu(p) + v).store(p); }
};

template <>
struct DAcc<float> {
  using VD = Vectorized<double>;
  using VF = Vectorized<float>;
  VD lo{0.0}, hi{0.0};
  static inline void widen(const VF& v, VD& l, VD& h) {
#if defined(CPU_CAPABILITY_AVX2)
    const __m256 x = v;
    l = VD(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
    h = VD(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
#else
    float t[VF::size()];
    v.store(t);
    double d[VF::size()];
    for (int64_t i = 0; i < VF::size(); ++i) d[i] = t[i];
    l = VD::loadu(d);
    h = VD::loadu(d + VD::size());
#endif
  }
  inline void add(const VF& v) {
    VD l, h;
    widen(v, l, h);
    lo = lo + l;
    hi = hi + h;
  }
  inline double sum() const {
    double t[VD::size()];
    (lo + hi).store(t);
    double s = 0;
    for (int64_t i = 0; i < VD::size(); ++i) s += t[i];
    return s;
  }
  static inline void rmw(double* p, const VF& v) {
    VD l, h;
    widen(v, l, h);
    static_assert(VF::size() == 2 * VD::size());
    (VD::loadu(p) + l).store(p);
    (VD::loadu(p + VD::size()) + h).store(p + VD::size());
  }
};

// ---------------------------------------------------------------------------
// Vectorized activations (the scalar definitions are in csrc/activation.h).
// ---------------------------------------------------------------------------
template <typename V>
inline V vsigmoid(const V& z) {
  const V one(1);
  return one / (one + z.neg().exp());
}

// act(z)
template <Act A, typename V>
inline V vact_forward(const V& z) {
  if constexpr (A == Act::kRelu) {
    return at::vec::maximum(z, V(0));  // propagates NaN, like torch.relu
  } else if constexpr (A == Act::kSilu) {
    return z * vsigmoid(z);
  } else if constexpr (A == Act::kSigmoid) {
    return vsigmoid(z);
  } else {
    return z;
  }
}

// g * act'(z)
template <Act A, typename V>
inline V vact_grad_mul(const V& z, const V& g) {
  if constexpr (A == Act::kRelu) {
    return V::blendv(g, V(0), z <= V(0));  // g at NaN, as torch's relu
  } else if constexpr (A == Act::kSilu) {
    const V one(1);
    const V s = vsigmoid(z);
    return g * (s * (one + z * (one - s)));
  } else if constexpr (A == Act::kSigmoid) {
    const V s = vsigmoid(z);
    return g * (s * (V(1) - s));
  } else {
    return g;
  }
}

// Calls f(std::integral_constant<bool, b>{}).
template <typename F>
inline void dispatch_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Calls f(std::integral_constant<Act, act>{}, std::integral_constant<bool, b>{}).
template <typename F>
inline void dispatch_act_bool(Act act, bool b, F&& f) {
  dispatch_act(act, [&](auto A) { dispatch_bool(b, [&](auto B) { f(A, B); }); });
}

}  // namespace cpu
}  // namespace convkernels

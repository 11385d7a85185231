// Activation functions shared by the CPU and CUDA kernels.
//
// Every fused op takes the activation as a string ("relu", "identity", "silu",
// "sigmoid"); it is parsed once per call into `Act` and the kernels are
// instantiated per activation so the inner loops carry no branch.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <string>

namespace convkernels {

enum class Act { kIdentity = 0, kRelu = 1, kSilu = 2, kSigmoid = 3 };

inline Act parse_act(const std::string& name) {
  if (name == "relu") return Act::kRelu;
  if (name == "identity") return Act::kIdentity;
  if (name == "silu") return Act::kSilu;
  if (name == "sigmoid") return Act::kSigmoid;
  TORCH_CHECK(false, "convkernels: unknown act '", name,
              "' (expected one of relu, identity, silu, sigmoid)");
}

// act(z)
template <Act A, typename T>
C10_HOST_DEVICE inline T act_forward(T z) {
  if constexpr (A == Act::kRelu) {
    return z < T(0) ? T(0) : z;  // NaN passes through, as in torch.relu
  } else if constexpr (A == Act::kSilu) {
    return z / (T(1) + std::exp(-z));
  } else if constexpr (A == Act::kSigmoid) {
    return T(1) / (T(1) + std::exp(-z));
  } else {
    return z;
  }
}

// d act(z) / dz, evaluated from the pre-activation z (recomputed in backward,
// never stored).
template <Act A, typename T>
C10_HOST_DEVICE inline T act_grad(T z) {
  if constexpr (A == Act::kRelu) {
    // 1 at NaN: torch's relu passes the gradient where its result is NaN.
    return z <= T(0) ? T(0) : T(1);
  } else if constexpr (A == Act::kSilu) {
    const T s = T(1) / (T(1) + std::exp(-z));
    return s * (T(1) + z * (T(1) - s));
  } else if constexpr (A == Act::kSigmoid) {
    const T s = T(1) / (T(1) + std::exp(-z));
    return s * (T(1) - s);
  } else {
    return T(1);
  }
}

// Calls f(std::integral_constant<Act, A>{}) with the activation as a
// compile-time constant.
template <typename F>
inline void dispatch_act(Act act, F&& f) {
  switch (act) {
    case Act::kRelu: f(std::integral_constant<Act, Act::kRelu>{}); break;
    case Act::kSilu: f(std::integral_constant<Act, Act::kSilu>{}); break;
    case Act::kSigmoid: f(std::integral_constant<Act, Act::kSigmoid>{}); break;
    case Act::kIdentity: f(std::integral_constant<Act, Act::kIdentity>{}); break;
  }
}

}  // namespace convkernels

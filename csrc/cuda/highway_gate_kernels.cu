// CUDA highway gate (contract: convkernels/ops/primitives.py):
// highway_gate_forward, highway_gate_backward.
//
// No parameters: the tensors, dense in one memory format, are one flat range,
// run on the rows kernel of common.cuh as N rows of C*H*W elements (a sample
// is contiguous in both layouts) with an empty Params.
//
// The arithmetic keeps the eager formula's form and rounds each product and
// sum separately (mul_rn/add_rn below): nvcc would otherwise contract
// h * t + ... into an FMA, which rounds once where torch's mul and add kernels
// round twice (see csrc/cpu/highway_gate_cpu.cpp).
#include <torch/library.h>

#include "common.cuh"

namespace convkernels {
namespace cuda_impl {
namespace {

struct NoParams {};

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// y = h * t + x * (1 - t), t = sigmoid(gate)
template <typename T, typename A>
struct HighwayGateForwardOp {
  using Params = NoParams;
  const T* h;
  const T* gate;
  const T* x;
  T* y;

  __device__ Params params(int64_t) const { return {}; }

  template <int V>
  __device__ __forceinline__ void apply(int64_t off, const Params (&)[V]) const {
    A hv[V], gv[V], xv[V];
    load_vec<V>(h + off, hv);
    load_vec<V>(gate + off, gv);
    load_vec<V>(x + off, xv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A t = act_forward<Act::kSigmoid, A>(gv[j]);
      hv[j] = add_rn(mul_rn(hv[j], t), mul_rn(xv[j], A(1) - t));
    }
    store_vec<V>(y + off, hv);
  }
};

// grad_h = g * t; grad_x = g * (1 - t); grad_gate = (g * h - g * x) * (1 - t) * t.
template <typename T, typename A>
struct HighwayGateBackwardOp {
  using Params = NoParams;
  const T* grad_y;
  const T* h;
  const T* gate;
  const T* x;
  T* grad_h;     // nullable
  T* grad_gate;  // nullable
  T* grad_x;     // nullable

  __device__ Params params(int64_t) const { return {}; }

  template <int V>
  __device__ __forceinline__ void apply(int64_t off, const Params (&)[V]) const {
    A g[V], t[V], out[V];
    load_vec<V>(grad_y + off, g);
    load_vec<V>(gate + off, t);
#pragma unroll
    for (int j = 0; j < V; ++j) t[j] = act_forward<Act::kSigmoid, A>(t[j]);
    if (grad_h != nullptr) {
#pragma unroll
      for (int j = 0; j < V; ++j) out[j] = g[j] * t[j];
      store_vec<V>(grad_h + off, out);
    }
    if (grad_x != nullptr) {
#pragma unroll
      for (int j = 0; j < V; ++j) out[j] = g[j] * (A(1) - t[j]);
      store_vec<V>(grad_x + off, out);
    }
    if (grad_gate != nullptr) {
      A hv[V], xv[V];
      load_vec<V>(h + off, hv);
      load_vec<V>(x + off, xv);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A gt = add_rn(mul_rn(g[j], hv[j]), -mul_rn(g[j], xv[j]));
        out[j] = gt * (A(1) - t[j]) * t[j];
      }
      store_vec<V>(grad_gate + off, out);
    }
  }
};

at::Tensor highway_gate_forward_cuda(const at::Tensor& h, const at::Tensor& gate,
                                     const at::Tensor& x) {
  const Geometry g = geometry_of(h, "h");
  check_like(gate, h, g, "gate");
  check_like(x, h, g, "x");
  c10::cuda::CUDAGuard guard(h.device());
  at::Tensor y = at::empty_like(h);
  if (g.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "highway_gate_forward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const int64_t L = g.C * g.HW;
    const int vec = pick_vec<scalar_t>(
        L, {h.const_data_ptr(), gate.const_data_ptr(), x.const_data_ptr(), y.const_data_ptr()});
    const HighwayGateForwardOp<scalar_t, A> op{h.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(),
                                               x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>()};
    launch_rows<scalar_t>(op, g.N, L, 1, vec);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> highway_gate_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& h, const at::Tensor& gate, const at::Tensor& x,
    bool need_grad_h, bool need_grad_gate, bool need_grad_x) {
  const Geometry g = geometry_of(h, "h");
  check_like(grad_y, h, g, "grad_y");
  check_like(gate, h, g, "gate");
  check_like(x, h, g, "x");
  c10::cuda::CUDAGuard guard(h.device());
  auto maybe = [&](bool need) { return need ? at::empty_like(h) : at::Tensor(); };
  at::Tensor gh = maybe(need_grad_h), gg = maybe(need_grad_gate), gx = maybe(need_grad_x);
  if (g.numel() == 0 || !(need_grad_h || need_grad_gate || need_grad_x)) return {gh, gg, gx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "highway_gate_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    auto ptr = [](at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr; };
    const int64_t L = g.C * g.HW;
    scalar_t *ghp = ptr(gh), *ggp = ptr(gg), *gxp = ptr(gx);
    const int vec = pick_vec<scalar_t>(L, {grad_y.const_data_ptr(), h.const_data_ptr(),
                                           gate.const_data_ptr(), x.const_data_ptr(), ghp, ggp, gxp});
    const HighwayGateBackwardOp<scalar_t, A> op{
        grad_y.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(),
        x.const_data_ptr<scalar_t>(), ghp, ggp, gxp};
    launch_rows<scalar_t>(op, g.N, L, 1, vec);
  });
  return {gh, gg, gx};
}

}  // namespace
}  // namespace cuda_impl
}  // namespace convkernels

TORCH_LIBRARY_IMPL(convkernels_C, CUDA, m) {
  m.impl("highway_gate_forward", &convkernels::cuda_impl::highway_gate_forward_cuda);
  m.impl("highway_gate_backward", &convkernels::cuda_impl::highway_gate_backward_cuda);
}

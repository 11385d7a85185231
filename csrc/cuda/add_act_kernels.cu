// CUDA residual add + activation (contract: convkernels/ops/primitives.py):
// add_act_forward, add_act_backward.
//
// The only parameter is per sample, and a sample is one contiguous run of
// C*H*W elements in both NCHW and channels_last, so both layouts use the rows
// kernel of common.cuh over N rows of C*H*W elements (params(n)).
#include <torch/library.h>

#include "common.cuh"

namespace convkernels {
namespace cuda_impl {
namespace {

template <typename A>
struct SampleParams {
  A scale;
};

// y = act(residual + scale[n] * x)
template <typename T, typename A, Act ACT>
struct AddActForwardOp {
  using Params = SampleParams<A>;
  const T* x;
  const T* res;
  T* y;
  const A* scale;  // nullable: 1

  __device__ Params params(int64_t n) const { return {scale != nullptr ? scale[n] : A(1)}; }

  template <int V>
  __device__ __forceinline__ void apply(int64_t off, const Params (&p)[V]) const {
    A xv[V], z[V];
    load_vec<V>(x + off, xv);
    load_vec<V>(res + off, z);
#pragma unroll
    for (int j = 0; j < V; ++j) z[j] = act_forward<ACT, A>(z[j] + p[j].scale * xv[j]);
    store_vec<V>(y + off, z);
  }
};

// gz = grad_y * act'(residual + scale[n] * x); grad_x = scale[n] * gz; grad_residual = gz.
template <typename T, typename A, Act ACT>
struct AddActBackwardOp {
  using Params = SampleParams<A>;
  const T* grad_y;
  const T* x;
  const T* res;
  T* grad_x;    // nullable
  T* grad_res;  // nullable
  const A* scale;  // nullable: 1

  __device__ Params params(int64_t n) const { return {scale != nullptr ? scale[n] : A(1)}; }

  template <int V>
  __device__ __forceinline__ void apply(int64_t off, const Params (&p)[V]) const {
    A gz[V];
    load_vec<V>(grad_y + off, gz);
    if constexpr (ACT != Act::kIdentity) {  // act' == 1 needs neither x nor residual
      A xv[V], rv[V];
      load_vec<V>(x + off, xv);
      load_vec<V>(res + off, rv);
#pragma unroll
      for (int j = 0; j < V; ++j) gz[j] *= act_grad<ACT, A>(rv[j] + p[j].scale * xv[j]);
    }
    if (grad_x != nullptr) {
      A gx[V];
#pragma unroll
      for (int j = 0; j < V; ++j) gx[j] = p[j].scale * gz[j];
      store_vec<V>(grad_x + off, gx);
    }
    if (grad_res != nullptr) store_vec<V>(grad_res + off, gz);
  }
};

const void* optional_scale(const std::optional<at::Tensor>& scale, const at::Tensor& x,
                           const Geometry& g) {
  if (!scale.has_value() || !scale->defined()) return nullptr;
  check_vector(*scale, g.N, x, "scale");
  return scale->const_data_ptr();
}

at::Tensor add_act_forward_cuda(const at::Tensor& x, const at::Tensor& residual,
                                const std::optional<at::Tensor>& scale, c10::string_view act) {
  const Geometry g = geometry_of(x, "x");
  check_like(residual, x, g, "residual");
  const void* sc = optional_scale(scale, x, g);
  const Act a = parse_act(std::string(act));
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (g.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_act_forward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const int64_t L = g.C * g.HW;
    const int vec = pick_vec<scalar_t>(L, {x.const_data_ptr(), residual.const_data_ptr(), y.const_data_ptr()});
    dispatch_act(a, [&](auto act_c) {
      constexpr Act ACT = decltype(act_c)::value;
      const AddActForwardOp<scalar_t, A, ACT> op{x.const_data_ptr<scalar_t>(),
                                                 residual.const_data_ptr<scalar_t>(),
                                                 y.mutable_data_ptr<scalar_t>(), static_cast<const A*>(sc)};
      launch_rows<scalar_t>(op, g.N, L, g.N, vec);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_act_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& residual,
    const std::optional<at::Tensor>& scale, c10::string_view act, bool need_grad_x,
    bool need_grad_residual) {
  const Geometry g = geometry_of(x, "x");
  check_like(grad_y, x, g, "grad_y");
  check_like(residual, x, g, "residual");
  const void* sc = optional_scale(scale, x, g);
  const Act a = parse_act(std::string(act));
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = need_grad_x ? at::empty_like(x) : at::Tensor();
  at::Tensor grad_res = need_grad_residual ? at::empty_like(x) : at::Tensor();
  if (g.numel() == 0 || !(need_grad_x || need_grad_residual)) return {grad_x, grad_res};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_act_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const int64_t L = g.C * g.HW;
    scalar_t* gx = need_grad_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gr = need_grad_residual ? grad_res.mutable_data_ptr<scalar_t>() : nullptr;
    const int vec = pick_vec<scalar_t>(
        L, {grad_y.const_data_ptr(), x.const_data_ptr(), residual.const_data_ptr(), gx, gr});
    dispatch_act(a, [&](auto act_c) {
      constexpr Act ACT = decltype(act_c)::value;
      const AddActBackwardOp<scalar_t, A, ACT> op{
          grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
          residual.const_data_ptr<scalar_t>(), gx, gr, static_cast<const A*>(sc)};
      launch_rows<scalar_t>(op, g.N, L, g.N, vec);
    });
  });
  return {grad_x, grad_res};
}

}  // namespace
}  // namespace cuda_impl
}  // namespace convkernels

TORCH_LIBRARY_IMPL(convkernels_C, CUDA, m) {
  m.impl("add_act_forward", &convkernels::cuda_impl::add_act_forward_cuda);
  m.impl("add_act_backward", &convkernels::cuda_impl::add_act_backward_cuda);
}

// CUDA elementwise passes of the BN primitives (contract:
// convkernels/ops/primitives.py): bn_act_apply, bn_act_backward_apply.
// Both run on the generic per-channel elementwise kernels of common.cuh.
#include <torch/library.h>

#include "common.cuh"

namespace convkernels {
namespace cuda_impl {
namespace {

// y = act(x * scale[c] + shift[c] (+ residual))
template <typename T, typename A, Act ACT>
struct BnApplyOp {
  struct Params {
    A scale, shift;
  };
  const T* x;
  const T* res;  // nullable
  T* y;
  const A* scale;
  const A* shift;

  __device__ Params params(int64_t c) const { return {scale[c], shift[c]}; }

  template <int V>
  __device__ __forceinline__ void apply(int64_t off, const Params (&p)[V]) const {
    A xv[V], z[V];
    bn_preact<V>(x, res, off, p, xv, z);
#pragma unroll
    for (int j = 0; j < V; ++j) z[j] = act_forward<ACT, A>(z[j]);
    store_vec<V>(y + off, z);
  }
};

// gz = grad_y * act'(z); grad_x = k1[c] * gz + k2[c] * x + k3[c] (no x term where k2[c] is 0);
// grad_residual = gz.
template <typename T, typename A, Act ACT>
struct BnBackwardApplyOp {
  struct Params {
    A scale, shift, k1, k2, k3;
  };
  const T* grad_y;
  const T* x;
  const T* res;  // nullable
  T* grad_x;     // nullable
  T* grad_res;   // nullable
  const A* scale;
  const A* shift;
  const A* k1;
  const A* k2;
  const A* k3;

  __device__ Params params(int64_t c) const { return {scale[c], shift[c], k1[c], k2[c], k3[c]}; }

  template <int V>
  __device__ __forceinline__ void apply(int64_t off, const Params (&p)[V]) const {
    A xv[V], gz[V];
    bn_preact<V>(x, res, off, p, xv, gz);
    A gy[V];
    load_vec<V>(grad_y + off, gy);
#pragma unroll
    for (int j = 0; j < V; ++j) gz[j] = gy[j] * act_grad<ACT, A>(gz[j]);
    if (grad_x != nullptr) {
      A gx[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        // No x term where k2 is 0 (eval): 0 * inf would be NaN where torch's gradient is finite.
        const A x_term = p[j].k2 == A(0) ? p[j].k3 : p[j].k2 * xv[j] + p[j].k3;
        gx[j] = p[j].k1 * gz[j] + x_term;
      }
      store_vec<V>(grad_x + off, gx);
    }
    if (grad_res != nullptr) store_vec<V>(grad_res + off, gz);
  }
};

at::Tensor bn_act_apply_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                             const std::optional<at::Tensor>& residual, c10::string_view act) {
  const Geometry g = geometry_of(x, "x");
  check_vector(scale, g.C, x, "scale");
  check_vector(shift, g.C, x, "shift");
  const Act a = parse_act(std::string(act));
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (g.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_apply_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* res = optional_ptr<scalar_t>(residual, x, g, "residual");
    const int vec = pick_vec<scalar_t>(g.row_len(), {x.const_data_ptr(), res, y.const_data_ptr()});
    dispatch_act(a, [&](auto act_c) {
      constexpr Act ACT = decltype(act_c)::value;
      const BnApplyOp<scalar_t, A, ACT> op{x.const_data_ptr<scalar_t>(), res,
                                           y.mutable_data_ptr<scalar_t>(), scale.const_data_ptr<A>(),
                                           shift.const_data_ptr<A>()};
      launch_channelwise<scalar_t>(op, g, vec);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_apply_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
    const std::optional<at::Tensor>& residual, c10::string_view act, const at::Tensor& k1,
    const at::Tensor& k2, const at::Tensor& k3, bool need_grad_x, bool need_grad_residual) {
  const Geometry g = geometry_of(x, "x");
  check_like(grad_y, x, g, "grad_y");
  check_vector(scale, g.C, x, "scale");
  check_vector(shift, g.C, x, "shift");
  check_vector(k1, g.C, x, "k1");
  check_vector(k2, g.C, x, "k2");
  check_vector(k3, g.C, x, "k3");
  const Act a = parse_act(std::string(act));
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = need_grad_x ? at::empty_like(x) : at::Tensor();
  at::Tensor grad_res = need_grad_residual ? at::empty_like(x) : at::Tensor();
  if (g.numel() == 0 || !(need_grad_x || need_grad_residual)) return {grad_x, grad_res};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_backward_apply_cuda", [&] {
        using A = at::opmath_type<scalar_t>;
        const scalar_t* res = optional_ptr<scalar_t>(residual, x, g, "residual");
        scalar_t* gx = need_grad_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
        scalar_t* gr = need_grad_residual ? grad_res.mutable_data_ptr<scalar_t>() : nullptr;
        const int vec = pick_vec<scalar_t>(
            g.row_len(), {x.const_data_ptr(), grad_y.const_data_ptr(), res, gx, gr});
        dispatch_act(a, [&](auto act_c) {
          constexpr Act ACT = decltype(act_c)::value;
          const BnBackwardApplyOp<scalar_t, A, ACT> op{
              grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), res, gx, gr,
              scale.const_data_ptr<A>(), shift.const_data_ptr<A>(), k1.const_data_ptr<A>(),
              k2.const_data_ptr<A>(), k3.const_data_ptr<A>()};
          launch_channelwise<scalar_t>(op, g, vec);
        });
      });
  return {grad_x, grad_res};
}

}  // namespace
}  // namespace cuda_impl
}  // namespace convkernels

TORCH_LIBRARY_IMPL(convkernels_C, CUDA, m) {
  m.impl("bn_act_apply", &convkernels::cuda_impl::bn_act_apply_cuda);
  m.impl("bn_act_backward_apply", &convkernels::cuda_impl::bn_act_backward_apply_cuda);
}

// CPU kernels of the residual add + activation primitives (contract:
// convkernels/ops/primitives.py): add_act_forward, add_act_backward.
// scale is per sample ([N]); it rides along as a per-sample parameter of the
// channel_map driver (channel_loops.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cpu/channel_loops.h"

namespace convkernels {
namespace cpu {
namespace {

using at::Tensor;

// Per-sample scale pointer; `ones` backs scale = None.
template <typename M>
const M* sample_scale(const char* op, const std::optional<Tensor>& scale, const Layout& L,
                      at::ScalarType acc_t, std::vector<M>& ones) {
  const Tensor* s = opt_ptr(scale);
  if (s != nullptr) {
    check_vec(op, "scale", *s, L.N, acc_t);
    return s->const_data_ptr<M>();
  }
  ones.assign(std::max<int64_t>(L.N, 1), M(1));
  return ones.data();
}

// y = act(residual + scale[n] * x)
Tensor add_act_forward_cpu(const Tensor& x, const Tensor& residual,
                           const std::optional<Tensor>& scale, c10::string_view act) {
  const char* op = "add_act_forward";
  const Layout L = check_layout(op, x, {&residual});
  const auto acc_t = acc_scalar_type(x.scalar_type());
  const Act a = act_of(act);
  Tensor y = at::empty_like(x);
  CK_DISPATCH(x.scalar_type(), "add_act_forward", [&] {
    using M = opmath_t<scalar_t>;
    using V = Vectorized<M>;
    using io = IO<scalar_t>;
    std::vector<M> ones;
    const std::array<const M*, 1> samp{sample_scale<M>(op, scale, L, acc_t, ones)};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    dispatch_act(a, [&](auto A) {
      constexpr Act kA = decltype(A)::value;
      channel_map<M>(L, std::array<const M*, 0>{}, samp, [=](int64_t off, auto n, const V* P) {
        const V z = at::vec::fmadd(io::load(xp + off, n), P[0], io::load(rp + off, n));
        io::store(yp + off, vact_forward<kA>(z), n);
      }, want_stream(L, sizeof(scalar_t)));
    });
  });
  return y;
}

// gz = grad_y * act'(residual + scale[n] * x); grad_x = scale[n] * gz; grad_residual = gz.
std::tuple<Tensor, Tensor> add_act_backward_cpu(const Tensor& grad_y, const Tensor& x,
                                                const Tensor& residual,
                                                const std::optional<Tensor>& scale,
                                                c10::string_view act, bool need_grad_x,
                                                bool need_grad_residual) {
  const char* op = "add_act_backward";
  const Layout L = check_layout(op, x, {&grad_y, &residual});
  const auto acc_t = acc_scalar_type(x.scalar_type());
  const Act a = act_of(act);
  Tensor grad_x = need_grad_x ? at::empty_like(x) : Tensor();
  Tensor grad_r = need_grad_residual ? at::empty_like(x) : Tensor();
  if (!need_grad_x && !need_grad_residual) return {grad_x, grad_r};
  CK_DISPATCH(x.scalar_type(), "add_act_backward", [&] {
    using M = opmath_t<scalar_t>;
    using V = Vectorized<M>;
    using io = IO<scalar_t>;
    std::vector<M> ones;
    const std::array<const M*, 1> samp{sample_scale<M>(op, scale, L, acc_t, ones)};
    const scalar_t* gp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual.const_data_ptr<scalar_t>();
    scalar_t* gxp = need_grad_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* grp = need_grad_residual ? grad_r.mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_act(a, [&](auto A) {
      constexpr Act kA = decltype(A)::value;
      channel_map<M>(L, std::array<const M*, 0>{}, samp, [=](int64_t off, auto n, const V* P) {
        V gz = io::load(gp + off, n);
        if constexpr (kA != Act::kIdentity) {
          const V z = at::vec::fmadd(io::load(xp + off, n), P[0], io::load(rp + off, n));
          gz = vact_grad_mul<kA>(z, gz);
        }
        if (gxp) io::store(gxp + off, gz * P[0], n);
        if (grp) io::store(grp + off, gz, n);
      }, want_stream(L, sizeof(scalar_t)));
    });
  });
  return {grad_x, grad_r};
}

}  // namespace
}  // namespace cpu
}  // namespace convkernels

TORCH_LIBRARY_IMPL(convkernels_C, CPU, m) {
  using namespace convkernels::cpu;
  m.impl("add_act_forward", &add_act_forward_cpu);
  m.impl("add_act_backward", &add_act_backward_cpu);
}

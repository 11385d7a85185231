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

// Runs the kernel make(A) (A: the activation as an integral_constant) over the
// elements of L with P[0] = scale[n] (1 where scale is None).
template <typename scalar_t, typename Make>
void add_act_map(const char* op, const std::optional<Tensor>& scale, const Layout& L,
                 at::ScalarType acc_t, Act a, const Make& make) {
  using M = opmath_t<scalar_t>;
  std::vector<M> ones;  // backs scale = None
  const M* sp;
  if (const Tensor* s = opt_ptr(scale)) {
    check_vec(op, "scale", *s, L.N, acc_t);
    sp = s->const_data_ptr<M>();
  } else {
    ones.assign(std::max<int64_t>(L.N, 1), M(1));
    sp = ones.data();
  }
  const std::array<const M*, 1> samp{sp};
  dispatch_act(a, [&](auto A) {
    channel_map<M>(L, std::array<const M*, 0>{}, samp, make(A), want_stream(L, sizeof(scalar_t)));
  });
}

// z = residual + scale[n] * x, with P[0] = scale[n].
template <typename io, typename T, typename N, typename V>
inline V add_z(const T* xp, const T* rp, int64_t off, N n, const V* P) {
  return at::vec::fmadd(io::load(xp + off, n), P[0], io::load(rp + off, n));
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
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    add_act_map<scalar_t>(op, scale, L, acc_t, a, [=](auto A) {
      return [=](int64_t off, auto n, const V* P) {
        io::store(yp + off, vact_forward<decltype(A)::value>(add_z<io>(xp, rp, off, n, P)), n);
      };
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
  GradOutputs out(x, L, need_grad_x, need_grad_residual);
  if (out.none()) return out.tuple();
  CK_DISPATCH(x.scalar_type(), "add_act_backward", [&] {
    const scalar_t* gp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual.const_data_ptr<scalar_t>();
    scalar_t* gxp = out.x_ptr<scalar_t>();
    scalar_t* grp = out.r_ptr<scalar_t>();
    add_act_map<scalar_t>(op, scale, L, acc_t, a, [=](auto A) {
      return [=](int64_t off, auto n, const V* P) {
        constexpr Act kA = decltype(A)::value;
        V gz = io::load(gp + off, n);
        if constexpr (kA != Act::kIdentity)
          gz = vact_grad_mul<kA>(add_z<io>(xp, rp, off, n, P), gz);
        if (gxp) io::store(gxp + off, gz * P[0], n);
        if (grp) io::store(grp + off, gz, n);
      };
    });
  });
  return out.tuple();
}

}  // namespace
}  // namespace cpu
}  // namespace convkernels

TORCH_LIBRARY_IMPL(convkernels_C, CPU, m) {
  using namespace convkernels::cpu;
  m.impl("add_act_forward", &add_act_forward_cpu);
  m.impl("add_act_backward", &add_act_backward_cpu);
}

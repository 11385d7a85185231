// CPU kernels of the BN+activation primitives (contract: convkernels/ops/primitives.py):
// channel_stats, bn_act_apply, bn_act_backward_reduce, bn_act_backward_apply.
// Each is one pass over its inputs, written as a kernel on one vector step for
// the drivers of channel_loops.h.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "cpu/channel_loops.h"

namespace convkernels {
namespace cpu {
namespace {

using at::Tensor;

// The BN pre-activation z = x * scale[c] + shift[c] (+ residual), with
// P[0] = scale[c], P[1] = shift[c]; the residual is read only when kR.
template <bool kR, typename io, typename T, typename N, typename V>
inline V bn_z(const V& xv, const T* rp, int64_t off, N n, const V* P) {
  V z = at::vec::fmadd(xv, P[0], P[1]);
  if constexpr (kR) z = z + io::load(rp + off, n);
  return z;
}

// Checks of the BN primitives: x (and grad_y, residual where given) dense in
// one layout, x possibly a channel slice of a larger tensor (read in place
// through Off::x); scale and shift [C] vectors of the accumulation dtype.
inline Layout check_bn(const char* op, const Tensor& x, const Tensor* grad_y, const Tensor* res,
                       const Tensor& scale, const Tensor& shift) {
  const Layout L = check_layout(op, x, {grad_y, res}, /*strided_x=*/true);
  const auto acc_t = acc_scalar_type(x.scalar_type());
  check_vec(op, "scale", scale, L.C, acc_t);
  check_vec(op, "shift", shift, L.C, acc_t);
  return L;
}

// mean and biased variance per channel. Sums of x - s[c] and (x - s[c])^2 in
// double, with s[c] = x[0, c, 0, 0] (shifted sums: no cancellation when the
// mean is large compared to the spread).
std::tuple<Tensor, Tensor> channel_stats_cpu(const Tensor& x) {
  const Layout L = check_layout("channel_stats", x, {}, /*strided_x=*/true);
  const auto acc_t = acc_scalar_type(x.scalar_type());
  Tensor mean = at::empty({L.C}, x.options().dtype(acc_t));
  Tensor var = at::empty({L.C}, x.options().dtype(acc_t));
  CK_DISPATCH(x.scalar_type(), "channel_stats", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    M* mp = mean.mutable_data_ptr<M>();
    M* vp = var.mutable_data_ptr<M>();
    const int64_t count = L.N * L.HW;
    if (count == 0) {
      for (int64_t c = 0; c < L.C; ++c) mp[c] = vp[c] = std::numeric_limits<M>::quiet_NaN();
      return;
    }
    std::vector<M> shift(L.C);
    for (int64_t c = 0; c < L.C; ++c)
      shift[c] = static_cast<M>(xp[L.channels_last ? c : c * L.HW]);
    const std::array<const M*, 1> chan{shift.data()};
    const std::vector<double> s =
        channel_reduce<2>(L, chan, [=](Off off, auto n, const V* P) {
          const V d = io::load(xp + off.x, n) - P[0];
          return std::array<V, 2>{d, d * d};
        });
    for (int64_t c = 0; c < L.C; ++c) {
      const double m1 = s[c] / count;
      const double v = s[L.C + c] / count - m1 * m1;
      mp[c] = static_cast<M>(shift[c] + m1);
      vp[c] = static_cast<M>(v < 0 ? 0.0 : v);  // rounding can go below 0; NaN stays NaN
    }
  });
  return {mean, var};
}

// y = act(x * scale[c] + shift[c] (+ residual)), returned as a new dense
// tensor, or written over x (in_place: through Off::x, so x may be a channel slice).
Tensor apply_pass(const char* op, const Tensor& x, const Tensor& scale, const Tensor& shift,
                  const std::optional<Tensor>& residual, c10::string_view act, bool in_place) {
  const Tensor* res = opt_ptr(residual);
  const Layout L = check_bn(op, x, nullptr, res, scale, shift);
  const Act a = act_of(act);
  Tensor y = in_place ? x : empty_dense(x, L);
  CK_DISPATCH(x.scalar_type(), "bn_act_apply", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = res ? res->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const std::array<const M*, 2> chan{scale.const_data_ptr<M>(), shift.const_data_ptr<M>()};
    dispatch_act_bool(a, res != nullptr, [&](auto A, auto R) {
      constexpr Act kA = decltype(A)::value;
      constexpr bool kR = decltype(R)::value;
      channel_map<M>(L, chan, std::array<const M*, 0>{}, [=](Off off, auto n, const V* P) {
        const V z = bn_z<kR, io>(io::load(xp + off.x, n), rp, off.d, n, P);
        io::store(yp + (in_place ? off.x : off.d), vact_forward<kA>(z), n);
      }, !in_place && want_stream(L, sizeof(scalar_t)));  // in place: the lines are loaded anyway
    });
  });
  return y;
}

Tensor bn_act_apply_cpu(const Tensor& x, const Tensor& scale, const Tensor& shift,
                        const std::optional<Tensor>& residual, c10::string_view act) {
  return apply_pass("bn_act_apply", x, scale, shift, residual, act, /*in_place=*/false);
}

void bn_act_apply__cpu(const Tensor& x, const Tensor& scale, const Tensor& shift,
                       const std::optional<Tensor>& residual, c10::string_view act) {
  apply_pass("bn_act_apply_", x, scale, shift, residual, act, /*in_place=*/true);
}

// gz = grad_y * act'(x * scale[c] + shift[c] (+ residual));
// per channel: sum(gz), sum(gz * (x - center[c])).
std::tuple<Tensor, Tensor> bn_act_backward_reduce_cpu(const Tensor& grad_y, const Tensor& x,
                                                      const Tensor& scale, const Tensor& shift,
                                                      const std::optional<Tensor>& residual,
                                                      c10::string_view act, const Tensor& center) {
  const Tensor* res = opt_ptr(residual);
  const char* op = "bn_act_backward_reduce";
  const Layout L = check_bn(op, x, &grad_y, res, scale, shift);
  const auto acc_t = acc_scalar_type(x.scalar_type());
  check_vec(op, "center", center, L.C, acc_t);
  const Act a = act_of(act);
  Tensor sum_gz = at::empty({L.C}, x.options().dtype(acc_t));
  Tensor sum_gz_xc = at::empty({L.C}, x.options().dtype(acc_t));
  CK_DISPATCH(x.scalar_type(), "bn_act_backward_reduce", [&] {
    const scalar_t* gp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = res ? res->const_data_ptr<scalar_t>() : nullptr;
    const std::array<const M*, 3> chan{scale.const_data_ptr<M>(), shift.const_data_ptr<M>(),
                                       center.const_data_ptr<M>()};
    std::vector<double> s;
    dispatch_act_bool(a, res != nullptr, [&](auto A, auto R) {
      constexpr Act kA = decltype(A)::value;
      constexpr bool kR = decltype(R)::value;
      s = channel_reduce<2>(L, chan, [=](Off off, auto n, const V* P) {
        const V xv = io::load(xp + off.x, n);
        V gz = io::load(gp + off.d, n);
        if constexpr (kA != Act::kIdentity)
          gz = vact_grad_mul<kA>(bn_z<kR, io>(xv, rp, off.d, n, P), gz);
        return std::array<V, 2>{gz, gz * (xv - P[2])};
      });
    });
    M* p1 = sum_gz.mutable_data_ptr<M>();
    M* p2 = sum_gz_xc.mutable_data_ptr<M>();
    for (int64_t c = 0; c < L.C; ++c) {
      p1[c] = static_cast<M>(s[c]);
      p2[c] = static_cast<M>(s[L.C + c]);
    }
  });
  return {sum_gz, sum_gz_xc};
}

// grad_x = k1[c] * gz + k2[c] * x + k3[c] (no x term where k2[c] is 0); grad_residual = gz.
std::tuple<Tensor, Tensor> bn_act_backward_apply_cpu(
    const Tensor& grad_y, const Tensor& x, const Tensor& scale, const Tensor& shift,
    const std::optional<Tensor>& residual, c10::string_view act, const Tensor& k1,
    const Tensor& k2, const Tensor& k3, bool need_grad_x, bool need_grad_residual) {
  const Tensor* res = opt_ptr(residual);
  const char* op = "bn_act_backward_apply";
  const Layout L = check_bn(op, x, &grad_y, res, scale, shift);
  const auto acc_t = acc_scalar_type(x.scalar_type());
  if (need_grad_x) {
    check_vec(op, "k1", k1, L.C, acc_t);
    check_vec(op, "k2", k2, L.C, acc_t);
    check_vec(op, "k3", k3, L.C, acc_t);
  }
  const Act a = act_of(act);
  GradOutputs out(x, L, need_grad_x, need_grad_residual);
  if (out.none()) return out.tuple();
  CK_DISPATCH(x.scalar_type(), "bn_act_backward_apply", [&] {
    const scalar_t* gp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = res ? res->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = out.x_ptr<scalar_t>();
    scalar_t* grp = out.r_ptr<scalar_t>();
    const M* sc = scale.const_data_ptr<M>();
    const M* sh = shift.const_data_ptr<M>();
    dispatch_act_bool(a, res != nullptr, [&](auto A, auto R) {
      constexpr Act kA = decltype(A)::value;
      constexpr bool kR = decltype(R)::value;
      if (need_grad_x) {
        const std::array<const M*, 5> chan{sc, sh, k1.const_data_ptr<M>(), k2.const_data_ptr<M>(),
                                           k3.const_data_ptr<M>()};
        channel_map<M>(L, chan, std::array<const M*, 0>{}, [=](Off off, auto n, const V* P) {
          const V xv = io::load(xp + off.x, n);
          V gz = io::load(gp + off.d, n);
          if constexpr (kA != Act::kIdentity)
            gz = vact_grad_mul<kA>(bn_z<kR, io>(xv, rp, off.d, n, P), gz);
          // No x term where k2 is 0 (eval): 0 * inf would be NaN.
          const V x_term = V::blendv(at::vec::fmadd(P[3], xv, P[4]), P[4], P[3] == V(0));
          io::store(gxp + off.d, at::vec::fmadd(P[2], gz, x_term), n);
          if (grp) io::store(grp + off.d, gz, n);
        }, want_stream(L, sizeof(scalar_t)));
      } else {  // x is read only when the activation needs z
        const std::array<const M*, 2> chan{sc, sh};
        channel_map<M>(L, chan, std::array<const M*, 0>{}, [=](Off off, auto n, const V* P) {
          V gz = io::load(gp + off.d, n);
          if constexpr (kA != Act::kIdentity)
            gz = vact_grad_mul<kA>(bn_z<kR, io>(io::load(xp + off.x, n), rp, off.d, n, P), gz);
          io::store(grp + off.d, gz, n);
        }, want_stream(L, sizeof(scalar_t)));
      }
    });
  });
  return out.tuple();
}

}  // namespace
}  // namespace cpu
}  // namespace convkernels

TORCH_LIBRARY_IMPL(convkernels_C, CPU, m) {
  using namespace convkernels::cpu;
  m.impl("channel_stats", &channel_stats_cpu);
  m.impl("bn_act_apply", &bn_act_apply_cpu);
  m.impl("bn_act_apply_", &bn_act_apply__cpu);
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce_cpu);
  m.impl("bn_act_backward_apply", &bn_act_backward_apply_cpu);
}

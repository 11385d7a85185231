// CPU kernels of the highway gate primitives (contract:
// convkernels/ops/primitives.py): highway_gate_forward, highway_gate_backward.
//
// t = sigmoid(gate); y = h * t + x * (1 - t). Purely elementwise: it runs on
// channel_map (channel_loops.h) with no per-channel or per-sample parameter,
// so NCHW and channels_last are the same flat loop.
//
// The arithmetic keeps the eager formula's form and order (h * t + x * (1 - t),
// and autograd's g * h - g * x for the gate), never x + t * (h - x): the two
// differ in rounding and in where inf - inf makes a NaN. The file is compiled
// without FMA contraction for the same reason (a fused multiply-add rounds
// once where torch's separate mul and add kernels round twice).
#pragma GCC optimize("fp-contract=off")

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/channel_loops.h"

namespace convkernels {
namespace cpu {
namespace {

using at::Tensor;

// Runs the per-element kernel f(off, n) over the tensors of L.
template <typename scalar_t, typename F>
void flat_map(const Layout& L, const F& f) {
  using M = opmath_t<scalar_t>;
  const std::array<const M*, 0> none{};
  channel_map<M>(L, none, none, [=](Off off, auto n, const Vectorized<M>*) { f(off, n); },
                 want_stream(L, sizeof(scalar_t)));
}

// y = h * t + x * (1 - t), t = sigmoid(gate)
Tensor highway_gate_forward_cpu(const Tensor& h, const Tensor& gate, const Tensor& x) {
  const char* op = "highway_gate_forward";
  const Layout L = check_layout(op, h, {&gate, &x});
  Tensor y = at::empty_like(h);
  CK_DISPATCH(h.scalar_type(), "highway_gate_forward", [&] {
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* gp = gate.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    flat_map<scalar_t>(L, [=](int64_t off, auto n) {
      const V t = vsigmoid(io::load(gp + off, n));
      io::store(yp + off, io::load(hp + off, n) * t + io::load(xp + off, n) * (V(1) - t), n);
    });
  });
  return y;
}

// grad_h = g * t; grad_x = g * (1 - t); grad_gate = (g * h - g * x) * (1 - t) * t
// (autograd's order: the two products of the combination, then sigmoid's
// backward). t is recomputed from gate; an output not asked for is undefined.
std::tuple<Tensor, Tensor, Tensor> highway_gate_backward_cpu(
    const Tensor& grad_y, const Tensor& h, const Tensor& gate, const Tensor& x,
    bool need_grad_h, bool need_grad_gate, bool need_grad_x) {
  const char* op = "highway_gate_backward";
  const Layout L = check_layout(op, h, {&grad_y, &gate, &x});
  auto maybe = [&](bool need) { return need ? empty_dense(h, L) : Tensor(); };
  Tensor gh = maybe(need_grad_h), gg = maybe(need_grad_gate), gx = maybe(need_grad_x);
  if (!(need_grad_h || need_grad_gate || need_grad_x)) return {gh, gg, gx};
  CK_DISPATCH(h.scalar_type(), "highway_gate_backward", [&] {
    auto ptr = [](Tensor& t) { return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr; };
    const scalar_t* dp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* gp = gate.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t *ghp = ptr(gh), *ggp = ptr(gg), *gxp = ptr(gx);
    flat_map<scalar_t>(L, [=](int64_t off, auto n) {
      const V g = io::load(dp + off, n);
      const V t = vsigmoid(io::load(gp + off, n));
      const V c = V(1) - t;
      if (ghp) io::store(ghp + off, g * t, n);
      if (gxp) io::store(gxp + off, g * c, n);
      if (ggp) {
        const V gt = g * io::load(hp + off, n) - g * io::load(xp + off, n);
        io::store(ggp + off, gt * c * t, n);
      }
    });
  });
  return {gh, gg, gx};
}

}  // namespace
}  // namespace cpu
}  // namespace convkernels

TORCH_LIBRARY_IMPL(convkernels_C, CPU, m) {
  using namespace convkernels::cpu;
  m.impl("highway_gate_forward", &highway_gate_forward_cpu);
  m.impl("highway_gate_backward", &highway_gate_backward_cpu);
}

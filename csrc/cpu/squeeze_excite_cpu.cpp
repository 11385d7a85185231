// CPU kernel of squeeze_excite (contract: convkernels/ops/primitives.py): a
// squeeze-and-excitation block (Hu et al., 2018; torchvision's
// SqueezeExcitation in EfficientNet) for inference, in one call:
//
//   s[n] = gate(fc2(act(fc1(mean over H, W of x[n]))));  y = x * s[n, c]
//
// The block's own forward is six ATen calls and four module calls; at batch 1
// their overhead was a fifth of EfficientNet-B0's SE time. Two passes over x:
// each sample's channel sums (channel_reduce, in double), then the scale
// (channel_map, the sample's row of s as its per-channel parameter). The 1x1
// convs on the pooled [N, C] map are GEMMs, and the activations ATen's own
// in-place kernels, the ones the block's modules call.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include <optional>

#include "cpu/channel_loops.h"

namespace convkernels {
namespace cpu {
namespace {

using at::Tensor;

void check_weight(const char* op, const char* name, const Tensor& w, int64_t out, int64_t in,
                  at::ScalarType dt) {
  TORCH_CHECK(w.dim() == 4 && w.size(0) == out && w.size(1) == in && w.size(2) == 1 &&
                  w.size(3) == 1,
              op, ": ", name, " must be a 1x1 conv weight [", out, ", ", in, ", 1, 1], got ",
              w.sizes());
  TORCH_CHECK(w.scalar_type() == dt, op, ": ", name, " must have dtype ", dt, ", got ",
              w.scalar_type());
  TORCH_CHECK(w.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
}

// h = act(h) in place, with the kernel the activation module runs.
void activate_(Tensor& h, Act act) {
  switch (act) {
    case Act::kRelu: at::relu_(h); break;
    case Act::kSilu: at::silu_(h); break;
    case Act::kSigmoid: at::sigmoid_(h); break;
    case Act::kIdentity: break;
  }
}

Tensor squeeze_excite_cpu(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1,
                          const Tensor& w2, const std::optional<Tensor>& b2,
                          c10::string_view act, c10::string_view gate) {
  const char* op = "squeeze_excite";
  const Layout L = check_layout(op, x, {});
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, ": x must be float32 or float64, got ",
              dt);
  TORCH_CHECK(L.HW > 0, op, ": x has no pixels to average (", x.sizes(), ")");
  const int64_t C = L.C, Cr = w1.size(0);
  check_weight(op, "w1", w1, Cr, C, dt);
  check_weight(op, "w2", w2, C, Cr, dt);
  if (b1.has_value()) check_vec(op, "b1", *b1, Cr, dt);
  if (b2.has_value()) check_vec(op, "b2", *b2, C, dt);
  const Act a = act_of(act), g = act_of(gate);

  Tensor y = empty_dense(x, L);
  if (L.N == 0) return y;
  Layout S = L;  // one sample: a dense block of C * HW elements in either layout
  S.N = 1;
  const int64_t sample = C * L.HW;
  Tensor mean = at::empty({L.N, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "squeeze_excite", [&] {
    using V = Vectorized<scalar_t>;
    using io = IO<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* mp = mean.mutable_data_ptr<scalar_t>();
    const std::array<const scalar_t*, 0> none{};
    for (int64_t n = 0; n < L.N; ++n) {
      const scalar_t* xs = xp + n * sample;
      const std::vector<double> sum = channel_reduce<1>(
          S, none, [=](Off off, auto k, const V*) { return std::array<V, 1>{io::load(xs + off.x, k)}; });
      for (int64_t c = 0; c < C; ++c) mp[n * C + c] = static_cast<scalar_t>(sum[c] / L.HW);
    }
  });
  Tensor h = b1.has_value() ? at::addmm(*b1, mean, w1.reshape({Cr, C}).t())
                            : at::mm(mean, w1.reshape({Cr, C}).t());
  activate_(h, a);
  Tensor s = b2.has_value() ? at::addmm(*b2, h, w2.reshape({C, Cr}).t())
                            : at::mm(h, w2.reshape({C, Cr}).t());
  activate_(s, g);
  AT_DISPATCH_FLOATING_TYPES(dt, "squeeze_excite", [&] {
    using V = Vectorized<scalar_t>;
    using io = IO<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const std::array<const scalar_t*, 0> none{};
    for (int64_t n = 0; n < L.N; ++n) {
      const scalar_t *xs = xp + n * sample, *ss = sp + n * C;
      scalar_t* ys = yp + n * sample;
      channel_map<scalar_t>(
          S, std::array<const scalar_t*, 1>{ss}, none,
          [=](Off off, auto k, const V* P) { io::store(ys + off, io::load(xs + off.x, k) * P[0], k); },
          want_stream(S, sizeof(scalar_t)));
    }
  });
  return y;
}

}  // namespace
}  // namespace cpu
}  // namespace convkernels

TORCH_LIBRARY_IMPL(convkernels_C, CPU, m) {
  m.impl("squeeze_excite", &convkernels::cpu::squeeze_excite_cpu);
}

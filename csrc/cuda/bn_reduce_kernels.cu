// CUDA per-channel reductions of the BN primitives (contract:
// convkernels/ops/primitives.py): channel_stats, bn_act_backward_reduce.
// Both are deterministic two-stage reductions (reduce.cuh).
#include <torch/library.h>

#include "common.cuh"
#include "reduce.cuh"

namespace convkernels {
namespace cuda_impl {
namespace {

// Per-channel mean and biased variance. Per thread: Welford in A; NCHW merges
// a whole V-element chunk (its exact two-pass mean/m2) at once, NHWC updates
// V channels that share one count (one reciprocal per row).
template <typename T, typename A>
struct StatsOp {
  using scalar_t = T;
  using acc_t = A;
  using Stat = WelfordStat;
  struct Params {};
  struct Slot {
    A mean, m2;
  };
  const T* x;

  __device__ Params params(int64_t) const { return {}; }

  template <int V>
  __device__ __forceinline__ void accum_chunk(Slot& s, A& n, const Params&, int64_t off) const {
    A xv[V];
    load_vec<V>(x + off, xv);
    A sum = A(0);
#pragma unroll
    for (int j = 0; j < V; ++j) sum += xv[j];
    const A mb = sum * (A(1) / A(V));
    A m2b = A(0);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A d = xv[j] - mb;
      m2b += d * d;
    }
    const A nn = n + A(V);
    const A w = A(V) / nn;
    const A d = mb - s.mean;
    s.mean += d * w;
    s.m2 += m2b + d * d * n * w;
    n = nn;
  }

  template <int V>
  __device__ __forceinline__ void accum_row(Slot (&s)[V], A& n, const Params (&)[V], int64_t off) const {
    A xv[V];
    load_vec<V>(x + off, xv);
    n += A(1);
    const A inv = A(1) / n;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A d = xv[j] - s[j].mean;
      s[j].mean += d * inv;
      s[j].m2 += d * (xv[j] - s[j].mean);
    }
  }

  __device__ Stat to_stat(const Slot& s, A n) const {
    return {static_cast<double>(n), static_cast<double>(s.mean), static_cast<double>(s.m2)};
  }
};

// sum(gz) and sum(gz * (x - center)), gz = grad_y * act'(x * scale + shift (+ residual)).
template <typename T, typename A, Act ACT>
struct BnBackwardReduceOp {
  using scalar_t = T;
  using acc_t = A;
  using Stat = Sum2Stat;
  struct Params {
    A scale, shift, center;
  };
  struct Slot {
    A sg, sgx;
  };
  const T* grad_y;
  const T* x;
  const T* res;  // nullable
  const A* scale;
  const A* shift;
  const A* center;

  __device__ Params params(int64_t c) const { return {scale[c], shift[c], center[c]}; }

  template <int V>
  __device__ __forceinline__ void accum(Slot* s, int s_stride, const Params* p, int p_stride,
                                        int64_t off) const {
    Params pv[V];
#pragma unroll
    for (int j = 0; j < V; ++j) pv[j] = p[j * p_stride];
    A xv[V], z[V], gy[V];
    bn_preact<V>(x, res, off, pv, xv, z);
    load_vec<V>(grad_y + off, gy);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A gz = gy[j] * act_grad<ACT, A>(z[j]);
      s[j * s_stride].sg += gz;
      s[j * s_stride].sgx += gz * (xv[j] - pv[j].center);
    }
  }

  template <int V>
  __device__ __forceinline__ void accum_chunk(Slot& s, A&, const Params& p, int64_t off) const {
    accum<V>(&s, 0, &p, 0, off);
  }

  template <int V>
  __device__ __forceinline__ void accum_row(Slot (&s)[V], A&, const Params (&p)[V], int64_t off) const {
    accum<V>(s, 1, p, 1, off);
  }

  __device__ Stat to_stat(const Slot& s, A) const {
    return {static_cast<double>(s.sg), static_cast<double>(s.sgx)};
  }
};

std::tuple<at::Tensor, at::Tensor> channel_stats_cuda(const at::Tensor& x) {
  const Geometry g = geometry_of(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type_of(x.scalar_type());
  at::Tensor mean = at::empty({g.C}, x.options().dtype(acc));
  at::Tensor var = at::empty({g.C}, x.options().dtype(acc));
  if (g.C == 0) return {mean, var};
  if (g.N * g.HW == 0) {  // statistics of no elements
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const StatsOp<scalar_t, A> op{x.const_data_ptr<scalar_t>()};
    const int vec = pick_vec<scalar_t>(g.row_len(), {x.const_data_ptr()});
    launch_reduce(op, g, vec, mean.mutable_data_ptr<A>(), var.mutable_data_ptr<A>(), x.options());
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_reduce_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
    const std::optional<at::Tensor>& residual, c10::string_view act, const at::Tensor& center) {
  const Geometry g = geometry_of(x, "x");
  check_like(grad_y, x, g, "grad_y");
  check_vector(scale, g.C, x, "scale");
  check_vector(shift, g.C, x, "shift");
  check_vector(center, g.C, x, "center");
  const Act a = parse_act(std::string(act));
  c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type_of(x.scalar_type());
  at::Tensor sum_gz = at::empty({g.C}, x.options().dtype(acc));
  at::Tensor sum_gz_xc = at::empty({g.C}, x.options().dtype(acc));
  if (g.C == 0) return {sum_gz, sum_gz_xc};
  if (g.N * g.HW == 0) {
    sum_gz.zero_();
    sum_gz_xc.zero_();
    return {sum_gz, sum_gz_xc};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_backward_reduce_cuda", [&] {
        using A = at::opmath_type<scalar_t>;
        const scalar_t* res = optional_ptr<scalar_t>(residual, x, g, "residual");
        const int vec = pick_vec<scalar_t>(g.row_len(), {x.const_data_ptr(), grad_y.const_data_ptr(), res});
        dispatch_act(a, [&](auto act_c) {
          constexpr Act ACT = decltype(act_c)::value;
          const BnBackwardReduceOp<scalar_t, A, ACT> op{
              grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), res,
              scale.const_data_ptr<A>(), shift.const_data_ptr<A>(), center.const_data_ptr<A>()};
          launch_reduce(op, g, vec, sum_gz.mutable_data_ptr<A>(), sum_gz_xc.mutable_data_ptr<A>(),
                        x.options());
        });
      });
  return {sum_gz, sum_gz_xc};
}

}  // namespace
}  // namespace cuda_impl
}  // namespace convkernels

TORCH_LIBRARY_IMPL(convkernels_C, CUDA, m) {
  m.impl("channel_stats", &convkernels::cuda_impl::channel_stats_cuda);
  m.impl("bn_act_backward_reduce", &convkernels::cuda_impl::bn_act_backward_reduce_cuda);
}

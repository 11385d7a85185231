// CUDA NT-Xent (SimCLR) primitives (contract: convkernels/ops/primitives.py):
// nt_xent_forward, nt_xent_backward.
//
// z is first normalised into an [M, D] buffer u of the math type A (float;
// double for double): one warp per row. The loss kernels give each warp one
// row (kWarps rows per block) and loop over tiles of 32 columns, one column per
// lane: the block stages the rows' and the tile's features in shared memory, a
// chunk of kChunk features at a time, and each lane forms its column's
// similarity with its warp's row. The forward keeps an online logsumexp per
// lane, merged across the warp at the end; the backward recomputes each tile,
// turns it into the weights W and accumulates W @ u_tile into the features of
// its block's chunk (blockIdx.y). Nothing of size M x M is ever stored.
// Per-op headers, not <ATen/ATen.h> (see common.cuh).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace convkernels {
namespace cuda_impl {
namespace {

constexpr int kWarps = 8;      // rows per block, one per warp
constexpr int kTileCols = 32;  // columns per tile, one per lane
constexpr int kChunk = 64;     // features per shared-memory stage (and per backward block)
constexpr int kThreads = kWarps * 32;
constexpr double kEps = 1e-12;  // F.normalize's
constexpr unsigned kFull = 0xffffffffu;

template <typename A>
struct Stage {
  A rows[kWarps][kChunk];
  A cols[kTileCols][kChunk + 1];  // +1: the lanes' reads of one feature hit distinct banks
};

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// u[i] = z[i] / max(|z[i]|, eps) and norm[i] = |z[i]|, one warp per row.
template <typename T, typename A>
__global__ void nt_xent_normalise_kernel(const T* __restrict__ z, A* __restrict__ u,
                                         A* __restrict__ norm, int64_t M, int64_t D) {
  const int64_t i = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= M) return;
  const T* zi = z + i * D;
  A ss = 0;
  for (int64_t k = lane; k < D; k += 32) {
    const A v = static_cast<A>(zi[k]);
    ss += v * v;
  }
  const A n = sqrt(warp_sum(ss));
  const A denom = n > A(kEps) ? n : A(kEps);
  for (int64_t k = lane; k < D; k += 32) u[i * D + k] = static_cast<A>(zi[k]) / denom;
  if (lane == 0) norm[i] = n;
}

// Stages features [k0, k0 + kChunk) of the columns [c0, c0 + 32) (and, with
// rows, of the block's rows [i0, i0 + kWarps)); zeros past the ends.
template <typename A>
__device__ void stage(Stage<A>& sm, const A* __restrict__ u, int64_t M, int64_t D, int64_t i0,
                      int64_t c0, int64_t k0, bool rows) {
  for (int idx = threadIdx.x; idx < kTileCols * kChunk; idx += kThreads) {
    const int c = idx / kChunk, k = idx % kChunk;
    const int64_t col = c0 + c, f = k0 + k;
    sm.cols[c][k] = (col < M && f < D) ? u[col * D + f] : A(0);
  }
  if (!rows) return;
  for (int idx = threadIdx.x; idx < kWarps * kChunk; idx += kThreads) {
    const int r = idx / kChunk, k = idx % kChunk;
    const int64_t row = i0 + r, f = k0 + k;
    sm.rows[r][k] = (row < M && f < D) ? u[row * D + f] : A(0);
  }
}

// s of the warp's row with column c0 + lane, over all D features. Every thread
// of the block must call it (it synchronises the block); on return sm.cols
// holds the tile's last feature chunk.
template <typename A>
__device__ A tile_similarity(Stage<A>& sm, const A* __restrict__ u, int64_t M, int64_t D,
                             int64_t i0, int64_t c0, A inv_t) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  A s = 0;
  for (int64_t k0 = 0; k0 < D; k0 += kChunk) {
    __syncthreads();  // the previous readers of sm are done
    stage(sm, u, M, D, i0, c0, k0, true);
    __syncthreads();
    const int kn = static_cast<int>(D - k0 < kChunk ? D - k0 : kChunk);
    for (int k = 0; k < kn; ++k) s += sm.rows[warp][k] * sm.cols[lane][k];
  }
  return s * inv_t;
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    nt_xent_fwd_kernel(const A* __restrict__ u, A* __restrict__ row_loss, A* __restrict__ lse,
                       int64_t M, int64_t D, A inv_t) {
  __shared__ Stage<A> sm;
  const int lane = threadIdx.x % 32;
  const int64_t i0 = int64_t(blockIdx.x) * kWarps, i = i0 + threadIdx.x / 32;
  const int64_t pos = (i + M / 2) % M;
  const A neg_inf = -INFINITY;
  A m = neg_inf, l = 0, s_pos = 0;  // this lane's columns: running max and sum of exp(s - m)
  for (int64_t c0 = 0; c0 < M; c0 += kTileCols) {
    const A s = tile_similarity(sm, u, M, D, i0, c0, inv_t);
    const int64_t j = c0 + lane;
    if (j == pos) s_pos = s;
    if (j < M && j != i) {
      if (s > m) {
        l = l * exp(m - s) + A(1);
        m = s;
      } else {
        l += exp(s - m);
      }
    }
  }
  // Merge the lanes' (max, sum) pairs; a lane without columns has (-inf, 0).
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    const A m2 = __shfl_xor_sync(kFull, m, off), l2 = __shfl_xor_sync(kFull, l, off);
    const A mm = m > m2 ? m : m2;
    l = (m == neg_inf ? A(0) : l * exp(m - mm)) + (m2 == neg_inf ? A(0) : l2 * exp(m2 - mm));
    m = mm;
  }
  s_pos = warp_sum(s_pos);
  if (lane == 0 && i < M) {
    const A v = m + log(l);
    lse[i] = v;
    row_loss[i] = v - s_pos;
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    nt_xent_bwd_kernel(const A* __restrict__ u, const A* __restrict__ norm,
                       const A* __restrict__ lse, const A* __restrict__ grad, T* __restrict__ gz,
                       int64_t M, int64_t D, A inv_t) {
  __shared__ Stage<A> sm;
  const int lane = threadIdx.x % 32;
  const int64_t i0 = int64_t(blockIdx.x) * kWarps, i = i0 + threadIdx.x / 32;
  const int64_t k0 = int64_t(blockIdx.y) * kChunk;  // this block's gradient features
  const int64_t pos = (i + M / 2) % M;
  const A lse_i = i < M ? lse[i] : A(0);
  A acc0 = 0, acc1 = 0;  // sum_j W_ij u_j at features k0 + lane and k0 + 32 + lane
  A r = 0;               // this lane's part of sum_j W_ij s_ij
  for (int64_t c0 = 0; c0 < M; c0 += kTileCols) {
    const A s = tile_similarity(sm, u, M, D, i0, c0, inv_t);
    const int64_t j = c0 + lane;
    A w = (j < M && j != i) ? exp(s - lse_i) + exp(s - lse[j]) : A(0);
    if (j == pos) w -= A(2);
    r += w * s;
    if (D > kChunk) {  // else sm.cols already holds the tile's (only) chunk
      __syncthreads();
      stage(sm, u, M, D, i0, c0, k0, false);
      __syncthreads();
    }
#pragma unroll 8
    for (int c = 0; c < kTileCols; ++c) {
      const A wc = __shfl_sync(kFull, w, c);
      acc0 += wc * sm.cols[c][lane];
      acc1 += wc * sm.cols[c][lane + 32];
    }
  }
  r = warp_sum(r);
  if (i >= M) return;
  const A c = grad[0] / static_cast<A>(M);
  const A n = norm[i];
  const A denom = n > A(kEps) ? n : A(kEps);
  const A proj = n > A(kEps) ? c * r : A(0);  // <u_i, g_u_i>; past the clamp the norm is constant
  const A acc[2] = {acc0, acc1};
#pragma unroll
  for (int t = 0; t < 2; ++t) {
    const int64_t k = k0 + lane + 32 * t;
    if (k < D) gz[i * D + k] = static_cast<T>((c * inv_t * acc[t] - proj * u[i * D + k]) / denom);
  }
}

void check_z(const at::Tensor& z, const char* op) {
  TORCH_CHECK(z.is_cuda(), op, ": z must be a CUDA tensor, got ", z.device());
  TORCH_CHECK(z.dim() == 2 && z.size(0) > 0 && z.size(0) % 2 == 0 && z.size(1) > 0, op,
              ": z must be a [2N, D] tensor with N >= 1 and D >= 1, got shape ", z.sizes());
  const auto st = z.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op,
              ": z must be float32, float16, bfloat16 or float64, got ", st);
}

at::ScalarType acc_of(const at::Tensor& z) {
  return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// (u, norm) of z: the normalised rows in the math type and the row norms.
template <typename T, typename A>
std::tuple<at::Tensor, at::Tensor> normalise(const at::Tensor& z) {
  const int64_t M = z.size(0), D = z.size(1);
  at::Tensor u = at::empty({M, D}, z.options().dtype(acc_of(z)));
  at::Tensor norm = at::empty({M}, u.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  nt_xent_normalise_kernel<T, A><<<(M + kWarps - 1) / kWarps, kThreads, 0, stream>>>(
      z.const_data_ptr<T>(), u.mutable_data_ptr<A>(), norm.mutable_data_ptr<A>(), M, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {u, norm};
}

std::tuple<at::Tensor, at::Tensor> nt_xent_forward_cuda(const at::Tensor& z_in, double temperature) {
  check_z(z_in, "nt_xent_forward");
  c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = z_in.contiguous();
  const int64_t M = z.size(0), D = z.size(1);
  at::Tensor row_loss = at::empty({M}, z.options().dtype(acc_of(z)));
  at::Tensor lse = at::empty({M}, row_loss.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "nt_xent_forward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    auto [u, norm] = normalise<scalar_t, A>(z);
    nt_xent_fwd_kernel<A><<<(M + kWarps - 1) / kWarps, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        u.const_data_ptr<A>(), row_loss.mutable_data_ptr<A>(), lse.mutable_data_ptr<A>(), M, D,
        static_cast<A>(1.0 / temperature));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {row_loss, lse};
}

at::Tensor nt_xent_backward_cuda(const at::Tensor& grad, const at::Tensor& z_in,
                                 const at::Tensor& lse_in, double temperature) {
  check_z(z_in, "nt_xent_backward");
  c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = z_in.contiguous();
  const int64_t M = z.size(0), D = z.size(1);
  TORCH_CHECK(lse_in.dim() == 1 && lse_in.size(0) == M, "nt_xent_backward: lse must have shape [", M,
              "], got ", lse_in.sizes());
  TORCH_CHECK(grad.numel() == 1, "nt_xent_backward: grad must hold one value, got ", grad.sizes());
  const at::Tensor lse = lse_in.to(z.device(), acc_of(z)).contiguous();
  const at::Tensor g = grad.to(z.device(), acc_of(z)).contiguous();
  at::Tensor gz = at::empty({M, D}, z.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "nt_xent_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    auto [u, norm] = normalise<scalar_t, A>(z);
    const dim3 grid((M + kWarps - 1) / kWarps, (D + kChunk - 1) / kChunk);
    nt_xent_bwd_kernel<scalar_t, A><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        u.const_data_ptr<A>(), norm.const_data_ptr<A>(), lse.const_data_ptr<A>(), g.const_data_ptr<A>(),
        gz.mutable_data_ptr<scalar_t>(), M, D, static_cast<A>(1.0 / temperature));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gz;
}

}  // namespace
}  // namespace cuda_impl
}  // namespace convkernels

TORCH_LIBRARY_IMPL(convkernels_C, CUDA, m) {
  m.impl("nt_xent_forward", &convkernels::cuda_impl::nt_xent_forward_cuda);
  m.impl("nt_xent_backward", &convkernels::cuda_impl::nt_xent_backward_cuda);
}

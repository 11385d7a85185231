// Deterministic two-stage per-channel reductions (no atomics).
//
// Stage 1 (one of two kernels, by layout) accumulates per thread in the
// accumulation type A (float, or double for float64 tensors), converts to a
// double-precision `Stat` and reduces the block in a fixed tree; each block
// writes one partial per channel into a double workspace [F, G, C]
// (G = blocks per channel). Stage 2 merges the G partials of each channel in a
// fixed order and writes the two [C] outputs. With G == 1 stage 1 writes the
// outputs directly.
//
//   * reduce_rows_kernel (NCHW): grid (C, G); block (tx along H*W, ty along N);
//     the (N rows x H*W) plane set of a channel is cut into units of ty rows x
//     tx*V columns, blocks of a channel take units round-robin.
//   * reduce_cols_kernel (NHWC): grid (channel blocks, G); block (bx channel
//     groups of V channels, by rows, by a power of two); loads are coalesced
//     along C, threads walk rows, the block reduces over its by rows in smem.
//
// A reduction Op provides (A = Op::acc_t, T = Op::scalar_t):
//   struct Params; Params params(int64_t c) const;   per-channel inputs
//   struct Slot;                                      per-thread, per-channel state
//   template <int V> void accum_chunk(Slot&, A& n, const Params&, int64_t off) const;
//       V contiguous elements of one channel (NCHW)
//   template <int V> void accum_row(Slot (&)[V], A& n, const Params (&)[V], int64_t off) const;
//       one element of each of V consecutive channels (NHWC)
//   Stat to_stat(const Slot&, A n) const;
// and a Stat type (below) with identity/merge/shfl_down/store/load/finalize.
#pragma once

#include "common.cuh"

namespace convkernels {
namespace cuda_impl {

// Count, mean and sum of squared deviations (Chan et al. merge), in double.
struct WelfordStat {
  static constexpr int kFields = 3;
  double n, mean, m2;

  __device__ static WelfordStat identity() { return {0.0, 0.0, 0.0}; }
  __device__ void merge(const WelfordStat& o) {
    if (o.n == 0.0) return;
    if (n == 0.0) {
      *this = o;
      return;
    }
    const double nn = n + o.n;
    const double w = o.n / nn;
    const double d = o.mean - mean;
    mean += d * w;
    m2 += o.m2 + d * d * n * w;
    n = nn;
  }
  __device__ WelfordStat shfl_down(int offset) const {
    return {__shfl_down_sync(0xffffffffu, n, offset), __shfl_down_sync(0xffffffffu, mean, offset),
            __shfl_down_sync(0xffffffffu, m2, offset)};
  }
  __device__ void store(double* ws, int64_t field_stride, int64_t i) const {
    ws[i] = n;
    ws[i + field_stride] = mean;
    ws[i + 2 * field_stride] = m2;
  }
  __device__ static WelfordStat load(const double* ws, int64_t field_stride, int64_t i) {
    return {ws[i], ws[i + field_stride], ws[i + 2 * field_stride]};
  }
  // mean and biased variance
  template <typename A>
  __device__ void finalize(A* out0, A* out1, int64_t c) const {
    out0[c] = static_cast<A>(n > 0.0 ? mean : NAN);
    out1[c] = static_cast<A>(n > 0.0 ? m2 / n : NAN);
  }
};

// Two plain sums, in double.
struct Sum2Stat {
  static constexpr int kFields = 2;
  double a, b;

  __device__ static Sum2Stat identity() { return {0.0, 0.0}; }
  __device__ void merge(const Sum2Stat& o) {
    a += o.a;
    b += o.b;
  }
  __device__ Sum2Stat shfl_down(int offset) const {
    return {__shfl_down_sync(0xffffffffu, a, offset), __shfl_down_sync(0xffffffffu, b, offset)};
  }
  __device__ void store(double* ws, int64_t field_stride, int64_t i) const {
    ws[i] = a;
    ws[i + field_stride] = b;
  }
  __device__ static Sum2Stat load(const double* ws, int64_t field_stride, int64_t i) {
    return {ws[i], ws[i + field_stride]};
  }
  template <typename A>
  __device__ void finalize(A* out0, A* out1, int64_t c) const {
    out0[c] = static_cast<A>(a);
    out1[c] = static_cast<A>(b);
  }
};

// Fixed-order reduction over the whole block (blockDim.x * blockDim.y a
// multiple of 32, at most 1024); the result is valid in thread 0.
template <typename S>
__device__ __forceinline__ S block_reduce(S s, S* smem /* [32] */) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s.merge(s.shfl_down(off));
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int nwarps = (blockDim.x * blockDim.y) >> 5;
  if (lane == 0) smem[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < nwarps ? smem[lane] : S::identity();
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s.merge(s.shfl_down(off));
  }
  return s;
}

template <int V, typename Op>
__global__ void __launch_bounds__(kThreads, 4)
    reduce_rows_kernel(const Op op, int64_t N, int64_t C, int64_t HW, int units, int col_chunks,
                       double* ws, typename Op::acc_t* out0, typename Op::acc_t* out1) {
  using A = typename Op::acc_t;
  using S = typename Op::Stat;
  const int64_t c = blockIdx.x;
  const typename Op::Params p = op.params(c);
  typename Op::Slot slot{};
  A n = A(0);
  for (int u = blockIdx.y; u < units; u += gridDim.y) {
    const int rg = u / col_chunks;
    const int cc = u - rg * col_chunks;
    const int64_t row = static_cast<int64_t>(rg) * blockDim.y + threadIdx.y;
    const int64_t col = (static_cast<int64_t>(cc) * blockDim.x + threadIdx.x) * V;
    if (row < N && col < HW) op.template accum_chunk<V>(slot, n, p, (row * C + c) * HW + col);
  }
  __shared__ S smem[32];
  const S s = block_reduce(op.to_stat(slot, n), smem);
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    if (gridDim.y == 1) {
      s.finalize(out0, out1, c);
    } else {
      s.store(ws, static_cast<int64_t>(gridDim.y) * C, static_cast<int64_t>(blockIdx.y) * C + c);
    }
  }
}

template <int V, typename Op>
__global__ void __launch_bounds__(kThreads, 4)
    reduce_cols_kernel(const Op op, int64_t R, int64_t C, double* ws, typename Op::acc_t* out0,
                       typename Op::acc_t* out1) {
  using A = typename Op::acc_t;
  using S = typename Op::Stat;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  const bool valid = c0 < C;
  typename Op::Slot slot[V];
#pragma unroll
  for (int j = 0; j < V; ++j) slot[j] = typename Op::Slot{};
  A n = A(0);
  if (valid) {
    typename Op::Params pv[V];
#pragma unroll
    for (int j = 0; j < V; ++j) pv[j] = op.params(c0 + j);
    const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
    const int64_t off_step = row_step * C;
    int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
    for (int64_t off = r * C + c0; r < R; r += row_step, off += off_step) {
      op.template accum_row<V>(slot, n, pv, off);
    }
  }
  __shared__ S smem[kThreads];
  const int bx = blockDim.x;
  const int me = threadIdx.y * bx + threadIdx.x;
  const int64_t field_stride = static_cast<int64_t>(gridDim.y) * C;
#pragma unroll
  for (int j = 0; j < V; ++j) {  // unrolled: slot[] stays in registers
    S s = op.to_stat(slot[j], n);
    smem[me] = s;
    for (int off = blockDim.y >> 1; off > 0; off >>= 1) {  // blockDim.y is a power of two
      __syncthreads();
      if (threadIdx.y < off) {
        s.merge(smem[me + off * bx]);
        smem[me] = s;
      }
    }
    if (threadIdx.y == 0 && valid) {
      if (gridDim.y == 1) {
        s.finalize(out0, out1, c0 + j);
      } else {
        s.store(ws, field_stride, static_cast<int64_t>(blockIdx.y) * C + c0 + j);
      }
    }
    __syncthreads();
  }
}

// Stage 2: block (32 channels, 8 lanes over G), fixed merge order.
template <typename S, typename A>
__global__ void __launch_bounds__(256)
    reduce_finalize_kernel(const double* ws, int64_t G, int64_t C, A* out0, A* out1) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  S s = S::identity();
  const int64_t field_stride = G * C;
  if (c < C) {
    for (int64_t g = threadIdx.y; g < G; g += 8) s.merge(S::load(ws, field_stride, g * C + c));
  }
  __shared__ S smem[8][32];
  smem[threadIdx.y][threadIdx.x] = s;
#pragma unroll
  for (int off = 4; off > 0; off >>= 1) {
    __syncthreads();
    if (threadIdx.y < off) {
      s.merge(smem[threadIdx.y + off][threadIdx.x]);
      smem[threadIdx.y][threadIdx.x] = s;
    }
  }
  if (threadIdx.y == 0 && c < C) s.finalize(out0, out1, c);
}

// Runs both stages of `op` over a tensor of geometry g; out0/out1 are [C]
// outputs of type A. `vec` from pick_vec(g.row_len(), ...). `options` gives the
// device for the workspace.
template <typename Op>
void launch_reduce(const Op& op, const Geometry& g, int vec, typename Op::acc_t* out0,
                   typename Op::acc_t* out1, const at::TensorOptions& options) {
  using T = typename Op::scalar_t;
  using A = typename Op::acc_t;
  using S = typename Op::Stat;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t target = resident_blocks(1);
  constexpr int64_t kMinVectorsPerThread = 4;
  at::Tensor ws;
  int64_t G = 1;

  dispatch_vec<T>(vec, [&](auto vc) {
    constexpr int V = decltype(vc)::value;
    // Blocks beyond this leave fewer than kMinVectorsPerThread loads per thread.
    const int64_t per_channel = g.N * g.HW;
    if (g.layout == Layout::kNCHW) {
      const int64_t lv = ceil_div(g.HW, V);
      const int tx = row_threads(lv);
      const int ty = kThreads / tx;
      const int64_t col_chunks = ceil_div(lv, tx);
      const int64_t units = ceil_div(g.N, ty) * col_chunks;
      TORCH_CHECK(units < (int64_t{1} << 31), "convkernels: tensor too large for channel reduction");
      TORCH_CHECK(g.C <= kMaxGridX, "convkernels: too many channels");
      const int64_t max_work = std::max<int64_t>(1, per_channel / (kThreads * V * kMinVectorsPerThread));
      G = std::min<int64_t>({units, std::max<int64_t>(1, target / g.C), max_work, kMaxGridY});
      if (G > 1) ws = at::empty({S::kFields, G, g.C}, options.dtype(at::kDouble));
      reduce_rows_kernel<V, Op><<<dim3(static_cast<unsigned>(g.C), static_cast<unsigned>(G)),
                                  dim3(tx, ty), 0, stream>>>(
          op, g.N, g.C, g.HW, static_cast<int>(units), static_cast<int>(col_chunks),
          G > 1 ? ws.data_ptr<double>() : nullptr, out0, out1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int64_t R = g.N * g.HW;
      const int64_t cv = g.C / V;
      const int bx = static_cast<int>(std::min<int64_t>(cv, 32));
      const int by = pow2_floor(kThreads / bx);
      const int64_t cblocks = ceil_div(cv, bx);
      TORCH_CHECK(cblocks <= kMaxGridX, "convkernels: too many channels");
      const int64_t max_work = std::max<int64_t>(1, R / (by * kMinVectorsPerThread));
      G = std::min<int64_t>(
          {ceil_div(R, by), std::max<int64_t>(1, target / cblocks), max_work, kMaxGridY});
      if (G > 1) ws = at::empty({S::kFields, G, g.C}, options.dtype(at::kDouble));
      reduce_cols_kernel<V, Op><<<dim3(static_cast<unsigned>(cblocks), static_cast<unsigned>(G)),
                                  dim3(bx, by), 0, stream>>>(
          op, R, g.C, G > 1 ? ws.data_ptr<double>() : nullptr, out0, out1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });

  if (G > 1) {
    reduce_finalize_kernel<S, A><<<static_cast<unsigned>(ceil_div(g.C, 32)), dim3(32, 8), 0, stream>>>(
        ws.data_ptr<double>(), G, g.C, out0, out1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace cuda_impl
}  // namespace convkernels

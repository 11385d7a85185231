// Shared host and device helpers of the CUDA primitives (csrc/cuda/*.cu).
//
// Host side: argument checks, layout detection, vector-width choice, launch
// configuration. Device side: vectorized loads/stores and the two generic
// elementwise kernels every elementwise primitive is an `Op` of:
//
//   * ew_rows_kernel: the tensor viewed as R rows of L contiguous elements,
//     every element of row r uses op.params(r % P). NCHW BN ops: rows are the
//     N*C planes (P = C); add_act: rows are the N samples (P = N).
//   * ew_cols_kernel: the tensor viewed as R rows of C contiguous channels,
//     element (r, c) uses op.params(c) (channels_last BN ops). A thread owns a
//     fixed group of V channels, loads their parameters once and walks rows.
//
// Neither kernel divides per element. An Op provides
//   struct Params;  Params params(int64_t i) const;
//   template <int V> void apply(int64_t off, const Params (&p)[V]) const;
// where apply processes the V contiguous elements at `off` (p[j] for element j).
#pragma once

// Per-op headers, not <ATen/ATen.h>, whose every op's declarations cost each
// .cu file's host and device passes (measured: 85 -> 67 s for bn_act_kernels.cu).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "activation.h"

namespace convkernels {
namespace cuda_impl {

// ---------------------------------------------------------------- host checks

enum class Layout { kNCHW, kNHWC };

inline at::MemoryFormat memory_format(Layout l) {
  return l == Layout::kNCHW ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
}

// Sizes and memory layout of the 4-D tensors of one call.
struct Geometry {
  int64_t N, C, HW;
  Layout layout;
  int64_t numel() const { return N * C * HW; }
  // Length of the contiguous run that shares one parameter row (rows kernel)
  // or one channel pattern (cols kernel): the vector width must divide it.
  int64_t row_len() const { return layout == Layout::kNCHW ? HW : C; }
};

// Checks the primary 4-D tensor `x` and returns its geometry. When x is both
// NCHW- and channels_last-contiguous (C == 1 or H*W == 1) the two layouts
// address memory identically; NHWC is chosen for H*W == 1 (long rows of C).
inline Geometry geometry_of(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "convkernels: ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 4, "convkernels: ", name, " must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "convkernels: ", name, " must be float32, float16, bfloat16 or float64, got ", st);
  Geometry g{x.size(0), x.size(1), x.size(2) * x.size(3), Layout::kNCHW};
  const bool nchw = x.is_contiguous();
  const bool nhwc = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(nchw || nhwc, "convkernels: ", name,
              " must be NCHW-contiguous or channels_last-contiguous");
  g.layout = (nhwc && (!nchw || g.HW == 1)) ? Layout::kNHWC : Layout::kNCHW;
  return g;
}

// `t` must match `x` (device, dtype, sizes) and be dense in x's layout.
inline void check_like(const at::Tensor& t, const at::Tensor& x, const Geometry& g, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "convkernels: ", name, " must be on ", x.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "convkernels: ", name, " must have dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), "convkernels: ", name, " must have shape ", x.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(memory_format(g.layout)), "convkernels: ", name,
              " must be in the same memory format as the input (",
              g.layout == Layout::kNCHW ? "NCHW" : "channels_last", ")");
}

inline at::ScalarType acc_type_of(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// A contiguous 1-D vector of `n` elements of x's accumulation dtype.
inline void check_vector(const at::Tensor& v, int64_t n, const at::Tensor& x, const char* name) {
  const auto acc = acc_type_of(x.scalar_type());
  TORCH_CHECK(v.device() == x.device(), "convkernels: ", name, " must be on ", x.device(),
              ", got ", v.device());
  TORCH_CHECK(v.scalar_type() == acc, "convkernels: ", name, " must have dtype ", acc,
              ", got ", v.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n && v.is_contiguous(), "convkernels: ", name,
              " must be a contiguous [", n, "] tensor, got shape ", v.sizes());
}

// Optional residual: nullptr when absent.
template <typename T>
inline const T* optional_ptr(const std::optional<at::Tensor>& t, const at::Tensor& x,
                             const Geometry& g, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_like(*t, x, g, name);
  return t->const_data_ptr<T>();
}

// --------------------------------------------------------------- vector width

// Widest vector is 16 bytes; the candidates are 16, 8 bytes and one element.
template <typename T>
constexpr int kMaxVec = static_cast<int>(16 / sizeof(T));
template <typename T>
constexpr int kMidVec = kMaxVec<T> / 2 > 1 ? kMaxVec<T> / 2 : 1;

// Largest candidate width that divides `len` and to which every non-null
// pointer is aligned (all tensors start at element 0 of a dense buffer, so
// row starts stay aligned when len is a multiple of the width).
template <typename T>
inline int pick_vec(int64_t len, std::initializer_list<const void*> ptrs) {
  for (int v : {kMaxVec<T>, kMidVec<T>}) {
    if (v == 1 || len % v != 0) continue;
    bool ok = true;
    for (const void* p : ptrs) {
      if (p != nullptr && reinterpret_cast<std::uintptr_t>(p) % (v * sizeof(T)) != 0) ok = false;
    }
    if (ok) return v;
  }
  return 1;
}

// Calls f(std::integral_constant<int, V>{}) for the chosen width.
template <typename T, typename F>
inline void dispatch_vec(int v, F&& f) {
  if (v == kMaxVec<T>) {
    f(std::integral_constant<int, kMaxVec<T>>{});
  } else if (v == kMidVec<T>) {
    f(std::integral_constant<int, kMidVec<T>>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// ---------------------------------------------------------- launch configuration

constexpr int kThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int pow2_ceil_clamped(int64_t v, int lo, int hi) {
  int p = lo;
  while (p < v && p < hi) p <<= 1;
  return p;
}

// Threads along a row of lv vectors: lv rounded up to a power of two, at most
// kThreads; the rest of the block takes further rows. Short rows (small NCHW
// images: 4x4, 8x8) share a warp instead of leaving most of it idle.
inline int row_threads(int64_t lv) { return pow2_ceil_clamped(lv, 1, kThreads); }

inline int pow2_floor(int64_t v) {
  int p = 1;
  while (2 * p <= v) p <<= 1;
  return p;
}

// Blocks that keep every SM full (kThreads-thread blocks), times `waves`.
inline int64_t resident_blocks(int waves = 1) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const int per_sm = prop->maxThreadsPerMultiProcessor / kThreads;
  return static_cast<int64_t>(prop->multiProcessorCount) * (per_sm > 0 ? per_sm : 1) * waves;
}

constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;

struct LaunchConfig {
  dim3 grid, block;
};

// Rows kernel over R rows of L elements, V elements per thread step:
// block (tx along the row, ty rows), grid (row blocks, column blocks).
inline LaunchConfig rows_config(int64_t R, int64_t L, int V) {
  const int64_t lv = ceil_div(L, V);
  const int tx = row_threads(lv);
  const int ty = kThreads / tx;
  const int64_t gy = std::min<int64_t>(ceil_div(lv, tx), kMaxGridY);
  const int64_t cap = std::max<int64_t>(1, resident_blocks(4) / gy);
  const int64_t gx = std::min<int64_t>({ceil_div(R, ty), cap, kMaxGridX});
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(tx, ty)};
}

// Cols kernel over R rows of C channels, V channels per thread:
// block (bx channel groups, by rows), grid (row blocks, channel blocks).
inline LaunchConfig cols_config(int64_t R, int64_t C, int V) {
  const int64_t cv = C / V;
  const int64_t gy = ceil_div(cv, kThreads);
  const int bx = static_cast<int>(ceil_div(cv, gy));
  const int by = std::max(1, kThreads / bx);
  TORCH_CHECK(gy <= kMaxGridY, "convkernels: too many channels (", C, ")");
  const int64_t cap = std::max<int64_t>(1, resident_blocks(4) / gy);
  const int64_t gx = std::min<int64_t>({ceil_div(R, by), cap, kMaxGridX});
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(bx, by)};
}

// ------------------------------------------------------------- device helpers

template <typename T, int V>
struct alignas(sizeof(T) * V) VecT {
  T v[V];
};

// Raw read-only load of sizeof(T) * V bytes (1 to 16) through the
// non-coherent path, converted to the accumulation type A.
template <int V, typename T, typename A>
__device__ __forceinline__ void load_vec(const T* p, A (&out)[V]) {
  constexpr int kBytes = sizeof(T) * V;
  VecT<T, V> r;
  if constexpr (kBytes == 16) {
    const int4 b = __ldg(reinterpret_cast<const int4*>(p));
    memcpy(&r, &b, 16);
  } else if constexpr (kBytes == 8) {
    const int2 b = __ldg(reinterpret_cast<const int2*>(p));
    memcpy(&r, &b, 8);
  } else if constexpr (kBytes == 4) {
    const int b = __ldg(reinterpret_cast<const int*>(p));
    memcpy(&r, &b, 4);
  } else {
    static_assert(kBytes == 2, "unsupported vector size");
    const unsigned short b = __ldg(reinterpret_cast<const unsigned short*>(p));
    memcpy(&r, &b, 2);
  }
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = static_cast<A>(r.v[j]);
}

template <int V, typename T, typename A>
__device__ __forceinline__ void store_vec(T* p, const A (&in)[V]) {
  VecT<T, V> r;
#pragma unroll
  for (int j = 0; j < V; ++j) r.v[j] = static_cast<T>(in[j]);
  *reinterpret_cast<VecT<T, V>*>(p) = r;
}

// Batch-norm pre-activation of V contiguous elements at `off`:
// xv = x, z = x * p.scale + p.shift (+ residual); P has members scale, shift.
template <int V, typename T, typename A, typename P>
__device__ __forceinline__ void bn_preact(const T* x, const T* res, int64_t off, const P (&p)[V],
                                          A (&xv)[V], A (&z)[V]) {
  load_vec<V>(x + off, xv);
#pragma unroll
  for (int j = 0; j < V; ++j) z[j] = xv[j] * p[j].scale + p[j].shift;
  if (res != nullptr) {
    A rv[V];
    load_vec<V>(res + off, rv);
#pragma unroll
    for (int j = 0; j < V; ++j) z[j] += rv[j];
  }
}

// ---------------------------------------------------------- elementwise kernels

template <int V, typename Op>
__global__ void __launch_bounds__(kThreads)
    ew_rows_kernel(const Op op, int64_t R, int64_t L, int64_t P) {
  const int64_t col0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  if (col0 >= L) return;
  const int64_t col_step = static_cast<int64_t>(gridDim.y) * blockDim.x * V;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < R; r += row_step) {
    const typename Op::Params p = op.params(r % P);
    typename Op::Params pv[V];
#pragma unroll
    for (int j = 0; j < V; ++j) pv[j] = p;
    const int64_t base = r * L;
    for (int64_t col = col0; col < L; col += col_step) op.template apply<V>(base + col, pv);
  }
}

template <int V, typename Op>
__global__ void __launch_bounds__(kThreads) ew_cols_kernel(const Op op, int64_t R, int64_t C) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  if (c0 >= C) return;
  typename Op::Params pv[V];
#pragma unroll
  for (int j = 0; j < V; ++j) pv[j] = op.params(c0 + j);
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  const int64_t off_step = row_step * C;
  int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  for (int64_t off = r * C + c0; r < R; r += row_step, off += off_step) {
    op.template apply<V>(off, pv);
  }
}

// Rows view: R rows of L elements, params(r % P). `vec` from pick_vec.
template <typename T, typename Op>
inline void launch_rows(const Op& op, int64_t R, int64_t L, int64_t P, int vec) {
  if (R == 0 || L == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_vec<T>(vec, [&](auto vc) {
    constexpr int V = decltype(vc)::value;
    const LaunchConfig cfg = rows_config(R, L, V);
    ew_rows_kernel<V, Op><<<cfg.grid, cfg.block, 0, stream>>>(op, R, L, P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Per-channel elementwise op over a 4-D tensor in either layout.
template <typename T, typename Op>
inline void launch_channelwise(const Op& op, const Geometry& g, int vec) {
  if (g.numel() == 0) return;
  if (g.layout == Layout::kNCHW) {
    launch_rows<T>(op, g.N * g.C, g.HW, g.C, vec);
    return;
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t R = g.N * g.HW;
  dispatch_vec<T>(vec, [&](auto vc) {
    constexpr int V = decltype(vc)::value;
    const LaunchConfig cfg = cols_config(R, g.C, V);
    ew_cols_kernel<V, Op><<<cfg.grid, cfg.block, 0, stream>>>(op, R, g.C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda_impl
}  // namespace convkernels

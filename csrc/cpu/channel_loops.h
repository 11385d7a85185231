// The two loop drivers behind every CPU primitive, for a 4-D tensor that is
// dense in NCHW or in channels_last:
//
//   channel_map(L, chan, samp, f)            per-element map
//   channel_reduce<K>(L, chan, f) -> [K][C]  per-channel sums (double)
//
// Both call the op's kernel `f(off, n, P)` on one vector step: the elements
// [off, off + lanes(n)) of the flat (memory-order) tensor, where `n` is Full or
// an int64_t tail count (`off` is an Off: it converts to that flat offset, and
// off.x is the step's offset into x, which may be a channel slice of a larger
// tensor, see Layout::xrow), and P[i] holds, lane by lane, the per-channel
// parameter chan[i][c] of each element (then, for channel_map, the per-sample
// parameters samp[j][n]). NCHW: a step lies in one (n, c) plane and the
// parameters are broadcast once per plane. channels_last: a step covers
// consecutive channels of one (n, h, w) row and the parameters are loaded from
// the [C] vectors. `f` of channel_reduce returns std::array<V, K>; its values
// are summed per channel in double (lanes past a tail are zeroed here).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <array>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/vec_utils.h"

namespace convkernels {
namespace cpu {

struct Layout {
  int64_t N = 0, C = 0, HW = 0;
  bool channels_last = false;
  // x's row stride: NCHW, from one sample to the next (C * HW when dense);
  // channels_last, from one pixel to the next (C when dense). Larger for a
  // channel slice of a bigger tensor (a DenseNet block's feature buffer): the
  // kernels then read x in place instead of from a dense copy.
  int64_t xrow = 0;
  int64_t numel() const { return N * C * HW; }
  at::MemoryFormat format() const {
    return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
};

// A vector step's offsets: `d` into the dense tensors of the call (outputs,
// grad_y, residual; the flat memory-order index) and `x` into x.
struct Off {
  int64_t d, x;
  operator int64_t() const { return d; }
};

// x is a channel slice of a dense NCHW (or channels_last) tensor: NCHW strides
// but for a larger batch stride (pixel stride, channels_last).
inline bool row_strided_nchw(const at::Tensor& x) {
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  return x.stride(3) == 1 && x.stride(2) == W && x.stride(1) == H * W && x.stride(0) >= C * H * W;
}
inline bool row_strided_cl(const at::Tensor& x) {
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3), P = x.stride(3);
  return x.stride(1) == 1 && P >= C && x.stride(2) == W * P && x.stride(0) == H * W * P;
}

// Checks that x and the defined tensors of `others` are 4-D, of x's dtype and
// shape, on the CPU, and all dense in one format (NCHW preferred when both fit).
// With `strided_x`, x may instead be a channel slice of a dense tensor in that
// format (row_strided_*), for the kernels that read it through Off::x.
inline Layout check_layout(const char* op, const at::Tensor& x,
                           std::initializer_list<const at::Tensor*> others,
                           bool strided_x = false) {
  TORCH_CHECK(x.dim() == 4, op, ": expected a 4-D tensor, got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), op, ": expected CPU tensors");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": unsupported dtype ", dt);
  bool nchw = x.is_contiguous();
  bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  bool sliced = false;
  if (strided_x && !nchw && !cl && x.numel() > 0) {
    nchw = row_strided_nchw(x);
    cl = !nchw && row_strided_cl(x);
    sliced = nchw || cl;
  }
  for (const at::Tensor* t : others) {
    if (t == nullptr || !t->defined()) continue;
    TORCH_CHECK(t->scalar_type() == dt, op, ": all tensors must have dtype ", dt, ", got ",
                t->scalar_type());
    TORCH_CHECK(t->sizes() == x.sizes(), op, ": shape mismatch ", t->sizes(), " vs ", x.sizes());
    TORCH_CHECK(t->device().is_cpu(), op, ": expected CPU tensors");
    nchw = nchw && t->is_contiguous();
    cl = cl && t->is_contiguous(at::MemoryFormat::ChannelsLast);
  }
  TORCH_CHECK(nchw || cl, op,
              ": tensors must all be NCHW-contiguous or all channels_last-contiguous",
              strided_x ? " (x may be a channel slice of one)" : "");
  Layout L;
  L.N = x.size(0);
  L.C = x.size(1);
  L.HW = x.size(2) * x.size(3);
  L.channels_last = !nchw;
  L.xrow = sliced ? (nchw ? x.stride(0) : x.stride(3)) : (nchw ? L.C * L.HW : L.C);
  return L;
}

// Checks a per-channel (or per-sample) vector: contiguous [len] of dtype `dt`.
inline void check_vec(const char* op, const char* name, const at::Tensor& v, int64_t len,
                      at::ScalarType dt) {
  TORCH_CHECK(v.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(v.numel() == len && v.dim() == 1, op, ": ", name, " must have shape [", len,
              "], got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == dt, op, ": ", name, " must have dtype ", dt, ", got ",
              v.scalar_type());
  TORCH_CHECK(v.is_contiguous() && v.device().is_cpu(), op, ": ", name,
              " must be a contiguous CPU tensor");
}

inline at::ScalarType acc_scalar_type(at::ScalarType dt) {
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

inline Act act_of(c10::string_view act) { return parse_act(std::string(act.data(), act.size())); }

inline const at::Tensor* opt_ptr(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? &*t : nullptr;
}

// Runs the lambda (__VA_ARGS__) for the dtypes of the contract: float, double,
// half, bfloat16. In the lambda's scope: scalar_t (the tensor dtype), M (its
// math type, opmath_t), V = Vectorized<M> and io = IO<scalar_t>.
#define CK_DISPATCH(TYPE, NAME, ...)                                             \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, [&] {   \
    using M = ::convkernels::cpu::opmath_t<scalar_t>;                            \
    using V = ::convkernels::cpu::Vectorized<M>;                                 \
    using io = ::convkernels::cpu::IO<scalar_t>;                                 \
    (__VA_ARGS__)();                                                             \
  })

// A new tensor of x's shape and dtype, dense in L's format (x itself may be a slice).
inline at::Tensor empty_dense(const at::Tensor& x, const Layout& L) {
  return at::empty(x.sizes(), x.options().memory_format(L.format()));
}

// (grad_x, grad_residual) of a backward primitive: each is allocated (like x)
// only when asked for; pointers to an output not asked for are null.
struct GradOutputs {
  at::Tensor x, r;
  GradOutputs(const at::Tensor& like, const Layout& L, bool need_x, bool need_r)
      : x(need_x ? empty_dense(like, L) : at::Tensor()),
        r(need_r ? empty_dense(like, L) : at::Tensor()) {}
  bool none() const { return !x.defined() && !r.defined(); }
  template <typename T>
  T* x_ptr() { return x.defined() ? x.mutable_data_ptr<T>() : nullptr; }
  template <typename T>
  T* r_ptr() { return r.defined() ? r.mutable_data_ptr<T>() : nullptr; }
  std::tuple<at::Tensor, at::Tensor> tuple() const { return {x, r}; }
};

// Elements per parallel task (memory-bound loops: big chunks).
constexpr int64_t kGrain = 32768;

// Outputs at least this large (half a typical server L3) are written with
// non-temporal stores (see channel_map): they would not stay in the caches
// anyway, and streaming them saves the read-for-ownership traffic of ordinary
// stores (measured: bn_act_apply fp32 [32,256,28,28] 3.3 -> 2.2 ms, 1 thread).
constexpr int64_t kStreamBytes = int64_t(16) << 20;

// Whether channel_map should stream an output of `numel` elements of `elem_size` bytes.
inline bool want_stream(const Layout& L, size_t elem_size) {
  return L.numel() * static_cast<int64_t>(elem_size) >= kStreamBytes;
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// ---------------------------------------------------------------------------
// Per-element map. With `stream`, full vector steps get the tag FullNT (IO
// stores then bypass the caches where aligned) instead of Full.
// ---------------------------------------------------------------------------
template <typename M, size_t NC, size_t NS, typename F>
void channel_map(const Layout& L, const std::array<const M*, NC>& chan,
                 const std::array<const M*, NS>& samp, const F& f, bool stream = false) {
  if (L.numel() == 0) return;
  auto run = [&](auto tag) {
    using Tag = decltype(tag);
    using V = Vectorized<M>;
    constexpr int64_t W = V::size();
    if (!L.channels_last) {
      // Parallel over whole vectors, so that chunks start W-aligned.
      const int64_t nvec = (L.numel() + W - 1) / W;
      at::parallel_for(0, nvec, kGrain / W, [&](int64_t vbegin, int64_t vend) {
        // Local copies: the vector stores are may-alias, so anything reached
        // through a reference would be reloaded after each store.
        const F fn = f;
        const auto cp = chan;
        const auto sp = samp;
        const int64_t C = L.C, HW = L.HW, xrow = L.xrow;
        const int64_t end = std::min(vend * W, L.numel());
        int64_t i = vbegin * W;
        std::array<V, NC + NS + 1> P;
        while (i < end) {
          const int64_t plane = i / HW;
          const int64_t pend = std::min(end, (plane + 1) * HW);
          const int64_t c = plane % C, n = plane / C;
          const int64_t dx = n * (xrow - C * HW);  // x's offset minus the dense one
          for (size_t k = 0; k < NC; ++k) P[k] = V(cp[k][c]);
          for (size_t k = 0; k < NS; ++k) P[NC + k] = V(sp[k][n]);
          for (; i + W <= pend; i += W) fn(Off{i, i + dx}, Tag{}, P.data());
          if (i < pend) {
            fn(Off{i, i + dx}, pend - i, P.data());
            i = pend;
          }
        }
        if constexpr (std::is_same_v<Tag, FullNT>) stream_fence();
      });
    } else {
      const int64_t rows = L.N * L.HW;
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / L.C), [&](int64_t begin, int64_t end) {
        const F fn = f;
        const auto cp = chan;
        const auto sp = samp;
        const int64_t C = L.C, HW = L.HW, xrow = L.xrow;
        std::array<V, NC + NS + 1> P;
        for (int64_t r = begin; r < end; ++r) {
          const int64_t n = r / HW;
          for (size_t k = 0; k < NS; ++k) P[NC + k] = V(sp[k][n]);
          const int64_t base = r * C, xbase = r * xrow;
          int64_t c = 0;
          for (; c + W <= C; c += W) {
            for (size_t k = 0; k < NC; ++k) P[k] = V::loadu(cp[k] + c);
            fn(Off{base + c, xbase + c}, Tag{}, P.data());
          }
          if (c < C) {
            for (size_t k = 0; k < NC; ++k) P[k] = V::loadu(cp[k] + c, C - c);
            fn(Off{base + c, xbase + c}, C - c, P.data());
          }
        }
        if constexpr (std::is_same_v<Tag, FullNT>) stream_fence();
      });
    }
  };
  if (stream) {
    run(FullNT{});
  } else {
    run(Full{});
  }
}

// ---------------------------------------------------------------------------
// Per-channel reduction: returns K*C doubles, out[k*C + c] = sum over the
// elements of channel c of f(...)[k]. Two-level: partial sums of a few
// vectors (NCHW) or rows (channels_last) in the math type, added into double
// accumulators. Deterministic for a given thread count (fixed chunks, each
// with its own accumulators, combined in order).
// ---------------------------------------------------------------------------
constexpr int64_t kInnerVecs = 16;  // NCHW: vectors per math-type partial sum
constexpr int64_t kInnerRows = 16;  // channels_last: rows per math-type partial sum

template <size_t K, typename M, size_t NC, typename F>
std::vector<double> channel_reduce(const Layout& L, const std::array<const M*, NC>& chan,
                                   const F& f) {
  using V = Vectorized<M>;
  constexpr int64_t W = V::size();
  const int64_t C = L.C, HW = L.HW;
  std::vector<double> out(K * C, 0.0);
  const int64_t total = L.numel();
  if (total == 0) return out;

  // Work units: elements (NCHW) or rows of C (channels_last).
  const int64_t units = L.channels_last ? L.N * HW : total;
  const int64_t unit_grain = L.channels_last ? std::max<int64_t>(1, kGrain / C) : kGrain;
  const int64_t nchunks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (units + unit_grain - 1) / unit_grain));
  const int64_t chunk = (units + nchunks - 1) / nchunks;
  const int64_t Cpad = (C + W - 1) / W * W;  // channels_last rows are padded to whole vectors
  std::vector<double> buf(nchunks * K * Cpad, 0.0);

  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    const F fn = f;
    const auto cp = chan;
    const int64_t C = L.C, HW = L.HW, Cp = Cpad, xrow = L.xrow;
    std::vector<M> part(L.channels_last ? K * Cp : 0);  // channels_last partial sums
    for (int64_t ch = cb; ch < ce; ++ch) {
      double* acc = buf.data() + ch * K * Cp;
      const int64_t begin = ch * chunk, end = std::min(units, begin + chunk);
      std::array<V, NC + 1> P;
      if (!L.channels_last) {
        int64_t i = begin;
        while (i < end) {
          const int64_t plane = i / HW;
          const int64_t pend = std::min(end, (plane + 1) * HW);
          const int64_t c = plane % C;
          const int64_t dx = (plane / C) * (xrow - C * HW);
          for (size_t k = 0; k < NC; ++k) P[k] = V(cp[k][c]);
          std::array<DAcc<M>, K> a;
          while (i + W <= pend) {
            const int64_t stop = std::min(pend, i + kInnerVecs * W);
            std::array<V, K> s;
            s.fill(V(0));
            for (; i + W <= stop; i += W) {
              const std::array<V, K> v = fn(Off{i, i + dx}, Full{}, P.data());
              for (size_t k = 0; k < K; ++k) s[k] = s[k] + v[k];
            }
            for (size_t k = 0; k < K; ++k) a[k].add(s[k]);
          }
          if (i < pend) {
            const int64_t n = pend - i;
            const std::array<V, K> v = fn(Off{i, i + dx}, n, P.data());
            for (size_t k = 0; k < K; ++k) a[k].add(mask_tail(v[k], n));
            i = pend;
          }
          for (size_t k = 0; k < K; ++k) acc[k * Cp + c] += a[k].sum();
        }
      } else {
        M* pp = part.data();
        for (int64_t r0 = begin; r0 < end; r0 += kInnerRows) {
          std::fill(pp, pp + K * Cp, M(0));
          const int64_t r1 = std::min(end, r0 + kInnerRows);
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t base = r * C, xbase = r * xrow;
            int64_t c = 0;
            for (; c + W <= C; c += W) {
              for (size_t k = 0; k < NC; ++k) P[k] = V::loadu(cp[k] + c);
              const std::array<V, K> v = fn(Off{base + c, xbase + c}, Full{}, P.data());
              for (size_t k = 0; k < K; ++k) (V::loadu(pp + k * Cp + c) + v[k]).store(pp + k * Cp + c);
            }
            if (c < C) {
              const int64_t n = C - c;
              for (size_t k = 0; k < NC; ++k) P[k] = V::loadu(cp[k] + c, n);
              const std::array<V, K> v = fn(Off{base + c, xbase + c}, n, P.data());
              for (size_t k = 0; k < K; ++k)
                (V::loadu(pp + k * Cp + c) + mask_tail(v[k], n)).store(pp + k * Cp + c);
            }
          }
          for (int64_t j = 0; j < static_cast<int64_t>(K) * Cp; j += W) DAcc<M>::rmw(acc + j, V::loadu(pp + j));
        }
      }
    }
  });

  for (int64_t ch = 0; ch < nchunks; ++ch) {
    const double* acc = buf.data() + ch * K * Cpad;
    for (size_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < C; ++c) out[k * C + c] += acc[k * Cpad + c];
  }
  return out;
}

}  // namespace cpu
}  // namespace convkernels

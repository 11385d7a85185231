// The two loop drivers behind every CPU primitive, for a 4-D tensor that is
// dense in NCHW or in channels_last:
//
//   channel_map(L, chan, samp, f)            per-element map
//   channel_reduce<K>(L, chan, f) -> [K][C]  per-channel sums (double)
//
// Both call the op's kernel `f(off, n, P)` on one vector step: the elements
// [off, off + lanes(n)) of the flat (memory-order) tensor, where `n` is Full or
// an int64_t tail count, and P[i] holds, lane by lane, the per-channel
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

#include <algorithm>
#include <array>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#include "cpu/vec_utils.h"

namespace convkernels {
namespace cpu {

struct Layout {
  int64_t N = 0, C = 0, HW = 0;
  bool channels_last = false;
  int64_t numel() const { return N * C * HW; }
};

// Checks that x and the defined tensors of `others` are 4-D, of x's dtype and
// shape, on the CPU, and all dense in one format (NCHW preferred when both fit).
inline Layout check_layout(const char* op, const at::Tensor& x,
                           std::initializer_list<const at::Tensor*> others) {
  TORCH_CHECK(x.dim() == 4, op, ": expected a 4-D tensor, got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), op, ": expected CPU tensors");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": unsupported dtype ", dt);
  bool nchw = x.is_contiguous();
  bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast);
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
              ": tensors must all be NCHW-contiguous or all channels_last-contiguous");
  Layout L;
  L.N = x.size(0);
  L.C = x.size(1);
  L.HW = x.size(2) * x.size(3);
  L.channels_last = !nchw;
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

// The dtypes of the contract: float, double, half, bfloat16.
#define CK_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Elements per parallel task (memory-bound loops: big chunks).
constexpr int64_t kGrain = 32768;

// ---------------------------------------------------------------------------
// Per-element map.
// ---------------------------------------------------------------------------
template <typename M, size_t NC, size_t NS, typename F>
void channel_map(const Layout& L, const std::array<const M*, NC>& chan,
                 const std::array<const M*, NS>& samp, const F& f) {
  using V = Vectorized<M>;
  constexpr int64_t W = V::size();
  constexpr size_t NP = NC + NS;
  const int64_t C = L.C, HW = L.HW;
  if (L.numel() == 0) return;
  if (!L.channels_last) {
    at::parallel_for(0, L.numel(), kGrain, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      while (i < end) {
        const int64_t plane = i / HW;
        const int64_t pend = std::min(end, (plane + 1) * HW);
        const int64_t c = plane % C, n = plane / C;
        std::array<V, NP + 1> P;
        for (size_t k = 0; k < NC; ++k) P[k] = V(chan[k][c]);
        for (size_t k = 0; k < NS; ++k) P[NC + k] = V(samp[k][n]);
        for (; i + W <= pend; i += W) f(i, Full{}, P.data());
        if (i < pend) {
          f(i, pend - i, P.data());
          i = pend;
        }
      }
    });
  } else {
    const int64_t rows = L.N * HW;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / C), [&](int64_t begin, int64_t end) {
      std::array<V, NP + 1> P;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / HW;
        for (size_t k = 0; k < NS; ++k) P[NC + k] = V(samp[k][n]);
        const int64_t base = r * C;
        int64_t c = 0;
        for (; c + W <= C; c += W) {
          for (size_t k = 0; k < NC; ++k) P[k] = V::loadu(chan[k] + c);
          f(base + c, Full{}, P.data());
        }
        if (c < C) {
          for (size_t k = 0; k < NC; ++k) P[k] = V::loadu(chan[k] + c, C - c);
          f(base + c, C - c, P.data());
        }
      }
    });
  }
}

// ---------------------------------------------------------------------------
// Per-channel reduction: returns K*C doubles, out[k*C + c] = sum over the
// elements of channel c of f(...)[k]. Deterministic for a given thread count
// (fixed chunks, each with its own accumulators, combined in order).
// ---------------------------------------------------------------------------
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
  const int64_t nchunks =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (units + unit_grain - 1) / unit_grain));
  const int64_t chunk = (units + nchunks - 1) / nchunks;
  const int64_t Cpad = (C + W - 1) / W * W;  // channels_last rows are padded to whole vectors
  std::vector<double> buf(nchunks * K * Cpad, 0.0);

  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      double* acc = buf.data() + ch * K * Cpad;
      const int64_t begin = ch * chunk, end = std::min(units, begin + chunk);
      if (!L.channels_last) {
        int64_t i = begin;
        std::array<V, NC + 1> P;
        while (i < end) {
          const int64_t plane = i / HW;
          const int64_t pend = std::min(end, (plane + 1) * HW);
          const int64_t c = plane % C;
          for (size_t k = 0; k < NC; ++k) P[k] = V(chan[k][c]);
          std::array<DAcc<M>, K> a;
          for (; i + W <= pend; i += W) {
            const std::array<V, K> v = f(i, Full{}, P.data());
            for (size_t k = 0; k < K; ++k) a[k].add(v[k]);
          }
          if (i < pend) {
            const int64_t n = pend - i;
            const std::array<V, K> v = f(i, n, P.data());
            for (size_t k = 0; k < K; ++k) a[k].add(mask_tail(v[k], n));
            i = pend;
          }
          for (size_t k = 0; k < K; ++k) acc[k * Cpad + c] += a[k].sum();
        }
      } else {
        std::array<V, NC + 1> P;
        for (int64_t r = begin; r < end; ++r) {
          const int64_t base = r * C;
          int64_t c = 0;
          for (; c + W <= C; c += W) {
            for (size_t k = 0; k < NC; ++k) P[k] = V::loadu(chan[k] + c);
            const std::array<V, K> v = f(base + c, Full{}, P.data());
            for (size_t k = 0; k < K; ++k) DAcc<M>::rmw(acc + k * Cpad + c, v[k]);
          }
          if (c < C) {
            const int64_t n = C - c;
            for (size_t k = 0; k < NC; ++k) P[k] = V::loadu(chan[k] + c, n);
            const std::array<V, K> v = f(base + c, n, P.data());
            for (size_t k = 0; k < K; ++k) DAcc<M>::rmw(acc + k * Cpad + c, mask_tail(v[k], n));
          }
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

// The direct NHWC conv's tiles and their scheduling, written once over a SIMD
// traits class V and compiled once per instruction set: conv_nhwc_cpu.cpp
// (AVX2) and conv_nhwc_avx512.cpp (AVX-512, under a target pragma) each
// include this file with their own V. Every function here is a template in an
// anonymous namespace, so that no function compiled for one instruction set
// can stand in for another's at link time.
//
// The conv is an implicit GEMM: output pixels x output channels, reducing over
// (kernel tap, input channel). A tile is R output pixels by H vectors of
// output channels (V::kWidth each) held in R*H accumulators; each step
// broadcasts one input value per pixel and multiplies it by H weight vectors.
// Weights are packed (convkernels/ops/_conv_direct.py) as
// [ceil(Cout/16), KH, KW, Cin, 16], zero-padded: AVX2's two 8-float vectors
// of a tile are one 16-channel panel, AVX-512's up to four 16-float vectors
// are as many panels. The reduction is split into blocks of a few hundred
// channels (one block's weights stay in L1 or L2); between blocks the partial
// sums live in `out`. Work items are a group of about kTilesPerGroup tiles'
// pixels against one column group (kVecs vectors), column-minor, so that a
// thread's consecutive items reuse the group's input pixels. An input pixel
// outside the image reads a row of zeros.
//
// V provides: Reg; kWidth (floats per Reg), kVecs (the most vectors H of a
// tile) and rows(H) (R of a full tile of H vectors, constexpr); set1(f),
// zero(), load(p), broadcast(p), fma(a, b, c), add, sub, mul, div, max,
// min (a, b), round(a) (to nearest); kExpLo, kExpHi and ldexp(e, n, x) for
// exp (below); and Cols(n) with load(p, h) / store(p, h, v) masked to the
// first n channels from p.
#pragma once

#include <ATen/Parallel.h>

#include "activation.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

namespace convkernels {
namespace cpu {

// Plain data, the same in every instruction set's translation unit.

// One run of input channels [c0, c0 + len) at kernel tap `tap` (= kh * KW + kw).
struct Slice {
  int64_t tap, c0, len;
};

// Where the tensors are and how the conv maps output pixels to input pixels.
struct Geometry {
  const float* x;
  int64_t xn, xh, xw;  // x's strides (elements) of sample, row, column
  int64_t h, w, oh, ow, kw, taps, cin;
  int64_t sh, sw, ph, pw, dh, dw;
  float* out;
  int64_t on, oh_s, ow_s;
  const float* res;
  int64_t rn, rh, rw;
  const float* weights;  // packed, [panels, taps, cin, 16]
  const float* bias;     // padded to panels * 16, or null
  const float* zeros;    // a row of zeros at least as long as any slice
  int64_t cout;
  Act act;
};

// The reduction's slices and where its blocks start (slices[blocks[b]] up to
// slices[blocks[b + 1]]); a block boundary is a pass over out.
struct Reduction {
  const Slice* slices;
  const int64_t* blocks;
  int64_t nblocks;
};

// conv_nhwc<Avx512>, compiled in conv_nhwc_avx512.cpp, and its block size:
// a 64-channel tile's weights of 256 channels are 64 KiB, read from L2 (128,
// 32 KiB as AVX2's 512 x 16, ran 1-3% slower on ResNet-50's convs).
void conv_nhwc_avx512(const Geometry& g, const Reduction& red, int64_t pixels);
// dwconv_nhwc<Avx512> (rows: batch x output height).
void dwconv_nhwc_avx512(const Geometry& g, int64_t rows);
constexpr int64_t kBlockKAvx512 = 256;

namespace {

constexpr int64_t kPanel = 16;         // output channels of a packed weight panel
constexpr int64_t kTilesPerGroup = 8;  // tiles a work item runs against one column group

// e^x, to about 1 ulp (Cephes' expf): e^x = 2^n e^r with n = round(x log2 e)
// and |r| <= ln2 / 2, e^r = 1 + r + r^2 P(r). x is first clamped to
// [V::kExpLo, V::kExpHi] (NaN kept: max and min return their second operand
// for a NaN); V::ldexp(e, n, x) gives e * 2^n, inf where e^x overflows and 0
// where it underflows, as torch's exp.
template <class V>
typename V::Reg exp(typename V::Reg x) {
  const auto c = V::set1;
  const typename V::Reg xc = V::min(c(V::kExpHi), V::max(c(V::kExpLo), x));
  const typename V::Reg n = V::round(V::mul(xc, c(1.44269504088896341f)));
  typename V::Reg r = V::fma(n, c(-0.693359375f), xc);  // ln2 in two parts
  r = V::fma(n, c(2.12194440e-4f), r);
  typename V::Reg p = c(1.9875691500e-4f);
  p = V::fma(p, r, c(1.3981999507e-3f));
  p = V::fma(p, r, c(8.3334519073e-3f));
  p = V::fma(p, r, c(4.1665795894e-2f));
  p = V::fma(p, r, c(1.6666665459e-1f));
  p = V::fma(p, r, c(5.0000001201e-1f));
  const typename V::Reg e = V::fma(V::mul(r, r), p, V::add(r, c(1.f)));
  return V::ldexp(e, n, x);
}

// act(z) for the activations after a conv; relu's max(0, z) returns z when z
// is NaN, and silu and sigmoid are written as in torch's CPU kernels
// (z * sigmoid(z), 1 / (1 + e^-z)) so that they give NaN and inf where torch does.
template <class V>
typename V::Reg activate(Act act, typename V::Reg z) {
  switch (act) {
    case Act::kRelu: return V::max(V::zero(), z);
    case Act::kSigmoid:
      return V::div(V::set1(1.f), V::add(V::set1(1.f), exp<V>(V::sub(V::zero(), z))));
    case Act::kSilu:
      return V::mul(z, V::div(V::set1(1.f), V::add(V::set1(1.f), exp<V>(V::sub(V::zero(), z)))));
    case Act::kIdentity: break;
  }
  return z;
}

// Every loop over a tile's rows and vectors must unroll fully: the
// accumulators stay in registers only if no loop indexes them at run time.
#define CK_UNROLL _Pragma("GCC unroll 16")

// R output pixels (their first flat index m0) by H vectors of channels from
// col0 (a multiple of 16), over the slices [s, s_end). first: start from zero
// (else from the partial sums in out); last: apply the epilogue.
template <class V, int R, int H>
void tile(const Geometry& g, int64_t m0, int64_t col0, const Slice* s, const Slice* s_end,
          bool first, bool last) {
  using Reg = typename V::Reg;
  // The rows' sample, output row and column: one division, then a walk
  // (divisions per row would cost as much as a short reduction).
  int64_t n[R], oy[R], ox[R];
  n[0] = m0 / (g.oh * g.ow);
  oy[0] = m0 % (g.oh * g.ow) / g.ow;
  ox[0] = m0 % g.ow;
  CK_UNROLL
  for (int r = 1; r < R; ++r) {
    const bool wrap = ox[r - 1] + 1 == g.ow, next = wrap && oy[r - 1] + 1 == g.oh;
    ox[r] = wrap ? 0 : ox[r - 1] + 1;
    oy[r] = next ? 0 : oy[r - 1] + wrap;
    n[r] = n[r - 1] + next;
  }
  int64_t iy[R], ix[R];
  float* o[R];
  CK_UNROLL
  for (int r = 0; r < R; ++r) {
    iy[r] = oy[r] * g.sh - g.ph;
    ix[r] = ox[r] * g.sw - g.pw;
    o[r] = g.out + n[r] * g.on + oy[r] * g.oh_s + ox[r] * g.ow_s + col0;
  }
  const typename V::Cols cols(g.cout - col0);
  // The epilogue's residual rows (and the output rows, when nothing is read
  // from them first) are requested now, so that they arrive during the
  // reduction: read at the end, each of the R rows a separate stretch of
  // memory, they stalled the tile (a 64 -> 256 1x1 conv at 56x56, batch 8,
  // Intel Xeon VM: 3.03 ms without the residual, 4.16 ms with it).
  if (last) {
    CK_UNROLL
    for (int r = 0; r < R; ++r) {
      const float* p = g.res == nullptr ? nullptr : g.res + n[r] * g.rn + oy[r] * g.rh + ox[r] * g.rw + col0;
      CK_UNROLL
      for (int h = 0; h < H; ++h) {
        if (p != nullptr) __builtin_prefetch(p + h * V::kWidth, 0, 3);
        if (first) __builtin_prefetch(o[r] + h * V::kWidth, 1, 3);
      }
    }
  }
  Reg acc[R][H];
  CK_UNROLL
  for (int r = 0; r < R; ++r) {
    CK_UNROLL
    for (int h = 0; h < H; ++h) acc[r][h] = first ? V::zero() : cols.load(o[r], h);
  }
  // Vector h's weights: panel (col0 + h * kWidth) / 16, from lane (h * kWidth) % 16.
  const int64_t panel_stride = g.taps * g.cin * kPanel;
  const float* tile_w = g.weights + col0 / kPanel * panel_stride;
  int64_t w_off[H];
  CK_UNROLL
  for (int h = 0; h < H; ++h)
    w_off[h] = h * V::kWidth / kPanel * panel_stride + h * V::kWidth % kPanel;
  for (; s != s_end; ++s) {
    const int64_t ky = s->tap / g.kw, kx = s->tap % g.kw;
    const float* a[R];
    CK_UNROLL
    for (int r = 0; r < R; ++r) {
      const int64_t y = iy[r] + ky * g.dh, x = ix[r] + kx * g.dw;
      a[r] = (y >= 0 && y < g.h && x >= 0 && x < g.w)
                 ? g.x + n[r] * g.xn + y * g.xh + x * g.xw + s->c0
                 : g.zeros;
    }
    // Locals, not s->len: stores to acc must not make the compiler reload it.
    const float* w = tile_w + (s->tap * g.cin + s->c0) * kPanel;
    const int64_t len = s->len;
    _Pragma("GCC unroll 4")
    for (int64_t c = 0; c < len; ++c, w += kPanel) {
      Reg wv[H];
      CK_UNROLL
      for (int h = 0; h < H; ++h) wv[h] = V::load(w + w_off[h]);
      CK_UNROLL
      for (int r = 0; r < R; ++r) {
        const Reg v = V::broadcast(a[r] + c);
        CK_UNROLL
        for (int h = 0; h < H; ++h) acc[r][h] = V::fma(v, wv[h], acc[r][h]);
      }
    }
  }
  if (last) {
    if (g.bias != nullptr) {
      CK_UNROLL
      for (int h = 0; h < H; ++h) {
        const Reg b = V::load(g.bias + col0 + h * V::kWidth);
        CK_UNROLL
        for (int r = 0; r < R; ++r) acc[r][h] = V::add(acc[r][h], b);
      }
    }
    if (g.res != nullptr) {
      CK_UNROLL
      for (int r = 0; r < R; ++r) {
        const float* p = g.res + n[r] * g.rn + oy[r] * g.rh + ox[r] * g.rw + col0;
        CK_UNROLL
        for (int h = 0; h < H; ++h) acc[r][h] = V::add(acc[r][h], cols.load(p, h));
      }
    }
    if (g.act != Act::kIdentity) {
      CK_UNROLL
      for (int r = 0; r < R; ++r)
        CK_UNROLL
        for (int h = 0; h < H; ++h) acc[r][h] = activate<V>(g.act, acc[r][h]);
    }
  }
  CK_UNROLL
  for (int r = 0; r < R; ++r)
    CK_UNROLL
    for (int h = 0; h < H; ++h) cols.store(o[r], h, acc[r][h]);
}

using TileFn = void (*)(const Geometry&, int64_t, int64_t, const Slice*, const Slice*, bool, bool);

// tile<V, R, H> for H = 1 .. V::kVecs and R = 1 .. V::rows(H), indexed
// [H - 1][R - 1] (null past rows(H)).
template <class V, int H, int... R>
constexpr std::array<TileFn, sizeof...(R)> tiles_of_width(std::integer_sequence<int, R...>) {
  return {(R < V::rows(H) ? &tile<V, (R < V::rows(H) ? R + 1 : 1), H> : nullptr)...};
}
template <class V, int... H>
constexpr auto tile_table(std::integer_sequence<int, H...>) {
  using Rows = std::make_integer_sequence<int, V::rows(1)>;
  return std::array<std::array<TileFn, V::rows(1)>, sizeof...(H)>{
      tiles_of_width<V, H + 1>(Rows{})...};
}
template <class V>
constexpr auto kTileTable = tile_table<V>(std::make_integer_sequence<int, V::kVecs>{});

// The whole conv: act(conv(x) + bias + residual) into g.out.
template <class V>
void conv_nhwc(const Geometry& g, const Reduction& red, int64_t pixels) {
  constexpr int64_t cols_per_group = V::kVecs * V::kWidth;
  // Work items run a group of about kTilesPerGroup full-height tiles' pixels
  // against one column group; a thread's consecutive items share the group's
  // input pixels (column-minor order). Groups, and the tiles in a group, are
  // balanced (group i covers pixels [i * pixels / groups, (i + 1) * pixels /
  // groups)), so that no tile has a lone row and every work item costs about
  // the same: parallel_for hands each thread one contiguous run of items.
  const int64_t groups = std::max<int64_t>(1, pixels / (kTilesPerGroup * V::rows(1)));
  const int64_t col_groups = (g.cout + cols_per_group - 1) / cols_per_group;
  at::parallel_for(0, groups * col_groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t group = item / col_groups, col0 = item % col_groups * cols_per_group;
      // The vectors with any channel left: the last column group may need
      // fewer, and then its tiles have more rows (V::rows).
      const int64_t left = g.cout - col0;
      const int64_t vecs = left >= cols_per_group ? V::kVecs : (left + V::kWidth - 1) / V::kWidth;
      const auto& table = kTileTable<V>[vecs - 1];
      const int64_t p0 = group * pixels / groups, n = (group + 1) * pixels / groups - p0;
      const int64_t rows = V::rows(static_cast<int>(vecs)), tiles = (n + rows - 1) / rows;
      for (int64_t b = 0; b < red.nblocks; ++b) {
        const Slice* s = red.slices + red.blocks[b];
        const Slice* s_end = red.slices + red.blocks[b + 1];
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t m0 = p0 + t * n / tiles, m1 = p0 + (t + 1) * n / tiles;
          table[m1 - m0 - 1](g, m0, col0, s, s_end, b == 0, b + 1 == red.nblocks);
        }
      }
    }
  });
}

// ---------------------------------------------------------------- depthwise
// groups == channels: output channel c reads input channel c alone, so a step
// is one multiply-add per tap, pixel and vector of channels, with the weights
// packed [KH, KW, C] (ops/_conv_direct.py's pack_depthwise; g.cin == g.cout ==
// C). A call computes R pixels of output row oy of sample n, from column ox0,
// for the H vectors of channels from col0; each tap's H weight vectors serve
// the R pixels. `checked`: some of their taps fall outside the image and are
// skipped, pixel by pixel; else every tap is inside. KW: the kernel's width where it is
// 3 or 5 (the tap loop then unrolls, edge checks and all), else 0 (g.kw).
template <class V, int H, int R, bool checked, int KW>
void dw_pixels(const Geometry& g, const typename V::Cols& cols, const typename V::Reg* bias,
               int64_t n, int64_t oy, int64_t ky0, int64_t ky1, int64_t ox0, int64_t col0) {
  using Reg = typename V::Reg;
  const int64_t ix0 = ox0 * g.sw - g.pw, step = g.sw * g.xw;
  Reg acc[R][H];
  CK_UNROLL
  for (int r = 0; r < R; ++r)
    CK_UNROLL
    for (int h = 0; h < H; ++h) acc[r][h] = bias[h];
  for (int64_t ky = ky0; ky < ky1; ++ky) {
    const float* xrow = g.x + n * g.xn + (oy * g.sh - g.ph + ky * g.dh) * g.xh + col0;
    const int64_t kw = KW > 0 ? KW : g.kw;
    const float* wrow = g.weights + ky * kw * g.cin + col0;
    _Pragma("GCC unroll 5")
    for (int64_t kx = 0; kx < kw; ++kx) {
      const int64_t ix = ix0 + kx * g.dw;
      Reg wv[H];
      CK_UNROLL
      for (int h = 0; h < H; ++h) wv[h] = cols.load(wrow + kx * g.cin, h);
      const float* xp = xrow + ix * g.xw;
      CK_UNROLL
      for (int r = 0; r < R; ++r) {
        if (checked && (ix + r * g.sw < 0 || ix + r * g.sw >= g.w)) continue;
        CK_UNROLL
        for (int h = 0; h < H; ++h) acc[r][h] = V::fma(cols.load(xp + r * step, h), wv[h], acc[r][h]);
      }
    }
  }
  CK_UNROLL
  for (int r = 0; r < R; ++r) {
    const int64_t ox = ox0 + r;
    if (g.res != nullptr) {
      const float* p = g.res + n * g.rn + oy * g.rh + ox * g.rw + col0;
      CK_UNROLL
      for (int h = 0; h < H; ++h) acc[r][h] = V::add(acc[r][h], cols.load(p, h));
    }
    float* o = g.out + n * g.on + oy * g.oh_s + ox * g.ow_s + col0;
    CK_UNROLL
    for (int h = 0; h < H; ++h) cols.store(o, h, activate<V>(g.act, acc[r][h]));
  }
}

constexpr int64_t kDwPixels = 4;  // R of the interior's calls

// Output row oy of sample n for H vectors of channels from col0, in calls of
// kDwPixels columns (checked where one of them has a tap outside the image),
// the last few columns one by one.
template <class V, int H, int KW>
void dw_row_kw(const Geometry& g, int64_t n, int64_t oy, int64_t col0) {
  using Reg = typename V::Reg;
  constexpr int R = kDwPixels;
  const typename V::Cols cols(g.cout - col0);
  const int64_t kh = g.taps / g.kw;
  int64_t ky0 = 0, ky1 = kh;  // the taps whose input row is inside the image
  while (ky0 < kh && oy * g.sh - g.ph + ky0 * g.dh < 0) ++ky0;
  while (ky1 > ky0 && oy * g.sh - g.ph + (ky1 - 1) * g.dh >= g.h) --ky1;
  Reg bias[H];
  CK_UNROLL
  for (int h = 0; h < H; ++h) bias[h] = g.bias ? cols.load(g.bias + col0, h) : V::zero();
  // Interior columns: ox * sw - pw >= 0 and ox * sw - pw + (kw - 1) * dw < w.
  const int64_t last = g.w - 1 - (g.kw - 1) * g.dw + g.pw;
  const int64_t lo = std::min(g.ow, (g.pw + g.sw - 1) / g.sw);
  const int64_t hi = last < 0 ? lo : std::max(lo, std::min(g.ow, last / g.sw + 1));
  int64_t ox = 0;
  for (; ox + R <= g.ow; ox += R) {
    if (ox >= lo && ox + R <= hi) {
      dw_pixels<V, H, R, false, KW>(g, cols, bias, n, oy, ky0, ky1, ox, col0);
    } else {
      dw_pixels<V, H, R, true, KW>(g, cols, bias, n, oy, ky0, ky1, ox, col0);
    }
  }
  for (; ox < g.ow; ++ox) dw_pixels<V, H, 1, true, KW>(g, cols, bias, n, oy, ky0, ky1, ox, col0);
}

template <class V, int H>
void dw_row(const Geometry& g, int64_t n, int64_t oy, int64_t col0) {
  switch (g.kw) {
    case 3: return dw_row_kw<V, H, 3>(g, n, oy, col0);
    case 5: return dw_row_kw<V, H, 5>(g, n, oy, col0);
    default: return dw_row_kw<V, H, 0>(g, n, oy, col0);
  }
}

using DwRowFn = void (*)(const Geometry&, int64_t, int64_t, int64_t);
template <class V, int... H>
constexpr std::array<DwRowFn, sizeof...(H)> dw_row_table(std::integer_sequence<int, H...>) {
  return {&dw_row<V, H + 1>...};
}

// The whole depthwise conv: items are (output row, group of channels),
// channel-minor. The channels' vectors are split into as few groups of at most
// V::kVecs as they need, of even size (144 channels in AVX-512 vectors: 3 x 3,
// not 4 + 4 + 1, whose last group pays a tap's overhead for one vector).
template <class V>
void dwconv_nhwc(const Geometry& g, int64_t rows) {
  static constexpr auto table = dw_row_table<V>(std::make_integer_sequence<int, V::kVecs>{});
  const int64_t vecs = (g.cout + V::kWidth - 1) / V::kWidth;
  const int64_t groups = (vecs + V::kVecs - 1) / V::kVecs;
  const int64_t per_group = (vecs + groups - 1) / groups;
  at::parallel_for(0, rows * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / groups, v0 = item % groups * per_group;
      const int64_t h = std::min(per_group, vecs - v0);
      if (h > 0) table[h - 1](g, row / g.oh, row % g.oh, v0 * V::kWidth);
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace convkernels

// Direct fp32 convolution on channels_last (NHWC) tensors for CPU inference,
// with its epilogue (bias, residual add, NaN-keeping relu) applied in registers.
//
// Why beside oneDNN: oneDNN's relu post-op maps NaN to 0 (so after a oneDNN
// conv relu is a separate pass), and on small convs its per-call cost (~50 us)
// is much of the time. Where each kernel runs, with the measurements:
// convkernels/ops/_conv_direct.py (benchmarks/bench_cpu_conv.py is the A/B).
//
// The conv is an implicit GEMM: output pixels x output channels, reducing over
// (kernel tap, input channel). A tile is kRows output pixels by kCols output
// channels held in 12 AVX2 accumulators; each step broadcasts one input value
// per pixel and multiplies it by two weight vectors. Weights are packed once
// (by the caller, convkernels/ops/_conv_direct.py) as
// [ceil(Cout/16), KH, KW, Cin, 16], zero-padded, so a tile streams them
// contiguously. The reduction is split into blocks of about kBlockK (weights of
// one block: 32 KiB, L1-sized); between blocks the partial sums live in `out`.
// Work items are a group of kTilesPerBlock tiles against one panel, panel-minor,
// so that a thread's consecutive items reuse the group's input pixels.
// An input pixel outside the image reads a row of zeros.
//
// Contract (convkernels/ops/primitives.py): conv2d_nhwc_(out, x, packed, bias,
// residual, stride, padding, dilation, act) writes act(conv2d(x, w) + bias +
// residual) into out; x, out and residual have unit channel stride (a
// channels_last tensor or a channel slice of one); out overlaps neither.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace convkernels {
namespace cpu {
namespace {

using at::Tensor;

constexpr int64_t kCols = 16;  // output channels of a tile: two 8-float vectors
constexpr int64_t kRows = 6;   // output pixels of a tile: 12 accumulators, 2 weights, 1 broadcast
constexpr int64_t kTilesPerBlock = 8;  // tiles a work item runs per weight panel
constexpr int64_t kBlockK = 512;       // reduction length of one block

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
  bool relu;
};

#if defined(CPU_CAPABILITY_AVX2)

// Lane masks for the first `n` of 8 floats (n may be <= 0 or >= 8).
inline __m256i lanes(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n, 0, 8))), idx);
}

// Every loop over a tile's rows and halves must unroll fully: the
// accumulators stay in registers only if no loop indexes them at run time.
#define CK_UNROLL _Pragma("GCC unroll 16")

struct Cols {
  bool full;
  __m256i m0, m1;
  explicit Cols(int64_t n) : full(n >= kCols), m0(lanes(n)), m1(lanes(n - 8)) {}
  __m256 load(const float* p, int half) const {
    return full ? _mm256_loadu_ps(p + 8 * half) : _mm256_maskload_ps(p + 8 * half, half ? m1 : m0);
  }
  void store(float* p, int half, __m256 v) const {
    if (full) {
      _mm256_storeu_ps(p + 8 * half, v);
    } else {
      _mm256_maskstore_ps(p + 8 * half, half ? m1 : m0, v);
    }
  }
};

// R output pixels (their first flat index m0) by one panel of 16 channels,
// over the reduction slices [s, s_end). first: start from zero (else from the
// partial sums in out); last: apply the epilogue.
template <int R>
void tile(const Geometry& g, int64_t m0, int64_t panel, const Slice* s, const Slice* s_end,
          bool first, bool last) {
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
    o[r] = g.out + n[r] * g.on + oy[r] * g.oh_s + ox[r] * g.ow_s + panel * kCols;
  }
  const Cols cols(g.cout - panel * kCols);
  __m256 acc[R][2];
  CK_UNROLL
  for (int r = 0; r < R; ++r) {
    CK_UNROLL
    for (int h = 0; h < 2; ++h) acc[r][h] = first ? _mm256_setzero_ps() : cols.load(o[r], h);
  }
  const float* panel_w = g.weights + panel * g.taps * g.cin * kCols;
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
    const float* w = panel_w + (s->tap * g.cin + s->c0) * kCols;
    const int64_t len = s->len;
    _Pragma("GCC unroll 4")
    for (int64_t c = 0; c < len; ++c, w += kCols) {
      const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
      CK_UNROLL
      for (int r = 0; r < R; ++r) {
        const __m256 v = _mm256_broadcast_ss(a[r] + c);
        acc[r][0] = _mm256_fmadd_ps(v, w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(v, w1, acc[r][1]);
      }
    }
  }
  if (last) {
    if (g.bias != nullptr) {
      const __m256 b0 = _mm256_loadu_ps(g.bias + panel * kCols);
      const __m256 b1 = _mm256_loadu_ps(g.bias + panel * kCols + 8);
      CK_UNROLL
      for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm256_add_ps(acc[r][0], b0);
        acc[r][1] = _mm256_add_ps(acc[r][1], b1);
      }
    }
    if (g.res != nullptr) {
      CK_UNROLL
      for (int r = 0; r < R; ++r) {
        const float* p = g.res + n[r] * g.rn + oy[r] * g.rh + ox[r] * g.rw + panel * kCols;
        CK_UNROLL
        for (int h = 0; h < 2; ++h) acc[r][h] = _mm256_add_ps(acc[r][h], cols.load(p, h));
      }
    }
    if (g.relu) {
      // max(0, v) returns its second operand when either is NaN: NaN stays
      // NaN, as in torch.relu.
      const __m256 zero = _mm256_setzero_ps();
      CK_UNROLL
      for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm256_max_ps(zero, acc[r][0]);
        acc[r][1] = _mm256_max_ps(zero, acc[r][1]);
      }
    }
  }
  CK_UNROLL
  for (int r = 0; r < R; ++r)
    CK_UNROLL
    for (int h = 0; h < 2; ++h) cols.store(o[r], h, acc[r][h]);
}

void run_tile(int64_t rows, const Geometry& g, int64_t m0, int64_t panel, const Slice* s,
              const Slice* s_end, bool first, bool last) {
  switch (rows) {
    case 6: return tile<6>(g, m0, panel, s, s_end, first, last);
    case 5: return tile<5>(g, m0, panel, s, s_end, first, last);
    case 4: return tile<4>(g, m0, panel, s, s_end, first, last);
    case 3: return tile<3>(g, m0, panel, s, s_end, first, last);
    case 2: return tile<2>(g, m0, panel, s, s_end, first, last);
    default: return tile<1>(g, m0, panel, s, s_end, first, last);
  }
}

#endif  // CPU_CAPABILITY_AVX2

// The reduction as slices of at most kBlockK channels, grouped into blocks of
// about kBlockK (a block boundary is a pass over out). Returns the block starts.
std::vector<int64_t> plan_slices(int64_t taps, int64_t cin, std::vector<Slice>& slices) {
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t c0 = 0; c0 < cin; c0 += kBlockK)
      slices.push_back({t, c0, std::min(kBlockK, cin - c0)});
  std::vector<int64_t> starts{0};
  int64_t k = 0;
  for (size_t i = 0; i < slices.size(); ++i) {
    if (k > 0 && k + slices[i].len > kBlockK) {
      starts.push_back(static_cast<int64_t>(i));
      k = 0;
    }
    k += slices[i].len;
  }
  starts.push_back(static_cast<int64_t>(slices.size()));
  return starts;
}

void check_nhwc(const char* name, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4,
              "conv2d_nhwc_: ", name, " must be a 4-D float32 CPU tensor, got ", t.scalar_type(),
              " ", t.sizes(), " on ", t.device());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "conv2d_nhwc_: ", name,
              " must have unit channel stride (channels_last or a channel slice of it), got "
              "strides ",
              t.strides());
}

void conv2d_nhwc__cpu(const Tensor& out, const Tensor& x, const Tensor& packed,
                      const std::optional<Tensor>& bias, const std::optional<Tensor>& residual,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                      c10::string_view act) {
  check_nhwc("x", x);
  check_nhwc("out", out);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "conv2d_nhwc_: stride, padding and dilation must have 2 values each");
  TORCH_CHECK(packed.dim() == 5 && packed.size(4) == kCols && packed.is_contiguous() &&
                  packed.scalar_type() == at::kFloat && packed.size(3) == x.size(1),
              "conv2d_nhwc_: packed must be a contiguous float32 [panels, KH, KW, ", x.size(1),
              ", 16] weight, got ", packed.sizes());
  const int64_t kh = packed.size(1), kw = packed.size(2), cin = x.size(1);
  const int64_t cout = out.size(1), panels = packed.size(0);
  TORCH_CHECK(panels == (cout + kCols - 1) / kCols, "conv2d_nhwc_: packed has ", panels,
              " panels of 16 output channels, out has ", cout, " channels");
  const int64_t oh = (x.size(2) + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t ow = (x.size(3) + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(2) == oh && out.size(3) == ow,
              "conv2d_nhwc_: out must be [", x.size(0), ", ", cout, ", ", oh, ", ", ow, "], got ",
              out.sizes());
  const std::string a(act.data(), act.size());
  TORCH_CHECK(a == "relu" || a == "identity", "conv2d_nhwc_: act must be relu or identity, got ",
              a);
  at::assert_no_overlap(out, x);
  std::vector<float> padded_bias;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == cout && bias->scalar_type() == at::kFloat &&
                    bias->device().is_cpu(),
                "conv2d_nhwc_: bias must be a float32 CPU vector of ", cout, " values");
    const Tensor b = bias->contiguous();
    padded_bias.assign(panels * kCols, 0.f);
    std::copy(b.const_data_ptr<float>(), b.const_data_ptr<float>() + cout, padded_bias.begin());
  }
  if (residual.has_value()) {
    check_nhwc("residual", *residual);
    TORCH_CHECK(residual->sizes() == out.sizes(), "conv2d_nhwc_: residual must be shaped as out ",
                out.sizes(), ", got ", residual->sizes());
    at::assert_no_overlap(out, *residual);
  }
#if defined(CPU_CAPABILITY_AVX2)
  if (out.numel() == 0) return;
  std::vector<Slice> slices;
  const std::vector<int64_t> blocks = plan_slices(kh * kw, cin, slices);
  const std::vector<float> zeros(std::min(cin, kBlockK), 0.f);
  const Tensor* res = residual.has_value() ? &*residual : nullptr;
  const Geometry g{x.const_data_ptr<float>(), x.stride(0), x.stride(2), x.stride(3),
                   x.size(2), x.size(3), oh, ow, kw, kh * kw, cin,
                   stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                   out.data_ptr<float>(), out.stride(0), out.stride(2), out.stride(3),
                   res ? res->const_data_ptr<float>() : nullptr,
                   res ? res->stride(0) : 0, res ? res->stride(2) : 0, res ? res->stride(3) : 0,
                   packed.const_data_ptr<float>(),
                   padded_bias.empty() ? nullptr : padded_bias.data(), zeros.data(), cout,
                   a == "relu"};
  // Tiles and groups of tiles are balanced (tile t covers pixels
  // [t * pixels / tiles, (t + 1) * pixels / tiles)), so that no tile has a
  // lone row and every work item costs about the same: parallel_for hands
  // each thread one contiguous run of items.
  const int64_t pixels = x.size(0) * oh * ow;
  const int64_t tiles = (pixels + kRows - 1) / kRows;
  const int64_t groups = (tiles + kTilesPerBlock - 1) / kTilesPerBlock;
  // Work items run a group of tiles against one panel; a thread's consecutive
  // items share the group's input pixels (panel-minor order).
  at::parallel_for(0, groups * panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t group = item / panels, panel = item % panels;
      const int64_t t0 = group * tiles / groups, t1 = (group + 1) * tiles / groups;
      for (size_t b = 0; b + 1 < blocks.size(); ++b) {
        const Slice* s = slices.data() + blocks[b];
        const Slice* s_end = slices.data() + blocks[b + 1];
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t m0 = t * pixels / tiles, m1 = (t + 1) * pixels / tiles;
          run_tile(m1 - m0, g, m0, panel, s, s_end, b == 0, b + 2 == blocks.size());
        }
      }
    }
  });
#else
  TORCH_CHECK(false, "conv2d_nhwc_: convkernels._C was built without AVX2 "
              "(CONVKERNELS_CPU_CAPABILITY=DEFAULT); use aten's convolution");
#endif
}

}  // namespace
}  // namespace cpu
}  // namespace convkernels

TORCH_LIBRARY_IMPL(convkernels_C, CPU, m) {
  m.impl("conv2d_nhwc_", &convkernels::cpu::conv2d_nhwc__cpu);
}

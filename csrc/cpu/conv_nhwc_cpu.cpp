// Direct fp32 convolution on channels_last (NHWC) tensors for CPU inference,
// with its epilogue (bias, residual add, activation: relu keeping NaN, silu,
// sigmoid) applied in registers.
//
// Why beside oneDNN: oneDNN's relu post-op maps NaN to 0 (so after a oneDNN
// conv relu is a separate pass), and on small convs its per-call cost (~50 us)
// is much of the time. Where each kernel runs, with the measurements:
// convkernels/ops/_conv_direct.py (benchmarks/bench_cpu_conv.py is the A/B).
//
// The tiles and their scheduling are in conv_nhwc_tile.h, compiled for AVX2
// here and for AVX-512 in conv_nhwc_avx512.cpp; this file holds the op, its
// checks, the choice of instruction set and the AVX2 traits.
//
// Contract (convkernels/ops/primitives.py): conv2d_nhwc_(out, x, packed, bias,
// residual, stride, padding, dilation, act) writes act(conv2d(x, w) + bias +
// residual) into out (dwconv2d_nhwc_ the same for a depthwise conv); x, out and residual have unit channel stride (a
// channels_last tensor or a channel slice of one); out overlaps neither.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "cpu/conv_nhwc_tile.h"

namespace convkernels {
namespace cpu {
namespace {

using at::Tensor;

constexpr int64_t kBlockKAvx2 = 512;  // 512 x 16 weights: 32 KiB, L1-sized

#if defined(CPU_CAPABILITY_AVX2)

// Lane masks for the first `n` of 8 floats (n may be <= 0 or >= 8).
inline __m256i lanes(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n, 0, 8))), idx);
}

// 6 pixels x 16 output channels (one panel, two vectors) in 12 of the 16 ymm registers.
struct Avx2 {
  using Reg = __m256;
  static constexpr int kWidth = 8, kVecs = 2;
  static constexpr int rows(int) { return 6; }
  static Reg set1(float f) { return _mm256_set1_ps(f); }
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static Reg broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm256_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  static Reg div(Reg a, Reg b) { return _mm256_div_ps(a, b); }
  static Reg max(Reg a, Reg b) { return _mm256_max_ps(a, b); }
  static Reg min(Reg a, Reg b) { return _mm256_min_ps(a, b); }
  static Reg round(Reg a) {
    return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // 2^n built in the exponent bits, so n must stay within [-126, 127]: x is
  // clamped to [kExpLo, kExpHi], and e^x for x above ln(FLT_MAX) set to inf
  // (x in (88, 88.72] gets e^88: a relative error below 1 in sigmoid and silu
  // of values under 1e-38). Below kExpLo e^x flushes to 0, not to a denormal.
  static constexpr float kExpLo = -87.3365447f, kExpHi = 88.0f;
  static Reg ldexp(Reg e, Reg n, Reg x) {
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                            _mm256_set1_epi32(127)), 23);
    const Reg y = _mm256_mul_ps(e, _mm256_castsi256_ps(bits));
    const Reg inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    const Reg big = _mm256_cmp_ps(x, _mm256_set1_ps(88.7228394f), _CMP_GT_OQ);
    const Reg tiny = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLo), _CMP_LT_OQ);
    return _mm256_blendv_ps(_mm256_blendv_ps(y, inf, big), _mm256_setzero_ps(), tiny);
  }
  struct Cols {
    bool full;
    __m256i m[kVecs];
    explicit Cols(int64_t n) : full(n >= kVecs * kWidth), m{lanes(n), lanes(n - kWidth)} {}
    Reg load(const float* p, int h) const {
      return full ? _mm256_loadu_ps(p + kWidth * h) : _mm256_maskload_ps(p + kWidth * h, m[h]);
    }
    void store(float* p, int h, Reg v) const {
      if (full) {
        _mm256_storeu_ps(p + kWidth * h, v);
      } else {
        _mm256_maskstore_ps(p + kWidth * h, m[h], v);
      }
    }
  };
};

// The instruction set the kernel runs with: the best this CPU has, unless
// set_conv_isa lowered it.
enum class Isa { kAvx2 = 1, kAvx512 = 2 };

Isa best_isa() {
  return __builtin_cpu_supports("avx512f") ? Isa::kAvx512 : Isa::kAvx2;
}

std::atomic<Isa>& current_isa() {
  static std::atomic<Isa> isa{best_isa()};
  return isa;
}

const char* isa_name(Isa isa) { return isa == Isa::kAvx512 ? "avx512" : "avx2"; }

#endif  // CPU_CAPABILITY_AVX2

// The instruction set conv2d_nhwc_ runs with: "avx512", "avx2", or "none"
// (a build without AVX2: the op refuses to run).
std::string conv_isa() {
#if defined(CPU_CAPABILITY_AVX2)
  return isa_name(current_isa().load());
#else
  return "none";
#endif
}

// Sets conv2d_nhwc_'s instruction set (to compare them on one CPU); returns
// the previous one. Only one this CPU has is accepted.
std::string set_conv_isa(c10::string_view isa) {
  const std::string want(isa.data(), isa.size());
#if defined(CPU_CAPABILITY_AVX2)
  const bool avx512 = want == "avx512";
  TORCH_CHECK(avx512 || want == "avx2", "set_conv_isa: isa must be 'avx2' or 'avx512', got '",
              want, "'");
  TORCH_CHECK(!avx512 || best_isa() == Isa::kAvx512,
              "set_conv_isa: isa 'avx512' asked for, but this CPU has no AVX-512F");
  return isa_name(current_isa().exchange(avx512 ? Isa::kAvx512 : Isa::kAvx2));
#else
  TORCH_CHECK(false, "set_conv_isa: convkernels._C was built without AVX2 "
              "(CONVKERNELS_CPU_CAPABILITY=DEFAULT), isa '", want, "' is not available");
#endif
}

// The reduction as slices of at most `block` channels, grouped into blocks of
// about `block` (a block boundary is a pass over out). Returns the block starts.
std::vector<int64_t> plan_slices(int64_t taps, int64_t cin, int64_t block,
                                 std::vector<Slice>& slices) {
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t c0 = 0; c0 < cin; c0 += block)
      slices.push_back({t, c0, std::min(block, cin - c0)});
  std::vector<int64_t> starts{0};
  int64_t k = 0;
  for (size_t i = 0; i < slices.size(); ++i) {
    if (k > 0 && k + slices[i].len > block) {
      starts.push_back(static_cast<int64_t>(i));
      k = 0;
    }
    k += slices[i].len;
  }
  starts.push_back(static_cast<int64_t>(slices.size()));
  return starts;
}

void check_nhwc(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4,
              op, ": ", name, " must be a 4-D float32 CPU tensor, got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name,
              " must have unit channel stride (channels_last or a channel slice of it), got "
              "strides ",
              t.strides());
}

// The checks and the launch both ops share: out's shape for a kh x kw kernel,
// the act, the overlaps, the bias (padded to whole 16-channel panels) and the
// residual. `depthwise`: `weights` is [KH, KW, C] and out has x's channels.
void run_direct(const char* op, const Tensor& out, const Tensor& x, const float* weights,
                int64_t kh, int64_t kw, bool depthwise, const std::optional<Tensor>& bias,
                const std::optional<Tensor>& residual, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view act) {
  const int64_t cin = x.size(1), cout = out.size(1), panels = (cout + kPanel - 1) / kPanel;
  const int64_t oh = (x.size(2) + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t ow = (x.size(3) + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(2) == oh && out.size(3) == ow, op,
              ": out must be [", x.size(0), ", ", cout, ", ", oh, ", ", ow, "], got ",
              out.sizes());
  const std::string a(act.data(), act.size());
  TORCH_CHECK(a == "relu" || a == "identity" || a == "silu" || a == "sigmoid", op,
              ": act must be relu, identity, silu or sigmoid, got ", a);
  at::assert_no_overlap(out, x);
  std::vector<float> padded_bias;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == cout && bias->scalar_type() == at::kFloat &&
                    bias->device().is_cpu(),
                op, ": bias must be a float32 CPU vector of ", cout, " values");
    const Tensor b = bias->contiguous();
    padded_bias.assign(panels * kPanel, 0.f);
    std::copy(b.const_data_ptr<float>(), b.const_data_ptr<float>() + cout, padded_bias.begin());
  }
  if (residual.has_value()) {
    check_nhwc(op, "residual", *residual);
    TORCH_CHECK(residual->sizes() == out.sizes(), op, ": residual must be shaped as out ",
                out.sizes(), ", got ", residual->sizes());
    at::assert_no_overlap(out, *residual);
  }
#if defined(CPU_CAPABILITY_AVX2)
  if (out.numel() == 0) return;
  const Isa isa = current_isa().load();
  const int64_t block = isa == Isa::kAvx512 ? kBlockKAvx512 : kBlockKAvx2;
  std::vector<Slice> slices;
  const std::vector<int64_t> blocks =
      depthwise ? std::vector<int64_t>{} : plan_slices(kh * kw, cin, block, slices);
  const std::vector<float> zeros(depthwise ? 0 : std::min(cin, block), 0.f);
  const Tensor* res = residual.has_value() ? &*residual : nullptr;
  const Geometry g{x.const_data_ptr<float>(), x.stride(0), x.stride(2), x.stride(3),
                   x.size(2), x.size(3), oh, ow, kw, kh * kw, cin,
                   stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                   out.data_ptr<float>(), out.stride(0), out.stride(2), out.stride(3),
                   res ? res->const_data_ptr<float>() : nullptr,
                   res ? res->stride(0) : 0, res ? res->stride(2) : 0, res ? res->stride(3) : 0,
                   weights, padded_bias.empty() ? nullptr : padded_bias.data(), zeros.data(),
                   cout, parse_act(a)};
  if (depthwise) {
    const int64_t rows = x.size(0) * oh;
    if (isa == Isa::kAvx512) {
      dwconv_nhwc_avx512(g, rows);
    } else {
      dwconv_nhwc<Avx2>(g, rows);
    }
    return;
  }
  const Reduction red{slices.data(), blocks.data(), static_cast<int64_t>(blocks.size()) - 1};
  const int64_t pixels = x.size(0) * oh * ow;
  if (isa == Isa::kAvx512) {
    conv_nhwc_avx512(g, red, pixels);
  } else {
    conv_nhwc<Avx2>(g, red, pixels);
  }
#else
  TORCH_CHECK(false, op, ": convkernels._C was built without AVX2 "
              "(CONVKERNELS_CPU_CAPABILITY=DEFAULT); use aten's convolution");
#endif
}

void check_args(const char* op, const Tensor& out, const Tensor& x, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_nhwc(op, "x", x);
  check_nhwc(op, "out", out);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have 2 values each");
}

void conv2d_nhwc__cpu(const Tensor& out, const Tensor& x, const Tensor& packed,
                      const std::optional<Tensor>& bias, const std::optional<Tensor>& residual,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                      c10::string_view act) {
  const char* op = "conv2d_nhwc_";
  check_args(op, out, x, stride, padding, dilation);
  TORCH_CHECK(packed.dim() == 5 && packed.size(4) == kPanel && packed.is_contiguous() &&
                  packed.scalar_type() == at::kFloat && packed.size(3) == x.size(1),
              "conv2d_nhwc_: packed must be a contiguous float32 [panels, KH, KW, ", x.size(1),
              ", 16] weight, got ", packed.sizes());
  const int64_t panels = packed.size(0), cout = out.size(1);
  TORCH_CHECK(panels == (cout + kPanel - 1) / kPanel, "conv2d_nhwc_: packed has ", panels,
              " panels of 16 output channels, out has ", cout, " channels");
  run_direct(op, out, x, packed.const_data_ptr<float>(), packed.size(1), packed.size(2), false,
             bias, residual, stride, padding, dilation, act);
}

void dwconv2d_nhwc__cpu(const Tensor& out, const Tensor& x, const Tensor& packed,
                        const std::optional<Tensor>& bias, const std::optional<Tensor>& residual,
                        at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, c10::string_view act) {
  const char* op = "dwconv2d_nhwc_";
  check_args(op, out, x, stride, padding, dilation);
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == x.size(1) && packed.is_contiguous() &&
                  packed.scalar_type() == at::kFloat,
              "dwconv2d_nhwc_: packed must be a contiguous float32 [KH, KW, ", x.size(1),
              "] weight, got ", packed.sizes());
  TORCH_CHECK(out.size(1) == x.size(1), "dwconv2d_nhwc_: out must have x's ", x.size(1),
              " channels, got ", out.size(1));
  run_direct(op, out, x, packed.const_data_ptr<float>(), packed.size(0), packed.size(1), true,
             bias, residual, stride, padding, dilation, act);
}

}  // namespace
}  // namespace cpu
}  // namespace convkernels

// Not tensor ops: their schemas live here, beside the state they read and set.
TORCH_LIBRARY_FRAGMENT(convkernels_C, m) {
  m.def("conv_isa() -> str", &convkernels::cpu::conv_isa);
  m.def("set_conv_isa(str isa) -> str", &convkernels::cpu::set_conv_isa);
}

TORCH_LIBRARY_IMPL(convkernels_C, CPU, m) {
  m.impl("conv2d_nhwc_", &convkernels::cpu::conv2d_nhwc__cpu);
  m.impl("dwconv2d_nhwc_", &convkernels::cpu::dwconv2d_nhwc__cpu);
}

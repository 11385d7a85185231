// CPU kernels of the NT-Xent primitives (contract: convkernels/ops/primitives.py):
// nt_xent_forward, nt_xent_backward.
//
// z is normalised once into an [M, D] buffer u of the accumulation type (float;
// double for double z), so that every tile of similarities is one GEMM call
// (MKL) on rows of u. Rows are split into blocks of kRows over at::parallel_for;
// each block walks blocks of kCols columns, so a task holds one kRows x kCols
// tile, never the M x M matrix. The forward keeps an online logsumexp per row;
// the backward recomputes each tile, turns it into the weights W in place and
// accumulates W @ u_cols into the block's gradient rows with a second GEMM.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace convkernels {
namespace cpu {
namespace {

using at::Tensor;

constexpr int64_t kRows = 64;   // rows per task
constexpr int64_t kCols = 256;  // columns per tile: 64 x 256 floats = 64 KiB, in L2
constexpr double kEps = 1e-12;  // F.normalize's

void check_z(const char* op, const Tensor& z) {
  TORCH_CHECK(z.device().is_cpu(), op, ": z must be a CPU tensor, got ", z.device());
  TORCH_CHECK(z.dim() == 2 && z.size(0) > 0 && z.size(0) % 2 == 0 && z.size(1) > 0, op,
              ": z must be a [2N, D] tensor with N >= 1 and D >= 1, got shape ", z.sizes());
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), op, ": z must be floating, got ", z.scalar_type());
}

at::ScalarType acc_of(const Tensor& z) {
  return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// u = z / max(|z|, eps) in the accumulation type, and the row norms |z|.
std::tuple<Tensor, Tensor> normalise(const Tensor& z) {
  Tensor u = z.to(acc_of(z), /*non_blocking=*/false, /*copy=*/true).contiguous();
  Tensor norm = at::empty({z.size(0)}, u.options());
  const int64_t D = z.size(1);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "nt_xent_normalise", [&] {
    scalar_t* up = u.mutable_data_ptr<scalar_t>();
    scalar_t* np = norm.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, z.size(0), 64, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        scalar_t* row = up + i * D;
        scalar_t ss = 0;
        for (int64_t k = 0; k < D; ++k) ss += row[k] * row[k];
        np[i] = std::sqrt(ss);
        const scalar_t denom = std::max(np[i], scalar_t(kEps));
        for (int64_t k = 0; k < D; ++k) row[k] /= denom;
      }
    });
  });
  return {u, norm};
}

// tile = (u[r0:r0+br] @ u[c0:c0+bc]^T) / temperature, into a contiguous [br, bc] view of buf.
Tensor sim_tile(const Tensor& u, Tensor& buf, int64_t r0, int64_t br, int64_t c0, int64_t bc,
                double inv_t) {
  Tensor tile = buf.narrow(0, 0, br * bc).view({br, bc});
  at::addmm_out(tile, tile, u.narrow(0, r0, br), u.narrow(0, c0, bc).t(), /*beta=*/0, inv_t);
  return tile;
}

// Calls f(begin, end) on the column ranges of a tile row of bc entries other than
// the self-pair at column `self` (-1 or >= bc when not in this tile).
template <typename F>
void for_each_off_self(int64_t bc, int64_t self, const F& f) {
  if (self < 0 || self >= bc) {
    f(0, bc);
    return;
  }
  if (self > 0) f(0, self);
  if (self + 1 < bc) f(self + 1, bc);
}

std::tuple<Tensor, Tensor> nt_xent_forward_cpu(const Tensor& z_in, double temperature) {
  const char* op = "nt_xent_forward";
  check_z(op, z_in);
  const Tensor z = z_in.contiguous();
  const int64_t M = z.size(0), N = M / 2;
  auto [u, norm] = normalise(z);
  Tensor row_loss = at::empty({M}, u.options());
  Tensor lse = at::empty({M}, u.options());
  const double inv_t = 1.0 / temperature;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "nt_xent_forward", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    const scalar_t kNegInf = -std::numeric_limits<scalar_t>::infinity();
    scalar_t* lp = row_loss.mutable_data_ptr<scalar_t>();
    scalar_t* sp = lse.mutable_data_ptr<scalar_t>();
    const int64_t blocks = (M + kRows - 1) / kRows;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      Tensor buf = at::empty({kRows * kCols}, u.options());
      std::vector<scalar_t> mx(kRows), sum(kRows), pos(kRows);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * kRows, br = std::min(kRows, M - r0);
        std::fill(mx.begin(), mx.end(), kNegInf);
        std::fill(sum.begin(), sum.end(), scalar_t(0));
        for (int64_t c0 = 0; c0 < M; c0 += kCols) {
          const int64_t bc = std::min(kCols, M - c0);
          const scalar_t* tile = sim_tile(u, buf, r0, br, c0, bc, inv_t).const_data_ptr<scalar_t>();
          for (int64_t i = 0; i < br; ++i) {
            const int64_t gi = r0 + i, p = (gi + N) % M;
            const scalar_t* row = tile + i * bc;
            if (p >= c0 && p < c0 + bc) pos[i] = row[p - c0];
            scalar_t tmax = kNegInf;
            for_each_off_self(bc, gi - c0, [&](int64_t a, int64_t e) {
              tmax = std::max(tmax, at::vec::reduce_all<scalar_t>(
                                        [](Vec& x, Vec& y) { return at::vec::maximum(x, y); },
                                        row + a, e - a));
            });
            if (tmax == kNegInf) continue;  // nothing but masked columns here
            // Online logsumexp: rescale the running sum to the new maximum.
            const scalar_t m = std::max(mx[i], tmax);
            scalar_t s = sum[i] * std::exp(mx[i] - m);
            for_each_off_self(bc, gi - c0, [&](int64_t a, int64_t e) {
              s += at::vec::map_reduce_all<scalar_t>(
                  [m](Vec x) { return (x - Vec(m)).exp(); },
                  [](Vec x, Vec y) { return x + y; }, row + a, e - a);
            });
            mx[i] = m;
            sum[i] = s;
          }
        }
        for (int64_t i = 0; i < br; ++i) {
          sp[r0 + i] = mx[i] + std::log(sum[i]);
          lp[r0 + i] = sp[r0 + i] - pos[i];
        }
      }
    });
  });
  return {row_loss, lse};
}

Tensor nt_xent_backward_cpu(const Tensor& grad, const Tensor& z_in, const Tensor& lse_in,
                            double temperature) {
  const char* op = "nt_xent_backward";
  check_z(op, z_in);
  const Tensor z = z_in.contiguous();
  const int64_t M = z.size(0), N = M / 2, D = z.size(1);
  auto [u, norm] = normalise(z);
  TORCH_CHECK(lse_in.dim() == 1 && lse_in.size(0) == M, op, ": lse must have shape [", M, "], got ",
              lse_in.sizes());
  const Tensor lse = lse_in.to(u.scalar_type()).contiguous();
  Tensor gz = at::empty({M, D}, u.options());
  const double inv_t = 1.0 / temperature;
  const double c = grad.item<double>() / static_cast<double>(M);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "nt_xent_backward", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    constexpr int64_t W = Vec::size();
    const scalar_t* lp = lse.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    const scalar_t* np = norm.const_data_ptr<scalar_t>();
    scalar_t* gp = gz.mutable_data_ptr<scalar_t>();
    const int64_t blocks = (M + kRows - 1) / kRows;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      Tensor buf = at::empty({kRows * kCols}, u.options());
      std::vector<scalar_t> r(kRows);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * kRows, br = std::min(kRows, M - r0);
        Tensor acc = at::zeros({br, D}, u.options());  // sum_j W_ij u_j of the block's rows
        std::fill(r.begin(), r.end(), scalar_t(0));
        for (int64_t c0 = 0; c0 < M; c0 += kCols) {
          const int64_t bc = std::min(kCols, M - c0);
          Tensor tile = sim_tile(u, buf, r0, br, c0, bc, inv_t);
          scalar_t* t = tile.mutable_data_ptr<scalar_t>();
          for (int64_t i = 0; i < br; ++i) {
            const int64_t gi = r0 + i, self = gi - c0, p = (gi + N) % M - c0;
            scalar_t* row = t + i * bc;
            const bool has_pos = p >= 0 && p < bc;
            const scalar_t s_pos = has_pos ? row[p] : scalar_t(0);
            const Vec lse_i(lp[gi]);
            // W_ij = exp(s_ij - lse_i) + exp(s_ij - lse_j) over the columns j != i,
            // written over s_ij, and r_i += sum_j W_ij s_ij.
            for_each_off_self(bc, self, [&](int64_t a, int64_t e) {
              Vec ws(0);
              for (int64_t j = a; j < e; j += W) {
                const int64_t k = std::min(W, e - j);
                const Vec s = Vec::loadu(row + j, k);
                const Vec w = (s - lse_i).exp() + (s - Vec::loadu(lp + c0 + j, k)).exp();
                ws = k == W ? ws + w * s : Vec::set(ws, ws + w * s, k);
                w.store(row + j, k);
              }
              r[i] += at::vec::vec_reduce_all<scalar_t>([](Vec& x, Vec& y) { return x + y; }, ws);
            });
            if (self >= 0 && self < bc) row[self] = 0;
            if (has_pos) {  // the positive pair's -2 (its s comes from the cross-entropy target)
              row[p] -= 2;
              r[i] -= 2 * s_pos;
            }
          }
          acc.addmm_(tile, u.narrow(0, c0, bc));
        }
        // grad_z_i = (g_u_i - c r_i u_i) / |z_i| with g_u_i = (c / t) acc_i; past the
        // clamp (|z_i| <= eps) the norm is a constant: g_u_i / eps.
        const scalar_t* ap = acc.const_data_ptr<scalar_t>();
        for (int64_t i = 0; i < br; ++i) {
          const int64_t gi = r0 + i;
          const scalar_t* a = ap + i * D;
          const scalar_t* ui = up + gi * D;
          scalar_t* g = gp + gi * D;
          const scalar_t cu = static_cast<scalar_t>(c * inv_t);
          const bool clamped = np[gi] <= scalar_t(kEps);
          const scalar_t proj = clamped ? scalar_t(0) : static_cast<scalar_t>(c) * r[i];
          const scalar_t inv_n = scalar_t(1) / std::max(np[gi], scalar_t(kEps));
          for (int64_t k = 0; k < D; ++k) g[k] = (cu * a[k] - proj * ui[k]) * inv_n;
        }
      }
    });
  });
  return gz.to(z.scalar_type());
}

}  // namespace
}  // namespace cpu
}  // namespace convkernels

TORCH_LIBRARY_IMPL(convkernels_C, CPU, m) {
  using namespace convkernels::cpu;
  m.impl("nt_xent_forward", &nt_xent_forward_cpu);
  m.impl("nt_xent_backward", &nt_xent_backward_cpu);
}

// grad_summary: sum g^2 and the probe projections x_j^T g y_j of a gradient in one pass, with
// float64 accumulation and no copy of the gradient (it can be a large embedding table).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace gradstats {
namespace {

void check_summary_args(const at::Tensor& g, const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(g.dim() == 2, "grad_summary: g must be 2-D [R, C], got shape ", g.sizes());
  TORCH_CHECK(at::isFloatingType(g.scalar_type()), "grad_summary: g must be floating, got ",
              g.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == g.size(0), "grad_summary: x must be [R, K] with R = ",
              g.size(0), ", got shape ", x.sizes());
  TORCH_CHECK(y.dim() == 2 && y.size(0) == g.size(1) && y.size(1) == x.size(1),
              "grad_summary: y must be [C, K] with C = ", g.size(1), " and K = ", x.size(1),
              ", got shape ", y.sizes());
  TORCH_CHECK(x.scalar_type() == at::kDouble && y.scalar_type() == at::kDouble,
              "grad_summary: x and y must be float64");
  TORCH_CHECK(g.device() == x.device() && g.device() == y.device(),
              "grad_summary: g, x and y must be on one device");
}

constexpr int kMaxK = 8;

at::Tensor grad_summary_cpu(const at::Tensor& g_in, const at::Tensor& x_in,
                            const at::Tensor& y_in) {
  check_summary_args(g_in, x_in, y_in);
  const int64_t K = x_in.size(1);
  TORCH_CHECK(K <= kMaxK, "grad_summary: at most ", kMaxK, " projections, got K = ", K);
  at::Tensor g = g_in.scalar_type() == at::kFloat || g_in.scalar_type() == at::kDouble
                     ? g_in.contiguous()
                     : g_in.to(at::kFloat).contiguous();
  at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const int64_t R = g.size(0), C = g.size(1);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(R, 4 * at::get_num_threads()));
  std::vector<double> partial(chunks * (1 + K), 0.0);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gradstats_grad_summary", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const double* xp = x.const_data_ptr<double>();
    const double* yp = y.const_data_ptr<double>();
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        double* out = partial.data() + c * (1 + K);
        for (int64_t r = c * R / chunks; r < (c + 1) * R / chunks; ++r) {
          const scalar_t* row = gp + r * C;
          double sq[4] = {0, 0, 0, 0};
          double rd[kMaxK] = {0};
          int64_t k = 0;
          for (; k + 4 <= C; k += 4) {
            for (int u = 0; u < 4; ++u) {
              const double v = double(row[k + u]);
              sq[u] += v * v;
              for (int64_t j = 0; j < K; ++j) rd[j] += v * yp[(k + u) * K + j];
            }
          }
          for (; k < C; ++k) {
            const double v = double(row[k]);
            sq[0] += v * v;
            for (int64_t j = 0; j < K; ++j) rd[j] += v * yp[k * K + j];
          }
          out[0] += (sq[0] + sq[1]) + (sq[2] + sq[3]);
          for (int64_t j = 0; j < K; ++j) out[1 + j] += xp[r * K + j] * rd[j];
        }
      }
    });
  });
  at::Tensor result = at::zeros({1 + K}, x.options());
  double* rp = result.mutable_data_ptr<double>();
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t j = 0; j < 1 + K; ++j) rp[j] += partial[c * (1 + K) + j];
  return result;
}

// Every other device (CUDA, meta): the same maths from ATen ops, correct by construction.
at::Tensor grad_summary_composite(const at::Tensor& g, const at::Tensor& x, const at::Tensor& y) {
  check_summary_args(g, x, y);
  at::Tensor gd = g.to(at::kDouble);
  at::Tensor sq = gd.mul(gd).sum().reshape({1});
  at::Tensor proj = at::mm(gd, y).mul(x).sum(0);
  return at::cat({sq, proj});
}

}  // namespace

TORCH_LIBRARY_IMPL(gradstats, CPU, m) { m.impl("grad_summary", &grad_summary_cpu); }
TORCH_LIBRARY_IMPL(gradstats, CompositeExplicitAutograd, m) {
  m.impl("grad_summary", &grad_summary_composite);
}

}  // namespace gradstats

// grad_summary: sum g^2, the probe projections x_j^T g y_j of a gradient and their rounding
// scales sum_rc (x_rj y_cj g_rc)^2 in one pass, with float64 accumulation across rows and no
// copy of the gradient (it can be a large embedding table).
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

constexpr int kLanes = 16;

// Rows [r0, r1) of g [R, C]: out[0] += sum g^2, out[1 + j] += x[r, j] * (g[r, :] . y[:, j]),
// out[1 + K + j] += x[r, j]^2 * (g[r, :]^2 . y[:, j]^2).
// Within a row the sums run in kLanes independent lanes of acc_t (float for float gradients,
// which vectorises; each row's total then joins a float64 sum), so no reassociation is needed
// for the compiler to use SIMD.
template <typename scalar_t, typename acc_t, int K>
void summarize_rows(const scalar_t* g, int64_t r0, int64_t r1, int64_t C, const acc_t* yt,
                    const acc_t* yt2, const double* x, double* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = g + r * C;
    acc_t sq[kLanes] = {};
    acc_t rd[K][kLanes] = {};
    acc_t rs[K][kLanes] = {};
    int64_t k = 0;
    for (; k + kLanes <= C; k += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const acc_t v = acc_t(row[k + l]);
        const acc_t vv = v * v;
        sq[l] += vv;
        for (int j = 0; j < K; ++j) {
          rd[j][l] += v * yt[j * C + k + l];
          rs[j][l] += vv * yt2[j * C + k + l];
        }
      }
    }
    for (int l = 0; k < C; ++k, ++l) {
      const acc_t v = acc_t(row[k]);
      sq[l] += v * v;
      for (int j = 0; j < K; ++j) {
        rd[j][l] += v * yt[j * C + k];
        rs[j][l] += v * v * yt2[j * C + k];
      }
    }
    double s = 0;
    for (int l = 0; l < kLanes; ++l) s += double(sq[l]);
    out[0] += s;
    for (int j = 0; j < K; ++j) {
      double d = 0, e = 0;
      for (int l = 0; l < kLanes; ++l) {
        d += double(rd[j][l]);
        e += double(rs[j][l]);
      }
      const double xr = x[r * K + j];
      out[1 + j] += xr * d;
      out[1 + K + j] += xr * xr * e;
    }
  }
}

template <typename scalar_t, typename acc_t>
void summarize(const at::Tensor& g, const at::Tensor& x, const at::Tensor& y, int64_t K,
               std::vector<double>& partial, int64_t chunks) {
  const int64_t R = g.size(0), C = g.size(1);
  at::Tensor yt = y.t().to(c10::CppTypeToScalarType<acc_t>::value).contiguous();  // [K, C]
  at::Tensor yt2 = yt.mul(yt);
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const acc_t* yp = yt.const_data_ptr<acc_t>();
  const acc_t* yp2 = yt2.const_data_ptr<acc_t>();
  const double* xp = x.const_data_ptr<double>();
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      double* out = partial.data() + c * (1 + 2 * K);
      const int64_t r0 = c * R / chunks, r1 = (c + 1) * R / chunks;
      switch (K) {
        case 1: summarize_rows<scalar_t, acc_t, 1>(gp, r0, r1, C, yp, yp2, xp, out); break;
        case 2: summarize_rows<scalar_t, acc_t, 2>(gp, r0, r1, C, yp, yp2, xp, out); break;
        case 3: summarize_rows<scalar_t, acc_t, 3>(gp, r0, r1, C, yp, yp2, xp, out); break;
        default: summarize_rows<scalar_t, acc_t, 4>(gp, r0, r1, C, yp, yp2, xp, out); break;
      }
    }
  });
}

at::Tensor grad_summary_cpu(const at::Tensor& g_in, const at::Tensor& x_in,
                            const at::Tensor& y_in) {
  check_summary_args(g_in, x_in, y_in);
  const int64_t K = x_in.size(1);
  TORCH_CHECK(K >= 1 && K <= 4, "grad_summary: 1 to 4 projections on CPU, got K = ", K);
  at::Tensor g = g_in.scalar_type() == at::kFloat || g_in.scalar_type() == at::kDouble
                     ? g_in.contiguous()
                     : g_in.to(at::kFloat).contiguous();
  at::Tensor x = x_in.contiguous();
  const int64_t R = g.size(0);
  // one chunk per ~32k elements (a parallel region costs more than a small gradient's pass)
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>({R, 4 * int64_t(at::get_num_threads()), g.numel() >> 15}));
  std::vector<double> partial(chunks * (1 + 2 * K), 0.0);
  if (g.scalar_type() == at::kDouble) {
    summarize<double, double>(g, x, y_in, K, partial, chunks);
  } else {
    summarize<float, float>(g, x, y_in, K, partial, chunks);
  }
  at::Tensor result = at::zeros({1 + 2 * K}, x.options());
  double* rp = result.mutable_data_ptr<double>();
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t j = 0; j < 1 + 2 * K; ++j) rp[j] += partial[c * (1 + 2 * K) + j];
  return result;
}

// Every other device (CUDA, meta): the same maths from ATen ops, correct by construction.
at::Tensor grad_summary_composite(const at::Tensor& g, const at::Tensor& x, const at::Tensor& y) {
  check_summary_args(g, x, y);
  at::Tensor gd = g.to(at::kDouble);
  at::Tensor g2 = gd.mul(gd);
  at::Tensor sq = g2.sum().reshape({1});
  at::Tensor proj = at::mm(gd, y).mul(x).sum(0);
  at::Tensor rms = at::mm(g2, y.mul(y)).mul(x.mul(x)).sum(0);
  return at::cat({sq, proj, rms});
}

}  // namespace

TORCH_LIBRARY_IMPL(gradstats, CPU, m) { m.impl("grad_summary", &grad_summary_cpu); }
TORCH_LIBRARY_IMPL(gradstats, CompositeExplicitAutograd, m) {
  m.impl("grad_summary", &grad_summary_composite);
}

}  // namespace gradstats

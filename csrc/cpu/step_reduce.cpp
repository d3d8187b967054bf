// step_reduce: the monitor's per-step reduction of its accumulators and the gradients' squared
// norms, one op instead of a dozen small ones (each costs microseconds of dispatch on the CPU).
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <vector>

namespace gradstats {
namespace {

void check_step_args(const at::Tensor& E, const at::Tensor& r, int64_t n,
                     const c10::List<c10::optional<at::Tensor>>& grads) {
  TORCH_CHECK(E.dim() == 2 && E.scalar_type() == at::kDouble,
              "step_reduce: E must be a float64 [slots, capacity] accumulator, got ",
              E.scalar_type(), " ", E.sizes());
  TORCH_CHECK(r.dim() == 1 && r.scalar_type() == at::kDouble && r.size(0) == E.size(1),
              "step_reduce: r must be float64 [capacity] with E's capacity ", E.size(1), ", got ",
              r.scalar_type(), " ", r.sizes());
  TORCH_CHECK(E.device() == r.device(), "step_reduce: E and r must be on one device");
  TORCH_CHECK(n >= 0 && n <= E.size(1), "step_reduce: n must be in [0, ", E.size(1), "], got ",
              n);
  TORCH_CHECK(grads.size() == 0 || int64_t(grads.size()) == E.size(0),
              "step_reduce: grads must be empty or hold one entry per slot (", E.size(0),
              "), got ", grads.size());
}

// |grads[s]|^2 into gsq [S] float64 (0 for None): one foreach norm over the present gradients,
// in float32 or float64 (a half-precision norm would round to 3 digits).
void grad_sq_norms(const c10::List<c10::optional<at::Tensor>>& grads, const at::Tensor& gsq) {
  std::vector<at::Tensor> dense;
  std::vector<int64_t> where;
  for (int64_t s = 0; s < int64_t(grads.size()); ++s) {
    const c10::optional<at::Tensor> opt = grads.get(s);
    if (!opt.has_value() || !opt->defined() || opt->numel() == 0) continue;
    TORCH_CHECK(at::isFloatingType(opt->scalar_type()) && !opt->is_sparse(), "step_reduce: grads[",
                s, "] must be a dense floating tensor, got ", opt->scalar_type());
    const auto t = opt->scalar_type();
    dense.push_back(t == at::kFloat || t == at::kDouble ? *opt : opt->to(at::kFloat));
    where.push_back(s);
  }
  if (dense.empty()) return;
  at::Tensor norms = at::stack(at::_foreach_norm(dense, 2)).to(gsq.device(), at::kDouble);
  at::Tensor sq = norms.mul(norms);
  if (int64_t(where.size()) == gsq.size(0)) {
    gsq.copy_(sq);
  } else {
    for (size_t j = 0; j < where.size(); ++j) gsq.select(0, where[j]).copy_(sq.select(0, j));
  }
}

at::Tensor step_reduce_cpu(const at::Tensor& E_in, const at::Tensor& r_in, int64_t n, double coef,
                           const c10::List<c10::optional<at::Tensor>>& grads) {
  check_step_args(E_in, r_in, n, grads);
  const int64_t S = E_in.size(0);
  at::Tensor out = at::zeros({2 * S + 2 + n}, E_in.options());
  double* o = out.mutable_data_ptr<double>();
  at::Tensor E = E_in.stride(1) == 1 ? E_in : E_in.contiguous();
  const double* e = E.const_data_ptr<double>();
  const int64_t ld = E.stride(0);
  at::Tensor r = r_in.contiguous();
  const double* rp = r.const_data_ptr<double>();
  std::vector<double> w(n);
  double C = 0, Q = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double c = rp[i] * coef;
    C += c;
    Q += c * c;
    w[i] = c > 0 ? 1.0 / (c * c) : 0.0;
  }
  double* per_example = o + 2 * S + 2;
  for (int64_t s = 0; s < S; ++s) {
    const double* row = e + s * ld;
    double acc = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double v = row[i] * w[i];
      acc += v;
      per_example[i] += v;
    }
    o[s] = acc;
  }
  o[2 * S] = C;
  o[2 * S + 1] = Q;
  grad_sq_norms(grads, out.narrow(0, S, S));
  return out;
}

// Every other device (CUDA, meta): the same maths from ATen ops.
at::Tensor step_reduce_composite(const at::Tensor& E_in, const at::Tensor& r_in, int64_t n,
                                 double coef, const c10::List<c10::optional<at::Tensor>>& grads) {
  check_step_args(E_in, r_in, n, grads);
  const int64_t S = E_in.size(0);
  at::Tensor c = r_in.narrow(0, 0, n) * coef;
  at::Tensor w = at::where(c > 0, c.reciprocal().square(), at::zeros_like(c));
  at::Tensor Ew = E_in.narrow(1, 0, n) * w;
  at::Tensor gsq = at::zeros({S}, E_in.options());
  grad_sq_norms(grads, gsq);
  return at::cat({Ew.sum(1), gsq, c.sum().reshape({1}), c.square().sum().reshape({1}), Ew.sum(0)});
}

}  // namespace

TORCH_LIBRARY_IMPL(gradstats, CPU, m) { m.impl("step_reduce", &step_reduce_cpu); }
TORCH_LIBRARY_IMPL(gradstats, CompositeExplicitAutograd, m) {
  m.impl("step_reduce", &step_reduce_composite);
}

}  // namespace gradstats

// C++ smoke test (CMakeLists.txt): calls gradstats::linear_norms and gradstats::linear_fused
// through the dispatcher on random CPU tensors and checks them against a direct libtorch
// computation of the per-example gradients G_i^T A_i. Exits non-zero on any mismatch.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

namespace {

using NormsFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                   c10::string_view);
using FusedFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, c10::string_view);

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, double rtol,
                  const std::string& what) {
  const double err =
      ((got.to(at::kDouble) - want).abs().max() / want.abs().max().clamp_min(1e-300))
          .item<double>();
  const bool ok = err <= rtol;
  std::printf("%-4s %-48s max rel err %.3g\n", ok ? "ok" : "FAIL", what.c_str(), err);
  if (!ok) ++failures;
}

}  // namespace

int main() {
  auto norms_op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("gradstats::linear_norms", "")
                      .typed<NormsFn>();
  auto fused_op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("gradstats::linear_fused", "")
                      .typed<FusedFn>();
  at::manual_seed(0);
  struct Case {
    std::vector<int64_t> a, g;  // shapes of A and G
  };
  const std::vector<Case> cases = {
      {{7, 33}, {7, 17}},             // T = 1
      {{5, 9, 24}, {5, 9, 40}},       // T < d: Gram territory
      {{3, 4, 6, 16}, {3, 4, 6, 8}},  // two middle dims, T = 24 > d_in d_out / (d_in + d_out)
      {{1, 13, 10}, {1, 13, 12}},     // B = 1
  };
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    const double rtol = dtype == at::kFloat ? 1e-4 : 1e-10;
    for (const auto& c : cases) {
      const at::Tensor A = at::randn(c.a, at::TensorOptions().dtype(dtype));
      const at::Tensor G = at::randn(c.g, at::TensorOptions().dtype(dtype));
      // Per-example gradients in float64, formed explicitly.
      const int64_t B = A.size(0);
      const at::Tensor a = A.to(at::kDouble).reshape({B, -1, A.size(-1)});
      const at::Tensor g = G.to(at::kDouble).reshape({B, -1, G.size(-1)});
      const at::Tensor dW_i = at::bmm(g.transpose(1, 2), a);  // [B, d_out, d_in]
      const at::Tensor db_i = g.sum(1);                       // [B, d_out]
      const at::Tensor want_w = dW_i.square().sum({1, 2});
      const at::Tensor want_b = db_i.square().sum(1);
      const std::string tag = std::string(c10::toString(dtype)) + " A" + c10::str(A.sizes());
      std::vector<std::string> strategies = {"auto", "gram", "direct"};
      if (a.size(1) == 1) strategies.push_back("outer");
      for (const auto& st : strategies) {
        auto [nw, nb] = norms_op.call(A, G, st);
        expect_close(nw, want_w, rtol, "linear_norms[" + st + "] weight " + tag);
        expect_close(nb, want_b, rtol, "linear_norms[" + st + "] bias   " + tag);
        auto [dW, db, fw, fb] = fused_op.call(A, G, st);
        expect_close(dW, dW_i.sum(0), rtol, "linear_fused[" + st + "] dW     " + tag);
        expect_close(db, db_i.sum(0), rtol, "linear_fused[" + st + "] db     " + tag);
        expect_close(fw, want_w, rtol, "linear_fused[" + st + "] weight " + tag);
        expect_close(fb, want_b, rtol, "linear_fused[" + st + "] bias   " + tag);
      }
    }
  }
  // Bad input must raise, not crash.
  try {
    norms_op.call(at::randn({2, 3, 4}), at::randn({2, 3, 5}), "outer");
    std::printf("FAIL strategy 'outer' with T > 1 did not raise\n");
    ++failures;
  } catch (const c10::Error&) {
    std::printf("ok   strategy 'outer' with T > 1 raises\n");
  }
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}

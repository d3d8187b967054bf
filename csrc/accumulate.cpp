// Device-agnostic helpers (ATen ops only), compiled once and called by the CPU and CUDA kernels.
#include "accumulate.h"

#include <ATen/TensorOperators.h>

#include <ATen/ops/bmm.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/stack.h>
#include <c10/util/Exception.h>

#include <vector>

namespace gradstats {
namespace {

// [n, K] = X [n, d] @ Y [d, K] for a few columns K: one matrix-vector product per column on the
// CPU, where a GEMM this thin runs several times slower.
at::Tensor thin_mm(const at::Tensor& X, const at::Tensor& Y) {
  at::Tensor y = Y.to(X.scalar_type());
  if (!X.is_cpu()) return at::mm(X, y);
  std::vector<at::Tensor> cols;
  for (int64_t j = 0; j < y.size(1); ++j) cols.push_back(at::mv(X, y.select(1, j)));
  return at::stack(cols, 1);
}

void check_probe_vector(const c10::optional<at::Tensor>& v, int64_t rows, int64_t K,
                        const at::Device& device, const char* name, const char* op) {
  if (!v.has_value()) return;
  TORCH_CHECK(v->dim() == 2 && v->size(0) == rows && v->size(1) == K, op, ": ", name,
              " must be [", rows, ", ", K, "], got shape ", v->sizes());
  TORCH_CHECK(v->scalar_type() == at::kDouble, op, ": ", name, " must be float64");
  TORCH_CHECK(v->device() == device, op, ": ", name, " must be on ", device);
}

}  // namespace

void check_accumulators(const at::Tensor& E, const at::Tensor& P, const at::Tensor& rows,
                        int64_t B, int64_t slot_w, int64_t slot_b, const at::Device& device,
                        const char* op) {
  TORCH_CHECK(E.dim() == 2 && E.scalar_type() == at::kDouble, op,
              ": E must be a float64 [slots, examples] accumulator, got ", E.scalar_type(), " ",
              E.sizes());
  TORCH_CHECK(P.dim() == 2 && P.scalar_type() == at::kDouble && P.size(0) == E.size(0), op,
              ": P must be a float64 [slots, 2K] accumulator with E's slots, got ",
              P.scalar_type(), " ", P.sizes());
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == B && rows.scalar_type() == at::kLong, op,
              ": rows must be int64 [B] with B = ", B, ", got ", rows.scalar_type(), " ",
              rows.sizes());
  TORCH_CHECK(E.device() == device && P.device() == device && rows.device() == device, op,
              ": E, P and rows must be on the inputs' device ", device);
  for (int64_t slot : {slot_w, slot_b}) {
    TORCH_CHECK(slot < E.size(0), op, ": slot ", slot, " out of range for E with ", E.size(0),
                " slots");
  }
}

void add_norms(const at::Tensor& E, const at::Tensor& rows, int64_t slot,
               const at::Tensor& norms) {
  if (slot < 0 || rows.numel() == 0) return;
  E.select(0, slot).index_add_(0, rows, norms.to(at::kDouble));
}

void linear_probe(const at::Tensor& A2, const at::Tensor& G2, const at::Tensor& P,
                  int64_t slot_w, int64_t slot_b, const c10::optional<at::Tensor>& xw,
                  const c10::optional<at::Tensor>& yw, const c10::optional<at::Tensor>& vb) {
  const int64_t K = P.size(1) / 2;
  const auto dev = P.device();
  check_probe_vector(xw, G2.size(1), K, dev, "xw", "linear probe");
  check_probe_vector(yw, A2.size(1), K, dev, "yw", "linear probe");
  check_probe_vector(vb, G2.size(1), K, dev, "vb", "linear probe");
  if (A2.size(0) == 0 || !((xw.has_value() && yw.has_value()) || vb.has_value())) return;
  at::Tensor gn = at::linalg_vector_norm(G2, 2, {1}).to(at::kDouble);  // |g_t|
  if (slot_w >= 0 && xw.has_value() && yw.has_value()) {
    at::Tensor value = (thin_mm(G2, *xw).to(at::kDouble) * thin_mm(A2, *yw).to(at::kDouble)).sum(0);
    at::Tensor an = at::linalg_vector_norm(A2, 2, {1}).to(at::kDouble);
    at::Tensor bound = (gn * an).sum() * at::linalg_vector_norm(*xw, 2, {0}) *
                       at::linalg_vector_norm(*yw, 2, {0});
    at::Tensor row = P.select(0, slot_w);
    row.narrow(0, 0, K).add_(value);
    row.narrow(0, K, K).add_(bound);
  }
  if (slot_b >= 0 && vb.has_value()) {
    at::Tensor value = at::mv(vb->t(), G2.sum(0).to(at::kDouble));
    at::Tensor bound = gn.sum() * at::linalg_vector_norm(*vb, 2, {0});
    at::Tensor row = P.select(0, slot_b);
    row.narrow(0, 0, K).add_(value);
    row.narrow(0, K, K).add_(bound);
  }
}

at::Tensor gram_correction(const at::Tensor& ac, const at::Tensor& gc, const at::Tensor& c,
                           const at::Tensor& d, const at::Tensor& s) {
  const auto wt = c.scalar_type();  // float32 or float64 working precision
  at::Tensor alpha = ac.sum(1, /*keepdim=*/false, wt);  // [n, d_in]
  // [n, T, 2] projections of the centred rows on (alpha, c) and on (d, s)
  at::Tensor va = at::bmm(ac.to(wt), at::stack({alpha, c}, 2));
  at::Tensor vg = at::bmm(gc.to(wt), at::stack({d, s.to(wt)}, 2));
  at::Tensor cross = (va.to(at::kDouble) * vg.to(at::kDouble)).sum({1, 2});
  auto dd = [](const at::Tensor& x, const at::Tensor& y) {
    return (x.to(at::kDouble) * y.to(at::kDouble)).sum(1);
  };
  return 2.0 * cross + dd(d, d) * dd(alpha, alpha) + dd(s, s) * dd(c, c) +
         2.0 * dd(d, s) * dd(alpha, c);
}

}  // namespace gradstats

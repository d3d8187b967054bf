// Every gradstats operator's schema, declared once. Implementations live in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY(gradstats, m) {
  // Per-example squared Frobenius norms of a Linear layer's weight and bias gradients.
  // A: [B, ..., d_in] layer input, G: [B, ..., d_out] gradient of the layer output.
  // Returns (weight_norms [B], bias_norms [B]) with
  //   weight_norms[i] = || sum_t g_{i,t} a_{i,t}^T ||_F^2,  bias_norms[i] = || sum_t g_{i,t} ||^2.
  // strategy: "auto" | "outer" (T == 1) | "gram" | "direct".
  m.def("linear_norms(Tensor A, Tensor G, str strategy=\"auto\") -> (Tensor, Tensor)");
  // The same norms together with the batch weight and bias gradients
  // dW = sum_i G_i^T A_i  [d_out, d_in]  and  db = sum_{i,t} g_{i,t}  [d_out].
  // Returns (dW, db, weight_norms, bias_norms).
  m.def(
      "linear_fused(Tensor A, Tensor G, str strategy=\"auto\") -> (Tensor, Tensor, Tensor, Tensor)");
  // The monitor's form of linear_norms: writes instead of returning. E [S, N] float64 gets
  // E[slot_w, rows[i]] += weight_norms[i] and E[slot_b, rows[i]] += bias_norms[i] (a slot < 0
  // is skipped); with probe vectors xw [d_out, K], yw [d_in, K], vb [d_out, K] (float64),
  // P [S, 2K] gets the contract probe <x_j y_j^T, dW>, <v_j, db> in columns [0, K) and the
  // bounds on their rounding in [K, 2K).
  m.def(
      "linear_collect(Tensor A, Tensor G, Tensor(a!) E, Tensor(b!) P, Tensor rows, int slot_w, "
      "int slot_b, Tensor? xw, Tensor? yw, Tensor? vb, str strategy=\"auto\") -> ()");
  // linear_collect that also returns (dW, db), computed with the norms in one pass.
  m.def(
      "linear_fused_collect(Tensor A, Tensor G, Tensor(a!) E, Tensor(b!) P, Tensor rows, "
      "int slot_w, int slot_b, Tensor? xw, Tensor? yw, Tensor? vb, str strategy=\"auto\") "
      "-> (Tensor, Tensor)");
  // One pass over a gradient viewed as g [R, C]: float64 [1 + 2K] holding sum g^2, the K
  // projections x_j^T g y_j for x [R, K] and y [C, K] (float64), and the K rounding scales
  // sum_rc (x_rj y_cj g_rc)^2 (the monitor's contract probe).
  m.def("grad_summary(Tensor g, Tensor x, Tensor y) -> Tensor");
  // The numeric part of the monitor's step() in one call. E [S, N] and r [N] float64 are the
  // accumulators (per-example squared norms, loss-reduction factors); the first n columns count.
  // With c_i = coef r_i and w_i = 1/c_i^2 (0 where c_i = 0), returns float64 [2S + 2 + n]:
  //   sum_i E[s, i] w_i (S),  |grads[s]|^2 (S; 0 for None, or all 0 when grads is empty),
  //   sum_i c_i,  sum_i c_i^2,  sum_s E[s, i] w_i (n).
  m.def("step_reduce(Tensor E, Tensor r, int n, float coef, Tensor?[] grads) -> Tensor");
}

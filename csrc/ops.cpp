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
  // One pass over a gradient viewed as g [R, C]: float64 [1 + K] holding sum g^2 and the K
  // projections x_j^T g y_j, for x [R, K] and y [C, K] float64 (the monitor's contract probe).
  m.def("grad_summary(Tensor g, Tensor x, Tensor y) -> Tensor");
}

// Argument checks, the strategy cost model, dtype rules and chunk sizing shared by the CPU and
// CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <string>
#include <string_view>

namespace gradstats {

enum class Strategy { Auto, Outer, Gram, Direct };

inline Strategy parse_strategy(std::string_view s) {
  if (s == "auto") return Strategy::Auto;
  if (s == "outer") return Strategy::Outer;
  if (s == "gram") return Strategy::Gram;
  if (s == "direct") return Strategy::Direct;
  TORCH_CHECK(false, "strategy must be one of 'auto', 'outer', 'gram', 'direct', got '",
              std::string(s), "'");
}

inline const char* strategy_name(Strategy s) {
  switch (s) {
    case Strategy::Outer: return "outer";
    case Strategy::Gram: return "gram";
    case Strategy::Direct: return "direct";
    default: return "auto";
  }
}

// The cheaper route per example. Gram costs ~T^2 (d_in + d_out) multiply-adds. For the norms
// alone the direct route costs a second weight-gradient GEMM, ~T d_in d_out; fused with the
// weight gradient it costs only squaring the tiles and adding them into dW, a memory pass over
// d_in d_out elements (counted as 4 multiply-adds each). The Gram route centres A and G over
// positions first (gram_correction in accumulate.h), so choosing it never costs accuracy.
inline Strategy choose_strategy(int64_t T, int64_t d_in, int64_t d_out, bool fused = false) {
  if (T == 1) return Strategy::Outer;
  const double gram = double(T) * double(T) * double(d_in + d_out);
  const double direct = (fused ? 4.0 : double(T)) * double(d_in) * double(d_out);
  return gram <= direct ? Strategy::Gram : Strategy::Direct;
}

struct LinearShape {
  int64_t B, T, d_in, d_out;
};

// Validates A [B, ..., d_in] and G [B, ..., d_out]; every message names the argument. An empty
// batch (B = 0) is valid: it contributes nothing.
inline LinearShape check_linear_inputs(const at::Tensor& A, const at::Tensor& G, const char* op) {
  TORCH_CHECK(A.defined(), op, ": A is undefined");
  TORCH_CHECK(G.defined(), op, ": G is undefined");
  TORCH_CHECK(A.dim() >= 2, op, ": A must have at least 2 dims [B, ..., d_in], got shape ",
              A.sizes());
  TORCH_CHECK(G.dim() >= 2, op, ": G must have at least 2 dims [B, ..., d_out], got shape ",
              G.sizes());
  TORCH_CHECK(A.dim() == G.dim(), op, ": A and G must have the same number of dims, got A ",
              A.sizes(), " and G ", G.sizes());
  TORCH_CHECK(at::isFloatingType(A.scalar_type()), op,
              ": A must be a floating-point tensor, got ", A.scalar_type());
  TORCH_CHECK(at::isFloatingType(G.scalar_type()), op,
              ": G must be a floating-point tensor, got ", G.scalar_type());
  TORCH_CHECK(A.device() == G.device(), op, ": A and G must be on the same device, got A on ",
              A.device(), " and G on ", G.device());
  TORCH_CHECK(A.size(0) == G.size(0), op, ": A and G must have the same batch size, got A ",
              A.sizes(), " and G ", G.sizes());
  TORCH_CHECK(!A.requires_grad() && !G.requires_grad(), op,
              ": A and G must not require grad (pass A.detach(), G.detach()); the ops are not "
              "differentiable");
  int64_t T = 1;
  for (int64_t d = 1; d + 1 < A.dim(); ++d) {
    TORCH_CHECK(A.size(d) == G.size(d), op, ": A and G must agree in every dim but the last, ",
                "got A ", A.sizes(), " and G ", G.sizes(), " (dim ", d, ")");
    T *= A.size(d);
  }
  return {A.size(0), T, A.size(-1), G.size(-1)};
}

inline Strategy resolve_strategy(std::string_view requested, const LinearShape& s,
                                 const char* op, bool fused = false) {
  Strategy st = parse_strategy(requested);
  if (st == Strategy::Auto) return choose_strategy(s.T, s.d_in, s.d_out, fused);
  TORCH_CHECK(st != Strategy::Outer || s.T == 1, op,
              ": strategy 'outer' needs one position per example (T == 1), got T = ", s.T);
  return st;
}

// Norms accumulate and come out in float32, or float64 when either input is float64.
inline at::ScalarType norm_dtype(const at::Tensor& A, const at::Tensor& G) {
  return (A.scalar_type() == at::kDouble || G.scalar_type() == at::kDouble) ? at::kDouble
                                                                            : at::kFloat;
}

// Examples per chunk so that a chunk's scratch (elems_per_example elements of elem_size bytes
// each) stays within budget_bytes; at least one example.
inline int64_t chunk_for(int64_t B, int64_t elems_per_example, int64_t elem_size,
                         int64_t budget_bytes) {
  const int64_t per = std::max<int64_t>(1, elems_per_example * elem_size);
  return std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(B, 1), budget_bytes / per));
}

// A and G as contiguous [B, T, d] in dtype `dt` (a copy only where the layout or dtype differs).
inline std::pair<at::Tensor, at::Tensor> flatten3(const at::Tensor& A, const at::Tensor& G,
                                                  const LinearShape& s, at::ScalarType dt) {
  return {A.to(dt).reshape({s.B, s.T, s.d_in}).contiguous(),
          G.to(dt).reshape({s.B, s.T, s.d_out}).contiguous()};
}

}  // namespace gradstats

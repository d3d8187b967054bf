// Device-agnostic pieces (ATen ops only) shared by the CPU and CUDA kernels: the accumulator
// writes, the contract probe of a Linear use, and the corrections of the centred Gram route.
#pragma once

#include <ATen/core/Tensor.h>

namespace gradstats {

// Checks the per-step accumulators a collect op writes: E [S, N] float64 (per-example squared
// norms, one row per covered parameter), P [S, 2K] float64 (probe values, then their rounding
// bounds), rows [B] int64 (the accumulator columns of this call's examples), all on `device`.
void check_accumulators(const at::Tensor& E, const at::Tensor& P, const at::Tensor& rows,
                        int64_t B, int64_t slot_w, int64_t slot_b, const at::Device& device,
                        const char* op);

// E[slot, rows[i]] += norms[i] (in float64); nothing when slot < 0.
void add_norms(const at::Tensor& E, const at::Tensor& rows, int64_t slot, const at::Tensor& norms);

// The contract probe of one Linear use, added into P[slot_w] and P[slot_b] (slot < 0: skipped):
// weight  <x_j y_j^T, sum_t g_t a_t^T> = sum_t (x_j . g_t)(y_j . a_t),
//         bound |x_j| |y_j| sum_t |g_t| |a_t| (Cauchy-Schwarz: the scale of its rounding);
// bias    <v_j, sum_t g_t>, bound |v_j| sum_t |g_t|.
// A2 [n, d_in], G2 [n, d_out] in the compute dtype; xw [d_out, K], yw [d_in, K], vb [d_out, K].
void linear_probe(const at::Tensor& A2, const at::Tensor& G2, const at::Tensor& P,
                  int64_t slot_w, int64_t slot_b, const c10::optional<at::Tensor>& xw,
                  const c10::optional<at::Tensor>& yw, const c10::optional<at::Tensor>& vb);

// The centred Gram route. For shifts c [n, d_in] and d [n, d_out] (any values; the means over
// positions make the result best conditioned), a_t = c + a'_t and g_t = d + g'_t, so with
// alpha = sum_t a'_t and s = sum_t g_t (the bias gradient):
//   |sum_t g_t a_t^T|^2 = sum_{t,r} (a'_t.a'_r)(g'_t.g'_r)                    (the Gram part)
//                       + 2 sum_t (g'_t.d)(a'_t.alpha) + 2 sum_t (g'_t.s)(a'_t.c)
//                       + |d|^2 |alpha|^2 + |s|^2 |c|^2 + 2 (d.s)(alpha.c).
// Returns everything but the Gram part, [n] float64, for centred ac [n, T, d_in] and
// gc [n, T, d_out] (any float dtype) and c, d, s in float32 or float64.
at::Tensor gram_correction(const at::Tensor& ac, const at::Tensor& gc, const at::Tensor& c,
                           const at::Tensor& d, const at::Tensor& s);

}  // namespace gradstats

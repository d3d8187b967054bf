// CPU kernels for Linear per-example gradient norms (outer / centred Gram / direct), the fused
// weight gradient, and the collect ops that write both into the monitor's accumulators.
// BLAS runs on whole chunks of examples (batched, multi-threaded by ATen), never inside
// at::parallel_for, where nested BLAS threading oversubscribes the cores (3 s -> 44 ms when
// fixed). Each thread reuses its own workspaces, so no B x d_out x d_in tensor is ever formed.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../accumulate.h"
#include "../linear_common.h"

namespace gradstats {
namespace {

constexpr int64_t kScratchBytes = int64_t(16) << 20;

// A per-thread scratch buffer that only grows, so repeated calls allocate nothing.
at::Tensor scratch(int slot, at::IntArrayRef shape, at::ScalarType dtype) {
  thread_local std::vector<at::Tensor> buffers;
  if (buffers.size() <= size_t(slot)) buffers.resize(slot + 1);
  at::Tensor& buf = buffers[slot];
  int64_t numel = 1;
  for (auto s : shape) numel *= s;
  if (!buf.defined() || buf.scalar_type() != dtype || buf.numel() < numel) {
    buf = at::empty({numel}, at::TensorOptions().dtype(dtype));
  }
  return buf.narrow(0, 0, numel).view(shape);
}

// sum_k x_k y_k in double; eight independent accumulators so the adds pipeline and vectorise.
template <typename scalar_t>
double dot(const scalar_t* x, const scalar_t* y, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += double(x[k + j]) * double(y[k + j]);
  }
  double total = 0.0;
  for (; k < n; ++k) total += double(x[k]) * double(y[k]);
  for (int j = 0; j < 8; ++j) total += acc[j];
  return total;
}

struct Prepared {
  LinearShape s;
  at::Tensor A, G;  // [B, T, d] contiguous, float32 or float64
};

Prepared prepare(const at::Tensor& A, const at::Tensor& G, const char* op) {
  LinearShape s = check_linear_inputs(A, G, op);
  auto [a, g] = flatten3(A, G, s, norm_dtype(A, G));
  return {s, a, g};
}

// At least this many multiply-adds per thread: below it a parallel region costs more than it
// saves (and on a busy machine a thread team can wait milliseconds for a core).
constexpr int64_t kMinWorkPerThread = int64_t(1) << 15;

// out[i] = sum_k x[i, k] y[i, k] over rows of two contiguous [n, m] buffers, rows in parallel;
// out is x's dtype or float64 (the monitor's accumulators: no float32 overflow of a square).
void row_dots(const at::Tensor& x, const at::Tensor& y, int64_t n, int64_t m, at::Tensor out) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gradstats_row_dots", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, m));
    if (out.scalar_type() == at::kDouble) {
      double* o = out.mutable_data_ptr<double>();
      at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) o[i] = dot(xp + i * m, yp + i * m, m);
      });
    } else {
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) o[i] = scalar_t(dot(xp + i * m, yp + i * m, m));
      });
    }
  });
}

// out[i] = |a_i|^2 |g_i|^2 for T == 1 (float64 out: see row_dots).
at::Tensor outer_norms(const Prepared& p, at::ScalarType out_dtype) {
  auto out = at::empty({p.s.B}, p.A.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(p.A.scalar_type(), "gradstats_outer", [&] {
    const scalar_t* a = p.A.const_data_ptr<scalar_t>();
    const scalar_t* g = p.G.const_data_ptr<scalar_t>();
    double* o = out.mutable_data_ptr<double>();
    const int64_t di = p.s.d_in, dout = p.s.d_out;
    const int64_t grain = std::max<int64_t>(16, kMinWorkPerThread / std::max<int64_t>(1, di + dout));
    at::parallel_for(0, p.s.B, grain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        o[i] = dot(a + i * di, a + i * di, di) * dot(g + i * dout, g + i * dout, dout);
      }
    });
  });
  return out_dtype == at::kDouble ? out : out.to(out_dtype);
}

// |sum_t g_t a_t^T|^2 through the Gram matrices of A and G centred over positions, plus the
// corrections (accumulate.h). Without centring, positions that share a large common component
// make sum_{t,s} (a_t.a_s)(g_t.g_s) cancel catastrophically in float32.
at::Tensor gram_norms(const Prepared& p, at::ScalarType out_dtype) {
  const int64_t T = p.s.T, B = p.s.B, di = p.s.d_in, dout = p.s.d_out;
  auto out = at::empty({B}, p.A.options().dtype(out_dtype));
  const auto dt = p.A.scalar_type();
  const int64_t chunk = chunk_for(B, 2 * T * T + T * (di + dout), p.A.element_size(),
                                  kScratchBytes);
  at::Tensor ka = scratch(0, {chunk, T, T}, dt), kg = scratch(1, {chunk, T, T}, dt);
  at::Tensor ac = scratch(3, {chunk, T, di}, dt), gc = scratch(4, {chunk, T, dout}, dt);
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t n = std::min(chunk, B - b0);
    at::Tensor a = p.A.narrow(0, b0, n), g = p.G.narrow(0, b0, n);
    at::Tensor c = a.mean(1), d = g.mean(1), s = g.sum(1);
    at::Tensor acn = ac.narrow(0, 0, n), gcn = gc.narrow(0, 0, n);
    at::sub_out(acn, a, c.unsqueeze(1));
    at::sub_out(gcn, g, d.unsqueeze(1));
    at::Tensor kan = ka.narrow(0, 0, n), kgn = kg.narrow(0, 0, n);
    at::bmm_out(kan, acn, acn.transpose(1, 2));
    at::bmm_out(kgn, gcn, gcn.transpose(1, 2));
    at::Tensor part = out.narrow(0, b0, n);
    row_dots(kan, kgn, n, T * T, part);
    part.add_(gram_correction(acn, gcn, c, d, s).to(out_dtype)).clamp_min_(0);
  }
  return out;
}

// Per chunk, the tiles G_i^T A_i [n, d_out, d_in] from one batched GEMM; visit(b0, n, tiles).
template <typename F>
void for_each_tile_chunk(const Prepared& p, F&& visit) {
  const int64_t di = p.s.d_in, dout = p.s.d_out, B = p.s.B;
  const int64_t chunk = chunk_for(B, dout * di, p.A.element_size(), kScratchBytes);
  at::Tensor m = scratch(2, {chunk, dout, di}, p.A.scalar_type());
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t n = std::min(chunk, B - b0);
    at::Tensor mn = m.narrow(0, 0, n);
    at::bmm_out(mn, p.G.narrow(0, b0, n).transpose(1, 2), p.A.narrow(0, b0, n));
    visit(b0, n, mn);
  }
}

// out[i] = |G_i^T A_i|_F^2
at::Tensor direct_norms(const Prepared& p, at::ScalarType out_dtype) {
  auto out = at::empty({p.s.B}, p.A.options().dtype(out_dtype));
  const int64_t tile = p.s.d_out * p.s.d_in;
  for_each_tile_chunk(p, [&](int64_t b0, int64_t n, const at::Tensor& m) {
    row_dots(m, m, n, tile, out.narrow(0, b0, n));
  });
  return out;
}

// The norms in the inputs' precision (the public ops), or float64 (the monitor's accumulators).
at::Tensor weight_norms(const Prepared& p, Strategy st, bool wide = false) {
  const auto dt = wide ? at::kDouble : p.A.scalar_type();
  switch (st) {
    case Strategy::Outer: return outer_norms(p, dt);
    case Strategy::Gram: return gram_norms(p, dt);
    default: return direct_norms(p, dt);
  }
}

// Per-example bias gradients sum_t g_t [B, d_out] and their squared norms [B].
std::tuple<at::Tensor, at::Tensor> bias_grads(const Prepared& p, bool wide = false) {
  at::Tensor gb = p.s.T == 1 ? p.G.select(1, 0) : p.G.sum(1);
  at::Tensor nb = at::empty({p.s.B}, p.G.options().dtype(wide ? at::kDouble : p.G.scalar_type()));
  row_dots(gb.contiguous(), gb.contiguous(), p.s.B, p.s.d_out, nb);
  return {gb, nb};
}

// dW and the norms from the same per-example tiles: each chunk's tiles are squared (per
// example, in parallel) and summed into dW while they are still in memory, so the weight
// gradient costs no second GEMM.
std::tuple<at::Tensor, at::Tensor> fused_direct(const Prepared& p) {
  const int64_t tile = p.s.d_out * p.s.d_in;
  at::Tensor dW = at::zeros({p.s.d_out, p.s.d_in}, p.A.options());
  at::Tensor norms = at::empty({p.s.B}, p.A.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(p.A.scalar_type(), "gradstats_fused", [&] {
    scalar_t* w = dW.mutable_data_ptr<scalar_t>();
    for_each_tile_chunk(p, [&](int64_t b0, int64_t n, const at::Tensor& m) {
      row_dots(m, m, n, tile, norms.narrow(0, b0, n));
      const scalar_t* mp = m.const_data_ptr<scalar_t>();
      at::parallel_for(0, tile, std::max<int64_t>(4096, kMinWorkPerThread / std::max<int64_t>(1, n)), [&](int64_t b, int64_t e) {
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* mi = mp + i * tile;
          for (int64_t k = b; k < e; ++k) w[k] += mi[k];
        }
      });
    });
  });
  return {dW, norms};
}

// T == 1 straight into the accumulators: E[slot_w, rows[i]] += |a_i|^2 |g_i|^2 and
// E[slot_b, rows[i]] += |g_i|^2 in one pass over A and G, no temporaries (a layer's norms cost
// less than the dispatch of the half-dozen small ops they took). rows are distinct columns;
// only a step that overflowed the accumulators under torch.compile repeats one, and step()
// discards that step.
void outer_collect(const Prepared& p, const at::Tensor& E, const at::Tensor& rows_in,
                   int64_t slot_w, int64_t slot_b) {
  if (slot_w < 0 && slot_b < 0) return;
  at::Tensor rows = rows_in.contiguous();
  const int64_t* r = rows.const_data_ptr<int64_t>();
  double* e = E.mutable_data_ptr<double>();
  const int64_t ld = E.stride(0), di = p.s.d_in, dout = p.s.d_out;
  double* ew = slot_w >= 0 ? e + slot_w * ld : nullptr;
  double* eb = slot_b >= 0 ? e + slot_b * ld : nullptr;
  AT_DISPATCH_FLOATING_TYPES(p.A.scalar_type(), "gradstats_outer_collect", [&] {
    const scalar_t* a = p.A.const_data_ptr<scalar_t>();
    const scalar_t* g = p.G.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(16, kMinWorkPerThread / std::max<int64_t>(1, di + dout));
    at::parallel_for(0, p.s.B, grain, [&](int64_t b, int64_t end) {
      for (int64_t i = b; i < end; ++i) {
        const double ng = dot(g + i * dout, g + i * dout, dout);
        if (ew) ew[r[i]] += dot(a + i * di, a + i * di, di) * ng;
        if (eb) eb[r[i]] += ng;
      }
    });
  });
}

bool outer_route(const Prepared& p, Strategy st, const at::Tensor& E) {
  return st == Strategy::Outer && p.s.B > 0 && E.is_cpu() && E.stride(1) == 1;
}

struct FusedResult {
  at::Tensor dW, db, nw, nb;
};

// wide: norms in float64 (the monitor), else in the inputs' precision (the public op)
FusedResult fused(const Prepared& p, Strategy st, bool wide) {
  at::Tensor dW, nw;
  if (p.s.B == 0) {
    dW = at::zeros({p.s.d_out, p.s.d_in}, p.A.options());
    nw = at::empty({0}, p.A.options());
  } else if (st == Strategy::Direct) {
    std::tie(dW, nw) = fused_direct(p);
    if (!wide) nw = nw.to(p.A.scalar_type());
  } else {
    // Gram and outer norms cost less than the weight gradient itself: one GEMM for dW.
    nw = weight_norms(p, st, wide);
    dW = at::mm(p.G.view({p.s.B * p.s.T, p.s.d_out}).t(), p.A.view({p.s.B * p.s.T, p.s.d_in}));
  }
  auto [gb, nb] = bias_grads(p, wide);
  return {dW, gb.sum(0), nw, nb};
}

std::tuple<at::Tensor, at::Tensor> linear_norms_cpu(const at::Tensor& A, const at::Tensor& G,
                                                    c10::string_view strategy) {
  Prepared p = prepare(A, G, "linear_norms");
  Strategy st = resolve_strategy(strategy, p.s, "linear_norms");
  at::Tensor nw = p.s.B == 0 ? at::empty({0}, p.A.options()) : weight_norms(p, st);
  return {nw, std::get<1>(bias_grads(p))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_fused_cpu(
    const at::Tensor& A, const at::Tensor& G, c10::string_view strategy) {
  Prepared p = prepare(A, G, "linear_fused");
  FusedResult r = fused(p, resolve_strategy(strategy, p.s, "linear_fused", true), false);
  const auto grad_dtype = c10::promoteTypes(A.scalar_type(), G.scalar_type());
  return {r.dW.to(grad_dtype), r.db.to(grad_dtype), r.nw, r.nb};
}

void linear_collect_cpu(const at::Tensor& A, const at::Tensor& G, const at::Tensor& E,
                        const at::Tensor& P, const at::Tensor& rows, int64_t slot_w,
                        int64_t slot_b, const c10::optional<at::Tensor>& xw,
                        const c10::optional<at::Tensor>& yw, const c10::optional<at::Tensor>& vb,
                        c10::string_view strategy) {
  Prepared p = prepare(A, G, "linear_collect");
  check_accumulators(E, P, rows, p.s.B, slot_w, slot_b, A.device(), "linear_collect");
  if (p.s.B == 0) return;
  if (outer_route(p, resolve_strategy(strategy, p.s, "linear_collect"), E)) {
    outer_collect(p, E, rows, slot_w, slot_b);
    linear_probe(p.A.view({-1, p.s.d_in}), p.G.view({-1, p.s.d_out}), P, slot_w, slot_b, xw, yw, vb);
    return;
  }
  if (slot_w >= 0) add_norms(E, rows, slot_w, weight_norms(p, resolve_strategy(strategy, p.s, "linear_collect"), true));
  if (slot_b >= 0) add_norms(E, rows, slot_b, std::get<1>(bias_grads(p, true)));
  linear_probe(p.A.view({-1, p.s.d_in}), p.G.view({-1, p.s.d_out}), P, slot_w, slot_b, xw, yw, vb);
}

std::tuple<at::Tensor, at::Tensor> linear_fused_collect_cpu(
    const at::Tensor& A, const at::Tensor& G, const at::Tensor& E, const at::Tensor& P,
    const at::Tensor& rows, int64_t slot_w, int64_t slot_b, const c10::optional<at::Tensor>& xw,
    const c10::optional<at::Tensor>& yw, const c10::optional<at::Tensor>& vb,
    c10::string_view strategy) {
  Prepared p = prepare(A, G, "linear_fused_collect");
  check_accumulators(E, P, rows, p.s.B, slot_w, slot_b, A.device(), "linear_fused_collect");
  const Strategy st = resolve_strategy(strategy, p.s, "linear_fused_collect", true);
  const auto grad_dtype = c10::promoteTypes(A.scalar_type(), G.scalar_type());
  if (outer_route(p, st, E)) {
    outer_collect(p, E, rows, slot_w, slot_b);
    at::Tensor A2 = p.A.view({p.s.B, p.s.d_in}), G2 = p.G.view({p.s.B, p.s.d_out});
    linear_probe(A2, G2, P, slot_w, slot_b, xw, yw, vb);
    return {at::mm(G2.t(), A2).to(grad_dtype), G2.sum(0).to(grad_dtype)};
  }
  FusedResult r = fused(p, st, true);
  if (p.s.B > 0) {
    add_norms(E, rows, slot_w, r.nw);
    add_norms(E, rows, slot_b, r.nb);
    linear_probe(p.A.view({-1, p.s.d_in}), p.G.view({-1, p.s.d_out}), P, slot_w, slot_b, xw, yw,
                 vb);
  }
  return {r.dW.to(grad_dtype), r.db.to(grad_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradstats, CPU, m) {
  m.impl("linear_norms", &linear_norms_cpu);
  m.impl("linear_fused", &linear_fused_cpu);
  m.impl("linear_collect", &linear_collect_cpu);
  m.impl("linear_fused_collect", &linear_fused_collect_cpu);
}

}  // namespace gradstats

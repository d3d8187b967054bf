// CPU kernels for Linear per-example gradient norms (outer / Gram / direct) and the fused
// weight gradient. Examples are split over threads with at::parallel_for; each thread reuses
// its own workspaces, so no B x d_out x d_in tensor is ever formed.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../linear_common.h"

namespace gradstats {
namespace {

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
  at::Tensor A, G;  // [B, T, d] contiguous in the compute dtype
};

Prepared prepare(const at::Tensor& A, const at::Tensor& G, const char* op) {
  LinearShape s = check_linear_inputs(A, G, op);
  const auto dt = norm_dtype(A, G);
  return {s, A.to(dt).reshape({s.B, s.T, s.d_in}).contiguous(),
          G.to(dt).reshape({s.B, s.T, s.d_out}).contiguous()};
}

// out[i] = |a_i|^2 |g_i|^2 for T == 1.
at::Tensor outer_norms(const Prepared& p) {
  auto out = at::empty({p.s.B}, p.A.options());
  AT_DISPATCH_FLOATING_TYPES(p.A.scalar_type(), "gradstats_outer", [&] {
    const scalar_t* a = p.A.const_data_ptr<scalar_t>();
    const scalar_t* g = p.G.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t di = p.s.d_in, dout = p.s.d_out;
    at::parallel_for(0, p.s.B, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        o[i] = scalar_t(dot(a + i * di, a + i * di, di) * dot(g + i * dout, g + i * dout, dout));
      }
    });
  });
  return out;
}

// Examples per chunk so that a chunk's scratch (elems_per_example each) stays near 16 MB: BLAS
// runs on whole chunks (batched and multi-threaded by ATen), never inside at::parallel_for,
// where nested BLAS threading oversubscribes the cores.
int64_t chunk_for(int64_t B, int64_t elems_per_example, int64_t elem_size) {
  const int64_t budget = int64_t(16) << 20;
  return std::max<int64_t>(1, std::min<int64_t>(B, budget / std::max<int64_t>(1, elems_per_example * elem_size)));
}

// out[i] = sum_{t,s} (a_t . a_s)(g_t . g_s)
at::Tensor gram_norms(const Prepared& p) {
  auto out = at::empty({p.s.B}, p.A.options());
  const int64_t T = p.s.T, B = p.s.B;
  const int64_t chunk = chunk_for(B, 2 * T * T, p.A.element_size());
  at::Tensor ka = scratch(0, {chunk, T, T}, p.A.scalar_type());
  at::Tensor kg = scratch(1, {chunk, T, T}, p.A.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(p.A.scalar_type(), "gradstats_gram", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int64_t b0 = 0; b0 < B; b0 += chunk) {
      const int64_t n = std::min(chunk, B - b0);
      at::Tensor a = p.A.narrow(0, b0, n), g = p.G.narrow(0, b0, n);
      at::Tensor kan = ka.narrow(0, 0, n), kgn = kg.narrow(0, 0, n);
      at::bmm_out(kan, a, a.transpose(1, 2));
      at::bmm_out(kgn, g, g.transpose(1, 2));
      const scalar_t* x = kan.const_data_ptr<scalar_t>();
      const scalar_t* y = kgn.const_data_ptr<scalar_t>();
      at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i)
          o[b0 + i] = scalar_t(dot(x + i * T * T, y + i * T * T, T * T));
      });
    }
  });
  return out;
}

// Per chunk, the tiles G_i^T A_i [n, d_out, d_in] from one batched GEMM; visit(b0, n, tiles).
template <typename F>
void for_each_tile_chunk(const Prepared& p, F&& visit) {
  const int64_t di = p.s.d_in, dout = p.s.d_out, B = p.s.B;
  const int64_t chunk = chunk_for(B, dout * di, p.A.element_size());
  at::Tensor m = scratch(2, {chunk, dout, di}, p.A.scalar_type());
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t n = std::min(chunk, B - b0);
    at::Tensor mn = m.narrow(0, 0, n);
    at::bmm_out(mn, p.G.narrow(0, b0, n).transpose(1, 2), p.A.narrow(0, b0, n));
    visit(b0, n, mn);
  }
}

// out[i] = |G_i^T A_i|_F^2
at::Tensor direct_norms(const Prepared& p) {
  auto out = at::empty({p.s.B}, p.A.options());
  const int64_t tile = p.s.d_out * p.s.d_in;
  AT_DISPATCH_FLOATING_TYPES(p.A.scalar_type(), "gradstats_direct", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for_each_tile_chunk(p, [&](int64_t b0, int64_t n, const at::Tensor& m) {
      const scalar_t* mp = m.const_data_ptr<scalar_t>();
      at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) o[b0 + i] = scalar_t(dot(mp + i * tile, mp + i * tile, tile));
      });
    });
  });
  return out;
}

at::Tensor weight_norms(const Prepared& p, Strategy st) {
  switch (st) {
    case Strategy::Outer: return outer_norms(p);
    case Strategy::Gram: return gram_norms(p);
    default: return direct_norms(p);
  }
}

// Per-example bias gradients sum_t g_t [B, d_out] and their squared norms [B].
std::tuple<at::Tensor, at::Tensor> bias_grads(const Prepared& p) {
  at::Tensor gb = p.s.T == 1 ? p.G.select(1, 0) : p.G.sum(1);
  at::Tensor nb = at::empty({p.s.B}, p.G.options());
  const int64_t dout = p.s.d_out;
  AT_DISPATCH_FLOATING_TYPES(p.G.scalar_type(), "gradstats_bias", [&] {
    const scalar_t* g = gb.const_data_ptr<scalar_t>();
    scalar_t* o = nb.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, p.s.B, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) o[i] = scalar_t(dot(g + i * dout, g + i * dout, dout));
    });
  });
  return {gb, nb};
}

std::tuple<at::Tensor, at::Tensor> linear_norms_cpu(const at::Tensor& A, const at::Tensor& G,
                                                    c10::string_view strategy) {
  Prepared p = prepare(A, G, "linear_norms");
  Strategy st = resolve_strategy(strategy, p.s, /*cuda=*/false, "linear_norms");
  return {weight_norms(p, st), std::get<1>(bias_grads(p))};
}

// dW and the norms from the same per-example tiles: each chunk's tiles are squared (per
// example, in parallel) and summed into dW while they are still in memory, so the weight
// gradient costs no second GEMM.
std::tuple<at::Tensor, at::Tensor> fused_direct(const Prepared& p) {
  const int64_t tile = p.s.d_out * p.s.d_in;
  at::Tensor dW = at::zeros({p.s.d_out, p.s.d_in}, p.A.options());
  at::Tensor norms = at::empty({p.s.B}, p.A.options());
  AT_DISPATCH_FLOATING_TYPES(p.A.scalar_type(), "gradstats_fused", [&] {
    scalar_t* o = norms.mutable_data_ptr<scalar_t>();
    scalar_t* w = dW.mutable_data_ptr<scalar_t>();
    for_each_tile_chunk(p, [&](int64_t b0, int64_t n, const at::Tensor& m) {
      const scalar_t* mp = m.const_data_ptr<scalar_t>();
      at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) o[b0 + i] = scalar_t(dot(mp + i * tile, mp + i * tile, tile));
      });
      at::parallel_for(0, tile, 4096, [&](int64_t b, int64_t e) {
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* mi = mp + i * tile;
          for (int64_t k = b; k < e; ++k) w[k] += mi[k];
        }
      });
    });
  });
  return {dW, norms};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_fused_cpu(
    const at::Tensor& A, const at::Tensor& G, c10::string_view strategy) {
  Prepared p = prepare(A, G, "linear_fused");
  Strategy st = resolve_strategy(strategy, p.s, /*cuda=*/false, "linear_fused");
  at::Tensor dW, nw;
  if (st == Strategy::Direct) {
    std::tie(dW, nw) = fused_direct(p);
  } else {
    // Gram and outer norms are cheaper than the weight gradient itself: one GEMM for dW.
    nw = weight_norms(p, st);
    dW = at::mm(p.G.view({p.s.B * p.s.T, p.s.d_out}).t(), p.A.view({p.s.B * p.s.T, p.s.d_in}));
  }
  auto [gb, nb] = bias_grads(p);
  const auto grad_dtype = c10::promoteTypes(A.scalar_type(), G.scalar_type());
  return {dW.to(grad_dtype), gb.sum(0).to(grad_dtype), nw, nb};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradstats, CPU, m) {
  m.impl("linear_norms", &linear_norms_cpu);
  m.impl("linear_fused", &linear_fused_cpu);
}

}  // namespace gradstats

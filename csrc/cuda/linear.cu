// CUDA kernels for Linear per-example gradient norms and the collect ops. Written to be right
// before it is fast: GEMMs go through ATen (cuBLAS), examples are processed in chunks that bound
// the scratch memory, and the only custom kernel is a row reduction. Half-precision inputs are
// never copied to float32: GEMMs take bf16/fp16 operands and accumulate and write float32
// (at::bmm with an out dtype), and the row reduction reads the inputs as they are.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/zeros.h>
#include <algorithm>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../accumulate.h"
#include "../linear_common.h"

namespace gradstats {
namespace {

constexpr int kThreads = 256;
// Scratch per chunk of examples ([chunk, T, T] Gram matrices or [chunk, d_out, d_in] tiles).
constexpr int64_t kScratchBytes = int64_t(256) << 20;

template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : acc_t(0);
  if (warp == 0) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

// out[r] += sum_{k in this block's chunk} x[r, k] * y[r, k]: a 2-D grid of (chunks, rows), so a
// few long rows (per-example tiles of a large layer) still fill the GPU. Reads any float dtype,
// accumulates in double (Gram rows can hold terms that largely cancel), adds into a zeroed
// double buffer.
template <typename scalar_t>
__global__ void row_dot_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                               int64_t n, int64_t chunk, double* __restrict__ out) {
  const int64_t r = blockIdx.y;
  const int64_t lo = int64_t(blockIdx.x) * chunk, hi = min(n, lo + chunk);
  const scalar_t* xr = x + r * n;
  const scalar_t* yr = y + r * n;
  double acc = 0;
  for (int64_t k = lo + threadIdx.x; k < hi; k += kThreads)
    acc += double(static_cast<float>(xr[k])) * double(static_cast<float>(yr[k]));
  acc = block_sum(acc);
  if (threadIdx.x == 0) atomicAdd(out + r, acc);
}

// out[r] = x[r] . y[r] for the rows of 2-D contiguous x, y (same dtype); out float32/float64.
void row_dot(const at::Tensor& x, const at::Tensor& y, const at::Tensor& out) {
  const int64_t rows = x.size(0), n = x.size(1);
  if (rows == 0) return;
  TORCH_CHECK(rows < 65536, "row_dot: at most 65535 rows per call, got ", rows);
  at::Tensor acc = at::zeros({rows}, out.options().dtype(at::kDouble));
  const int64_t chunk = std::max<int64_t>(kThreads * 16, (n + 1023) / 1024);
  const dim3 grid(unsigned((n + chunk - 1) / chunk), unsigned(rows));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gradstats_row_dot", [&] {
    row_dot_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), n, chunk,
        acc.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  out.copy_(acc);
}

bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// Batched GEMM whose output is float32 for half operands (fp32 accumulation, tensor cores).
at::Tensor bmm_acc(const at::Tensor& a, const at::Tensor& b) {
  return is_half(a.scalar_type()) ? at::bmm(a, b, at::kFloat) : at::bmm(a, b);
}

struct Prepared {
  LinearShape s;
  at::Tensor A, G;      // [B, T, d] contiguous, in the input dtype (a common one if they differ)
  at::ScalarType out;   // float32 or float64
};

Prepared prepare(const at::Tensor& A, const at::Tensor& G, const char* op) {
  LinearShape s = check_linear_inputs(A, G, op);
  TORCH_CHECK(A.is_cuda(), op, ": A must be a CUDA tensor here, got ", A.device());
  // Mixed inputs (float32 A with bf16 G under autocast): compute in the wider of the two.
  const auto dt = A.scalar_type() == G.scalar_type()
                      ? A.scalar_type()
                      : c10::promoteTypes(A.scalar_type(), G.scalar_type());
  auto [a, g] = flatten3(A, G, s, dt);
  return {s, a, g, norm_dtype(A, G)};
}

// wide: float64 norms (the monitor's accumulators: no float32 overflow of a square)
at::Tensor weight_norms(const Prepared& p, Strategy st, bool wide = false) {
  const auto& s = p.s;
  const auto out_opts = p.A.options().dtype(wide ? at::kDouble : p.out);
  at::Tensor out = at::empty({s.B}, out_opts);
  if (s.B == 0) return out;
  if (st == Strategy::Outer) {
    auto a = p.A.view({s.B, s.d_in});
    auto g = p.G.view({s.B, s.d_out});
    at::Tensor na = at::empty({s.B}, out_opts);
    row_dot(a, a, na);
    row_dot(g, g, out);
    return out.mul_(na);
  }
  const int64_t per = st == Strategy::Gram ? 2 * s.T * s.T + s.T * (s.d_in + s.d_out)
                                           : s.d_out * s.d_in;
  const int64_t chunk = chunk_for(s.B, per, 4, kScratchBytes);
  const auto wt = p.out;  // working precision of the means and corrections
  for (int64_t b0 = 0; b0 < s.B; b0 += chunk) {
    const int64_t n = std::min(chunk, s.B - b0);
    at::Tensor a = p.A.narrow(0, b0, n), g = p.G.narrow(0, b0, n);
    at::Tensor part = out.narrow(0, b0, n);
    if (st == Strategy::Gram) {
      // Centre over positions in the input dtype (a shift rounded to it is still exact algebra:
      // gram_correction holds for any shift).
      at::Tensor c = a.mean(1, false, wt).to(a.scalar_type()).to(wt);
      at::Tensor d = g.mean(1, false, wt).to(g.scalar_type()).to(wt);
      at::Tensor ac = at::sub(a, c.to(a.scalar_type()).unsqueeze(1));
      at::Tensor gc = at::sub(g, d.to(g.scalar_type()).unsqueeze(1));
      at::Tensor ka = bmm_acc(ac, ac.transpose(1, 2)).view({n, s.T * s.T});
      at::Tensor kg = bmm_acc(gc, gc.transpose(1, 2)).view({n, s.T * s.T});
      row_dot(ka, kg, part);
      part.add_(gram_correction(ac, gc, c, d, g.sum(1, false, wt)).to(part.scalar_type()))
          .clamp_min_(0);
    } else {
      at::Tensor m = bmm_acc(g.transpose(1, 2), a).view({n, s.d_out * s.d_in});
      row_dot(m, m, part);
    }
  }
  return out;
}

// Per-example bias gradients sum_t g_t [B, d_out] (float32/64) and their squared norms [B].
std::tuple<at::Tensor, at::Tensor> bias_grads(const Prepared& p, bool wide = false) {
  at::Tensor gb = p.G.sum(1, false, p.out).contiguous();
  at::Tensor nb = at::empty({p.s.B}, gb.options().dtype(wide ? at::kDouble : p.out));
  row_dot(gb, gb, nb);
  return {gb, nb};
}

at::Tensor weight_grad(const Prepared& p) {
  at::Tensor g2 = p.G.view({p.s.B * p.s.T, p.s.d_out}).t(), a2 = p.A.view({p.s.B * p.s.T, p.s.d_in});
  if (p.s.B == 0) return at::zeros({p.s.d_out, p.s.d_in}, p.A.options().dtype(p.out));
  return is_half(p.A.scalar_type()) ? at::mm(g2, a2, at::kFloat) : at::mm(g2, a2);
}

std::tuple<at::Tensor, at::Tensor> linear_norms_cuda(const at::Tensor& A, const at::Tensor& G,
                                                     c10::string_view strategy) {
  c10::cuda::CUDAGuard guard(A.device());
  Prepared p = prepare(A, G, "linear_norms");
  Strategy st = resolve_strategy(strategy, p.s, "linear_norms");
  return {weight_norms(p, st), std::get<1>(bias_grads(p))};
}

// Correct-by-construction version: the weight gradient is one cuBLAS GEMM and the norms come
// from the chosen strategy. The single-pass fused kernel is the Triton one (gradstats/kernels).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_fused_cuda(
    const at::Tensor& A, const at::Tensor& G, c10::string_view strategy) {
  c10::cuda::CUDAGuard guard(A.device());
  Prepared p = prepare(A, G, "linear_fused");
  Strategy st = resolve_strategy(strategy, p.s, "linear_fused", true);
  at::Tensor nw = weight_norms(p, st);
  auto [gb, nb] = bias_grads(p);
  const auto grad_dtype = c10::promoteTypes(A.scalar_type(), G.scalar_type());
  return {weight_grad(p).to(grad_dtype), gb.sum(0).to(grad_dtype), nw, nb};
}

void collect(const Prepared& p, const at::Tensor& E, const at::Tensor& P, const at::Tensor& rows,
             int64_t slot_w, int64_t slot_b, const c10::optional<at::Tensor>& xw,
             const c10::optional<at::Tensor>& yw, const c10::optional<at::Tensor>& vb,
             c10::string_view strategy, const char* op) {
  check_accumulators(E, P, rows, p.s.B, slot_w, slot_b, p.A.device(), op);
  if (p.s.B == 0) return;
  if (slot_w >= 0) add_norms(E, rows, slot_w, weight_norms(p, resolve_strategy(strategy, p.s, op), true));
  if (slot_b >= 0) add_norms(E, rows, slot_b, std::get<1>(bias_grads(p, true)));
  if (xw.has_value() || vb.has_value()) {
    // Probe steps only: the probe vectors must not be rounded to a half dtype.
    at::Tensor a2 = p.A.view({-1, p.s.d_in}), g2 = p.G.view({-1, p.s.d_out});
    if (is_half(a2.scalar_type())) {
      a2 = a2.to(at::kFloat);
      g2 = g2.to(at::kFloat);
    }
    linear_probe(a2, g2, P, slot_w, slot_b, xw, yw, vb);
  }
}

void linear_collect_cuda(const at::Tensor& A, const at::Tensor& G, const at::Tensor& E,
                         const at::Tensor& P, const at::Tensor& rows, int64_t slot_w,
                         int64_t slot_b, const c10::optional<at::Tensor>& xw,
                         const c10::optional<at::Tensor>& yw,
                         const c10::optional<at::Tensor>& vb, c10::string_view strategy) {
  c10::cuda::CUDAGuard guard(A.device());
  collect(prepare(A, G, "linear_collect"), E, P, rows, slot_w, slot_b, xw, yw, vb, strategy,
          "linear_collect");
}

std::tuple<at::Tensor, at::Tensor> linear_fused_collect_cuda(
    const at::Tensor& A, const at::Tensor& G, const at::Tensor& E, const at::Tensor& P,
    const at::Tensor& rows, int64_t slot_w, int64_t slot_b, const c10::optional<at::Tensor>& xw,
    const c10::optional<at::Tensor>& yw, const c10::optional<at::Tensor>& vb,
    c10::string_view strategy) {
  c10::cuda::CUDAGuard guard(A.device());
  Prepared p = prepare(A, G, "linear_fused_collect");
  collect(p, E, P, rows, slot_w, slot_b, xw, yw, vb, strategy, "linear_fused_collect");
  const auto grad_dtype = c10::promoteTypes(A.scalar_type(), G.scalar_type());
  at::Tensor db = p.G.sum({0, 1}, false, p.out);
  return {weight_grad(p).to(grad_dtype), db.to(grad_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradstats, CUDA, m) {
  m.impl("linear_norms", &linear_norms_cuda);
  m.impl("linear_fused", &linear_fused_cuda);
  m.impl("linear_collect", &linear_collect_cuda);
  m.impl("linear_fused_collect", &linear_fused_collect_cuda);
}

}  // namespace gradstats

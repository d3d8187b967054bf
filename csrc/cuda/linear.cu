// CUDA kernels for Linear per-example gradient norms. Written to be right before it is fast:
// GEMMs go through ATen (cuBLAS), examples are processed in chunks that bound the scratch
// memory, and the only custom kernels are two row reductions.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

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

// out[r] = sum_k x[r, k] * y[r, k]; one block per row. Row-major, contiguous rows of length n.
// Accumulates in double: Gram rows can hold terms that largely cancel.
template <typename scalar_t>
__global__ void row_dot_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                               int64_t n, scalar_t* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const scalar_t* xr = x + r * n;
  const scalar_t* yr = y + r * n;
  double acc = 0;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) acc += double(xr[k]) * double(yr[k]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[r] = scalar_t(acc);
}

// Writes sum_k x[r,k] y[r,k] for each row r of 2-D contiguous x, y into out[0..rows).
void row_dot(const at::Tensor& x, const at::Tensor& y, at::Tensor out) {
  const int64_t rows = x.size(0), n = x.size(1);
  if (rows == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gradstats_row_dot", [&] {
    row_dot_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), n,
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

struct Prepared {
  LinearShape s;
  at::Tensor A, G;  // [B, T, d] contiguous, float32 or float64
};

Prepared prepare(const at::Tensor& A, const at::Tensor& G, const char* op) {
  LinearShape s = check_linear_inputs(A, G, op);
  TORCH_CHECK(A.is_cuda(), op, ": A must be a CUDA tensor here, got ", A.device());
  const auto dt = norm_dtype(A, G);
  return {s, A.to(dt).reshape({s.B, s.T, s.d_in}).contiguous(),
          G.to(dt).reshape({s.B, s.T, s.d_out}).contiguous()};
}

int64_t chunk_size(int64_t B, int64_t per_example_elems, int64_t elem_bytes) {
  const int64_t per = std::max<int64_t>(1, per_example_elems * elem_bytes);
  return std::max<int64_t>(1, std::min<int64_t>(B, kScratchBytes / per));
}

at::Tensor weight_norms(const Prepared& p, Strategy st) {
  const auto& s = p.s;
  at::Tensor out = at::empty({s.B}, p.A.options());
  if (st == Strategy::Outer) {
    auto a = p.A.view({s.B, s.d_in});
    auto g = p.G.view({s.B, s.d_out});
    at::Tensor na = at::empty({s.B}, p.A.options());
    row_dot(a, a, na);
    row_dot(g, g, out);
    out.mul_(na);
    return out;
  }
  const int64_t per = st == Strategy::Gram ? s.T * s.T : s.d_out * s.d_in;
  const int64_t chunk = chunk_size(s.B, st == Strategy::Gram ? 2 * per : per,
                                   p.A.element_size());
  for (int64_t b0 = 0; b0 < s.B; b0 += chunk) {
    const int64_t n = std::min(chunk, s.B - b0);
    at::Tensor a = p.A.narrow(0, b0, n), g = p.G.narrow(0, b0, n);
    if (st == Strategy::Gram) {
      at::Tensor ka = at::bmm(a, a.transpose(1, 2)).view({n, per});
      at::Tensor kg = at::bmm(g, g.transpose(1, 2)).view({n, per});
      row_dot(ka, kg, out.narrow(0, b0, n));
    } else {
      at::Tensor m = at::bmm(g.transpose(1, 2), a).view({n, per});
      row_dot(m, m, out.narrow(0, b0, n));
    }
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_grads(const Prepared& p) {
  at::Tensor gb = p.G.sum(1).contiguous();
  at::Tensor nb = at::empty({p.s.B}, p.G.options());
  row_dot(gb, gb, nb);
  return {gb, nb};
}

std::tuple<at::Tensor, at::Tensor> linear_norms_cuda(const at::Tensor& A, const at::Tensor& G,
                                                     c10::string_view strategy) {
  c10::cuda::CUDAGuard guard(A.device());
  Prepared p = prepare(A, G, "linear_norms");
  Strategy st = resolve_strategy(strategy, p.s, /*cuda=*/true, "linear_norms");
  return {weight_norms(p, st), std::get<1>(bias_grads(p))};
}

// Correct-by-construction version: the weight gradient is one cuBLAS GEMM and the norms come
// from the chosen strategy. The single-pass fused kernel needs a GPU to verify and tune.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_fused_cuda(
    const at::Tensor& A, const at::Tensor& G, c10::string_view strategy) {
  c10::cuda::CUDAGuard guard(A.device());
  Prepared p = prepare(A, G, "linear_fused");
  Strategy st = resolve_strategy(strategy, p.s, /*cuda=*/true, "linear_fused");
  const auto& s = p.s;
  at::Tensor nw = weight_norms(p, st);
  at::Tensor dW = at::mm(p.G.view({s.B * s.T, s.d_out}).t(), p.A.view({s.B * s.T, s.d_in}));
  auto [gb, nb] = bias_grads(p);
  const auto grad_dtype = c10::promoteTypes(A.scalar_type(), G.scalar_type());
  return {dW.to(grad_dtype), gb.sum(0).to(grad_dtype), nw, nb};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradstats, CUDA, m) {
  m.impl("linear_norms", &linear_norms_cuda);
  m.impl("linear_fused", &linear_fused_cuda);
}

}  // namespace gradstats

// The Python module gradstats._C: build facts and small non-tensor helpers. The operators are
// registered with the dispatcher (ops.cpp, cpu/, cuda/) when this library is loaded.
#include <torch/extension.h>

#include "linear_common.h"

#ifndef GRADSTATS_VERSION
#define GRADSTATS_VERSION "unknown"
#endif
#ifndef GRADSTATS_TORCH_VERSION
#define GRADSTATS_TORCH_VERSION "unknown"
#endif
#ifndef GRADSTATS_CUDA_ARCHS
#define GRADSTATS_CUDA_ARCHS ""
#endif
#ifndef GRADSTATS_CUDA_VERSION
#define GRADSTATS_CUDA_VERSION ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "gradstats compiled kernels";
  m.def("build_info", [] {
    py::dict d;
    d["version"] = GRADSTATS_VERSION;
    d["torch_version"] = GRADSTATS_TORCH_VERSION;
#ifdef GRADSTATS_WITH_CUDA
    d["cuda_compiled"] = true;
    d["cuda_version"] = GRADSTATS_CUDA_VERSION;
#else
    d["cuda_compiled"] = false;
    d["cuda_version"] = py::none();
#endif
    d["cuda_archs"] = std::string(GRADSTATS_CUDA_ARCHS);
    return d;
  }, "Facts about this build: versions, and whether and for which GPUs CUDA kernels were compiled.");
  m.def(
      "choose_linear_strategy",
      [](int64_t T, int64_t d_in, int64_t d_out, bool fused) {
        return std::string(
            gradstats::strategy_name(gradstats::choose_strategy(T, d_in, d_out, fused)));
      },
      py::arg("T"), py::arg("d_in"), py::arg("d_out"), py::arg("fused") = false,
      "The strategy 'auto' picks for a Linear layer with T positions per example (fused: with "
      "the weight gradient).");
}

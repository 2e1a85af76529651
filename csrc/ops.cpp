// Registration of every mmvae_fast op with the dispatcher (TORCH_LIBRARY), CPU and CUDA kernels.
// The Python module `mmvae_fast._C` is empty: importing it loads this library and its ops,
// which are then reachable as torch.ops.mmvae_fast.<name>.
#include <Python.h>
#include <torch/library.h>

namespace mmvae_fast {
at::Tensor lse_rows_cpu(const at::Tensor& x);
}

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(mmvae_fast, m) {
  m.def("lse_rows(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmvae_fast, CPU, m) {
  m.impl("lse_rows", &mmvae_fast::lse_rows_cpu);
}

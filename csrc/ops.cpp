// Schemas of the compiled kernels (namespace convkernels_C).
//
// These are the per-backend primitives behind the public torch.ops.convkernels.*
// ops; the public ops, their autograd and their fake impls are registered in
// Python (convkernels/ops/), so that `import convkernels` works without this
// extension. The contract of each primitive is documented in
// convkernels/ops/primitives.py; CPU impls live in cpu/, CUDA impls in cuda/.
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <atomic>
#include <bitset>

extern "C" {
// `import convkernels._C` loads this library, whose static initializers
// register the ops below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {
// The number of threads one at::parallel_for of this library runs on: that of
// torch.get_num_threads() when it was compiled with torch's intra-op backend
// (OpenMP), 1 when not (then every CPU kernel here is single-threaded).
int64_t parallel_threads() {
  std::atomic<uint64_t> seen{0};
  const int64_t n = std::min<int64_t>(at::get_num_threads(), 64);
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    seen.fetch_or(uint64_t(1) << (at::get_thread_num() % 64));
  });
  return static_cast<int64_t>(std::bitset<64>(seen.load()).count());
}
}  // namespace

TORCH_LIBRARY(convkernels_C, m) {
  m.def("parallel_threads() -> int", &parallel_threads);
  m.def("channel_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def("bn_act_apply(Tensor x, Tensor scale, Tensor shift, Tensor? residual, str act) -> Tensor");
  // bn_act_apply written over x (CPU only: the epilogue of the CPU GEMM conv).
  m.def("bn_act_apply_(Tensor(a!) x, Tensor scale, Tensor shift, Tensor? residual, str act) -> ()");
  m.def(
      "bn_act_backward_reduce(Tensor grad_y, Tensor x, Tensor scale, Tensor shift, Tensor? residual, "
      "str act, Tensor center) -> (Tensor sum_gz, Tensor sum_gz_xc)");
  m.def(
      "bn_act_backward_apply(Tensor grad_y, Tensor x, Tensor scale, Tensor shift, Tensor? residual, "
      "str act, Tensor k1, Tensor k2, Tensor k3, bool need_grad_x, bool need_grad_residual) "
      "-> (Tensor grad_x, Tensor grad_residual)");
  m.def("add_act_forward(Tensor x, Tensor residual, Tensor? scale, str act) -> Tensor");
  m.def(
      "add_act_backward(Tensor grad_y, Tensor x, Tensor residual, Tensor? scale, str act, "
      "bool need_grad_x, bool need_grad_residual) -> (Tensor grad_x, Tensor grad_residual)");
}

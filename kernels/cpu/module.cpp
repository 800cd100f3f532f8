// fastlm.kernels._cpu_xent: fastlm's native CPU kernels as one CPython module (built by CMakeLists.txt).
// softmax_xent.cpp: the bf16 loss and its gradient per chunk; gemm_bf16.cpp: bf16 GEMMs with an fp32 output.
// Nothing here depends on torch: the Python side (fastlm/model/cpu_kernels.py) passes addresses and sizes.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace fastlm_native {
PyObject* softmax_xent_rows(PyObject*, PyObject* args);
PyObject* gemm_bf16_f32(PyObject*, PyObject* args);
PyObject* has_avx512_bf16(PyObject*, PyObject*);
}  // namespace fastlm_native

namespace {

PyMethodDef methods[] = {
    {"softmax_xent_rows", fastlm_native::softmax_xent_rows, METH_VARARGS,
     "Softmax cross-entropy and its gradient (bf16, in place) of a chunk of bf16 logits."},
    {"gemm_bf16_f32", fastlm_native::gemm_bf16_f32, METH_VARARGS,
     "C (+)= A @ B for bf16 A and B into fp32 C, on AVX512-BF16."},
    {"cpu_has_avx512_bf16", fastlm_native::has_avx512_bf16, METH_NOARGS,
     "Whether this CPU runs gemm_bf16_f32."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_xent", "fastlm's native CPU kernels.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__cpu_xent() { return PyModule_Create(&module); }

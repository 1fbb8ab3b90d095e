// Module entry of one CPU-capability build (fastdiff._C_cpu_<cap>); the
// kernels in this library register themselves with the dispatcher on load.
#include <Python.h>

#define FASTDIFF_CONCAT_(a, b) a##b
#define FASTDIFF_CONCAT(a, b) FASTDIFF_CONCAT_(a, b)
#define FASTDIFF_STR_(a) #a
#define FASTDIFF_STR(a) FASTDIFF_STR_(a)

PyMODINIT_FUNC FASTDIFF_CONCAT(PyInit_, FASTDIFF_CPU_MODULE)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, FASTDIFF_STR(FASTDIFF_CPU_MODULE),
                                      nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

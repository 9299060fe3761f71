// The Python module blossom_ops._C. It holds no Python functions: importing it loads the
// shared library, whose static initialisers register the operators with the dispatcher
// (TORCH_LIBRARY in schema.cpp, TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "blossom_ops compiled operators", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

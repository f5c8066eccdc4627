// An empty Python module: importing pyqkv._C runs the TORCH_LIBRARY registrations of the shared
// library, and nothing else. The ops are reached through torch.ops.pyqkv.*.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// The Python module `lacot_kernels._C`: it has no methods of its own. Importing it loads this shared library,
// whose static initializers register the kernels (TORCH_LIBRARY_IMPL) into the `lacot` op namespace whose
// schemas lacot_kernels/_registry.py defines. Built against the limited C API (abi3).
#include <Python.h>

static struct PyModuleDef lacot_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled kernels of lacot_kernels (registered into torch.ops.lacot on import).",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&lacot_c_module); }

/* fastmlm.ops._call_key: dispatch.call_key's key, built in C.

   The public ops build this key on every call (issue 22). The Python loop costs ~4 us for a
   masked_lm_loss call on the CPU tier's host, this one ~3 us alone, and in front of a backend
   call it saves 3-4 us (measured interleaved: the interpreter's work slows the kernel call that
   follows it). The key is the same tuple the Python version (dispatch._python_call_key) builds,
   and the tests hold the two to that:

     a bool, int, float or str (exactly those types)  -> (type, value)
     None                                             -> None
     a torch.Tensor (or subclass), not on meta        -> (type, dtype, device, shape, stride(), requires_grad)
     a meta tensor, or anything else                  -> the whole key is None (do not memoise)

   Plain C against the Python API only (no torch headers): it reads the tensor's attributes as
   Python does, without the bytecode around them. init(tensor_type, scalar_types) must be called
   once, with torch.Tensor and the frozenset of scalar types. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *tensor_type = NULL;  /* torch.Tensor */
static PyObject *scalar_types = NULL; /* frozenset of the exact scalar types */
static PyObject *s_dtype, *s_device, *s_shape, *s_stride, *s_requires_grad, *s_is_meta;

static PyObject *init(PyObject *self, PyObject *args) {
    PyObject *tensor, *scalars;
    if (!PyArg_ParseTuple(args, "OO!", &tensor, &PyFrozenSet_Type, &scalars)) return NULL;
    Py_XSETREF(tensor_type, Py_NewRef(tensor));
    Py_XSETREF(scalar_types, Py_NewRef(scalars));
    Py_RETURN_NONE;
}

/* The (type, dtype, device, shape, stride(), requires_grad) of a tensor; Py_None (a new
   reference) for a meta tensor; NULL with an exception set on error. */
static PyObject *tensor_part(PyObject *a, PyObject *kind) {
    PyObject *meta = PyObject_GetAttr(a, s_is_meta);
    if (meta == NULL) return NULL;
    int is_meta = PyObject_IsTrue(meta);
    Py_DECREF(meta);
    if (is_meta < 0) return NULL;
    if (is_meta) return Py_NewRef(Py_None);
    PyObject *dtype = PyObject_GetAttr(a, s_dtype);
    PyObject *device = dtype ? PyObject_GetAttr(a, s_device) : NULL;
    PyObject *shape = device ? PyObject_GetAttr(a, s_shape) : NULL;
    PyObject *stride = shape ? PyObject_CallMethodNoArgs(a, s_stride) : NULL;
    PyObject *grad = stride ? PyObject_GetAttr(a, s_requires_grad) : NULL;
    PyObject *part = grad ? PyTuple_Pack(6, kind, dtype, device, shape, stride, grad) : NULL;
    Py_XDECREF(dtype);
    Py_XDECREF(device);
    Py_XDECREF(shape);
    Py_XDECREF(stride);
    Py_XDECREF(grad);
    return part;
}

static PyObject *call_key(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (tensor_type == NULL || scalar_types == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "fastmlm.ops._call_key: init() was not called");
        return NULL;
    }
    PyObject *parts = PyTuple_New(nargs);
    if (parts == NULL) return NULL;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        PyObject *a = args[i];
        PyObject *kind = (PyObject *)Py_TYPE(a);
        PyObject *part;
        int scalar = PySet_Contains(scalar_types, kind);
        if (scalar < 0) goto fail;
        if (scalar) {
            part = PyTuple_Pack(2, kind, a);
        } else if (a == Py_None) {
            part = Py_NewRef(Py_None);
        } else {
            int tensor = PyObject_IsInstance(a, tensor_type);
            if (tensor < 0) goto fail;
            if (!tensor) goto no_key;
            part = tensor_part(a, kind);
            if (part == Py_None) {  /* a meta tensor */
                Py_DECREF(part);
                goto no_key;
            }
        }
        if (part == NULL) goto fail;
        PyTuple_SET_ITEM(parts, i, part); /* steals the reference */
    }
    return parts;
no_key:
    Py_DECREF(parts);
    Py_RETURN_NONE;
fail:
    Py_DECREF(parts);
    return NULL;
}

static PyMethodDef methods[] = {
    {"init", init, METH_VARARGS, "init(tensor_type, scalar_types: frozenset): what call_key tells apart."},
    {"call_key", (PyCFunction)(void (*)(void))call_key, METH_FASTCALL,
     "call_key(*args) -> tuple or None: dispatch.call_key's key (see the module comment)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_call_key", NULL, -1, methods};

PyMODINIT_FUNC PyInit__call_key(void) {
    s_dtype = PyUnicode_InternFromString("dtype");
    s_device = PyUnicode_InternFromString("device");
    s_shape = PyUnicode_InternFromString("shape");
    s_stride = PyUnicode_InternFromString("stride");
    s_requires_grad = PyUnicode_InternFromString("requires_grad");
    s_is_meta = PyUnicode_InternFromString("is_meta");
    if (!s_dtype || !s_device || !s_shape || !s_stride || !s_requires_grad || !s_is_meta) return NULL;
    return PyModule_Create(&module);
}

/* fastmlm.ops._boundary: what the public ops do on every call (issue 22), in C.

   call_key(*args): dispatch.call_key's key. The Python loop costs ~4 us for a masked_lm_loss
   call on the CPU tier's host, this one ~3 us alone, and in front of a backend call it saves
   3-4 us (measured interleaved: the interpreter's work slows the kernel call that follows it).
   The key is the tuple the Python version (dispatch._python_call_key) builds, and the tests
   hold the two to that:

     a bool, int, float or str (exactly those types)  -> (type, value)
     None                                             -> None
     a dense torch.Tensor (or subclass), not on meta  -> (type, dtype, device, shape, stride(), requires_grad)
     a meta or non-strided (sparse, mkldnn) tensor,
     or anything else                                 -> the whole key is None (do not memoise)

   ids_in_range(address, count, itemsize, low, high, allowed): whether the `count` int32
   (itemsize 4) or int64 (itemsize 8) values at `address` all lie in [low, high) or equal
   `allowed` (None: no such value): checks.check_ids's test of a contiguous CPU tensor, whose
   caller vouches for the memory (a plain strided CPU tensor it holds, data_ptr() and numel()).
   ~1 us where a Python set of 64 labels takes ~4. offsets_ok(address, count, total, max_seqlen):
   the same for checks.check_cu_seqlens (int32 offsets).

   Plain C against the Python API only (no torch headers): call_key reads the tensor's
   attributes as Python does, without the bytecode around them. init(tensor_type, scalar_types,
   strided) must be called once, with torch.Tensor, the frozenset of scalar types and torch.strided. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static PyObject *tensor_type = NULL;  /* torch.Tensor */
static PyObject *scalar_types = NULL; /* frozenset of the exact scalar types */
static PyObject *strided = NULL;      /* torch.strided: the one layout the key describes */
static PyObject *s_dtype, *s_device, *s_shape, *s_stride, *s_requires_grad, *s_is_meta, *s_layout;

static PyObject *init(PyObject *self, PyObject *args) {
    PyObject *tensor, *scalars, *layout;
    if (!PyArg_ParseTuple(args, "OO!O", &tensor, &PyFrozenSet_Type, &scalars, &layout)) return NULL;
    Py_XSETREF(tensor_type, Py_NewRef(tensor));
    Py_XSETREF(scalar_types, Py_NewRef(scalars));
    Py_XSETREF(strided, Py_NewRef(layout));
    Py_RETURN_NONE;
}

/* The (type, dtype, device, shape, stride(), requires_grad) of a tensor; Py_None (a new
   reference) for a meta or non-strided one; NULL with an exception set on error. */
static PyObject *tensor_part(PyObject *a, PyObject *kind) {
    PyObject *meta = PyObject_GetAttr(a, s_is_meta);
    if (meta == NULL) return NULL;
    int is_meta = PyObject_IsTrue(meta);
    Py_DECREF(meta);
    if (is_meta < 0) return NULL;
    PyObject *layout = is_meta ? NULL : PyObject_GetAttr(a, s_layout);
    if (!is_meta && layout == NULL) return NULL;
    int dense = layout == strided;
    Py_XDECREF(layout);
    if (is_meta || !dense) return Py_NewRef(Py_None);
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
    if (tensor_type == NULL || scalar_types == NULL || strided == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "fastmlm.ops._boundary: init() was not called");
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
            if (part == Py_None) {  /* a meta or non-strided tensor */
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

/* Whether every value lies in [low, high) or equals allowed (see the module comment). */
#define ALL_IN_RANGE(type)                                                        \
    do {                                                                          \
        const type *v = (const type *)address;                                    \
        for (Py_ssize_t i = 0; i < count; i++)                                    \
            if (!((v[i] >= low && v[i] < high) || (has_allowed && v[i] == allowed))) \
                Py_RETURN_FALSE;                                                  \
    } while (0)

static PyObject *ids_in_range(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "ids_in_range(address, count, itemsize, low, high, allowed)");
        return NULL;
    }
    void *address = PyLong_AsVoidPtr(args[0]);
    Py_ssize_t count = PyLong_AsSsize_t(args[1]);
    long itemsize = PyLong_AsLong(args[2]);
    long long low = PyLong_AsLongLong(args[3]);
    long long high = PyLong_AsLongLong(args[4]);
    int has_allowed = args[5] != Py_None;
    long long allowed = has_allowed ? PyLong_AsLongLong(args[5]) : 0;
    if (PyErr_Occurred()) return NULL;
    if (count < 0 || (count > 0 && address == NULL)) {
        PyErr_SetString(PyExc_ValueError, "ids_in_range: a negative count, or no address");
        return NULL;
    }
    if (itemsize == 8) {
        ALL_IN_RANGE(int64_t);
    } else if (itemsize == 4) {
        ALL_IN_RANGE(int32_t);
    } else {
        PyErr_SetString(PyExc_ValueError, "ids_in_range: itemsize must be 4 (int32) or 8 (int64)");
        return NULL;
    }
    Py_RETURN_TRUE;
}

/* offsets_ok(address, count, total, max_seqlen): whether the `count` int32 values at `address`
   start at 0, never decrease, end at `total` and never step by more than `max_seqlen`:
   checks.check_cu_seqlens's test of a contiguous CPU cu_seqlens (the same caller contract). */
static PyObject *offsets_ok(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "offsets_ok(address, count, total, max_seqlen)");
        return NULL;
    }
    void *address = PyLong_AsVoidPtr(args[0]);
    Py_ssize_t count = PyLong_AsSsize_t(args[1]);
    long long total = PyLong_AsLongLong(args[2]);
    long long max_seqlen = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (count < 1 || address == NULL) {
        PyErr_SetString(PyExc_ValueError, "offsets_ok: at least one offset, and an address");
        return NULL;
    }
    const int32_t *v = (const int32_t *)address;
    if (v[0] != 0 || (long long)v[count - 1] != total) Py_RETURN_FALSE;
    for (Py_ssize_t i = 1; i < count; i++) {
        long long step = (long long)v[i] - (long long)v[i - 1]; /* in 64 bits: int32 differences could wrap */
        if (step < 0 || step > max_seqlen) Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"init", init, METH_VARARGS, "init(tensor_type, scalar_types: frozenset, strided): what call_key tells apart."},
    {"call_key", (PyCFunction)(void (*)(void))call_key, METH_FASTCALL,
     "call_key(*args) -> tuple or None: dispatch.call_key's key (see the module comment)."},
    {"ids_in_range", (PyCFunction)(void (*)(void))ids_in_range, METH_FASTCALL,
     "ids_in_range(address, count, itemsize, low, high, allowed) -> bool (see the module comment)."},
    {"offsets_ok", (PyCFunction)(void (*)(void))offsets_ok, METH_FASTCALL,
     "offsets_ok(address, count, total, max_seqlen) -> bool: a valid cu_seqlens (see above)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_boundary", NULL, -1, methods};

PyMODINIT_FUNC PyInit__boundary(void) {
    s_dtype = PyUnicode_InternFromString("dtype");
    s_device = PyUnicode_InternFromString("device");
    s_shape = PyUnicode_InternFromString("shape");
    s_stride = PyUnicode_InternFromString("stride");
    s_requires_grad = PyUnicode_InternFromString("requires_grad");
    s_is_meta = PyUnicode_InternFromString("is_meta");
    s_layout = PyUnicode_InternFromString("layout");
    if (!s_dtype || !s_device || !s_shape || !s_stride || !s_requires_grad || !s_is_meta || !s_layout) return NULL;
    return PyModule_Create(&module);
}

"""The seams of the CUDA extension, checked without a GPU or a compiler (CPU tier, fast).

Three descriptions of the same eight ops must agree, and only the GPU would otherwise notice
when they drift: the ``TORCH_LIBRARY`` schemas in csrc/bindings.cpp (with the C++ functions
that implement them), the C interface of the emulator (csrc/emulate/emulated_kernels.cpp) and
its ctypes signatures and call sites in fastmlm/ops/cuda_impl/emulate.py. The sources are
parsed as text; the Python calls are made against a recording stand-in for the library.
"""
import ctypes
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

from fastmlm.ops.cuda_impl import emulate
from fastmlm.tools import compile_cuda

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CTYPES = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float}  # any pointer: c_void_p
CPP_TYPES = {"const Tensor&": "Tensor", "const OptTensor&": "Tensor?", "int64_t": "int", "double": "float"}


def _strip_comments(text):
    return re.sub(r"//[^\n]*", "", text)


def schemas():
    """{op: [(type, name, mutable), ...]} from the m.def(...) strings of bindings.cpp."""
    text = _strip_comments((CSRC / "bindings.cpp").read_text())
    block = re.search(r"TORCH_LIBRARY\(fastmlm_C, m\)\s*\{(.*?)\n\}", text, re.S).group(1)
    found = {}
    for call in re.findall(r"m\.def\((.*?)\);", block, re.S):
        schema = "".join(re.findall(r'"([^"]*)"', call))
        name, args, returns = re.fullmatch(r"(\w+)\((.*)\) -> (.*)", schema).groups()
        assert returns == "()", f"{name}: the ops write into their mutable arguments and return nothing"
        parsed = []
        for arg in args.split(", "):
            kind, arg_name = arg.rsplit(" ", 1)
            mutable = re.fullmatch(r"Tensor\([a-z]!\)", kind) is not None
            parsed.append(("Tensor" if mutable else kind, arg_name, mutable))
        found[name] = parsed
    return found


def cpp_implementations():
    """{op: [(schema type, name), ...]} of the C++ functions m.impl registers for the CUDA key."""
    text = _strip_comments((CSRC / "bindings.cpp").read_text())
    block = re.search(r"TORCH_LIBRARY_IMPL\(fastmlm_C, CUDA, m\)\s*\{(.*?)\n\}", text, re.S).group(1)
    found = {}
    for op, function in re.findall(r'm\.impl\("(\w+)", &fastmlm::(\w+)\);', block):
        params = re.search(r"\nvoid %s\((.*?)\)\s*\{" % function, text, re.S).group(1)
        found[op] = []
        for param in " ".join(params.split()).split(", "):
            kind, name = param.rsplit(" ", 1)
            found[op].append((CPP_TYPES[kind], name))
    return found


def c_functions():
    """{function: [(ctype, name, writable pointer), ...]} of the emulator's extern "C" interface."""
    text = _strip_comments((CSRC / "emulate" / "emulated_kernels.cpp").read_text())
    block = text[text.index('extern "C" {'):]
    found = {}
    for name, params in re.findall(r"\bint (fastmlm_emu_\w+)\((.*?)\)\s*\{", block, re.S):
        found[name] = []
        for param in " ".join(params.split()).split(", "):
            kind, arg = param.rsplit(" ", 1)
            if "*" in kind:
                found[name].append((ctypes.c_void_p, arg, not kind.startswith("const ")))
            else:
                found[name].append((CTYPES[kind], arg, False))
    return found


def test_the_parsers_see_every_op():
    assert set(schemas()) == {"attention_fwd", "attention_bwd", "block_sparse_fwd", "block_sparse_bwd",
                              "gather_rows", "masked_ce_chunk_stats", "masked_ce_finish", "masked_ce_chunk_grad"}
    assert len(c_functions()) == 5


def test_every_schema_has_a_cpp_implementation_with_its_arguments():
    """What the binding registers is what it declares (on a GPU a mismatch only fails at import)."""
    defs, impls = schemas(), cpp_implementations()
    assert set(impls) == set(defs)
    for op, args in defs.items():
        assert impls[op] == [(kind, name) for kind, name, _ in args], op


def test_emulated_ops_take_the_schema_arguments_by_name_and_order():
    defs = schemas()
    methods = {name for name, _ in inspect.getmembers(emulate.EmulatedOps, inspect.isfunction)
               if not name.startswith("_")}
    assert methods == set(defs) == set(emulate.OP_FUNCTIONS)
    for op, args in defs.items():
        params = list(inspect.signature(getattr(emulate.EmulatedOps, op)).parameters)
        assert params == ["self"] + [name for _, name, _ in args], op


def test_ctypes_signatures_match_the_c_prototypes():
    functions = c_functions()
    assert set(emulate.C_SIGNATURES) == set(functions) == set(emulate.OP_FUNCTIONS.values())
    for name, params in functions.items():
        assert emulate.C_SIGNATURES[name] == [ctype for ctype, _, _ in params], name


def test_each_schema_argument_reaches_the_c_parameter_of_its_name():
    """Tensors travel as pointers (writable where the schema says mutable), int as an integer, float as float."""
    functions = c_functions()
    for op, args in schemas().items():
        params = {name: (ctype, writable) for ctype, name, writable in functions[emulate.OP_FUNCTIONS[op]]}
        for kind, name, mutable in args:
            assert name in params, f"{op}: the C function has no parameter {name}"
            ctype, writable = params[name]
            expected = {"Tensor": (ctypes.c_void_p,), "Tensor?": (ctypes.c_void_p,), "int": (ctypes.c_int, ctypes.c_int64),
                        "float": (ctypes.c_float,)}[kind]
            assert ctype in expected, f"{op}.{name}: {kind} passed as {ctype.__name__}"
            assert writable or not mutable, f"{op}.{name} is written but the C parameter is const"


def test_dtype_codes_are_the_launchers_dtype_enum():
    text = (CSRC / "launchers.h").read_text()
    names = [n.strip() for n in re.search(r"enum class DType \{([^}]*)\}", text).group(1).split(",")]
    by_name = {"kFloat16": torch.float16, "kBFloat16": torch.bfloat16, "kFloat32": torch.float32}
    assert emulate._DTYPES == {by_name[n]: i for i, n in enumerate(names)}


class _Recorder:
    """Stands in for the ctypes library: records each call and returns cudaSuccess."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, args))
            return 0
        return call


def _example_arguments(op):
    """Small CPU tensors (distinct storage each) and scalars for one op, by schema argument name."""
    half = dict(dtype=torch.float16)
    b, s, h, d, r, c = 2, 3, 4, 8, 5, 6
    attention = dict(q=torch.zeros(b, s, h, d, **half), k=torch.zeros(b, s, h, d, **half),
                     v=torch.zeros(b, s, h, d, **half), out=torch.zeros(b, s, h, d, **half),
                     lse=torch.zeros(b, s, h), key_mask=torch.ones(b, s, dtype=torch.bool),
                     key_len=torch.full((b,), s, dtype=torch.int32), cu_seqlens=None, max_seqlen=s, scale=0.5,
                     dout=torch.zeros(b, s, h, d, **half), delta=torch.zeros(b, s, h),
                     dq=torch.zeros(b, s, h, d, **half), dk=torch.zeros(b, s, h, d, **half),
                     dv=torch.zeros(b, s, h, d, **half))
    nb, layout_len = 2, 5  # the block-sparse layout: tile states, visit lists, a one-head token mask
    attention.update(blocks=torch.ones(h, nb, nb, dtype=torch.int8), kv_index=torch.zeros(h, nb, nb, dtype=torch.int32),
                     kv_count=torch.ones(h, nb, dtype=torch.int32), q_index=torch.zeros(h, nb, nb, dtype=torch.int32),
                     q_count=torch.ones(h, nb, dtype=torch.int32),
                     token_mask=torch.zeros(1, layout_len, layout_len, dtype=torch.bool), block_size=64, window=3,
                     num_global=1)
    chunk = dict(logits=torch.zeros(r, c, **half), bias=torch.zeros(c, **half),
                 targets=torch.zeros(r, dtype=torch.long), v0=12, vocab=30, label_smoothing=0.1, z_loss=0.01,
                 stats=torch.zeros(r, 4), best=torch.zeros(r, dtype=torch.long), best_logit=torch.zeros(r),
                 lse=torch.zeros(r), grad=torch.zeros(r), dlogits=torch.zeros(r, c, **half), loss=torch.zeros(r),
                 correct=torch.zeros(r, dtype=torch.bool))
    gather = dict(hidden=torch.zeros(7, d, **half), positions=torch.zeros(r, dtype=torch.long),
                  rows=torch.zeros(r, d, **half))
    # The C parameters that are not schema arguments: derived from the shapes.
    dense_layout = dict(layout_heads=0, mask_heads=0, num_blocks=0, layout_len=0, block_size=0, window=-1,
                        num_global=0)  # blocks is null: dense
    sparse_layout = dict(layout_heads=h, mask_heads=1, num_blocks=nb, layout_len=layout_len)
    derived = {
        "attention_fwd": dict(backward=0, dtype=0, batch=b, heads=h, head_dim=d, total_rows=b * s * h, **dense_layout),
        "attention_bwd": dict(backward=1, dtype=0, batch=b, heads=h, head_dim=d, total_rows=b * s * h, **dense_layout),
        "block_sparse_fwd": dict(backward=0, dtype=0, batch=b, heads=h, head_dim=d, total_rows=b * s * h,
                                 **sparse_layout),
        "block_sparse_bwd": dict(backward=1, dtype=0, batch=b, heads=h, head_dim=d, total_rows=b * s * h,
                                 **sparse_layout),
        "gather_rows": dict(dtype=0, num_rows=r, num_tokens=7, hidden_size=d),
        "masked_ce_chunk_stats": dict(dtype=0, num_rows=r, chunk=c),
        "masked_ce_finish": dict(num_rows=r),
        "masked_ce_chunk_grad": dict(dtype=0, num_rows=r, chunk=c),
    }[op]
    values = gather if op == "gather_rows" else attention if op.startswith(("attention", "block_sparse")) else chunk
    return values, derived


@pytest.mark.parametrize("op", sorted(emulate.OP_FUNCTIONS))
def test_emulated_ops_pass_each_argument_in_its_c_position(op):
    """Every C parameter gets the tensor (data pointer) or value of its name, in the prototype's order."""
    ops = emulate.EmulatedOps.__new__(emulate.EmulatedOps)  # no library: nothing is built or run
    ops.lib = _Recorder()
    values, derived = _example_arguments(op)
    args = [values[name] for _, name, _ in schemas()[op]]
    getattr(ops, op)(*args)
    (function, passed), = ops.lib.calls
    assert function == emulate.OP_FUNCTIONS[op]
    params = c_functions()[function]
    assert len(passed) == len(params) == len(emulate.C_SIGNATURES[function])
    schema_names = {name for _, name, _ in schemas()[op]}
    for (ctype, name, _), value, argtype in zip(params, passed, emulate.C_SIGNATURES[function]):
        argtype.from_param(value)  # ctypes accepts it as the declared type
        if name in schema_names:
            expected = values[name]
            expected = expected.data_ptr() if isinstance(expected, torch.Tensor) else expected
        elif name in derived:
            expected = derived[name]
        else:  # a pointer this op does not use (the forward's gradients, say)
            assert ctype is ctypes.c_void_p, f"{function}.{name}: no value for it in {op}"
            expected = None
        assert value == expected, f"{op}: C parameter {name} got {value!r}, expected {expected!r}"


@pytest.mark.gpu
def test_the_extension_carries_the_head_dims():
    """The built extension exports the buckets of csrc/head_dims.h, for the Python side to read."""
    try:
        extension = importlib.import_module("fastmlm._C")
    except ImportError as exc:
        pytest.fail(f"the GPU tier needs the extension: {exc}")
    assert extension.HEAD_DIMS == compile_cuda.head_dims()

"""One dispatcher for every op: pick a backend, fall back loudly, or say exactly why none fits.

Each op owns a :class:`Registry` naming its backends. A backend is a module with

    why_not(inputs) -> str | None      # None: "I can run these inputs"
    forward(inputs) -> outputs
    backward(inputs, *saved_outputs, upstream_gradient) -> gradients
    differentiable(inputs) -> bool     # optional: autograd may record forward itself (see below)

where ``inputs`` is the op's one named bundle, the same for every backend of the op:
``AttentionInputs`` / ``BlockSparseInputs`` (``forward -> (out, lse)``,
``backward(inputs, out, lse, dout) -> (dq, dk, dv)``) and ``MaskedCEInputs``
(``forward -> (loss, lse, correct)`` per row, ``backward(inputs, lse, grad_rows) ->
(d_hidden, d_weight, d_bias)``). The custom ops build the bundle from their flat schemas.

``backend="auto"`` walks the op's priority list for the inputs' device (CUDA:
cuda, triton, torch, reference; elsewhere torch, reference; the Triton interpreter
is too slow to pick on its own) and takes the first backend whose ``why_not`` is None,
with two rules that keep a GPU user off a cliff:

- **No silent O(S²) oracle on a GPU.** For CUDA inputs larger than
  :data:`REFERENCE_LIMIT` units of work (score elements for attention, logits for the
  loss; the op's ``work`` function counts them) ``auto`` never picks ``reference``: when
  every fast backend declines, :class:`BackendUnavailable` lists each one's reason.
  ``backend="reference"`` still runs it.
- **A failing kernel degrades loudly.** Under ``auto`` the custom ops receive
  ``"auto:<name>"``: the backend chosen first, and permission to move on. When it raises
  while compiling or launching (a Triton compile error, a missing symbol, a CUDA launch
  failure), the dispatcher warns once per op, input signature and backend (a
  :class:`BackendFailed` warning with the reason), remembers the failure, and runs the
  next backend of the priority list that can take the inputs, in the same call, forward
  or backward. Every later call with that input signature skips the failed backend.
  An explicit backend (``backend="triton"``) still raises its own error.

Because every backend of an op honours the same contract (outputs, saved statistics and
gradients mean the same thing), a backward may run on another backend than its forward.
The reference joins a fallback chain through :mod:`fastmlm.ops.torch_impl.oracle` (the
references in bundle form), and only where ``auto`` may pick it.

**What depends only on the input signature is worked out once.** The public ops memoise,
per :func:`call_key` (every argument's metadata: type, dtype, device, shape, strides,
requires_grad; options by type and value), what their boundary derives from it: the metadata
checks and the backend choice (:meth:`Registry.memo`). Value checks (index ranges,
``cu_seqlens`` contents) still run on every call. A recorded failure or
:meth:`Registry.forget_failures` empties the memo. Under torch.compile nothing is memoised
(dynamo traces the plain path once), nor for meta tensors (tests stand them in for other
devices with stubbed probes). The eager path also skips the custom-op wrapping where nothing
needs it (:func:`plain_eager`): the custom ops stay for torch.compile, dispatch modes and opcheck.
Where a backend's forward is itself differentiable PyTorch (the CPU torch backend of attention:
ATen's flash attention has a derivative) and says so (:meth:`Registry.differentiable`), the eager
path lets autograd record it, rather than a Python autograd node that calls back into
``backward``: PyTorch's engine then runs the backward pass without re-entering Python.

Backend modules are imported lazily, on the first call that needs them, so
importing fastmlm never imports triton, never loads the CUDA extension and never
queries CUDA. The choice is made per call from the inputs, never at import time.
The Triton backends live in the package ``fastmlm_kernels`` (see kernels_path.py).
"""
from __future__ import annotations

import threading
import warnings
from types import ModuleType
from typing import Callable, Optional

import torch

from . import checks, kernels_path

BACKENDS = ("reference", "torch", "triton", "cuda")
PRIORITY = {"cuda": ("cuda", "triton", "torch", "reference")}  # device type -> auto's order
DEFAULT_PRIORITY = ("torch", "reference")  # every other device (the Triton interpreter is for tests)
REFERENCE_LIMIT = 1 << 20  # units of work above which auto never runs the reference on CUDA inputs
AUTO_PREFIX = "auto:"
MEMO_SIZE = 1024  # signatures remembered per op before the memo starts over (a bound, not a tuning knob)
_SCALARS = frozenset((bool, int, float, str))  # the option types call_key remembers by value
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # tensor types that carry no dispatch behaviour of their own


class BackendUnavailable(ValueError):
    """Raised when the requested backend (or every backend, for ``auto``) cannot run."""


class BackendFailed(RuntimeWarning):
    """Warned (once per op, input signature and backend) when a backend chosen by ``auto`` raised
    while compiling or launching and the dispatcher moved on to the next one."""


def priority(device_type: str) -> tuple[str, ...]:
    """``auto``'s order of backends for tensors of ``device_type``."""
    return PRIORITY.get(device_type, DEFAULT_PRIORITY)


def device_type(t: torch.Tensor) -> str:
    """The device type whose priority list a fallback chain walks (tests stub it)."""
    return t.device.type


def first_tensor(bundle) -> torch.Tensor:
    """The first tensor of a bundle (q, or hidden), walking nested bundles in field order."""
    for item in bundle:
        if isinstance(item, torch.Tensor):
            return item
        if isinstance(item, tuple):
            try:
                return first_tensor(item)
            except LookupError:
                continue
    raise LookupError("the bundle holds no tensor")


def signature(bundle) -> tuple:
    """What a kernel specialises on, per field: (dtype, device type, rank, last dim) of a tensor,
    None for an absent one; nested bundles recurse; scalars do not count (a Triton config
    that fails for one sequence length fails for the next)."""
    parts = []
    for item in bundle:
        if isinstance(item, torch.Tensor):
            parts.append((item.dtype, item.device.type, item.dim(), item.shape[-1] if item.dim() else None))
        elif item is None:
            parts.append(None)
        elif isinstance(item, tuple):
            parts.append(signature(item))
    return tuple(parts)


def call_key(*args) -> Optional[tuple]:
    """A hashable summary of a call's arguments without any tensor value, for :meth:`Registry.memo`.

    Tensors count by (type, dtype, device, shape, strides, requires_grad); None by itself; a bool,
    int, float or str (exactly those types) by (type, value), so 16 and 16.0 differ and NaN never
    matches itself. None (do not memoise) under torch.compile, for a meta or non-strided (sparse)
    tensor, or for an argument of any other kind, a subclass of those scalars included (it is
    validated every call).
    Built by the C helper ``fastmlm.ops._boundary.call_key`` where it was compiled (a few µs less
    on every call of a public op, issue 22), else by :func:`_python_call_key`: the same tuple.
    """
    if torch.compiler.is_compiling():
        return None
    if _native_call_key is not None:
        return _native_call_key(*args)
    return _python_call_key(args)


def _python_call_key(args: tuple) -> Optional[tuple]:
    """:func:`call_key` in Python (where the C helper is not built; the tests hold the two equal)."""
    parts = []
    for a in args:  # the cheapest tests first
        kind = type(a)
        if kind in _SCALARS:  # a set lookup of the exact type: cheaper than isinstance on a tuple
            parts.append((kind, a))
        elif a is None:
            parts.append(None)
        elif isinstance(a, torch.Tensor):
            if a.is_meta or a.layout is not torch.strided:
                return None
            parts.append((kind, a.dtype, a.device, a.shape, a.stride(), a.requires_grad))
        else:
            return None
    return tuple(parts)


def _load_native_call_key():
    """The C helper's call_key, initialised; None where the extension was not built (an install
    without a C compiler: ``setup.py`` builds it as optional)."""
    if checks.native_boundary is None:
        return None
    checks.native_boundary.init(torch.Tensor, _SCALARS, torch.strided)
    return checks.native_boundary.call_key


_native_call_key = _load_native_call_key()


def forward_out(module, inputs):
    """A backend's first output alone (attention's out, without its lse): its optional
    ``forward_out(inputs)`` where it has one (it may skip the work of the rest), else ``forward``'s."""
    own = getattr(module, "forward_out", None)
    return own(inputs) if own is not None else module.forward(inputs)[0]


def plain_eager(*tensors) -> bool:
    """True when a call may skip the custom-op wrapping: :func:`no_modes`, and plain
    ``torch.Tensor`` or ``nn.Parameter`` arguments (:func:`plain_types`). Anything else goes
    through the custom ops."""
    return no_modes() and plain_types(*tensors)


def no_modes() -> bool:
    """Eager mode, no torch function or dispatch mode (fake tensors, selective checkpointing,
    FlopCounter) and no functorch transform: the part of :func:`plain_eager` that is state, not
    argument metadata (a public op that memoises :func:`plain_types` per signature asks only this)."""
    return not (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
                or torch._C._len_torch_dispatch_stack() > 0 or torch._C._functorch.peek_interpreter_stack() is not None)


def plain_types(*tensors) -> bool:
    """Every argument None, a plain ``torch.Tensor`` or an ``nn.Parameter`` (a Parameter adds no
    dispatch behaviour, and the loss's weight is one); part of every :func:`call_key`."""
    return all(t is None or type(t) in _PLAIN for t in tensors)


def score_elements(inputs) -> int:
    """Attention scores the reference materialises for an ``AttentionInputs``: B·H·S² padded,
    H·T·max_seqlen packed (a bound on H·Σ len², known without reading cu_seqlens)."""
    q = inputs.q
    if inputs.cu_seqlens is not None:
        return q.shape[0] * q.shape[1] * inputs.max_seqlen
    return q.shape[0] * q.shape[2] * q.shape[1] ** 2


def _never_fall_back(exc: BaseException) -> bool:
    """Errors that another backend would not cure: out of memory is the caller's budget, not a defect."""
    return isinstance(exc, torch.cuda.OutOfMemoryError)


class Registry:
    """The backends of one op, by name, as importable module paths.

    Arguments:
        op: the public op's name, for messages.
        modules: backend name -> module path (the reference needs none: it lives in the op's file).
        work: ``work(inputs) -> int``, the size of a call in the units of :data:`REFERENCE_LIMIT`
            (score elements, logits); None: the reference is never refused.
        oracle: module path of the reference in bundle form (``forward`` / ``backward``), so a
            fallback chain can end there.
    """

    def __init__(self, op: str, modules: dict[str, str], work: Optional[Callable] = None,
                 oracle: Optional[str] = None):
        unknown = set(modules) - set(BACKENDS)
        if unknown:
            raise ValueError(f"unknown backend names {sorted(unknown)}")
        self.op = op
        self.modules = modules
        self.work = work
        self.oracle = oracle
        self._loaded: dict[str, ModuleType] = {}
        self._import_errors: dict[str, Exception] = {}  # backends whose import failed, with the error
        self._failed: dict[tuple, dict[str, str]] = {}  # input signature -> {backend: reason}
        self._memo: dict[tuple, object] = {}  # call_key -> what the boundary derived from it
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ memo
    def memo(self, key: Optional[tuple], derive: Callable[[], object]):
        """``derive()`` once per ``key`` (a :func:`call_key`), its result remembered; every call
        when ``key`` is None. ``derive`` must read only metadata: its errors are not remembered."""
        if key is None:
            return derive()
        found = self._memo.get(key)
        if found is None:
            found = derive()
            with self._lock:
                if len(self._memo) >= MEMO_SIZE:
                    self._memo.clear()
                self._memo[key] = found
        return found

    # ------------------------------------------------------------------ backends
    def module(self, name: str):
        """The backend module ``name``; for ``"auto:<name>"`` a :class:`_Fallback` that starts there."""
        if name.startswith(AUTO_PREFIX):
            if name not in self._loaded:
                self._loaded[name] = _Fallback(self, name[len(AUTO_PREFIX):])
            return self._loaded[name]
        if name not in self._loaded:
            path = self.oracle if name == "reference" else self.modules[name]
            if path is None:
                raise LookupError(f"fastmlm.ops.{self.op} has no reference in bundle form")
            if name in self._import_errors:  # a failed import is not retried on every call (and in every trace)
                raise self._import_errors[name]
            module_path, _, attr = path.partition(":")  # "package.module:namespace"
            try:
                mod = kernels_path.import_module(module_path)
            except Exception as exc:
                self._import_errors[name] = exc
                raise
            self._loaded[name] = getattr(mod, attr) if attr else mod
        return self._loaded[name]

    def why_not(self, name: str, inputs) -> Optional[str]:
        """Why backend ``name`` cannot run ``inputs`` (the op's bundle); None when it can."""
        if name == "reference":  # the oracle takes every input that passed validation
            return None
        if name not in self.modules:
            return "not implemented for this op"
        try:
            mod = self.module(name)
        except Exception as exc:  # missing triton, extension not built, ...
            return f"cannot be imported ({type(exc).__name__}: {exc})"
        return mod.why_not(inputs)

    def differentiable(self, name: str, inputs) -> bool:
        """True when backend ``name``'s ``forward``, run under autograd on ``inputs``, records a graph
        whose gradients are its ``backward``'s (a backend declares it with an optional
        ``differentiable(inputs)``), so the eager path may skip the op's Python autograd node."""
        check = getattr(self.module(name), "differentiable", None)
        return check is not None and check(inputs)

    def refuses_reference(self, device_type: str, inputs) -> Optional[str]:
        """Why ``auto`` must not run the reference on these inputs (None: it may)."""
        if device_type != "cuda" or self.work is None:
            return None
        work = self.work(inputs)
        if work <= REFERENCE_LIMIT:
            return None
        return (f"not picked by auto for CUDA inputs this large ({work:,} > {REFERENCE_LIMIT:,} elements of "
                f"work): it is the fp32 O(S²) oracle, 10-100x slower; pass backend='reference' to run it anyway")

    # ------------------------------------------------------------------ failures
    def failures(self, inputs) -> dict[str, str]:
        """Backends that raised under ``auto`` for inputs of this signature, with their reasons."""
        return dict(self._failed.get(signature(inputs), {}))

    def forget_failures(self) -> None:
        """Try every backend again (tests; after fixing an installation)."""
        with self._lock:
            self._failed.clear()
            self._memo.clear()
            self._import_errors.clear()

    def _record_failure(self, name: str, inputs, exc: BaseException) -> str:
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        with self._lock:
            self._failed.setdefault(signature(inputs), {})[name] = reason
            self._memo.clear()  # choices remembered before the failure may name the failed backend
        return reason

    # ------------------------------------------------------------------ choice
    def _candidates(self, device_type: str, inputs, after: Optional[str] = None):
        """(name, None) for each backend auto may run, in priority order (after ``after``),
        and (name, reason) for each one it may not."""
        order = priority(device_type)
        if after is not None:
            order = order[order.index(after) + 1:] if after in order else ()
        failed = self._failed.get(signature(inputs), {})
        for name in order:
            if name in failed:
                yield name, f"failed earlier on inputs like these ({failed[name]})"
                continue
            why = self.refuses_reference(device_type, inputs) if name == "reference" else self.why_not(name, inputs)
            yield name, why

    def select(self, backend: str, device_type: str, inputs) -> str:
        """The backend to run ``inputs`` (the op's bundle), or raise listing every reason.

        Returns the backend's name for an explicit choice, ``"reference"`` when ``auto`` picks
        the reference, and ``"auto:<name>"`` when ``auto`` picks a fast backend (the custom ops
        pass it to :meth:`module`, which falls back past a backend that raises).
        """
        if backend == "auto":
            reasons = []
            for name, why in self._candidates(device_type, inputs):
                if why is None:
                    return name if name == "reference" else AUTO_PREFIX + name
                reasons.append(f"  {name}: {why}")
            raise BackendUnavailable(f"fastmlm.ops.{self.op}: no backend can run these inputs:\n" + "\n".join(reasons))
        if backend not in BACKENDS:
            raise ValueError(f"fastmlm.ops.{self.op}: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        why = self.why_not(backend, inputs)
        if why is None:
            return backend
        raise BackendUnavailable(f"fastmlm.ops.{self.op}: backend {backend!r} cannot run these inputs:\n"
                                 f"  {backend}: {why}")

    def chosen(self, backend: str, device_type: str, inputs) -> str:
        """The plain name of the backend :meth:`select` would run first (for reports and tests)."""
        name = self.select(backend, device_type, inputs)
        return name[len(AUTO_PREFIX):] if name.startswith(AUTO_PREFIX) else name

    def _next(self, failed_name: str, device_type: str, inputs, tried: list[str]) -> str:
        """The backend after ``failed_name`` that auto may run, or raise listing why none."""
        failed = self._failed.get(signature(inputs), {})
        reasons = [f"  {name}: failed ({failed[name]})" for name in tried if name in failed]
        for name, why in self._candidates(device_type, inputs, after=failed_name):
            if why is None and name == "reference" and self.oracle is None:
                why = "cannot join a fallback chain for this op"
            if why is None:
                return name
            if name not in tried:
                reasons.append(f"  {name}: {why}")
        raise BackendUnavailable(f"fastmlm.ops.{self.op}: every backend auto may use failed or declined "
                                 f"these inputs:\n" + "\n".join(reasons))

    def run(self, first: str, inputs, call: Callable[[object], object]):
        """``call(module)`` on backend ``first``, then on each next one auto may use while they raise."""
        name, tried = first, []
        if self._failed and name in self._failed.get(signature(inputs), {}):  # a forward fell back earlier: skip it
            tried.append(name)
            name = self._next(name, device_type(first_tensor(inputs)), inputs, tried)
        while True:
            try:
                return call(self.module(name))
            except Exception as exc:  # noqa: BLE001 - any compile or launch failure; re-raised when none is left
                if _never_fall_back(exc):
                    raise
                reason = self._record_failure(name, inputs, exc)
                tried.append(name)
                try:
                    following = self._next(name, device_type(first_tensor(inputs)), inputs, tried)
                except BackendUnavailable as none_left:
                    raise none_left from exc
                warnings.warn(f"fastmlm.ops.{self.op}: the {name} backend failed on these inputs ({reason}); "
                              f"using the {following} backend for inputs like these from now on",
                              BackendFailed, stacklevel=4)
                name = following


class _Fallback:
    """What the custom ops get for ``"auto:<name>"``: a backend that is ``name``, then the next ones."""

    def __init__(self, registry: Registry, first: str):
        self.registry, self.first = registry, first

    def why_not(self, inputs) -> Optional[str]:
        return self.registry.why_not(self.first, inputs)

    def differentiable(self, inputs) -> bool:
        # Only the first backend counts: the one that says yes (CPU torch) is followed by the
        # reference alone, plain differentiable PyTorch too.
        return self.registry.differentiable(self.first, inputs)

    def forward(self, inputs):
        return self.registry.run(self.first, inputs, lambda mod: mod.forward(inputs))

    def forward_out(self, inputs):
        return self.registry.run(self.first, inputs, lambda mod: forward_out(mod, inputs))

    def backward(self, inputs, *args):
        return self.registry.run(self.first, inputs, lambda mod: mod.backward(inputs, *args))

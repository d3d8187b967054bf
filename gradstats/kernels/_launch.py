"""One Triton kernel source, compiled for CUDA tensors and interpreted for CPU tensors.

Triton picks compiled or interpreted code when a function is decorated, from the environment
variable ``TRITON_INTERPRET`` read at that moment, and its standard library (``tl.sum``,
``tl.cdiv``, ...) is decorated when triton is first imported. Setting the variable therefore only
works before anything imports triton, which a test suite or a user program cannot promise. Here
nothing reads or sets the variable: :class:`Kernel` holds both a ``triton.jit`` build of the
function and an ``InterpretedFunction`` of the same source, and chooses by the device of the
tensors at each launch. While an interpreted kernel runs, :func:`_interpreted_stdlib` swaps the
standard library's compiled helpers, and the kernel module's own (:func:`helper`), for
interpreted ones (what ``TRITON_INTERPRET=1`` at import would have made them) and restores them
afterwards, under a lock (the interpreter itself keeps
global state, so interpreted launches never overlap).
"""
from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    _IMPORT_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - exercised where triton is absent
    triton = tl = InterpretedFunction = JITFunction = None  # type: ignore[assignment]
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

__all__ = ["Kernel", "helper", "triton", "tl", "import_error", "require_triton"]

_LOCK = threading.Lock()
_WRAPPED: dict[int, Any] = {}


def import_error() -> str | None:
    """Why triton could not be imported, or None."""
    return _IMPORT_ERROR


def require_triton() -> None:
    """Raises ImportError, saying what to install, when triton is missing."""
    if _IMPORT_ERROR is not None:
        raise ImportError("gradstats.kernels needs Triton (pip install triton; it comes with "
                          "CUDA builds of torch on Linux): " + _IMPORT_ERROR)


def _patched_objects(namespace: dict[str, Any]) -> list[Any]:
    """What an interpreted launch changes: triton.language's modules and classes (the
    interpreter patches their builtins and operators) and the kernel's module namespace."""
    objs = [tl, tl.core, tl.standard, tl.math, tl.tensor, tl.core.dtype,
            getattr(tl.core, "tensor_descriptor_base", None), namespace]
    return [o for o in objs if o is not None]


def _attrs(obj: Any) -> dict[str, Any]:
    return dict(obj if isinstance(obj, dict) else vars(obj))


def _put(obj: Any, name: str, value: Any) -> None:
    if isinstance(obj, dict):
        obj[name] = value
    else:  # a module or a class
        setattr(obj, name, value)


def _restore(obj: Any, before: dict[str, Any], keep: dict[str, Any]) -> None:
    """Puts back what changed in ``obj``. Names added to a module stay when they are modules
    or the interpreter's own globals, which its rewriter copies into the namespace of every
    function it rewrites for good (the rewritten function, cached, reads them later)."""
    now = _attrs(obj)
    for name, value in now.items():
        if name not in before:
            if isinstance(obj, type):
                delattr(obj, name)
            elif not (isinstance(value, types.ModuleType) or keep.get(name, _NONE) is value):
                del (obj if isinstance(obj, dict) else vars(obj))[name]
        elif value is not before[name]:
            _put(obj, name, before[name])
    for name, value in before.items():
        if name not in now:
            _put(obj, name, value)


_NONE = object()


@contextlib.contextmanager
def _interpreted_stdlib(namespace: dict[str, Any]) -> Iterator[None]:
    """The compiled helpers of triton's standard library and of ``namespace`` (the kernel's
    module, for its own ``@triton.jit`` helpers) swapped for interpreted ones meanwhile, and
    everything the interpreter patches put back afterwards: its nested device-function calls
    (``tl.sum`` and the like) patch triton.language and never restore it, which under
    ``TRITON_INTERPRET=1`` does not matter but here would break the next compiled kernel."""
    import dataclasses

    from triton.runtime import interpreter

    try:  # the first interpreted launch imports triton.experimental.gluon (triton >= 3.4), whose
        # import asserts that the helpers it re-exports are compiled: import it before the swap
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pass

    with _LOCK:
        objs = _patched_objects(namespace)
        snapshot = [(o, _attrs(o)) for o in objs]
        builder = interpreter.interpreter_builder
        options = builder.options
        try:
            # the interpreter checks every int32 op for overflow (the compiled kernel does not):
            # on the small shapes it runs none can overflow, and the check is 40% of its time
            if getattr(options, "sanitize_overflow", False):
                builder.options = dataclasses.replace(options, sanitize_overflow=False)
            for obj in objs:
                for name, value in _attrs(obj).items():
                    if isinstance(value, JITFunction):
                        wrapped = _WRAPPED.get(id(value))
                        if wrapped is None:
                            wrapped = _WRAPPED[id(value)] = InterpretedFunction(value.fn)
                        _put(obj, name, wrapped)
            yield
        finally:
            builder.options = options
            for obj, before in snapshot:
                _restore(obj, before, vars(interpreter))


def helper(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``triton.jit`` for a device function that kernels call (left plain without triton);
    interpreted launches swap it for an interpreted one (:func:`_interpreted_stdlib`)."""
    return fn if _IMPORT_ERROR is not None else triton.jit(fn)


class Kernel:
    """A Triton kernel launched as ``kernel[grid](*args, **meta)``: compiled on CUDA tensors,
    interpreted on CPU tensors (the device of the first tensor argument decides)."""

    def __init__(self, fn: Callable[..., None]):
        require_triton()
        self.fn = fn
        self.compiled = triton.jit(fn)
        self.interpreted = InterpretedFunction(fn)

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        def launch(*args: Any, **meta: Any) -> None:
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            if device.type == "cpu":
                with _interpreted_stdlib(self.fn.__globals__):
                    self.interpreted[grid](*args, **meta)
            else:  # Triton launches on the current device
                with torch.cuda.device(device):
                    self.compiled[grid](*args, **meta)

        return launch

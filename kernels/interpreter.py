"""Fix for the Triton CPU interpreter's bf16 ``tl.dot`` (applied explicitly, never on import).

Under ``TRITON_INTERPRET=1`` Triton 3.6 stores bf16 tensors as raw uint16 bits and its
``create_dot`` hands those bits to ``np.matmul``: the product of two bf16 tiles is garbage.
``enable_interpreter_bf16_dot()`` wraps the interpreter builder's ``create_dot`` so bf16
operands are widened to float32 first (exact) and multiplied in float32, which is what the
tensor cores do (bf16 products are exact in fp32, accumulation in fp32).
"""
from __future__ import annotations

import numpy as np

_PATCHED = {"done": False}


def enable_interpreter_bf16_dot() -> bool:
    """Patch the interpreter's dot for bf16 operands; idempotent.

    Returns True when the patch is (now) active, False when the interpreter module is not
    available (e.g. a Triton build without it). Call from tests or CPU launchers only.
    """
    if _PATCHED["done"]:
        return True
    try:
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:
        return False
    builder_cls = getattr(interp, "InterpreterBuilder", None)
    if builder_cls is None or not hasattr(interp, "_convert_float"):
        return False
    original = builder_cls.create_dot

    def _widen(handle):
        if handle.dtype == tl.bfloat16:
            bits = handle.data.astype(np.uint16)
            return (bits.astype(np.uint32) << 16).view(np.float32)
        return handle.data

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype != tl.bfloat16 and b.dtype != tl.bfloat16:
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        prod = np.matmul(_widen(a), _widen(b), dtype=np.float32)
        return interp.TensorHandle(prod.astype(d.data.dtype) + d.data, d.dtype.scalar)

    builder_cls.create_dot = create_dot
    _PATCHED["done"] = True
    return True

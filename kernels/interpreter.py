"""Fix for the Triton CPU interpreter's bf16 ``tl.dot`` (applied explicitly, never on import).

Under ``TRITON_INTERPRET=1`` Triton 3.6 stores bf16 tensors as raw uint16 bits and its
``create_dot`` hands those bits to ``np.matmul``: the product of two bf16 tiles is garbage.
``enable_interpreter_bf16_dot()`` wraps the interpreter builder's ``create_dot`` so bf16
operands are widened to float32 first (exact) and multiplied in float32, which is what the
tensor cores do (bf16 products are exact in fp32, accumulation in fp32). It also makes
float32 -> bf16 casts round to nearest even, as the GPU's ``cvt.rn.bf16.f32`` does (the
interpreter truncates them).
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
    for name in ("create_fp_trunc", "create_fp_to_fp"):
        _round_bf16_casts(builder_cls, name, interp, tl)
    _PATCHED["done"] = True
    return True


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """uint16 bf16 bits of float32 ``x``, rounded to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def _round_bf16_casts(builder_cls, name: str, interp, tl) -> None:
    """Make the builder's cast ``name`` round float32 -> bf16 to nearest even."""
    original = getattr(builder_cls, name)

    def cast(self, src, dst_type, *args):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interp.TensorHandle(_f32_to_bf16_bits(src.data), tl.bfloat16)
        return original(self, src, dst_type, *args)

    setattr(builder_cls, name, cast)

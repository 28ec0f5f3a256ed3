"""Checks that Relax has no op for: index bounds (embedding, ``index_select``, ``gather``) and integer
division by zero."""

from __future__ import annotations

from tvm.script import tirx as T

from .common import _scheduled


def index_check_kernel(dtype: str, idx_dtype: str, wrap: bool, what: str):
    """``O[m] = I[m]`` as int64, checked against the indexed dimension ``V`` of ``X [A, V, P]`` (only
    its shape is used; every size symbolic) with torch's bounds: an index outside ``[0, V)`` --
    ``[-V, V)`` with ``wrap``, a negative index counting from the end and coming out as ``i + V`` --
    raises ``RuntimeError("<what>: index out of range ...")``. Placed before Relax ``take`` /
    ``gather_elements``, whose CPU code reads whatever an index points at (garbage just past the
    end, a segfault further)."""
    valid = "-size <= index < size" if wrap else "0 <= index < size"
    msg = f"{what}: index out of range (valid: {valid} of the indexed dimension)"
    i64 = "int64"

    @T.prim_func(private=True, s_tir=True)
    def index_check(x_h: T.handle, i_h: T.handle, o_h: T.handle):
        # opaque to FuseOps (8 = kOpaque): as an elementwise op it was fused with the reshapes around
        # it, and FuseTIR failed on the symbolic shapes
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        A = T.int64()
        V = T.int64()
        P = T.int64()
        M = T.int64()
        T.match_buffer(x_h, (A, V, P), dtype)  # for V only
        ids = T.match_buffer(i_h, (M,), idx_dtype)
        out = T.match_buffer(o_h, (M,), i64)
        with T.sblock("root"):  # Relax's reshape-pattern analysis requires a root block
            for m in range(M):
                raw: T.let = T.Cast(i64, ids[m])
                i: T.let = T.if_then_else(raw < 0, raw + V, raw) if wrap else raw
                T.Assert(0 <= i and i < V, msg)
                out[m] = i

    return _scheduled(index_check)


def nonzero_check_kernel(dtype: str, what: str):
    """``O[m] = I[m]`` checked nonzero: an integer divisor of 0 raises ``RuntimeError("<what>:
    ZeroDivisionError ...")`` as torch does, where the CPU's integer division traps (SIGFPE kills the
    process). Placed before integer ``floor_divide`` / ``trunc`` division / ``remainder`` / ``fmod``
    by a tensor."""
    msg = f"{what}: ZeroDivisionError (an integer divisor is 0)"

    @T.prim_func(private=True, s_tir=True)
    def nonzero_check(i_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})  # opaque to FuseOps, as index_check
        M = T.int64()
        vals = T.match_buffer(i_h, (M,), dtype)
        out = T.match_buffer(o_h, (M,), dtype)
        with T.sblock("root"):
            for m in range(M):
                T.Assert(vals[m] != T.Cast(dtype, 0), msg)
                out[m] = vals[m]

    return _scheduled(nonzero_check)

"""Large kernel weights as VM parameters, held in one arena on transparent huge pages.

:func:`lift_weights` turns every constant argument of a ``call_tir`` of at least :data:`LIFT_BYTES`
(our packed dense / sparse / conv weights) into an extra parameter of ``main``, after the model's own
inputs. :class:`WeightArena` holds those arrays back to back (64-byte aligned) in one anonymous
mapping advised ``MADV_HUGEPAGE`` before it is touched, and :class:`..TVMModel` passes them on every
call.

Why: a batch-1 sparse or dense linear streams its weights from DRAM once per call. Embedded in the
executable they sit in TVM's own allocations on 4 KiB pages, where each call pays a TLB walk every
4 KiB and the hardware prefetcher stops at every page. On 2 MiB pages the same kernels took 0.90-1.02x
the time, typically ~0.95x (3072x768, 70-95 % sparsity, cold, same-run A/B;
``benchmarks/bench_tvm.py --only coldread`` shows the effect on a plain read). Where the kernel cannot
get huge pages (THP ``never``, not Linux) the arena is still one allocation on normal pages; nothing
else changes.
"""

from __future__ import annotations

import mmap

import numpy as np
import tvm
from tvm import relax

__all__ = ["LIFT_BYTES", "lift_weights", "WeightArena"]

# constants below this stay embedded (biases, small index arrays): a few pages at most
LIFT_BYTES = 64 << 10
_ALIGN = 64
_HUGE_PAGE = 2 << 20
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _npy_spec(saved, name: str) -> tuple:
    """``(shape, dtype)`` of member ``name`` of an open ``.npz``, from its header alone."""
    with saved.zip.open(name + ".npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            return shape, dtype
        if version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            return shape, dtype
    array = saved[name]  # another header version: read the array for its spec
    return array.shape, array.dtype


def _nbytes(const) -> int:
    return int(np.prod([int(d) for d in const.value.shape])) * np.dtype(str(const.value.dtype)).itemsize


def lift_weights(mod: tvm.IRModule, min_bytes: int = LIFT_BYTES) -> tuple[tvm.IRModule, list]:
    """``main``'s ``call_tir`` constant arguments of ``>= min_bytes`` -> trailing parameters of ``main``.

    Returns the new module and the lifted arrays (``tvm`` tensors, in parameter order). A constant
    used by several calls becomes one parameter. Constants feeding anything but ``call_tir`` stay
    (``FoldConstant`` may still fold them); so does everything when nothing is large enough.
    """
    main = mod["main"]
    lifted: dict = {}

    @relax.expr_functor.mutator
    class _Lift(relax.PyExprMutator):
        def visit_call_(self, op):
            op = self.visit_expr_post_order(op)
            if not op.op.same_as(_CALL_TIR):
                return op
            fields, changed = [], False
            for arg in op.args[1].fields:
                if isinstance(arg, tvm.ir.expr.GenericConst) and _nbytes(arg) >= min_bytes:
                    if arg not in lifted:
                        lifted[arg] = relax.Var(f"sc_weight{len(lifted)}", arg.ty)
                    arg, changed = lifted[arg], True
                fields.append(arg)
            if not changed:
                return op
            return relax.Call(op.op, [op.args[0], relax.Tuple(fields)], op.attrs, op.ty_args)

    body = _Lift().visit_expr(main.body)
    if not lifted:
        return mod, []
    params = list(lifted.items())
    fn = relax.Function(list(main.params) + [v for _, v in params], body, main.ret_ty, main.is_pure,
                        main.attrs)
    out = mod.clone()
    out["main"] = fn
    return out, [c.value for c, _ in params]


class WeightArena:
    """Arrays copied back to back into one anonymous mapping on transparent huge pages.

    ``tensors`` are ``tvm`` tensors viewing the arena (64-byte aligned); ``huge`` says whether the
    kernel accepted ``MADV_HUGEPAGE`` (the pages are then 2 MiB where the system has them free).
    ``huge_pages=False`` maps the same way on normal pages (the benchmarks' comparison). The arena
    lives as long as any of its tensors.
    """

    def __init__(self, arrays, huge_pages: bool = True):
        arrays = [a if isinstance(a, np.ndarray) else a.numpy() for a in arrays]
        views = self._views([(a.shape, a.dtype) for a in arrays], huge_pages)
        for view, a in zip(views, arrays):
            view[...] = a
        self.tensors = [tvm.runtime.from_dlpack(v) for v in views]

    @classmethod
    def from_npz(cls, path, huge_pages: bool = True) -> "WeightArena":
        """The arrays ``arr_0, arr_1, ...`` of an ``.npz`` (as ``TVMModel.save`` writes them), read one
        at a time straight into the arena: loading holds the arena plus one array, not a second copy
        of every weight."""
        arena = cls.__new__(cls)
        with np.load(path) as saved:
            names = [f"arr_{i}" for i in range(len(saved.files))]
            views = arena._views([_npy_spec(saved, n) for n in names], huge_pages)
            for view, name in zip(views, names):
                view[...] = saved[name]
        arena.tensors = [tvm.runtime.from_dlpack(v) for v in views]
        return arena

    def _views(self, specs, huge_pages: bool) -> list:
        """Map the arena for ``(shape, dtype)`` specs; one 64-byte aligned view per spec."""
        sizes = [int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for shape, dtype in specs]
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += -(-max(size, 1) // _ALIGN) * _ALIGN
        self.nbytes = total
        self.huge = False
        if not specs:  # a model with nothing lifted maps nothing
            return []
        raw = self._map(total, huge_pages)
        return [raw[off:off + size].view(dtype).reshape(shape)
                for (shape, dtype), off, size in zip(specs, offsets, sizes)]

    def _map(self, nbytes: int, huge_pages: bool) -> np.ndarray:
        anonymous = getattr(mmap, "MAP_ANONYMOUS", None)
        if anonymous is None:  # not POSIX: one ordinary allocation
            buf = np.empty(nbytes + _ALIGN, np.uint8)
            start = (-buf.ctypes.data) % _ALIGN
            return buf[start:start + nbytes]
        size = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE
        self._mapping = mmap.mmap(-1, size + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | anonymous)
        raw = np.frombuffer(self._mapping, dtype=np.uint8)
        start = (-raw.ctypes.data) % _HUGE_PAGE  # huge pages need 2 MiB-aligned ranges
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is not None and huge_pages:
            try:
                self._mapping.madvise(advice, start, size)  # before the first touch
                self.huge = True
            except OSError:  # THP compiled out: normal pages
                pass
        return raw[start:start + nbytes]

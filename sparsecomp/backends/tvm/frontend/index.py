"""Converters of indexing ops, with indices checked as torch checks them (embedding, index, scatter, gather)."""

from __future__ import annotations

from torch import fx

import tvm
from tvm import relax

from ....errors import UnsupportedError
from .. import kernels
from .common import _op, _prod


class IndexConverters:
    """Indexing through checked indices (a mixin of ``_Lowering``)."""

    def _checked_index(self, imp, node: fx.Node, data: relax.Expr, index: relax.Expr, axis: int,
                       wrap: bool) -> relax.Expr | None:
        """``index`` (int64, same shape) after :func:`.kernels.index_check_kernel` against axis ``axis``
        of ``data``: an index out of range raises as in torch, where Relax ``take`` /
        ``gather_elements`` would read past the end (garbage or a segfault); negative indices come
        out counted from the end when ``wrap``. ``None`` (the caller defers to the importer) for
        dtypes this does not cover."""
        if (data.ty.ndim < 1 or data.ty.dtype not in _INDEXED_DATA
                or index.ty.dtype not in _INDEX_DTYPES):
            return None
        bb = imp.block_builder
        shape = list(data.ty.shape.values)
        ishape = list(index.ty.shape.values)
        axis %= len(shape)
        x3 = bb.emit(relax.op.reshape(data, [_prod(shape[:axis]), shape[axis], _prod(shape[axis + 1:])]))
        i1 = bb.emit(relax.op.reshape(index, [_prod(ishape)]))
        checked = self._check(
            imp, node, "index_check",
            lambda what: kernels.index_check_kernel(data.ty.dtype, index.ty.dtype, wrap, what), [x3, i1], i1,
            "int64")
        return bb.emit(relax.op.reshape(checked, ishape))

    def _take(self, imp, node: fx.Node, key: str, data: relax.Expr, index: relax.Expr, axis: int,
              wrap: bool) -> relax.Var:
        checked = self._checked_index(imp, node, data, index, axis, wrap)
        if checked is None:
            return self._default(imp, key, node)
        return imp.block_builder.emit(relax.op.take(data, checked, axis=axis))

    def embedding(self, node: fx.Node, imp) -> relax.Var:
        return self._take(imp, node, "embedding.default", imp.env[node.args[0]], imp.env[node.args[1]],
                          0, False)

    def index_select(self, node: fx.Node, imp) -> relax.Var:
        return self._take(imp, node, "index_select.default", imp.env[node.args[0]],
                          imp.env[node.args[2]], node.args[1], False)

    def index(self, node: fx.Node, imp) -> relax.Var:
        """``x[..., i, ...]`` with integer index tensors (negative indices count from the end), each
        checked against its axis. One: a ``take``. Several: one ``take`` of a flat index over the
        indexed axes merged into one, laid out as torch lays out advanced indexing (adjacent index
        tensors keep their place, separated ones go first). The importer's own converter got both
        the shape (``x[i, :, j]``, ``x[:, i, j]``) and the values (``x[i, j, j]``) wrong. A boolean
        mask goes to the importer."""
        given = [(axis, i) for axis, i in enumerate(node.args[1]) if i is not None]
        data = imp.env[node.args[0]]
        if any(imp.env[i].ty.dtype not in _INDEX_DTYPES for _, i in given):  # a boolean mask
            return self._default(imp, "index.Tensor", node)
        if len(given) == 1:
            axis, i = given[0]
            return self._take(imp, node, "index.Tensor", data, imp.env[i], axis, True)
        if data.ty.dtype not in _INDEXED_DATA:
            raise UnsupportedError(f"TVM backend: indexing {data.ty.dtype} data at node {node.name!r}")
        bb = imp.block_builder
        shape = list(data.ty.shape.values)
        axes = [axis for axis, _ in given]
        if any(not isinstance(shape[a], tvm.tirx.IntImm) for a in axes[1:]):
            raise UnsupportedError(
                f"TVM backend: indexing at node {node.name!r}: a symbolic size on an indexed axis "
                f"after the first ({[shape[a] for a in axes]})")
        flat = _flat_position(bb, [self._checked_index(imp, node, data, imp.env[i], axis, True)
                                   for axis, i in given], [shape[a] for a in axes])
        first, last = axes[0], axes[-1]
        merged = [_prod([shape[a] for a in axes])]
        if last - first + 1 == len(axes):  # adjacent: the merged axis stays in place
            x = bb.emit(relax.op.reshape(data, shape[:first] + merged + shape[last + 1:]))
            out = bb.emit(relax.op.take(x, flat, axis=first))
        else:  # separated: the indexed axes go first
            rest = [d for d in range(len(shape)) if d not in axes]
            x = bb.emit(relax.op.permute_dims(data, axes + rest))
            x = bb.emit(relax.op.reshape(x, merged + [shape[d] for d in rest]))
            out = bb.emit(relax.op.take(x, flat, axis=0))
        self._count("index_gather")
        return out

    def select(self, node: fx.Node, imp) -> relax.Var:
        """``x.select(dim, i)`` where ``i`` is a tensor's value (``x[i]`` with a 0-d index tensor
        exports as ``select(x, dim, _local_scalar_dense(i))``): a checked ``take`` with the 0-d
        index; the importer only takes a constant ``i`` (it failed with ``ValueError`` here)."""
        src = node.args[2]
        if not (isinstance(src, fx.Node) and _op(src) == "_local_scalar_dense.default"):
            return self._default(imp, "select.int", node)
        index = imp.env[src.args[0]]
        if index.ty.ndim != 0:
            index = imp.block_builder.emit(relax.op.reshape(index, []))
        return self._take(imp, node, "select.int", imp.env[node.args[0]], index, node.args[1], True)

    def index_put(self, node: fx.Node, imp) -> relax.Var:
        """``x[indices] = values`` (``accumulate``: ``+=``, as ``index_add`` decomposes), integer index
        tensors only: each checked against its axis (negative ones count from the end), then one flat
        position per written element (``arange`` over the sliced axes, laid out as torch lays out
        advanced indexing: adjacent index tensors keep their place, separated ones go first) and a
        1-D ``scatter_elements`` (see :func:`_flat_scatter`). The importer's own converter refused
        fewer index tensors than dimensions and laid out ``None`` (slice) axes wrongly where they
        follow an index tensor. A boolean mask, a symbolic broadcast or a symbolic size after the
        first goes to the importer."""
        key = "index_put_.default" if "index_put_" in str(node.target) else "index_put.default"
        x, values = imp.env[node.args[0]], imp.env[node.args[2]]
        accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
        given = [(axis, i) for axis, i in enumerate(node.args[1]) if i is not None]
        exprs = [imp.env[i] for _, i in given]
        if (not given or x.ty.ndim < 1 or x.ty.dtype not in _INDEXED_DATA
                or any(e.ty.dtype not in _INDEX_DTYPES for e in exprs)):
            return self._default(imp, key, node)
        bshape = _broadcast_dims([list(e.ty.shape.values) for e in exprs])
        if bshape is None:
            return self._default(imp, key, node)
        bb = imp.block_builder
        shape = list(x.ty.shape.values)
        axes = [axis for axis, _ in given]
        first, last = axes[0], axes[-1]
        adjacent = last - first + 1 == len(axes)
        sliced = [d for d in range(len(shape)) if d not in axes]
        pre = first if adjacent else 0
        out = (shape[:first] + bshape + shape[last + 1:]) if adjacent else bshape + [shape[d] for d in sliced]
        if any(not isinstance(d, tvm.tirx.IntImm) for d in shape[1:]):
            return self._default(imp, key, node)
        rank, nb = len(out), len(bshape)
        terms = []
        for d in range(len(shape)):
            if d in axes:
                e = exprs[axes.index(d)]
                checked = self._checked_index(imp, node, x, e, d, True)
                dims = [1] * (nb - e.ty.ndim) + list(e.ty.shape.values)
                terms.append(bb.emit(relax.op.reshape(checked, [1] * pre + dims + [1] * (rank - pre - nb))))
            else:
                p = (d if d < first else d - len(axes) + nb) if adjacent else nb + sliced.index(d)
                terms.append(_arange_along(bb, shape[d], p, rank))
        self._count("index_put")
        result = _flat_scatter(bb, x, terms, out, values, "add" if accumulate else "update")
        if key == "index_put_.default":  # in place: later reads of ``x`` (or an alias) see the write
            for other, expr in list(imp.env.items()):
                if expr is x:
                    imp.env[other] = result
        return result

    def scatter(self, node: fx.Node, imp) -> relax.Var:
        """``scatter`` (``src`` or a scalar), ``scatter_add`` and ``scatter_reduce(...,
        include_self=True)`` with ``sum`` / ``prod`` / ``amax`` / ``amin``: the index checked against
        ``dim`` of ``self`` (Relax ``scatter_elements`` wrote wherever an index pointed), then
        ``scatter_elements`` over ``src`` cut to the index's shape, as torch reads it. The importer
        refused a ``src`` larger than the index and had no ``scatter_add`` / ``scatter_reduce``."""
        op = _op(node)
        x, axis, index, src = imp.env[node.args[0]], node.args[1], imp.env[node.args[2]], node.args[3]
        reduce = {"scatter_add.default": "sum", "scatter_reduce.two": None}.get(op, "update")
        if reduce is None:
            reduce = src_reduce = node.args[4]
            include_self = node.args[5] if len(node.args) > 5 else node.kwargs.get("include_self", True)
            if not include_self or src_reduce not in _SCATTER_REDUCTIONS or src_reduce == "update":
                raise UnsupportedError(
                    f"TVM backend: scatter_reduce at node {node.name!r} with reduce={src_reduce!r}, "
                    f"include_self={include_self} is not supported (supported: include_self=True with "
                    f"sum, prod, amax, amin)")
        checked = self._checked_index(imp, node, x, index, axis, False)
        if checked is None:
            raise UnsupportedError(
                f"TVM backend: {op} at node {node.name!r} with a {index.ty.dtype} index into "
                f"{x.ty.dtype} data")
        bb = imp.block_builder
        if isinstance(src, fx.Node):
            src = imp.env[src]
            ishape, sshape = list(index.ty.shape.values), list(src.ty.shape.values)
            cut = [d for d, (a, b) in enumerate(zip(ishape, sshape)) if not _same_dim(a, b)]
            if any(not isinstance(ishape[d], tvm.tirx.IntImm) for d in cut):
                raise UnsupportedError(
                    f"TVM backend: {op} at node {node.name!r}: src {src.ty} cut to the index's symbolic "
                    f"shape {index.ty}")
            if cut:
                src = bb.emit(relax.op.strided_slice(src, cut, [0] * len(cut), [ishape[d] for d in cut]))
        else:  # scatter.value: a Python scalar
            src = bb.emit(relax.op.full_like(index, relax.const(src, x.ty.dtype), dtype=x.ty.dtype))
        shape, ishape = list(x.ty.shape.values), list(index.ty.shape.values)
        axis %= len(shape)
        if any(not isinstance(d, tvm.tirx.IntImm) for d in shape[1:]):
            raise UnsupportedError(
                f"TVM backend: {op} at node {node.name!r}: symbolic sizes after the first in {x.ty}")
        terms = [checked if d == axis else _arange_along(bb, ishape[d], d, len(shape)) for d in range(len(shape))]
        self._count("scatter")
        return _flat_scatter(bb, x, terms, ishape, src, _SCATTER_REDUCTIONS[reduce])

    def gather(self, node: fx.Node, imp) -> relax.Var:
        x, axis = imp.env[node.args[0]], node.args[1]
        checked = self._checked_index(imp, node, x, imp.env[node.args[2]], axis, False)
        if checked is None:
            return self._default(imp, "gather.default", node)
        return imp.block_builder.emit(relax.op.gather_elements(x, checked, axis=axis))


_INDEXED_DATA = ("float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64",
                 "bool")
_INDEX_DTYPES = ("int8", "uint8", "int16", "int32", "int64")
# torch's scatter reduction -> Relax scatter_elements reduction ("update": plain scatter;
# scatter_reduce with include_self=True only)
_SCATTER_REDUCTIONS = {"update": "update", "sum": "add", "prod": "mul", "amax": "max", "amin": "min"}


def _arange_along(bb, size, pos: int, rank: int) -> relax.Var:
    """``arange(size)`` (int64) shaped to run along axis ``pos`` of a rank-``rank`` broadcast."""
    idx = bb.emit(relax.op.arange(relax.prim_value(0), relax.prim_value(size), relax.prim_value(1), "int64"))
    return bb.emit(relax.op.reshape(idx, [1] * pos + [size] + [1] * (rank - pos - 1)))


def _flat_scatter(bb, x: relax.Expr, terms: list, shape: list, src: relax.Expr, reduction: str) -> relax.Var:
    """``x`` with ``src`` (broadcast to ``shape``) written at the positions whose coordinate along axis
    ``d`` of ``x`` is ``terms[d]`` (broadcastable to ``shape``), combined by ``reduction``: a 1-D
    ``scatter_elements`` on a flat view of ``x``. Relax ``scatter_elements`` misplaced writes for an
    index smaller than ``x`` on a middle axis, and ``index_put`` failed to legalize symbolic index
    shapes; a flat view has neither problem. The sizes of ``x`` after the first must be static."""
    xshape = list(x.ty.shape.values)
    pos = _flat_position(bb, terms, xshape)
    size = _prod(shape)
    pos = bb.emit(relax.op.reshape(bb.emit(relax.op.broadcast_to(pos, shape)), [size]))
    src = bb.emit(relax.op.reshape(bb.emit(relax.op.broadcast_to(src, shape)), [size]))
    flat = bb.emit(relax.op.scatter_elements(bb.emit(relax.op.reshape(x, [_prod(xshape)])), pos, src, axis=0,
                                             reduction=reduction))
    return bb.emit(relax.op.reshape(flat, xshape))


def _flat_position(bb, coords: list, sizes: list) -> relax.Var:
    """``sum(coords[d] * stride[d])``: the row-major position of coordinates (int64, broadcastable to
    each other) over dimensions of ``sizes`` (static except possibly the first)."""
    pos = None
    for coord, stride in zip(coords, _strides(sizes)):
        if stride != 1:
            coord = bb.emit(relax.op.multiply(coord, relax.const(stride, "int64")))
        pos = coord if pos is None else bb.emit(relax.op.add(pos, coord))
    return pos


def _strides(sizes: list) -> list[int]:
    """Row-major strides of an index over ``sizes`` (static except possibly the first)."""
    out, step = [], 1
    for size in reversed(sizes[1:]):
        out.append(step)
        step *= int(size)
    return [step] + out[::-1]


def _same_dim(a, b) -> bool:
    """Two shape dimensions known equal: the same static size, or the same symbol."""
    if isinstance(a, tvm.tirx.IntImm) and isinstance(b, tvm.tirx.IntImm):
        return int(a) == int(b)
    return a.same_as(b)


def _broadcast_dims(shapes: list[list]) -> list | None:
    """Broadcast of shape dimension lists as torch broadcasts; ``None`` where a symbolic dimension
    meets anything but 1 or the same symbol."""
    rank = max(len(s) for s in shapes)
    out = []
    for pos in range(rank):
        dims = [s[pos - rank + len(s)] for s in shapes if pos - rank + len(s) >= 0]
        static = {int(d) for d in dims if isinstance(d, tvm.tirx.IntImm)} - {1}
        symbolic = [d for d in dims if not isinstance(d, tvm.tirx.IntImm)]
        if symbolic:
            if static or any(not d.same_as(symbolic[0]) for d in symbolic):
                return None
            out.append(symbolic[0])
        elif len(static) > 1:
            return None
        else:
            out.append(tvm.tirx.IntImm("int64", static.pop() if static else 1))
    return out

"""Schedules for the dense operators that Relax legalizes to TIR (everything except ``linear``).

``linear`` layers with constant weights never reach this module: the frontend lowers them to our packed
dense kernel (:func:`.kernels.dense_kernel`). What is left -- attention matmuls between activations,
softmax, pooling, elementwise chains fused by ``FuseOps``, and the convolutions / norms the frontend's
kernels refuse -- is scheduled here:

1. dlight's CPU ``GEMV`` and ``Reduction`` rules (softmax, LayerNorm, RMSNorm: parallel rows,
   vectorised injective stages);
2. :class:`LoopNest`, our rule for every other function, block by block: the leading spatial loops are
   fused and run in parallel; an injective block vectorises its innermost loop; a reduction block whose
   innermost spatial loop has a static extent that is a multiple of the vector width (matmul, conv over
   output channels / width) gets that loop split and moved *inside* the reduction, so the reduction
   accumulates a register vector instead of a scalar.

A block the rule cannot transform is left as legalized (correct, just slower); nothing is guessed.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, te, tirx, topi
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

VECTOR = 8  # float32 lanes of an AVX2 register
MIN_PARALLEL_ITERS = 1 << 16
# bool / int8 stores do not vectorise cleanly in TVM's LLVM codegen (int8xN vs bool buffers)
_VECTOR_DTYPES = ("float32", "float64", "int32", "int64")


def _static(sch: s_tir.Schedule, loop) -> int | None:
    extent = get_extent(sch, loop)
    return extent if isinstance(extent, int) else None


class LoopNest(CPUScheduleRule):
    """Parallel outer loops and vectorised inner loops for any function dlight's rules did not take.

    ``parallel=False`` (models lowered for one thread) only vectorises.
    """

    def __init__(self, parallel: bool = True):
        super().__init__()
        self.parallel = parallel

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        n_blocks = len(infos)
        infos = dlight.try_inline(sch, infos)  # elementwise producers into their consumers
        changed = len(infos) != n_blocks
        for info in infos:
            try:
                changed |= self._schedule_block(sch, info, self.parallel)
            except (s_tir.ScheduleError, tvm.error.InternalError):
                continue  # keep this block as legalized; the others are still scheduled
        return sch if changed else None

    @staticmethod
    def _schedule_block(sch: s_tir.Schedule, info, allow_parallel: bool) -> bool:
        kinds = info.dom_kind()
        loops = sch.get_loops(info.block_rv)
        if len(loops) != len(kinds) or not loops:
            return False
        n_s = len(kinds) - len(kinds.lstrip("S"))
        work = 1
        for loop in loops:
            work *= _static(sch, loop) or 1  # symbolic (batch) extents count as 1
        # a parallel launch costs ~12 us even on one thread: not worth it for small loop nests
        use = allow_parallel and work >= MIN_PARALLEL_ITERS
        parallel = sch.parallel if use else (lambda _loop: None)
        block = sch.get(info.block_rv)
        vectorizable = all(str(w.source.dtype) in _VECTOR_DTYPES for w in block.writes)
        if "R" not in kinds:
            inner = loops[-1]
            extent = _static(sch, inner)
            outer = loops[:-1]
            if vectorizable and extent is not None and extent >= VECTOR and extent % VECTOR == 0:
                if extent > VECTOR:
                    o, inner = sch.split(inner, factors=[None, VECTOR])
                    outer = [*outer, o]
                sch.vectorize(inner)
            if outer:
                parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
            return True
        if n_s == 0 or kinds[n_s:].strip("R"):
            return False  # reduction without leading spatial loops, or interleaved S/R
        spatial, reduce = loops[:n_s], loops[n_s:]
        last = spatial[-1]
        extent = _static(sch, last)
        if vectorizable and extent is not None and extent % VECTOR == 0 and n_s >= 2:
            o, v = sch.split(last, factors=[None, VECTOR])
            sch.reorder(*spatial[:-1], o, *reduce, v)
            init = sch.decompose_reduction(info.block_rv, o)
            # a loop carrying a reduction block cannot be T.vectorized; unrolled, its VECTOR
            # contiguous FMAs are packed into one vector FMA by LLVM's SLP vectoriser
            sch.unroll(v)
            init_loops = sch.get_loops(init)
            if _static(sch, init_loops[-1]) == VECTOR:
                sch.vectorize(init_loops[-1])
            outer = spatial[:-1]
        else:
            outer = spatial
        if len(outer) > 1:
            parallel(sch.fuse(*outer))
        elif outer:
            parallel(outer[0])
        return True


def _gelu(bb, call):
    """Exact (erf) GELU with TVM's vectorisable rational ``fast_erf`` (abs. error ~1e-7) instead
    of a scalar libm ``erf`` call per element (the default legalization; 5x slower here)."""
    approximate = call.attrs.approximate if hasattr(call.attrs, "approximate") else "none"
    if approximate == "tanh":
        return None  # keep the default legalization

    def gelu(x):
        half = tvm.tirx.const(0.5, x.dtype)
        return x * half * (tvm.tirx.const(1.0, x.dtype)
                           + topi.fast_erf(x * tvm.tirx.const(0.7071067811865476, x.dtype)))

    if call.args[0].ty.dtype != "float32":
        return None
    return bb.call_te(gelu, call.args[0], primfunc_name_hint="gelu")


# x ** n for these constant exponents: multiplies / sqrt (torch's CPU pow special-cases them too)
_POWERS = {1.0: lambda x, one: x, 2.0: lambda x, one: x * x, 3.0: lambda x, one: x * x * x,
           4.0: lambda x, one: (x * x) * (x * x), 0.5: lambda x, one: tirx.sqrt(x),
           -0.5: lambda x, one: tirx.rsqrt(x), -1.0: lambda x, one: one / x,
           -2.0: lambda x, one: one / (x * x)}


def _scalar_exponent(expr) -> tuple[float, int] | None:
    """``(value, ndim)`` of a one-element float constant, else ``None``."""
    data = getattr(expr, "value", None) if isinstance(expr, tvm.ir.expr.Constant) else None
    if data is None or not hasattr(data, "numpy"):
        return None
    value = data.numpy()
    if value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(())), value.ndim


def _power(bb, call):
    """``x ** c`` for a constant ``c`` in :data:`_POWERS` (GPT-2's tanh-GELU cubes its input):
    multiplies, ``sqrt`` or a reciprocal instead of a scalar libm ``powf`` call per element, which
    LLVM cannot vectorise (the zoo's hf_gpt2 GELU on [32, 256]: ~85 us, ~6 us without ``powf``).
    Other exponents, non-float inputs and exponents that would broadcast ``x`` keep the default."""
    x, exponent = call.args
    ty = x.ty
    c = _scalar_exponent(exponent)
    if (c is None or c[0] not in _POWERS or not isinstance(ty, relax.TensorType)
            or ty.dtype not in ("float32", "float64") or exponent.ty.dtype != ty.dtype
            or c[1] > ty.ndim):
        return tvm.ir.Op.get("relax.power").get_attr("FLegalize")(bb, call)  # the default
    fn = _POWERS[c[0]]
    return bb.call_te(lambda t: te.compute(t.shape, lambda *i: fn(t(*i), tirx.const(1.0, t.dtype)),
                                           name="T_power"), x,
                      primfunc_name_hint="power")


def legalize_passes() -> list:
    """CPU legalization (as ``relax.backend.cpu_generic``), with our GELU and ``power`` rules."""
    return [
        relax.transform.LegalizeOps(customize_legalize_map={"relax.nn.gelu": _gelu,
                                                            "relax.power": _power}),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


class Serial(CPUScheduleRule):
    """Runs a dlight rule with ``Schedule.parallel`` as a no-op (for models lowered for one thread).

    dlight's CPU ``Reduction`` / ``GEMV`` always parallelise their outer loop; a parallel launch costs
    ~12 us even on one thread, more than a small op itself (ResNet's global average pool: 22 us
    parallel, ~1 us serial). The rules take no option for it, so the primitive is disabled while the
    wrapped rule runs (compilation is single-threaded Python; the original is always restored).
    """

    def __init__(self, rule: CPUScheduleRule):
        super().__init__()
        self.rule = rule

    def apply(self, func, target: Target, tunable: bool):
        original = s_tir.Schedule.parallel
        s_tir.Schedule.parallel = lambda _self, _loop: None
        try:
            return self.rule.apply(func, target, tunable)
        finally:
            s_tir.Schedule.parallel = original


class Tolerant(CPUScheduleRule):
    """Runs a dlight rule, treating its ``AssertionError`` as "does not apply" (the next rule is tried).

    dlight's GEMV analysis asserts on some functions it matched (``logsumexp``'s fused max / subtract /
    exp / sum, ``cosine_similarity``): the whole build failed. The rule schedules a copy, so a failed
    attempt leaves ``func`` as it was.
    """

    def __init__(self, rule: CPUScheduleRule):
        super().__init__()
        self.rule = rule

    def apply(self, func, target: Target, tunable: bool):
        try:
            return self.rule.apply(func, target, tunable)
        except AssertionError:
            return None


def schedule_pass(parallel: bool = True) -> tvm.transform.Pass:
    """dlight CPU rules then :class:`LoopNest`; functions marked ``tirx.is_scheduled`` are skipped.

    ``parallel=False``: no parallel loop anywhere (dlight's rules wrapped in :class:`Serial`).
    """
    rules = [dlight.cpu.GEMV(), dlight.cpu.Reduction()]
    if not parallel:
        rules = [Serial(rule) for rule in rules]
    rules = [Tolerant(rule) for rule in rules]
    return dlight.ApplyDefaultSchedule(*rules, LoopNest(parallel))

"""Convolution kernels: direct (1-D/2-D/3-D, grouped), pointwise (1x1) and depthwise, with fused activations."""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder

from .common import BATCH_VEC, by_work, _parallel_threshold, _scheduled


# --------------------------------------------------------------------------- convolutions
# Direct convolution: outputs per vector (output channels) and output-width positions per register
# tile; see conv_tile() for the choice (measured on the zoo's layers, 1 thread).
CONV_NB = 8
CONV_TW = 8
# Pointwise (1x1) convolution: output channels x positions per register tile. 6x16 measured best of
# 4x16 / 6x16 / 3x32 / 8x8 on the zoo's 1x1 layers (e.g. 84->48 at 32x32: 61 vs 45 / 28 / 32 GF/s).
POINTWISE_MB = 6
POINTWISE_PB = 16
# depthwise rows with a stride up to this are computed at every input column, then subsampled
# (:func:`depthwise_conv_kernel`)
DW_WIDE_MAX_STRIDE = 4


ACTIVATIONS = ("relu", "hardswish", "hardsigmoid")


def activation(act: str | None, x, dtype: str = "float32"):
    """``x`` through a fused activation (evaluated while a kernel is parsed): ``relu``,
    ``hardswish`` ``x * clamp(x + 3, 0, 6) / 6`` or ``hardsigmoid`` ``clamp(x + 3, 0, 6) / 6``, in
    torch's decomposition's operation order (same rounding); ``None``: ``x`` itself."""
    if act is None:
        return x
    zero, three, six = (tirx.const(v, dtype) for v in (0, 3, 6))
    if act == "relu":
        return tirx.max(x, zero)
    gate = tirx.min(tirx.max(x + three, zero), six)
    if act == "hardswish":
        return x * gate / six
    if act == "hardsigmoid":
        return gate / six
    raise ValueError(f"unknown fused activation {act!r}; expected one of {ACTIVATIONS}")


def conv_tile(ocg: int, groups: int, ow: int, avx512: bool = False) -> tuple[int, int]:
    """``(NB, TW)`` for :func:`conv_kernel`: channels per vector and width positions per tile.

    8 channels x 8 positions when the output row is at least 8 wide (16->16 3x3 at 32x32: 76 GF/s vs
    50 for 16x4); narrower rows (the late, small stages) take 16 channels x up to 4 positions (1x1
    128->512 at 4x4: 84 vs 48 GF/s). A grouped conv's vector must stay inside one group (8, else 4).
    With AVX-512 (``avx512``) a 16-channel vector is one register: 16 channels x up to 8 positions
    wherever 16 channels fit (the zoo's ResNet on an AVX-512 Xeon: 0.197 -> 0.135 ms, 1 thread), and
    for 9-15 channels, which 8-channel vectors pad to 16 as well (DenseNet's growth-12 3x3 convs:
    the whole model 1.79 -> 1.27 ms).
    """
    if groups > 1 and ocg % 8:
        return 4, min(ow, 8)
    if (ow < 8 or avx512) and (groups == 1 or ocg % 16 == 0) and (ocg >= 16 or avx512 and ocg > 8):
        return 16, min(ow, 8 if avx512 else 4)
    return 8, min(ow, 8)


def pointwise_tile(positions: int, avx512: bool = False) -> tuple[int, int]:
    """``(MB, PB)`` for :func:`pointwise_conv_kernel`: output channels x positions per tile.

    AVX2: 6 x 16 (12 accumulator vectors). With AVX-512 a 16-position row is one register, and 6 x 16
    kept only 6 in flight: 6 x 32 where a row has 32 positions or more, else 12 x 16. Batch 2, one
    thread, on an AVX-512 Xeon: 84->48 at 32x32 105 -> 82 us, 16->64 at 16x16 5.9 -> 5.7 us, 40->120
    at 4x4 2.1 -> 1.7 us, 120->32 at 1x1 1.06 -> 0.62 us; the zoo MobileNet's 18 1x1 layers ~36 ->
    ~31 us (6 x 32 everywhere: 8 % slower on the 4x4 layers; 8 x 16: between the two)."""
    if not avx512:
        return POINTWISE_MB, POINTWISE_PB
    return (6, 32) if positions >= 32 else (12, 16)


def conv_out_size(padded: int, k: int, s: int, d: int) -> int:
    """Output extent of a convolution over an already padded input extent."""
    return (padded - d * (k - 1) - 1) // s + 1


def _views(dtype: str, N, **args: tuple) -> list:
    """A kernel's array arguments ``name=(handle, dims, view_dims, view_name)``: each matched with its own
    rank (``[N, *dims]``, so the caller needs no reshape), then viewed as ``[N, *view_dims]``; the views, in
    order, each named as ``view_name = T.decl_buffer(...)`` in the kernel's text would name it."""
    matched = []
    for name, (handle, dims, view_dims, view_name) in args.items():
        buf = T.match_buffer(handle, (N, *dims), dtype)
        IRBuilder.name(name, buf)
        matched.append((buf, view_dims, view_name))
    views = []
    for buf, view_dims, view_name in matched:
        view = T.decl_buffer((N, *view_dims), dtype, data=buf.data)
        IRBuilder.name(view_name, view)
        views.append(view)
    return views


def conv_kernel(IC: int, IS: tuple, OC: int, KS: tuple, S: tuple, D: tuple, G: int,
                NB: int = CONV_NB, TW: int = CONV_TW, dtype: str = "float32", act: str | None = None,
                x_dims: tuple | None = None, y_dims: tuple | None = None, parallel: bool = True,
                residual: bool = False):
    """Direct ``N``-batch convolution on an NCDHW input that is already padded.

    ``X [N, IC, DP, HP, WP]`` (``IS = (DP, HP, WP)``), weights packed ``[OCP/NB, IC/G, KD, KH, KW, NB]``
    (``OCP`` = ``OC`` rounded up to ``NB``; padded outputs have zero weights and are not stored), bias
    ``[OCP]``, output ``Y [N, OC, OD, OH, OW]``. Register tile: ``TW`` consecutive output-width
    positions x ``NB`` output channels (one ``NB``-wide vector FMA per position and reduction step, the
    weight vector loaded once per step and the input broadcast); the reduction runs over ``IC/G x KD x
    KH x KW``. Groups need ``OC/G % NB == 0`` (a vector never straddles two groups); ``act`` is an
    activation fused into the store (:func:`activation`). 1-D and 2-D convolutions use ``DP = KD = 1``;
    ``x_dims`` / ``y_dims`` (dims after ``N``) give the argument buffers their own rank (the kernel
    views them as 5-D), so the caller needs no reshape. (image, vector block) pairs run in parallel
    above :data:`MIN_PARALLEL_FLOPS`, as the dense kernel. ``residual``: the function takes one more
    input shaped like ``Y`` that is added before the activation (a fused ``conv + x`` skip
    connection; arguments ``x, w, bias, residual, y``).
    """
    DP, HP, WP = IS
    KD, KH, KW = KS
    sd, sh, sw = S
    dd, dh, dw = D
    OD, OH, OW = (conv_out_size(p, k, s, d) for p, k, s, d in zip(IS, KS, S, D))
    ICG, OCG = IC // G, OC // G
    if G > 1 and OCG % NB:
        raise ValueError(f"grouped convolution needs out_channels/groups % {NB} == 0, got {OCG}")
    OCP = -(-OC // NB) * NB
    OCB = OCP // NB
    BPG = OCB if G == 1 else OCG // NB  # vector blocks per group
    xv, yv = (IC, DP, HP, WP), (OC, OD, OH, OW)  # the kernel's view of the arguments
    xd, yd = x_dims or xv, y_dims or yv
    full = OW // TW
    R = OW - full * TW  # static remainder tile
    RR = max(R, 1)
    flops_per_image = 2 * OCP * OD * OH * OW * ICG * KD * KH * KW
    threshold = _parallel_threshold(parallel)

    @T.macro
    def tile(X, w, bias, Rs, Y, n, ocb, od, oh, ow0, width, acc):
        for t in T.unroll(width):
            for v in T.vectorized(NB):
                acc[t, v] = bias[ocb * NB + v]
        for ic, kd, kh, kw in T.grid(ICG, KD, KH, KW):
            for t in T.unroll(width):
                for v in T.vectorized(NB):
                    acc[t, v] = acc[t, v] + X[
                        n, ocb // BPG * ICG + ic, od * sd + kd * dd, oh * sh + kh * dh,
                        (ow0 + t) * sw + kw * dw] * w[ocb, ic, kd, kh, kw, v]
        for t in T.unroll(width):
            for v in T.unroll(NB):
                if ocb * NB + v < OC:
                    if residual:
                        Y[n, ocb * NB + v, od, oh, ow0 + t] = activation(
                            act, acc[t, v] + Rs[n, ocb * NB + v, od, oh, ow0 + t], dtype)
                    else:
                        Y[n, ocb * NB + v, od, oh, ow0 + t] = activation(act, acc[t, v], dtype)

    @T.macro
    def block(X, w, bias, Rs, Y, n, ocb, acc, acc1, in_task):
        for od, oh in T.grid(OD, OH):
            for owo in range(full):
                tile(X, w, bias, Rs, Y, n, ocb, od, oh, owo * TW, TW, acc)
            if R > 0:
                tile(X, w, bias, Rs, Y, n, ocb, od, oh, full * TW, R, acc1)

    blocks = by_work(threshold, {"acc": ((TW, NB), dtype), "acc1": ((RR, NB), dtype)}, block, ("n", "ocb"))

    @T.prim_func(private=True)
    def conv(x_h: T.handle, w: T.Buffer((OCB, ICG, KD, KH, KW, NB), dtype),
             bias: T.Buffer((OCP,), dtype), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        N = T.int64()
        X, Y = T.meta_var(_views(dtype, N, Xa=(x_h, xd, xv, "X"), Ya=(y_h, yd, yv, "Y")))
        blocks(N * flops_per_image, (N, OCB), (X, w, bias, Y, Y))

    @T.prim_func(private=True)
    def conv_residual(x_h: T.handle, w: T.Buffer((OCB, ICG, KD, KH, KW, NB), dtype),
                      bias: T.Buffer((OCP,), dtype), r_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        N = T.int64()
        X, Rs, Y = T.meta_var(_views(dtype, N, Xa=(x_h, xd, xv, "X"), Ra=(r_h, yd, yv, "Rs"), Ya=(y_h, yd, yv, "Y")))
        blocks(N * flops_per_image, (N, OCB), (X, w, bias, Rs, Y))

    return _scheduled(conv_residual if residual else conv)


def pointwise_conv_kernel(IC: int, P: int, OC: int, MB: int = POINTWISE_MB, PB: int = POINTWISE_PB,
                          dtype: str = "float32", act: str | None = None, x_dims: tuple | None = None,
                          y_dims: tuple | None = None, parallel: bool = True,
                          residual: bool = False):
    """1x1, stride-1, ungrouped convolution as ``Y[n] = W @ X[n]`` over ``P`` flattened positions.

    ``X [N, IC, P]``, weights packed ``[OCP/MB, IC, MB]`` (``OCP`` = ``OC`` rounded up to ``MB``), bias
    ``[OCP]``, ``Y [N, OC, P]``. Register tile ``MB`` output channels x ``PB`` positions, vectorised
    over positions: every input load and output store is contiguous in NCHW, and each input row line
    is used whole (the direct kernel's per-channel input rows, 4 KiB apart at 32x32, thrashed L1 sets).
    ``x_dims`` / ``y_dims``: the argument buffers' own dims after ``N`` (viewed as ``[IC, P]``);
    ``residual`` as :func:`conv_kernel`.
    """
    xv, yv = (IC, P), (OC, P)  # the kernel's view of the arguments
    xd, yd = x_dims or xv, y_dims or yv
    OCP = -(-OC // MB) * MB
    OCB = OCP // MB
    flops_per_image = 2 * OCP * P * IC
    threshold = _parallel_threshold(parallel)
    full = P // PB
    R = P - full * PB
    RR = max(R, 1)

    @T.macro
    def tile(X, w, bias, Rs, Y, n, ob, p0, width, acc):
        for m in T.unroll(MB):
            for v in T.vectorized(width):
                acc[m, v] = bias[ob * MB + m]
        for ic in range(IC):
            for m in T.unroll(MB):
                for v in T.vectorized(width):
                    acc[m, v] = acc[m, v] + w[ob, ic, m] * X[n, ic, p0 + v]
        for m in T.unroll(MB):
            if ob * MB + m < OC:
                for v in T.vectorized(width):
                    if residual:
                        Y[n, ob * MB + m, p0 + v] = activation(
                            act, acc[m, v] + Rs[n, ob * MB + m, p0 + v], dtype)
                    else:
                        Y[n, ob * MB + m, p0 + v] = activation(act, acc[m, v], dtype)

    @T.macro
    def block(X, w, bias, Rs, Y, n, ob, acc, acc1, in_task):
        for po in range(full):
            tile(X, w, bias, Rs, Y, n, ob, po * PB, PB, acc)
        if R > 0:
            tile(X, w, bias, Rs, Y, n, ob, full * PB, R, acc1)

    blocks = by_work(threshold, {"acc": ((MB, PB), dtype), "acc1": ((MB, RR), dtype)}, block, ("n", "ob"))

    @T.prim_func(private=True)
    def conv1x1(x_h: T.handle, w: T.Buffer((OCB, IC, MB), dtype), bias: T.Buffer((OCP,), dtype),
                y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        N = T.int64()
        X, Y = T.meta_var(_views(dtype, N, Xa=(x_h, xd, xv, "X"), Ya=(y_h, yd, yv, "Y")))
        blocks(N * flops_per_image, (N, OCB), (X, w, bias, Y, Y))

    @T.prim_func(private=True)
    def conv1x1_residual(x_h: T.handle, w: T.Buffer((OCB, IC, MB), dtype),
                         bias: T.Buffer((OCP,), dtype), r_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        N = T.int64()
        X, Rs, Y = T.meta_var(_views(dtype, N, Xa=(x_h, xd, xv, "X"), Ra=(r_h, yd, yv, "Rs"), Ya=(y_h, yd, yv, "Y")))
        blocks(N * flops_per_image, (N, OCB), (X, w, bias, Rs, Y))

    return _scheduled(conv1x1_residual if residual else conv1x1)


def depthwise_conv_kernel(IC: int, IS: tuple, OC: int, KS: tuple, S: tuple, D: tuple,
                          V: int = BATCH_VEC, dtype: str = "float32", act: str | None = None,
                          x_dims: tuple | None = None, y_dims: tuple | None = None,
                          parallel: bool = True):
    """Depthwise convolution (``groups == IC``, ``OC = IC * multiplier``) on a padded NCDHW input.

    ``X [N, IC, DP, HP, WP]``, weights ``[OC, KD, KH, KW]``, bias ``[OC]``, ``Y [N, OC, OD, OH, OW]``;
    output channel ``o`` reads input channel ``o // multiplier``. Each output row is computed in
    ``V``-wide vectors along the width (a static remainder vector for the rest): one broadcast weight
    FMA per tap. The generic schedule ran these per element; with few taps per output there is no
    reduction worth vectorising, only the row. ``x_dims`` / ``y_dims`` as :func:`conv_kernel`.

    A strided row (width stride ``sw`` <= :data:`DW_WIDE_MAX_STRIDE`) is computed at every input
    column in between, on contiguous vectors, and every ``sw``-th lane is stored: ``sw`` times the
    FMAs, but a strided vector of ``x`` was 8 scalar loads per tap. Stride 2, batch 2 / 1, one
    thread: 64 ch 16x16 k3 15.8 -> 4.0 us, 96 ch 8x8 k5 14.3 -> 6.4 us, 144 ch 28x28 k3 53 -> 19 us,
    32 ch 112x112 k3 193 -> 68 us; stride 3: 0.89 -> 0.60 us. Also tried for MobileNet's small planes:
    16-channel vectors over a channel-last copy of each block of planes (the two transposes cost more
    than the scalar loads: 1.2-7x the time), and stride-1 planes as one flat vector over padded rows
    (0.85-2.3x the time); copying each plane into a zero-bordered buffer inside the kernel instead
    of the separate pad operator (the whole MobileNet: 0.13 -> 0.15 ms).
    """
    DP, HP, WP = IS
    KD, KH, KW = KS
    sd, sh, sw = S
    dd, dh, dw = D
    OD, OH, OW = (conv_out_size(p, k, s, d) for p, k, s, d in zip(IS, KS, S, D))
    M = OC // IC
    full, R = OW // V, OW % V
    xv, yv = (IC, DP, HP, WP), (OC, OD, OH, OW)  # the kernel's view of the arguments
    xd, yd = x_dims or xv, y_dims or yv
    flops_per_image = 2 * OC * OD * OH * OW * KD * KH * KW
    threshold = _parallel_threshold(parallel)

    @T.macro
    def row(X, w, bias, Y, n, oc, od, oh, ow0, width, acc):
        for v in T.vectorized(width):
            acc[v] = bias[oc]
        for kd, kh, kw in T.grid(KD, KH, KW):
            for v in T.vectorized(width):
                acc[v] = acc[v] + X[n, oc // M, od * sd + kd * dd, oh * sh + kh * dh,
                                    (ow0 + v) * sw + kw * dw] * w[oc, kd, kh, kw]
        for v in T.vectorized(width):
            Y[n, oc, od, oh, ow0 + v] = activation(act, acc[v], dtype)

    def lanes(width: int) -> int:
        return (width - 1) * sw + 1

    @T.macro
    def row_wide(X, w, bias, Y, n, oc, od, oh, ow0, width, acc):
        # strided rows: every input column in between too, contiguous vectors, then every sw-th
        for v in T.vectorized(lanes(width)):
            acc[v] = bias[oc]
        for kd, kh, kw in T.grid(KD, KH, KW):
            for v in T.vectorized(lanes(width)):
                acc[v] = acc[v] + X[n, oc // M, od * sd + kd * dd, oh * sh + kh * dh,
                                    ow0 * sw + v + kw * dw] * w[oc, kd, kh, kw]
        for v in T.vectorized(width):
            Y[n, oc, od, oh, ow0 + v] = activation(act, acc[v * sw], dtype)

    body = row_wide if 1 < sw <= DW_WIDE_MAX_STRIDE else row

    @T.macro
    def plane(X, w, bias, Y, n, oc, acc, in_task):
        for od, oh in T.grid(OD, OH):
            for owo in range(full):
                body(X, w, bias, Y, n, oc, od, oh, owo * V, V, acc)
            if R > 0:
                body(X, w, bias, Y, n, oc, od, oh, full * V, R, acc)

    planes = by_work(threshold, {"acc": ((V * sw,), dtype)}, plane, ("n", "oc"))

    @T.prim_func(private=True)
    def depthwise(x_h: T.handle, w: T.Buffer((OC, KD, KH, KW), dtype), bias: T.Buffer((OC,), dtype),
                  y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        N = T.int64()
        X, Y = T.meta_var(_views(dtype, N, Xa=(x_h, xd, xv, "X"), Ya=(y_h, yd, yv, "Y")))
        planes(N * flops_per_image, (N, OC), (X, w, bias, Y))

    return _scheduled(depthwise)
